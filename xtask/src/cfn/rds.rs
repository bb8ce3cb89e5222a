//! The database: RDS PostgreSQL, reachable only from the worker tasks, its master credentials
//! generated in Secrets Manager, the master `DATABASE_URL` secret (for `orderfleet migrate`),
//! and per worker a generated password for its role and the `DATABASE_URL` it connects with.

use serde_json::json;

use super::{r, resource, resource_on_removal, sub, tags, Handler, Resources};

/// Name of the database created on the RDS instance.
const DATABASE_NAME: &str = "orderfleet";
/// PostgreSQL's port: the instance keeps the engine's default (it sets no `Port`), which the
/// database's ingress and the tasks' egress open.
pub(super) const POSTGRES_PORT: u16 = 5432;

pub(super) fn shared(res: &mut Resources) {
    network(res);
    master_secret(res);
    instance(res);
    database_url_secret(res);
}

/// The worker's own database login: a generated password for its role `orderfleet_<handler>`
/// (migration 0015), which the task's `migrate` container sets (`orderfleet migrate
/// --login-for`), and the `DATABASE_URL` the worker connects with as that role.
pub(super) fn worker_login(res: &mut Resources, h: &Handler) {
    res.add(
        h.id("DbPasswordSecret"),
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Delete",
            json!({
                "Description": format!("Password of the {} worker's database role", h.name),
                "GenerateSecretString": {
                    "PasswordLength": 32,
                    // Alphanumeric only, so the password can sit in a URL unescaped.
                    "ExcludePunctuation": true
                },
                "Tags": tags(h.name)
            }),
        ),
    );
    let url = format!(
        "postgres://orderfleet_{}:{{{{resolve:secretsmanager:${{{}}}}}}}@${{Db.Endpoint.Address}}:${{Db.Endpoint.Port}}/{DATABASE_NAME}?sslmode=require",
        h.name,
        h.id("DbPasswordSecret")
    );
    res.add(
        h.id("DatabaseUrlSecret"),
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Delete",
            json!({
                "Description": format!("DATABASE_URL of the {} worker: its own role", h.name),
                "SecretString": sub(&url),
                "Tags": tags(h.name)
            }),
        ),
    );
}

/// The database's security group (PostgreSQL from the tasks only) and subnet group.
fn network(res: &mut Resources) {
    res.add(
        "DbSecurityGroup",
        resource(
            "AWS::EC2::SecurityGroup",
            json!({
                "GroupDescription": "orderfleet PostgreSQL: the worker tasks only",
                "VpcId": r("VpcId"),
                "SecurityGroupIngress": [{
                    "IpProtocol": "tcp", "FromPort": POSTGRES_PORT, "ToPort": POSTGRES_PORT,
                    "SourceSecurityGroupId": r("TaskSecurityGroup"),
                    "Description": "PostgreSQL from the worker tasks"
                }],
                "Tags": tags("database")
            }),
        ),
    );
    res.add(
        "DbSubnetGroup",
        resource(
            "AWS::RDS::DBSubnetGroup",
            json!({
                "DBSubnetGroupDescription": "orderfleet PostgreSQL subnets",
                "SubnetIds": r("SubnetIds"),
                "Tags": tags("database")
            }),
        ),
    );
}

/// The generated master credentials, attached to the instance.
fn master_secret(res: &mut Resources) {
    res.add(
        "DbMasterSecret",
        // Kept with the final snapshot, whose master password it holds.
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Retain",
            json!({
                "Description": "orderfleet RDS master credentials",
                "GenerateSecretString": {
                    "SecretStringTemplate": "{\"username\":\"orderfleet\"}",
                    "GenerateStringKey": "password",
                    "PasswordLength": 32,
                    // Alphanumeric only, so the password can sit in a URL unescaped.
                    "ExcludePunctuation": true
                },
                "Tags": tags("database")
            }),
        ),
    );
    res.add(
        "DbMasterSecretAttachment",
        resource(
            "AWS::SecretsManager::SecretTargetAttachment",
            json!({"SecretId": r("DbMasterSecret"), "TargetId": r("Db"), "TargetType": "AWS::RDS::DBInstance"}),
        ),
    );
}

/// A dynamic reference to `key` of the master secret, for use inside `Fn::Sub`.
fn master(key: &str) -> String {
    format!("{{{{resolve:secretsmanager:${{DbMasterSecret}}:SecretString:{key}}}}}")
}

/// PostgreSQL 17 with TLS enforced (`DbForceSsl`), snapshotted when removed. Its planner costs
/// a random page read at 1.1, not 4: the fleet looks rows up by key in tables whose hot part is
/// in memory on SSD-backed storage, and at 4 PostgreSQL scans tables of a few thousand rows
/// whole where an index finds the row (docs/deploy.md).
fn instance(res: &mut Resources) {
    res.add(
        "DbParameterGroup",
        resource(
            "AWS::RDS::DBParameterGroup",
            json!({
                "Description": "orderfleet PostgreSQL 17",
                "Family": "postgres17",
                "Parameters": {"rds.force_ssl": r("DbForceSsl"), "random_page_cost": "1.1"},
                "Tags": tags("database")
            }),
        ),
    );
    res.add(
        "Db",
        resource_on_removal(
            "AWS::RDS::DBInstance",
            "Snapshot",
            json!({
                "Engine": "postgres",
                "EngineVersion": "17.6",
                "DBInstanceClass": r("DbInstanceClass"),
                "AllocatedStorage": r("DbAllocatedStorageGiB"),
                "StorageType": "gp3",
                "StorageEncrypted": true,
                "DBName": DATABASE_NAME,
                "MasterUsername": sub(&master("username")),
                "MasterUserPassword": sub(&master("password")),
                "DBSubnetGroupName": r("DbSubnetGroup"),
                "DBParameterGroupName": r("DbParameterGroup"),
                "VPCSecurityGroups": [r("DbSecurityGroup")],
                "MultiAZ": r("DbMultiAz"),
                "PubliclyAccessible": false,
                "BackupRetentionPeriod": 7,
                "DeletionProtection": true,
                "CopyTagsToSnapshot": true,
                "AutoMinorVersionUpgrade": true,
                "Tags": tags("database")
            }),
        ),
    );
}

/// What the workers read as `DATABASE_URL`, composed from the master secret at deploy time.
fn database_url_secret(res: &mut Resources) {
    let url = format!(
        "postgres://{}:{}@${{Db.Endpoint.Address}}:${{Db.Endpoint.Port}}/{DATABASE_NAME}?sslmode=require",
        master("username"),
        master("password")
    );
    res.add(
        "DatabaseUrlSecret",
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Delete",
            json!({
                "Description": "The master DATABASE_URL: for `orderfleet migrate`, never a worker",
                "SecretString": sub(&url),
                "Tags": tags("database")
            }),
        ),
    );
}
