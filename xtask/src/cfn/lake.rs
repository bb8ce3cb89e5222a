//! The data lake: an encrypted S3 bucket with a lifecycle (archive, then expire) and a Firehose
//! delivery stream that the analytics worker writes into it, partitioned by day.

use orderfleet::infra::topology::{self, Topology};
use serde_json::json;

use super::{att, r, resource, resource_on_removal, sub, tags, Resources};

pub(super) fn shared(res: &mut Resources, names: &Topology) {
    bucket(res);
    delivery_role(res);
    delivery_stream(res, names);
    hash_key(res);
    glue_table(res);
}

/// The lake as an Athena table: `<Prefix>_lake.events`, one row per record, partitioned by the
/// event's day with partition projection (no crawler, no `MSCK REPAIR`): Athena computes the
/// partitions from the key layout of [`topology::LAKE_PREFIX`]. `detail` is kept as JSON text,
/// to be read with `json_extract`.
fn glue_table(res: &mut Resources) {
    res.add(
        "LakeDatabase",
        resource(
            "AWS::Glue::Database",
            json!({
                "CatalogId": r("AWS::AccountId"),
                "DatabaseInput": {
                    "Name": sub("${Prefix}_lake"),
                    "Description": "orderfleet's data lake (redacted events)"
                }
            }),
        ),
    );
    let column = |name: &str, kind: &str| json!({"Name": name, "Type": kind});
    res.add(
        "LakeEventsTable",
        resource(
            "AWS::Glue::Table",
            json!({
                "CatalogId": r("AWS::AccountId"),
                "DatabaseName": r("LakeDatabase"),
                "TableInput": {
                    "Name": "events",
                    "Description": "Every event on the bus, redacted, by the day of its time",
                    "TableType": "EXTERNAL_TABLE",
                    "Parameters": {
                        "classification": "json",
                        "projection.enabled": "true",
                        "projection.year.type": "integer",
                        "projection.year.range": "2024,2099",
                        "projection.month.type": "integer",
                        "projection.month.range": "1,12",
                        "projection.month.digits": "2",
                        "projection.day.type": "integer",
                        "projection.day.range": "1,31",
                        "projection.day.digits": "2",
                        "storage.location.template": sub("s3://${LakeBucket}/events/year=${!year}/month=${!month}/day=${!day}/")
                    },
                    "PartitionKeys": [column("year", "string"), column("month", "string"), column("day", "string")],
                    "StorageDescriptor": {
                        "Location": sub("s3://${LakeBucket}/events/"),
                        "InputFormat": "org.apache.hadoop.mapred.TextInputFormat",
                        "OutputFormat": "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat",
                        "SerdeInfo": {
                            "SerializationLibrary": "org.openx.data.jsonserde.JsonSerDe",
                            // EventBridge's `detail-type` is not a valid column name.
                            "Parameters": {"mapping.detail_type": "detail-type", "ignore.malformed.json": "true"}
                        },
                        "Columns": [
                            column("version", "string"), column("id", "string"),
                            column("detail_type", "string"), column("source", "string"),
                            column("account", "string"), column("time", "string"),
                            column("region", "string"), column("resources", "array<string>"),
                            column("detail", "string")
                        ]
                    }
                }
            }),
        ),
    );
}

/// The key under which the analytics worker pseudonymises customers in the lake
/// (`ORDERFLEET_LAKE_HASH_KEY`, see `orderfleet::domain::redaction`). Kept with the lake: a new
/// key makes every returning customer look new.
fn hash_key(res: &mut Resources) {
    res.add(
        "LakeHashKeySecret",
        resource_on_removal(
            "AWS::SecretsManager::Secret",
            "Retain",
            json!({
                "Description": "Key of the lake's customer pseudonyms (HMAC-SHA256)",
                "GenerateSecretString": {"PasswordLength": 64, "ExcludePunctuation": true},
                "Tags": tags("lake")
            }),
        ),
    );
}

/// The bucket, retained with the stack, and its policy refusing plain HTTP.
fn bucket(res: &mut Resources) {
    res.add(
        "LakeBucket",
        resource_on_removal(
            "AWS::S3::Bucket",
            "Retain",
            json!({
                "BucketEncryption": {"ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": true, "BlockPublicPolicy": true, "IgnorePublicAcls": true, "RestrictPublicBuckets": true
                },
                "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                "LifecycleConfiguration": {"Rules": [
                    {
                        "Id": "archive-then-expire-events",
                        "Status": "Enabled",
                        "Prefix": "events/",
                        "Transitions": [{"StorageClass": "GLACIER_IR", "TransitionInDays": r("LakeArchiveAfterDays")}],
                        "ExpirationInDays": r("LakeExpireAfterDays")
                    },
                    {"Id": "expire-delivery-errors", "Status": "Enabled", "Prefix": "errors/", "ExpirationInDays": 30},
                    {"Id": "abort-incomplete-uploads", "Status": "Enabled", "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}
                ]},
                "Tags": tags("lake")
            }),
        ),
    );
    res.add(
        "LakeBucketPolicy",
        resource(
            "AWS::S3::BucketPolicy",
            json!({
                "Bucket": r("LakeBucket"),
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Sid": "DenyInsecureTransport",
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:*",
                        "Resource": [att("LakeBucket", "Arn"), sub("${LakeBucket.Arn}/*")],
                        "Condition": {"Bool": {"aws:SecureTransport": "false"}}
                    }]
                }
            }),
        ),
    );
}

/// The role Firehose assumes (from this account only) to write the bucket.
fn delivery_role(res: &mut Resources) {
    res.add(
        "LakeDeliveryRole",
        resource(
            "AWS::IAM::Role",
            json!({
                "Description": "Lets Firehose write the lake bucket",
                "AssumeRolePolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Effect": "Allow",
                        "Principal": {"Service": "firehose.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                        "Condition": {"StringEquals": {"sts:ExternalId": r("AWS::AccountId")}}
                    }]
                },
                "Policies": [{
                    "PolicyName": "write-lake",
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Action": [
                                "s3:AbortMultipartUpload", "s3:GetBucketLocation", "s3:GetObject",
                                "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:PutObject"
                            ],
                            "Resource": [att("LakeBucket", "Arn"), sub("${LakeBucket.Arn}/*")]
                        }]
                    }
                }],
                "Tags": tags("lake")
            }),
        ),
    );
}

/// The delivery stream `${Prefix}-lake`, with the topology's partitioning of the lake.
fn delivery_stream(res: &mut Resources, names: &Topology) {
    res.add(
        "LakeDeliveryStream",
        resource(
            "AWS::KinesisFirehose::DeliveryStream",
            json!({
                "DeliveryStreamName": sub(&names.firehose_stream()),
                "DeliveryStreamType": "DirectPut",
                "DeliveryStreamEncryptionConfigurationInput": {"KeyType": "AWS_OWNED_CMK"},
                "ExtendedS3DestinationConfiguration": {
                    "BucketARN": att("LakeBucket", "Arn"),
                    "RoleARN": att("LakeDeliveryRole", "Arn"),
                    "Prefix": topology::LAKE_PREFIX,
                    "ErrorOutputPrefix": topology::LAKE_ERROR_PREFIX,
                    // Partitions by the event's own time (see topology::LAKE_PREFIX).
                    "DynamicPartitioningConfiguration": {
                        "Enabled": true,
                        "RetryOptions": {"DurationInSeconds": 300}
                    },
                    "ProcessingConfiguration": {
                        "Enabled": true,
                        "Processors": [{
                            "Type": "MetadataExtraction",
                            "Parameters": [
                                {"ParameterName": "MetadataExtractionQuery", "ParameterValue": topology::LAKE_PARTITION_QUERY},
                                {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"}
                            ]
                        }]
                    },
                    "BufferingHints": {"IntervalInSeconds": 300, "SizeInMBs": 64},
                    "CompressionFormat": "UNCOMPRESSED"
                },
                "Tags": tags("lake")
            }),
        ),
    );
}
