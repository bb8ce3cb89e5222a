//! SQS details that the runtime and the operator share: looking a queue up ([`queue`]) and the
//! message attributes the fleet reads and writes ([`attrs`]). The clients themselves are built
//! with every other AWS client, in [`crate::infra::aws`].

pub mod attrs;
pub mod queue;
