//! The workers on ECS Fargate: the cluster, their log group, their security group (outbound
//! HTTPS and PostgreSQL only), the execution role, and per handler a task role reaching only
//! what the handler needs, a task definition (a `migrate` container, then the worker) and a
//! service.

use orderfleet::domain::catalogue::{EventSpec, Producer, EVENTS, OPERATOR_RELAY, OPERATOR_SOURCE};
use orderfleet::domain::names::HandlerName;
use serde_json::{json, Value};

use super::rds::POSTGRES_PORT;
use super::{att, r, resource, resource_on_removal, sub, tags, Handler, Resources, PREFIX};

/// `ORDERFLEET_SHUTDOWN_GRACE_SECS` given to every ECS task: what running handlers get to finish
/// after SIGTERM (the worker's default).
const SHUTDOWN_GRACE_SECS: u32 = 25;
/// `ORDERFLEET_WAIT_TIME_SECS` of every ECS task: the long poll, which a stop lets run to its end.
const WAIT_TIME_SECS: u32 = 20;
/// ECS `stopTimeout` (SIGKILL follows SIGTERM after this long), also given to the worker as
/// `ORDERFLEET_STOP_TIMEOUT_SECS`: the worker refuses to start unless the wait time, 5 s of
/// receive slack, the grace and 5 s to flush (55 s) fit inside it. ECS allows up to 120 s.
const STOP_TIMEOUT_SECS: u32 = 60;
/// The worker container's health check, run by ECS inside the container.
const HEALTHCHECK_COMMAND: [&str; 3] = ["CMD", "/usr/local/bin/orderfleet-worker", "healthcheck"];

// Environment variables of the handlers' own dependencies. They must match the flags of
// `orderfleet::handlers::DepsArgs`.
const ENV_EMAIL_TRANSPORT: &str = "ORDERFLEET_EMAIL_TRANSPORT";
const ENV_EMAIL_FROM: &str = "ORDERFLEET_EMAIL_FROM";
const ENV_FIREHOSE_STREAM: &str = "ORDERFLEET_FIREHOSE_STREAM";
const ENV_PERSONALIZE_TRACKING_ID: &str = "ORDERFLEET_PERSONALIZE_TRACKING_ID";

/// What all the handlers' tasks share.
pub(super) fn shared(res: &mut Resources) {
    res.add(
        "Cluster",
        resource(
            "AWS::ECS::Cluster",
            json!({
                "ClusterName": sub(PREFIX),
                "ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}],
                "Tags": tags("workers")
            }),
        ),
    );
    res.add(
        "LogGroup",
        resource_on_removal(
            "AWS::Logs::LogGroup",
            "Delete",
            json!({
                "LogGroupName": sub("/${Prefix}/${EnvironmentName}/workers"),
                "RetentionInDays": r("LogRetentionDays"),
                "Tags": tags("workers")
            }),
        ),
    );
    // Giving the group an egress rule of its own replaces EC2's default allow-all one. Every AWS
    // API the tasks call is HTTPS on public endpoints or VPC interface endpoints (the addresses
    // vary, hence 0.0.0.0/0); the Amazon DNS resolver is not filtered by security groups.
    res.add(
        "TaskSecurityGroup",
        resource(
            "AWS::EC2::SecurityGroup",
            json!({
                "GroupDescription": "orderfleet worker tasks: no inbound; outbound HTTPS to the AWS APIs and PostgreSQL to the database",
                "VpcId": r("VpcId"),
                "SecurityGroupEgress": [{
                    "IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "CidrIp": "0.0.0.0/0",
                    "Description": "HTTPS to the AWS APIs: SQS, EventBridge, Firehose, SES, CloudWatch, Secrets Manager, Personalize, ECR"
                }],
                "Tags": tags("workers")
            }),
        ),
    );
    // A rule of its own: inside the group it would reference the database's group, whose
    // ingress references this one, and CloudFormation refuses the cycle.
    res.add(
        "TaskSecurityGroupEgressToDb",
        resource(
            "AWS::EC2::SecurityGroupEgress",
            json!({
                "GroupId": r("TaskSecurityGroup"),
                "IpProtocol": "tcp", "FromPort": POSTGRES_PORT, "ToPort": POSTGRES_PORT,
                "DestinationSecurityGroupId": r("DbSecurityGroup"),
                "Description": "PostgreSQL to the database: the outbox, inbox and business data"
            }),
        ),
    );
    res.add("TaskExecutionRole", execution_role());
}

/// Lets ECS pull the image, write logs and inject `DATABASE_URL`.
fn execution_role() -> Value {
    resource(
        "AWS::IAM::Role",
        json!({
            "Description": "Lets ECS pull the image, write logs and read DATABASE_URL",
            "AssumeRolePolicyDocument": assume_role("ecs-tasks.amazonaws.com"),
            "ManagedPolicyArns": [sub("arn:${AWS::Partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy")],
            "Policies": [{
                "PolicyName": "read-database-url",
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": execution_secrets()}]
                }
            }],
            "Tags": tags("workers")
        }),
    )
}

/// Every secret ECS injects into a task: the master URL (migrate), each worker's password and
/// URL, the lake's key. Only ECS reads them; no task role may.
fn execution_secrets() -> Value {
    let mut ids = vec![r("DatabaseUrlSecret"), r("LakeHashKeySecret")];
    ids.extend(super::deliverability::execution_secrets());
    for (_, parameter, condition) in super::partners::WRITE_BACK_SECRETS {
        ids.push(json!({"Fn::If": [condition, r(parameter), r("AWS::NoValue")]}));
    }
    for handler in HandlerName::ALL {
        let stem = super::logical_id(handler);
        ids.push(r(&format!("{stem}DbPasswordSecret")));
        ids.push(r(&format!("{stem}DatabaseUrlSecret")));
    }
    Value::Array(ids)
}

/// A trust policy for `service`, from ECS in this account and region only.
fn assume_role(service: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": service},
            "Action": "sts:AssumeRole",
            "Condition": {"ArnLike": {"aws:SourceArn": sub("arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:*")}}
        }]
    })
}

/// The handler's task role, task definition and service.
pub(super) fn handler(res: &mut Resources, h: &Handler) {
    super::rds::worker_login(res, h);
    res.add(h.id("TaskRole"), task_role(h));
    res.add(h.id("TaskDefinition"), task_definition(h));
    res.add(h.id("Service"), service(h));
}

fn task_role(h: &Handler) -> Value {
    let description = if published_sources(h.handler).is_empty() {
        format!(
            "The {} worker: its own queue and DLQ and its own dependencies; it publishes no events",
            h.name
        )
    } else {
        format!(
            "The {} worker: its own queue and DLQ, its own events onto the bus, and its own dependencies",
            h.name
        )
    };
    resource(
        "AWS::IAM::Role",
        json!({
            "Description": description,
            "AssumeRolePolicyDocument": assume_role("ecs-tasks.amazonaws.com"),
            "Policies": [{
                "PolicyName": format!("orderfleet-{}", h.name),
                "PolicyDocument": {"Version": "2012-10-17", "Statement": statements(h)}
            }],
            "Tags": tags(h.name)
        }),
    )
}

/// Every handler consumes its queue and dead-letters to its DLQ; one the catalogue lists as a
/// producer publishes to the bus, under its own source only; some reach one dependency of their
/// own.
fn statements(h: &Handler) -> Vec<Value> {
    let mut statements = vec![
        json!({
            "Sid": "ConsumeOwnQueue",
            "Effect": "Allow",
            "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
            "Resource": att(&h.id("Queue"), "Arn")
        }),
        json!({
            "Sid": "DeadLetterToOwnDlq",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
            "Resource": att(&h.id("Dlq"), "Arn")
        }),
    ];
    statements.extend(publish_statement(h.handler));
    statements.extend(dependency_statement(h.handler));
    statements
}

/// The `source` of every event the catalogue says `handler` produces, sorted, without repeats:
/// empty for a handler that only consumes.
fn published_sources(handler: HandlerName) -> Vec<String> {
    let mut sources: Vec<String> = EVENTS
        .iter()
        .filter(|e| e.producer == Producer::Handler(handler))
        .map(EventSpec::source)
        .collect();
    // The orders worker's relay also publishes the support desk's events (the CLI writes them
    // to the outbox and needs no AWS rights).
    if handler == OPERATOR_RELAY {
        sources.push(OPERATOR_SOURCE.to_string());
    }
    sources.sort();
    sources.dedup();
    sources
}

/// PutEvents on the bus for a handler that produces events, held to the sources of those
/// events: a worker's outbox relay publishes only the rows of the handlers it runs, so a task
/// can neither publish another handler's events nor pose as the storefront.
fn publish_statement(handler: HandlerName) -> Option<Value> {
    let sources = published_sources(handler);
    if sources.is_empty() {
        return None;
    }
    Some(json!({
        "Sid": "PublishOwnEventsToBus",
        "Effect": "Allow",
        "Action": "events:PutEvents",
        "Resource": att("Bus", "Arn"),
        "Condition": {"StringEquals": {"events:source": sources}}
    }))
}

/// The access to its own dependency a handler needs, if it has one.
fn dependency_statement(handler: HandlerName) -> Option<Value> {
    match handler {
        HandlerName::Notifications => Some(json!({
            "Sid": "SendCustomerEmail",
            "Effect": "Allow",
            "Action": ["ses:SendEmail", "ses:SendRawEmail"],
            "Resource": [
                sub("arn:${AWS::Partition}:ses:${AWS::Region}:${AWS::AccountId}:identity/${SesIdentity}"),
                super::deliverability::configuration_set_arn()
            ],
            "Condition": {"StringEquals": {"ses:FromAddress": r("EmailFromAddress")}}
        })),
        HandlerName::Analytics => Some(json!({
            "Sid": "ArchiveToLake",
            "Effect": "Allow",
            "Action": "firehose:PutRecordBatch",
            "Resource": att("LakeDeliveryStream", "Arn")
        })),
        // Granted only when the stack is given a tracker.
        HandlerName::Personalization => Some(json!({
            "Fn::If": ["HasPersonalizeTracker", {
                "Sid": "ForwardInteractions",
                "Effect": "Allow",
                "Action": "personalize:PutEvents",
                "Resource": r("PersonalizeEventTrackerArn")
            }, r("AWS::NoValue")]
        })),
        // The platforms are called over HTTPS with their own credentials, not through AWS.
        HandlerName::Orders
        | HandlerName::Inventory
        | HandlerName::Payments
        | HandlerName::Fulfillment
        | HandlerName::Storefront => None,
    }
}

fn env(name: &str, value: Value) -> Value {
    json!({"Name": name, "Value": value})
}

/// The worker container's environment, sorted by name.
fn environment(h: &Handler) -> Vec<Value> {
    let mut environment = vec![
        env("AWS_REGION", r("AWS::Region")),
        env("ORDERFLEET_HANDLERS", json!(h.name)),
        env("ORDERFLEET_LOG_FORMAT", json!("json")),
        // EMF lines on stdout: awslogs carries them to CloudWatch, which extracts the metrics.
        env("ORDERFLEET_METRICS_SINK", json!("emf")),
        env("ORDERFLEET_PREFIX", r("Prefix")),
        env(
            "ORDERFLEET_SHUTDOWN_GRACE_SECS",
            json!(SHUTDOWN_GRACE_SECS.to_string()),
        ),
        env(
            "ORDERFLEET_STOP_TIMEOUT_SECS",
            json!(STOP_TIMEOUT_SECS.to_string()),
        ),
        env(
            "ORDERFLEET_WAIT_TIME_SECS",
            json!(WAIT_TIME_SECS.to_string()),
        ),
    ];
    environment.extend(dependency_environment(h.handler));
    environment.sort_by(|a, b| a["Name"].as_str().cmp(&b["Name"].as_str()));
    environment
}

/// The settings of a handler's own dependency, matching [`dependency_statement`].
fn dependency_environment(handler: HandlerName) -> Vec<Value> {
    match handler {
        HandlerName::Notifications => {
            let mut environment = vec![
                env(ENV_EMAIL_TRANSPORT, json!("ses")),
                env(ENV_EMAIL_FROM, r("EmailFromAddress")),
            ];
            environment.extend(
                super::deliverability::environment()
                    .into_iter()
                    .map(|(name, value)| env(name, value)),
            );
            environment
        }
        HandlerName::Analytics => vec![env(ENV_FIREHOSE_STREAM, r("LakeDeliveryStream"))],
        HandlerName::Personalization => {
            vec![env(ENV_PERSONALIZE_TRACKING_ID, r("PersonalizeTrackingId"))]
        }
        HandlerName::Storefront => super::partners::write_back_environment()
            .into_iter()
            .map(|(name, value)| env(name, value))
            .collect(),
        HandlerName::Orders
        | HandlerName::Inventory
        | HandlerName::Payments
        | HandlerName::Fulfillment => vec![],
    }
}

fn task_definition(h: &Handler) -> Value {
    resource(
        "AWS::ECS::TaskDefinition",
        json!({
            "Family": sub(&h.names.queue_name),
            "RequiresCompatibilities": ["FARGATE"],
            "NetworkMode": "awsvpc",
            "Cpu": r("TaskCpu"),
            "Memory": r("TaskMemory"),
            "RuntimePlatform": {"OperatingSystemFamily": "LINUX", "CpuArchitecture": r("CpuArchitecture")},
            "ExecutionRoleArn": att("TaskExecutionRole", "Arn"),
            "TaskRoleArn": att(&h.id("TaskRole"), "Arn"),
            "ContainerDefinitions": [migrate_container(h), worker_container(h)],
            "Tags": tags(h.name)
        }),
    )
}

/// Runs before the worker in every task: idempotent and serialised by an advisory lock, so a
/// fresh stack or a new release migrates itself.
fn migrate_container(h: &Handler) -> Value {
    json!({
        "Name": "migrate",
        "Image": r("ImageUri"),
        "Essential": false,
        "EntryPoint": ["/usr/local/bin/orderfleet"],
        // Migrates as the owner, then lets this worker's role log in with its password.
        "Command": ["migrate", "--login-for", h.name],
        "Environment": [env("ORDERFLEET_LOG_FORMAT", json!("json"))],
        "Secrets": [
            secret("DATABASE_URL", "DatabaseUrlSecret"),
            secret("ORDERFLEET_DB_LOGIN_PASSWORD", &h.id("DbPasswordSecret"))
        ],
        "LogConfiguration": logs(&format!("{}-migrate", h.name))
    })
}

fn worker_container(h: &Handler) -> Value {
    json!({
        "Name": "worker",
        "Image": r("ImageUri"),
        "Essential": true,
        "DependsOn": [{"ContainerName": "migrate", "Condition": "SUCCESS"}],
        "Environment": environment(h),
        "Secrets": worker_secrets(h),
        "StopTimeout": STOP_TIMEOUT_SECS,
        "HealthCheck": {
            "Command": HEALTHCHECK_COMMAND,
            "Interval": 30, "Timeout": 10, "Retries": 3, "StartPeriod": 60
        },
        "LogConfiguration": logs(h.name)
    })
}

/// The environment variable `name`, injected by ECS from the secret `id`.
fn secret(name: &str, id: &str) -> Value {
    json!({"Name": name, "ValueFrom": r(id)})
}

/// The worker's secrets: its own role's `DATABASE_URL`, for analytics the lake's key, for
/// notifications the suppression list's key and the unsubscribe key.
fn worker_secrets(h: &Handler) -> Value {
    let mut secrets = vec![secret("DATABASE_URL", &h.id("DatabaseUrlSecret"))];
    if h.handler == HandlerName::Analytics {
        secrets.push(secret("ORDERFLEET_LAKE_HASH_KEY", "LakeHashKeySecret"));
    }
    if h.handler == HandlerName::Notifications {
        secrets.extend(super::deliverability::secrets());
    }
    if h.handler == HandlerName::Storefront {
        for (name, parameter, condition) in super::partners::WRITE_BACK_SECRETS {
            secrets
                .push(json!({"Fn::If": [condition, secret(name, parameter), r("AWS::NoValue")]}));
        }
    }
    Value::Array(secrets)
}

/// The awslogs driver into the workers' log group, streams named `stream_prefix/...`.
fn logs(stream_prefix: &str) -> Value {
    json!({
        "LogDriver": "awslogs",
        "Options": {
            "awslogs-group": r("LogGroup"),
            "awslogs-region": r("AWS::Region"),
            "awslogs-stream-prefix": stream_prefix
        }
    })
}

/// The Fargate service, rolled back by the circuit breaker when a deployment fails.
fn service(h: &Handler) -> Value {
    resource(
        "AWS::ECS::Service",
        json!({
            "ServiceName": sub(&h.names.queue_name),
            "Cluster": r("Cluster"),
            "TaskDefinition": r(&h.id("TaskDefinition")),
            "LaunchType": "FARGATE",
            "DesiredCount": r("DesiredCount"),
            "DeploymentConfiguration": {
                "MinimumHealthyPercent": 100,
                "MaximumPercent": 200,
                "DeploymentCircuitBreaker": {"Enable": true, "Rollback": true}
            },
            "NetworkConfiguration": {"AwsvpcConfiguration": {
                "Subnets": r("SubnetIds"),
                "SecurityGroups": [r("TaskSecurityGroup")],
                "AssignPublicIp": r("AssignPublicIp")
            }},
            "PropagateTags": "SERVICE",
            "Tags": tags(h.name)
        }),
    )
}
