//! The committed CloudFormation template: generated from the code's topology, routing exactly
//! like it, and accepted by cfn-lint.

use std::path::{Path, PathBuf};
use std::process::Command;

use orderfleet::domain::catalogue::{Producer, EVENTS};
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::{self, Topology};
use serde_json::{json, Value};

/// How to regenerate the committed template (also `make cfn`).
const REGENERATE: &str = "cargo run -p xtask -- cfn";

fn template_path() -> PathBuf {
    xtask::template_path()
}

fn committed() -> Value {
    let text = std::fs::read_to_string(template_path()).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; run `{REGENERATE}`",
            template_path().display()
        )
    });
    serde_json::from_str(&text).expect("the committed template is JSON")
}

/// The committed template with its `Prefix` parameter at its default, for reading names.
struct Template {
    doc: Value,
    prefix: String,
}

impl Template {
    fn load() -> Self {
        let doc = committed();
        let prefix = doc["Parameters"]["Prefix"]["Default"]
            .as_str()
            .expect("a Prefix parameter with a default")
            .to_string();
        Template { doc, prefix }
    }

    fn resources(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.doc["Resources"].as_object().expect("Resources").iter()
    }

    fn resource(&self, id: &str) -> &Value {
        let r = &self.doc["Resources"][id];
        assert!(!r.is_null(), "the template has no resource {id}");
        r
    }

    /// A literal string, or an `Fn::Sub` whose variables are `${Prefix}` and pseudo parameters
    /// (given stand-in values).
    fn name(&self, v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            // A name given at deploy time (a partner event source): never one the topology has.
            _ if v["Ref"].is_string() => format!("<{}>", v["Ref"].as_str().unwrap_or_default()),
            _ => {
                let text = v["Fn::Sub"]
                    .as_str()
                    .unwrap_or_else(|| panic!("not a name: {v}"));
                let resolved = text
                    .replace("${Prefix}", &self.prefix)
                    .replace("${AWS::Partition}", "aws")
                    .replace("${AWS::Region}", "region")
                    .replace("${AWS::AccountId}", "account");
                assert!(!resolved.contains("${"), "unresolved variable in {text}");
                resolved
            }
        }
    }

    /// The logical id and properties of the only resource of `kind` whose `key` is `name`.
    fn named(&self, kind: &str, key: &str, name: &str) -> (&str, &Value) {
        let found: Vec<_> = self
            .resources()
            .filter(|(_, r)| r["Type"] == kind)
            .filter(|(_, r)| self.name(&r["Properties"][key]) == name)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {kind} with {key} {name}, found {}",
            found.len()
        );
        (found[0].0.as_str(), &found[0].1["Properties"])
    }

    fn of_type(&self, kind: &str) -> Vec<(&str, &Value)> {
        self.resources()
            .filter(|(_, r)| r["Type"] == kind)
            .map(|(id, r)| (id.as_str(), &r["Properties"]))
            .collect()
    }
}

fn get_att(id: &str, attribute: &str) -> Value {
    json!({"Fn::GetAtt": [id, attribute]})
}

/// Whether the catalogue lists an event `h` produces.
fn produces_events(h: HandlerName) -> bool {
    EVENTS.iter().any(|e| e.producer == Producer::Handler(h))
}

/// The statements of the handler's task role; a conditional one (`Fn::If`) by its `then` branch.
fn task_role_statements(t: &Template, h: HandlerName) -> Vec<&Value> {
    let role = t.resource(&format!("{}TaskRole", xtask::cfn::logical_id(h)));
    role["Properties"]["Policies"]
        .as_array()
        .expect("Policies")
        .iter()
        .flat_map(|p| {
            p["PolicyDocument"]["Statement"]
                .as_array()
                .expect("Statement")
        })
        .map(|s| s.get("Fn::If").map(|f| &f[1]).unwrap_or(s))
        .collect()
}

/// The actions of a policy statement.
fn actions(statement: &Value) -> Vec<&str> {
    match &statement["Action"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        other => panic!("odd Action {other}"),
    }
}

#[test]
fn the_committed_template_is_the_one_generated_from_the_topology() {
    let generated = xtask::cfn::render(&Topology::default());
    let on_disk = std::fs::read_to_string(template_path()).unwrap_or_default();
    assert!(
        on_disk == generated,
        "deploy/cloudformation/orderfleet.json is out of date with the topology in the code; \
         regenerate it with `{REGENERATE}` and commit the result"
    );
}

#[test]
fn every_handler_has_the_topology_s_queue_dlq_rule_pattern_and_redrive() {
    let t = Template::load();
    let topo = Topology::default();
    assert_eq!(t.prefix, topo.prefix);
    let (bus_id, _) = t.named("AWS::Events::EventBus", "Name", &topo.bus_name);

    for res in topo.all() {
        let h = res.handler;
        let (queue_id, queue) = t.named("AWS::SQS::Queue", "QueueName", &res.queue_name);
        let (dlq_id, dlq) = t.named("AWS::SQS::Queue", "QueueName", &res.dlq_name);
        let (rule_id, rule) = t.named("AWS::Events::Rule", "Name", &res.rule_name);

        // The queue: visibility, retention, encryption, redrive to its own DLQ.
        assert_eq!(
            queue["VisibilityTimeout"],
            topology::QUEUE_VISIBILITY_TIMEOUT_SECS,
            "{h}"
        );
        assert_eq!(
            queue["MessageRetentionPeriod"],
            topology::QUEUE_RETENTION_SECS,
            "{h}"
        );
        assert_eq!(queue["SqsManagedSseEnabled"], true, "{h}");
        assert_eq!(
            queue["RedrivePolicy"],
            json!({"deadLetterTargetArn": get_att(dlq_id, "Arn"), "maxReceiveCount": topo.max_receive_count}),
            "{h}: redrive policy"
        );

        // The DLQ: 14 days, encrypted, accepting dead letters from its own queue only.
        assert_eq!(
            dlq["MessageRetentionPeriod"],
            topology::DLQ_RETENTION_SECS,
            "{h}"
        );
        assert_eq!(dlq["SqsManagedSseEnabled"], true, "{h}");
        let allow = &dlq["RedriveAllowPolicy"];
        assert_eq!(allow["redrivePermission"], "byQueue", "{h}");
        let sources = allow["sourceQueueArns"]
            .as_array()
            .expect("sourceQueueArns");
        assert_eq!(sources.len(), 1, "{h}");
        assert_eq!(
            t.name(&sources[0]),
            format!("arn:aws:sqs:region:account:{}", res.queue_name),
            "{h}: the DLQ must allow only its own queue"
        );

        // The rule: on the bus, the catalogue's pattern, into the queue, with retries and a DLQ.
        assert_eq!(rule["EventBusName"], json!({"Ref": bus_id}), "{h}");
        assert_eq!(rule["EventPattern"], res.pattern, "{h}: event pattern");
        assert_eq!(rule["State"], "ENABLED", "{h}");
        let targets = rule["Targets"].as_array().expect("Targets");
        assert_eq!(targets.len(), 1, "{h}");
        assert_eq!(targets[0]["Arn"], get_att(queue_id, "Arn"), "{h}");
        assert!(
            targets[0]["RetryPolicy"]["MaximumRetryAttempts"].is_u64(),
            "{h}"
        );
        assert_eq!(
            targets[0]["DeadLetterConfig"]["Arn"],
            get_att("BusDlq", "Arn"),
            "{h}"
        );

        // The queue policy: exactly the topology's, for this queue and rule.
        let policies: Vec<_> = t
            .of_type("AWS::SQS::QueuePolicy")
            .into_iter()
            .filter(|(_, p)| p["Queues"] == json!([{"Ref": queue_id}]))
            .collect();
        assert_eq!(policies.len(), 1, "{h}: one queue policy");
        // Rules from other buses deliver too: the platforms' into storefront (each only when
        // connected), SES's events into notifications.
        let mut rules = vec![get_att(rule_id, "Arn")];
        if h == HandlerName::Storefront {
            for p in ["ShopifyPartnerRule", "CommercetoolsPartnerRule"] {
                let condition = t.doc["Resources"][p]["Condition"].clone();
                rules.push(
                    json!({"Fn::If": [condition, get_att(p, "Arn"), {"Ref": "AWS::NoValue"}]}),
                );
            }
        }
        if h == HandlerName::Notifications {
            rules.push(get_att("SesEventsRule", "Arn"));
        }
        let marks: Vec<String> = (0..rules.len()).map(|i| format!("RULE{i}")).collect();
        let marks: Vec<&str> = marks.iter().map(String::as_str).collect();
        let expected: Value =
            serde_json::from_str(&topology::queue_policy("QUEUE", &marks)).expect("policy JSON");
        let mut expected = expected
            .to_string()
            .replace("\"QUEUE\"", &get_att(queue_id, "Arn").to_string());
        for (mark, rule) in marks.iter().zip(&rules) {
            expected = expected.replace(&format!("\"{mark}\""), &rule.to_string());
        }
        let expected: Value = serde_json::from_str(&expected).expect("policy JSON");
        assert_eq!(
            policies[0].1["PolicyDocument"], expected,
            "{h}: queue policy"
        );
    }

    // Nothing else: one queue and DLQ per handler, plus the bus's target DLQ.
    assert_eq!(
        t.of_type("AWS::SQS::Queue").len(),
        2 * HandlerName::ALL.len() + 1,
        "unexpected queues in the template"
    );
    // One rule per handler, one per platform's partner bus, one for SES on the default bus.
    assert_eq!(
        t.of_type("AWS::Events::Rule").len(),
        HandlerName::ALL.len() + 2 + 1
    );
    let ses = t.resource("SesEventsRule");
    assert_eq!(ses["Properties"]["EventBusName"], "default");
    assert_eq!(
        ses["Properties"]["EventPattern"]["detail"]["mail"]["tags"]["ses:configuration-set"],
        json!([{"Ref": "SesConfigurationSet"}])
    );
    assert_eq!(
        t.resource("SesEventDestination")["Properties"]["EventDestination"]
            ["EventBridgeDestination"]["EventBusArn"],
        json!({"Fn::Sub": "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default"})
    );
}

#[test]
fn each_task_stops_after_the_worker_s_shutdown_grace_and_checks_its_health() {
    let t = Template::load();
    for h in HandlerName::ALL {
        let id = format!("{}TaskDefinition", xtask::cfn::logical_id(h));
        let containers = t.resource(&id)["Properties"]["ContainerDefinitions"]
            .as_array()
            .expect("ContainerDefinitions");
        let worker = containers
            .iter()
            .find(|c| c["Name"] == "worker")
            .expect("a worker container");
        let env = |name: &str| {
            worker["Environment"]
                .as_array()
                .expect("Environment")
                .iter()
                .find(|e| e["Name"] == name)
                .map(|e| e["Value"].clone())
        };
        assert_eq!(env("ORDERFLEET_HANDLERS"), Some(json!(h.as_str())), "{h}");
        assert_eq!(env("ORDERFLEET_LOG_FORMAT"), Some(json!("json")), "{h}");
        let grace: u64 = env("ORDERFLEET_SHUTDOWN_GRACE_SECS")
            .and_then(|v| v.as_str().and_then(|s| s.parse().ok()))
            .expect("ORDERFLEET_SHUTDOWN_GRACE_SECS");
        let stop = worker["StopTimeout"].as_u64().expect("StopTimeout");
        assert!(
            stop >= grace + 5,
            "{h}: stopTimeout {stop}s leaves no time after the {grace}s grace to flush and exit"
        );
        let value = |name: &str| -> String {
            env(name)
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("{h}: {name} in the task's environment"))
        };
        assert_eq!(
            value("ORDERFLEET_STOP_TIMEOUT_SECS"),
            stop.to_string(),
            "{h}: the worker must be told the task's stopTimeout"
        );
        let settings = [
            "orderfleet-worker".to_string(),
            "--wait-time-secs".into(),
            value("ORDERFLEET_WAIT_TIME_SECS"),
            "--shutdown-grace-secs".into(),
            grace.to_string(),
            "--stop-timeout-secs".into(),
            stop.to_string(),
        ];
        #[derive(clap::Parser)]
        struct Settings {
            #[command(flatten)]
            consumer: orderfleet::worker::ConsumerArgs,
        }
        <Settings as clap::Parser>::try_parse_from(settings)
            .expect("settings parse")
            .consumer
            .check_stop_budget()
            .unwrap_or_else(|e| panic!("{h}: the task's stop does not fit: {e}"));
        assert_eq!(
            worker["HealthCheck"]["Command"],
            json!(["CMD", "/usr/local/bin/orderfleet-worker", "healthcheck"]),
            "{h}"
        );
        assert_eq!(worker["LogConfiguration"]["LogDriver"], "awslogs", "{h}");
        assert_eq!(worker["Secrets"][0]["Name"], "DATABASE_URL", "{h}");
    }
}

#[test]
fn each_task_role_reaches_only_its_own_queues_and_its_own_dependencies() {
    let t = Template::load();
    let topo = Topology::default();
    for h in HandlerName::ALL {
        let stem = xtask::cfn::logical_id(h);
        let (queue_id, _) = t.named("AWS::SQS::Queue", "QueueName", &topo.queue_name(h));
        let (dlq_id, _) = t.named("AWS::SQS::Queue", "QueueName", &topo.dlq_name(h));
        let role = t.resource(&format!("{stem}TaskRole"));
        assert!(
            role["Properties"]["ManagedPolicyArns"].is_null(),
            "{h}: a task role gets its permissions from its own policy only"
        );
        let mut services = Vec::new();
        for s in task_role_statements(&t, h) {
            for action in &actions(s) {
                assert!(!action.contains('*'), "{h}: wildcard action {action}");
                let service = action.split(':').next().unwrap_or_default().to_string();
                if !services.contains(&service) {
                    services.push(service);
                }
                if action.starts_with("sqs:") {
                    let own = if matches!(*action, "sqs:SendMessage") {
                        vec![get_att(dlq_id, "Arn")]
                    } else if matches!(*action, "sqs:GetQueueUrl" | "sqs:GetQueueAttributes") {
                        vec![get_att(queue_id, "Arn"), get_att(dlq_id, "Arn")]
                    } else {
                        vec![get_att(queue_id, "Arn")]
                    };
                    assert!(
                        own.contains(&s["Resource"]),
                        "{h}: {action} on {}",
                        s["Resource"]
                    );
                }
            }
        }
        services.sort();
        let extra = match h {
            HandlerName::Notifications => Some("ses"),
            HandlerName::Analytics => Some("firehose"),
            HandlerName::Personalization => Some("personalize"),
            _ => None,
        };
        let mut expected = vec!["sqs"];
        if produces_events(h) {
            expected.push("events");
        }
        expected.extend(extra);
        expected.sort();
        assert_eq!(services, expected, "{h}: services the task role reaches");
    }
}

#[test]
fn only_handlers_that_produce_events_may_put_events_and_only_under_their_own_source() {
    let t = Template::load();
    let topo = Topology::default();
    let (bus_id, _) = t.named("AWS::Events::EventBus", "Name", &topo.bus_name);
    let producers: Vec<HandlerName> = HandlerName::ALL
        .into_iter()
        .filter(|h| produces_events(*h))
        .collect();
    assert!(
        !producers.is_empty() && producers.len() < HandlerName::ALL.len(),
        "the catalogue should have handlers that produce events and handlers that do not"
    );
    for h in HandlerName::ALL {
        let puts: Vec<&Value> = task_role_statements(&t, h)
            .into_iter()
            .filter(|s| {
                actions(s)
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case("events:PutEvents") || *a == "*")
            })
            .collect();
        if !produces_events(h) {
            assert!(
                puts.is_empty(),
                "{h} produces no event in the catalogue, yet its task role may PutEvents: {puts:?}"
            );
            continue;
        }
        assert_eq!(
            puts.len(),
            1,
            "{h}: one PutEvents statement, found {puts:?}"
        );
        let put = puts[0];
        assert_eq!(put["Effect"], "Allow", "{h}");
        assert_eq!(
            put["Resource"],
            get_att(bus_id, "Arn"),
            "{h}: on the bus only"
        );
        // The orders worker's relay also publishes the support desk's events.
        let mut sources = vec![h.source()];
        if h == orderfleet::domain::catalogue::OPERATOR_RELAY {
            sources.push(orderfleet::domain::catalogue::OPERATOR_SOURCE.to_string());
            sources.sort();
        }
        assert_eq!(
            put["Condition"],
            json!({"StringEquals": {"events:source": sources}}),
            "{h}: PutEvents must be held to the handler's own source"
        );
        // The catalogue's events of the handler carry that same source.
        for e in EVENTS.iter().filter(|e| e.producer == Producer::Handler(h)) {
            assert_eq!(e.source(), h.source(), "{h}: {}", e.detail_type);
        }
    }
}

#[test]
fn tasks_send_only_https_out_and_postgresql_to_the_database() {
    let t = Template::load();
    let services = t.of_type("AWS::ECS::Service");
    assert_eq!(services.len(), HandlerName::ALL.len());
    let db_groups = t.resource("Db")["Properties"]["VPCSecurityGroups"]
        .as_array()
        .expect("VPCSecurityGroups");
    assert_eq!(db_groups.len(), 1, "the database has one security group");
    let db_group = &db_groups[0];

    let mut task_groups: Vec<&Value> = Vec::new();
    for (_, s) in &services {
        for g in s["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
            .as_array()
            .expect("SecurityGroups")
        {
            if !task_groups.contains(&g) {
                task_groups.push(g);
            }
        }
    }
    assert_eq!(task_groups.len(), 1, "every task shares one security group");
    let task_group = task_groups[0];
    let task_group_id = task_group["Ref"].as_str().expect("a Ref to the task group");
    let group = &t.resource(task_group_id)["Properties"];
    assert!(
        group["SecurityGroupIngress"].is_null(),
        "the tasks take no inbound traffic"
    );

    // Without an embedded rule, EC2 would keep its default allow-all egress.
    let inline = group["SecurityGroupEgress"]
        .as_array()
        .expect("the task group must declare its egress, or EC2 allows all outbound traffic");
    let standalone: Vec<&Value> = t
        .of_type("AWS::EC2::SecurityGroupEgress")
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e["GroupId"] == *task_group)
        .collect();
    let rules: Vec<&Value> = inline.iter().chain(standalone).collect();
    for rule in &rules {
        let protocol = rule["IpProtocol"].as_str().unwrap_or_default();
        assert!(
            protocol != "-1" && !protocol.eq_ignore_ascii_case("all"),
            "all-traffic egress from the tasks: {rule}"
        );
        assert!(
            rule["Description"].as_str().is_some_and(|d| !d.is_empty()),
            "an egress rule without a reason: {rule}"
        );
    }
    let https = |r: &Value| {
        r["IpProtocol"] == "tcp"
            && r["FromPort"] == 443
            && r["ToPort"] == 443
            && r["CidrIp"] == "0.0.0.0/0"
            && r["DestinationSecurityGroupId"].is_null()
    };
    let postgres = |r: &Value| {
        r["IpProtocol"] == "tcp"
            && r["FromPort"] == 5432
            && r["ToPort"] == 5432
            && r["DestinationSecurityGroupId"] == *db_group
            && r["CidrIp"].is_null()
    };
    assert_eq!(
        rules.iter().filter(|r| https(r)).count(),
        1,
        "one HTTPS rule to the AWS APIs: {rules:?}"
    );
    assert_eq!(
        rules.iter().filter(|r| postgres(r)).count(),
        1,
        "one PostgreSQL rule to the database's group: {rules:?}"
    );
    assert_eq!(rules.len(), 2, "no other egress from the tasks: {rules:?}");

    // The other side: the database admits PostgreSQL from the tasks only.
    let db_group_id = db_group["Ref"]
        .as_str()
        .expect("a Ref to the database group");
    let ingress = t.resource(db_group_id)["Properties"]["SecurityGroupIngress"]
        .as_array()
        .expect("SecurityGroupIngress");
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(ingress[0]["SourceSecurityGroupId"], *task_group);
    assert_eq!(ingress[0]["FromPort"], 5432);
    assert_eq!(ingress[0]["ToPort"], 5432);
}

#[test]
fn each_worker_connects_as_its_own_role_and_only_migrate_sees_the_master_url() {
    let t = Template::load();
    for h in HandlerName::ALL {
        let stem = xtask::cfn::logical_id(h);
        let containers = t.resource(&format!("{stem}TaskDefinition"))["Properties"]
            ["ContainerDefinitions"]
            .as_array()
            .expect("ContainerDefinitions");
        let container = |name: &str| {
            containers
                .iter()
                .find(|c| c["Name"] == name)
                .unwrap_or_else(|| panic!("{h}: a {name} container"))
        };
        let secret = |c: &Value, name: &str| {
            c["Secrets"]
                .as_array()
                .expect("Secrets")
                .iter()
                .find(|s| s["Name"] == name)
                .map(|s| s["ValueFrom"].clone())
        };
        let worker = container("worker");
        let own_url = format!("{stem}DatabaseUrlSecret");
        assert_eq!(
            secret(worker, "DATABASE_URL"),
            Some(json!({"Ref": own_url})),
            "{h}: the worker's DATABASE_URL"
        );
        let url = t.resource(&own_url)["Properties"]["SecretString"]["Fn::Sub"]
            .as_str()
            .expect("a composed URL")
            .to_string();
        assert!(
            url.starts_with(&format!("postgres://orderfleet_{h}:")),
            "{h}: {url}"
        );
        assert!(
            url.contains(&format!("${{{stem}DbPasswordSecret}}")),
            "{h}: {url}"
        );
        let migrate = container("migrate");
        assert_eq!(
            secret(migrate, "DATABASE_URL"),
            Some(json!({"Ref": "DatabaseUrlSecret"}))
        );
        assert_eq!(
            secret(migrate, "ORDERFLEET_DB_LOGIN_PASSWORD"),
            Some(json!({"Ref": format!("{stem}DbPasswordSecret")}))
        );
        assert_eq!(
            migrate["Command"],
            json!(["migrate", "--login-for", h.as_str()])
        );
        assert_eq!(
            secret(worker, "ORDERFLEET_LAKE_HASH_KEY").is_some(),
            h == HandlerName::Analytics,
            "{h}: only analytics gets the lake's key"
        );
        // No task role may read a secret: only ECS injects them.
        for statement in task_role_statements(&t, h) {
            assert!(
                !actions(statement)
                    .iter()
                    .any(|a| a.starts_with("secretsmanager:")),
                "{h}'s task role reads secrets: {statement}"
            );
        }
    }
}

#[test]
fn the_lake_is_partitioned_by_event_time_and_athena_reads_it_through_partition_projection() {
    let t = Template::load();
    let s3 = &t.resource("LakeDeliveryStream")["Properties"]["ExtendedS3DestinationConfiguration"];
    let prefix = s3["Prefix"].as_str().unwrap();
    assert_eq!(prefix, topology::LAKE_PREFIX);
    for key in ["year", "month", "day"] {
        assert!(
            prefix.contains(&format!("{key}=!{{partitionKeyFromQuery:{key}}}/")),
            "{prefix}"
        );
    }
    assert_eq!(s3["DynamicPartitioningConfiguration"]["Enabled"], true);
    let params = &s3["ProcessingConfiguration"]["Processors"][0]["Parameters"];
    let query = params
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ParameterName"] == "MetadataExtractionQuery")
        .expect("a metadata extraction query")["ParameterValue"]
        .as_str()
        .unwrap();
    // The partition is the event's own time, never the moment Firehose received it.
    assert!(
        query.contains(".time[0:4]") && query.contains(".time[8:10]"),
        "{query}"
    );

    let table = &t.resource("LakeEventsTable")["Properties"]["TableInput"];
    let location = table["Parameters"]["storage.location.template"]["Fn::Sub"]
        .as_str()
        .unwrap();
    assert_eq!(
        location, "s3://${LakeBucket}/events/year=${!year}/month=${!month}/day=${!day}/",
        "Athena's projection must name the keys the stream writes"
    );
    let partitions: Vec<&str> = table["PartitionKeys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Name"].as_str().unwrap())
        .collect();
    assert_eq!(partitions, ["year", "month", "day"]);
    let columns: Vec<&str> = table["StorageDescriptor"]["Columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Name"].as_str().unwrap())
        .collect();
    for field in ["id", "detail_type", "source", "time", "detail"] {
        assert!(columns.contains(&field), "{field} is not a column");
    }
}

#[test]
fn every_handler_is_alarmed_on_dlq_age_errors_and_a_missing_heartbeat() {
    let t = Template::load();
    let topo = Topology::default();
    let alarms = t.of_type("AWS::CloudWatch::Alarm");
    for h in HandlerName::ALL {
        let q = topo.queue_name(h);
        for suffix in [
            "-dlq-not-empty",
            "-oldest-message-age",
            "-error-rate",
            "-heartbeat-missing",
        ] {
            let name = format!("{q}{suffix}");
            assert!(
                alarms.iter().any(|(_, a)| t.name(&a["AlarmName"]) == name),
                "missing alarm {name}"
            );
        }
        let (_, heartbeat) = alarms
            .iter()
            .find(|(_, a)| t.name(&a["AlarmName"]) == format!("{q}-heartbeat-missing"))
            .expect("heartbeat alarm");
        assert_eq!(heartbeat["TreatMissingData"], "breaching", "{h}");
        assert_eq!(heartbeat["Namespace"], "orderfleet", "{h}");
    }
}

#[test]
fn the_template_passes_cfn_lint() {
    let root = xtask::workspace_root();
    let cfn_lint = root.join(".venv/bin/cfn-lint");
    assert!(
        cfn_lint.exists(),
        "{} is missing; run `make test` (its `tools` step installs cfn-lint into .venv)",
        cfn_lint.display()
    );
    let out = Command::new(&cfn_lint)
        .arg(template_path())
        .current_dir(&root)
        .output()
        .expect("run cfn-lint");
    assert!(
        out.status.success(),
        "cfn-lint rejected deploy/cloudformation/orderfleet.json (exit {:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The deployed database plans with the cost the local cluster (`scripts/stack.sh`, which the
/// benchmarks run on) starts with, so that the plans measured are the plans deployed.
#[test]
fn the_database_costs_a_random_page_read_as_the_local_cluster_does() {
    let t = Template::load();
    let group = t.resource("DbParameterGroup");
    let cost = group["Properties"]["Parameters"]["random_page_cost"]
        .as_str()
        .expect("random_page_cost in the parameter group");
    assert_eq!(
        t.resource("Db")["Properties"]["DBParameterGroupName"],
        json!({"Ref": "DbParameterGroup"})
    );
    let stack =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack.sh"))
            .expect("scripts/stack.sh");
    assert!(
        stack.contains(&format!("\nPG_RANDOM_PAGE_COST={cost}\n"))
            && stack.contains("-c random_page_cost=$PG_RANDOM_PAGE_COST"),
        "scripts/stack.sh starts PostgreSQL without random_page_cost={cost}"
    );
}
