mod common;
mod notifications_support;
mod saga_support;
use notifications_support::*;
use orderfleet::topology::HandlerName;
#[tokio::test]
async fn dump() {
    let dir = std::path::PathBuf::from("/tmp/of-dump");
    let _ = std::fs::remove_dir_all(&dir);
    let fleet = notifications_only(file_mailer(&dir)).await;
    fleet.deliver_to(HandlerName::Notifications, &envelope("OrderAccepted", &accepted("ord-dump", "ada@example.com")), 1).await.unwrap();
}
