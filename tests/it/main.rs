//! The integration tests, one crate: the fleet and the AWS SDK are compiled and linked once
//! for all of them, not once per file. Each module is one area; [`support`] is what they share
//! (a fresh database and emulator prefix per test, the saga fixtures, the mail sinks).
//!
//! They need the local stack: run them with `make test`, or `make up` and
//! `eval "$(make -s env)"` first.

mod support;

mod analytics_lake;
mod catalogue_schemas;
mod demo_e2e;
mod deploy_systemd;
mod layering;
mod lease_timeouts;
mod notifications_deliverability;
mod notifications_file_outbox;
mod notifications_recommendations;
mod notifications_ses;
mod notifications_smtp;
mod notifications_worker;
mod observe;
mod operator_dlq;
mod operator_native;
mod operator_status;
mod operator_watch;
mod outbox_dead_letters;
mod permissions;
mod personalization_personalize;
mod personalization_recommendations;
mod privacy;
mod readme;
mod relay_handoff;
mod relay_passes;
mod runtime_adaptive_depth;
mod runtime_group_commit;
mod runtime_receive_pacing;
mod saga_compensation;
mod saga_concurrency;
mod saga_group_commit;
mod saga_happy_path;
mod saga_idempotency;
mod saga_payments;
mod saga_producers;
mod saga_shipping;
mod saga_validation;
mod spine_process;
mod spine_restart;
mod spine_runtime;
mod storefront_platforms;
mod storefront_write_back;
mod support_desk;
mod support_desk_actions;
