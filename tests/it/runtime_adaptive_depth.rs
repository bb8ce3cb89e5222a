//! The adaptive depth (`runtime::adapt`) with the real consumer, group commit and inventory
//! handler on one queue: a quiet queue keeps one full receive in flight and commits each event
//! alone without ever reading the backlog; a preloaded backlog grows the in-flight target and
//! the groups, never past the flags, and the target comes back to the floor once the queue has
//! drained. The backlog is a few hundred messages, not thousands: moto's ReceiveMessage slows
//! down with the queue's depth (see PRODUCT.md), and the growth shows from 400 on.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use orderfleet::domain::names::HandlerName;
use orderfleet::runtime::adapt::FLOOR;
use orderfleet::runtime::group::GroupConfig;
use orderfleet::runtime::ConsumerConfig;
use orderfleet::sqs::queue::QueueFacts;

use crate::support::saga::stock;
use crate::support::{self, GroupedConsumer};

/// One inventory consumer applying through a group commit that shares its counters, as the
/// worker builds it.
fn start(
    clients: &orderfleet::infra::aws::Clients,
    pool: &deadpool_postgres::Pool,
    cfg: ConsumerConfig,
    group: GroupConfig,
) -> GroupedConsumer {
    GroupedConsumer::start(
        clients,
        pool,
        Arc::new(orderfleet::handlers::inventory::Inventory),
        cfg,
        group,
    )
}

async fn inventory_queue(clients: &orderfleet::infra::aws::Clients) -> QueueFacts {
    let topo = support::topology(clients).await;
    orderfleet::sqs::queue::inspect_queue(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_single_message_on_a_quiet_queue_is_applied_alone_and_the_target_stays_at_the_floor() {
    let clients = support::clients().await;
    let facts = inventory_queue(&clients).await;
    let (pool, _) = support::fresh_db().await;
    // The worker's ceilings: plenty of room to grow, which a quiet queue must not use.
    let cfg = ConsumerConfig {
        concurrency: 512,
        receivers: 8,
        ..support::consumer_config(&facts)
    };
    let run = start(
        &clients,
        &pool,
        cfg,
        GroupConfig {
            max_group: 256,
            transactions: 2,
            timeout: Duration::from_secs(20),
        },
    );
    support::send_bodies(
        &clients,
        &facts.queue_url,
        &[support::stock_received("QUIET-1", 3)],
    )
    .await;
    run.handled(1, Duration::from_secs(30)).await;
    // Let the loops poll the empty queue a few times more.
    let c = run.counters.clone();
    support::wait_for(Duration::from_secs(30), "three empty receives", || {
        let c = c.clone();
        async move { (c.snapshot().empty_receives >= 3).then_some(()) }
    })
    .await;

    let s = run.counters.snapshot();
    assert_eq!(s.succeeded, 1, "{s:?}");
    assert_eq!(s.in_flight_target, FLOOR as u64, "{s:?}");
    assert_eq!(
        s.backlog_reads, 0,
        "a quiet queue costs no GetQueueAttributes: {s:?}"
    );
    assert_eq!((s.groups, s.grouped_events), (1, 1), "{s:?}");
    assert_eq!(run.group.stats().largest, 1);
    // At the floor, groups are capped at one full receive per transaction, far under the flag.
    assert_eq!(s.group_cap, (FLOOR / 2) as u64, "{s:?}");
    assert_eq!(stock(&pool, "QUIET-1").await.0, 3);
    run.shutdown().await;
}

#[tokio::test]
async fn a_backlog_grows_the_target_and_the_groups_within_the_flags_then_shrinks_back() {
    let clients = support::clients().await;
    let facts = inventory_queue(&clients).await;
    let (pool, _) = support::fresh_db().await;
    const SKUS: usize = 8;
    const PER_SKU: usize = 50;
    const CONCURRENCY: usize = 80;
    const MAX_GROUP: usize = 20;
    let bodies: Vec<String> = (0..PER_SKU)
        .flat_map(|_| (0..SKUS).map(|i| support::stock_received(&format!("BACKLOG-{i}"), 1)))
        .collect();
    support::send_bodies(&clients, &facts.queue_url, &bodies).await;

    // Two receive loops: moto's ReceiveMessage slows down with the backlog, and eight
    // concurrent ones on a few hundred messages outlive their wait time plus slack.
    let cfg = ConsumerConfig {
        concurrency: CONCURRENCY,
        receivers: 2,
        ..support::consumer_config(&facts)
    };
    let run = start(
        &clients,
        &pool,
        cfg,
        GroupConfig {
            max_group: MAX_GROUP,
            transactions: 2,
            timeout: Duration::from_secs(20),
        },
    );
    // The highest target and group cap the consumer reports while it drains.
    let (peak_target, peak_cap) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (c, t, g) = (run.counters.clone(), peak_target.clone(), peak_cap.clone());
        let stop = run.stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let s = c.snapshot();
                t.fetch_max(s.in_flight_target, Relaxed);
                g.fetch_max(s.group_cap, Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let total = (SKUS * PER_SKU) as u64;
    run.handled(total, Duration::from_secs(180)).await;

    let s = run.counters.snapshot();
    let stats = run.group.stats();
    eprintln!("drained: {s:?} {stats:?}");
    let (target, cap) = (peak_target.load(Relaxed), peak_cap.load(Relaxed));
    assert!(s.backlog_reads >= 1, "{s:?}");
    assert!(
        target > FLOOR as u64 && target <= CONCURRENCY as u64,
        "peak target {target}: {s:?}"
    );
    assert!(
        cap > (FLOOR / 2) as u64 && cap <= MAX_GROUP as u64,
        "peak group cap {cap}"
    );
    assert!(
        stats.largest > 1 && stats.largest <= MAX_GROUP as u64,
        "{stats:?}"
    );
    assert!(stats.groups < stats.events, "{stats:?}");
    for i in [0, SKUS / 2, SKUS - 1] {
        assert_eq!(
            stock(&pool, &format!("BACKLOG-{i}")).await.0,
            PER_SKU as i64,
            "each receipt applied once"
        );
    }

    // Drained: short and empty receives bring the target back to the floor.
    let c = run.counters.clone();
    support::wait_for(
        Duration::from_secs(120),
        "the target back at the floor",
        || {
            let c = c.clone();
            async move {
                let s = c.snapshot();
                (s.in_flight_target == FLOOR as u64).then_some(())
            }
        },
    )
    .await;
    run.shutdown().await;
    sampler.await.unwrap();
}
