//! What every layer speaks: the EventBridge envelope, the catalogue of event types and the
//! handlers' names, the typed payloads with their money, and the typed outcome of handling.

pub mod catalogue;
pub mod deliverability;
pub mod envelope;
pub mod events;
pub mod mask;
pub mod money;
pub mod names;
pub mod outcome;
pub mod platform;
pub mod redaction;
pub mod ses;
