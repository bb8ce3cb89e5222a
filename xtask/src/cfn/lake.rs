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
                    "BufferingHints": {"IntervalInSeconds": 300, "SizeInMBs": 64},
                    "CompressionFormat": "UNCOMPRESSED"
                },
                "Tags": tags("lake")
            }),
        ),
    );
}
