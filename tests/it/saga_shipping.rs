//! Shipping against a cancellation and against a crash: whatever lands between fulfillment's
//! decision and the carrier call, an order never ends cancelled with a live parcel at the
//! carrier, and a crash after the carrier call ends in exactly one parcel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support;
use crate::support::saga::*;
use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::handlers::fulfillment::Fulfillment;
use orderfleet::providers::carrier::{
    Cancellation, Carrier, CarrierError, Dispatch, Parcel, SandboxCarrier,
};
use orderfleet::runtime::group::execute_group;
use orderfleet::runtime::Executed;
use orderfleet_testkit::inproc::Fleet;
use tokio::sync::Notify;

/// What the sandbox carrier knows of one order's parcel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ParcelRecord {
    shipped: bool,
    cancelled: bool,
    ship_calls: i32,
}

/// The sandbox carrier with two hooks: `gate` holds every `ship` before it reaches the carrier
/// until released; `crash_after_first_ship` hands the first parcel over and then fails, as a
/// process killed before its commit would.
struct TestCarrier {
    sandbox: SandboxCarrier,
    gate: Option<(Notify, Notify)>,
    crash_after_first_ship: bool,
    crash_after_first_cancel: bool,
    /// Lets fulfillment group its events, and so ship a group's parcels in one `ship_all`.
    grouping: bool,
    /// The first `ship_all` hands its parcels over and then never answers, as a process
    /// killed right after the carrier call would.
    hang_after_first_batch: bool,
    ships: Mutex<u32>,
    cancels: Mutex<u32>,
    batches: Mutex<u32>,
}

#[async_trait]
impl Carrier for TestCarrier {
    fn name(&self) -> &str {
        "sandbox"
    }

    async fn ship(&self, parcel: &Parcel<'_>) -> Result<Dispatch, CarrierError> {
        if let Some((entered, release)) = &self.gate {
            entered.notify_one();
            release.notified().await;
        }
        let dispatch = self.sandbox.ship(parcel).await?;
        let first = {
            let mut n = self.ships.lock().unwrap();
            *n += 1;
            *n == 1
        };
        if self.crash_after_first_ship && first {
            return Err(CarrierError::Transient(
                "the process died after the carrier took the parcel".into(),
            ));
        }
        Ok(dispatch)
    }

    async fn ship_all(&self, parcels: &[Parcel<'_>]) -> Vec<Result<Dispatch, CarrierError>> {
        let answers = self.sandbox.ship_all(parcels).await;
        let first = {
            let mut n = self.batches.lock().unwrap();
            *n += 1;
            *n == 1
        };
        if self.hang_after_first_batch && first {
            std::future::pending::<()>().await;
        }
        answers
    }

    fn answers_locally(&self) -> bool {
        self.grouping
    }

    async fn cancel(&self, order_id: &str) -> Result<Cancellation, CarrierError> {
        let cancellation = self.sandbox.cancel(order_id).await?;
        let first = {
            let mut n = self.cancels.lock().unwrap();
            *n += 1;
            *n == 1
        };
        if self.crash_after_first_cancel && first {
            return Err(CarrierError::Transient(
                "the process died after the carrier cancelled the parcel".into(),
            ));
        }
        Ok(cancellation)
    }
}

/// The sandbox carrier's record of `order_id`.
async fn parcel_record(pool: &deadpool_postgres::Pool, order_id: &str) -> ParcelRecord {
    let c = pool.get().await.unwrap();
    c.query_opt(
        "SELECT shipped_at IS NOT NULL, cancelled_at IS NOT NULL, ship_calls
           FROM sandbox_carrier_parcels WHERE idempotency_key = $1",
        &[&order_id],
    )
    .await
    .unwrap()
    .map(|r| ParcelRecord {
        shipped: r.get(0),
        cancelled: r.get(1),
        ship_calls: r.get(2),
    })
    .unwrap_or_default()
}

/// A saga fleet whose fulfillment ships through a [`TestCarrier`] with the given hooks.
async fn fleet_with(gate: bool, crash_after_first_ship: bool) -> (Fleet, Arc<TestCarrier>) {
    fleet_crashing(gate, crash_after_first_ship, false).await
}

async fn fleet_crashing(
    gate: bool,
    crash_after_first_ship: bool,
    crash_after_first_cancel: bool,
) -> (Fleet, Arc<TestCarrier>) {
    let (pool, url) = support::fresh_db().await;
    let side = orderfleet::store::db::pool(&url, 8).unwrap();
    let carrier = Arc::new(TestCarrier {
        sandbox: SandboxCarrier::new(side.clone()),
        gate: gate.then(|| (Notify::new(), Notify::new())),
        crash_after_first_ship,
        crash_after_first_cancel,
        grouping: false,
        hang_after_first_batch: false,
        ships: Mutex::new(0),
        cancels: Mutex::new(0),
        batches: Mutex::new(0),
    });
    fleet_of(pool, &url, side, carrier)
}

/// A saga fleet whose fulfillment ships through `carrier`, committing its intents in `side`.
fn fleet_of(
    pool: deadpool_postgres::Pool,
    url: &str,
    side: deadpool_postgres::Pool,
    carrier: Arc<TestCarrier>,
) -> (Fleet, Arc<TestCarrier>) {
    let fleet = sandbox_fleet(pool, url).with_handler(
        HandlerName::Fulfillment,
        Arc::new(Fulfillment::new(carrier.clone(), side)),
    );
    (fleet, carrier)
}

/// Places `order_id` and delivers events until its OrderReadyToShip comes up, which is
/// returned undelivered.
async fn until_ready_to_ship(fleet: &Fleet, order_id: &str) -> Envelope {
    stock_sku(fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order(order_id, &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.deliver_until("OrderReadyToShip").await.unwrap()
}

/// Delivers events until the ShipmentCancelRequested of the cancellation comes up, which is
/// returned undelivered.
async fn until_cancel_requested(fleet: &Fleet) -> Envelope {
    fleet
        .deliver_until("ShipmentCancelRequested")
        .await
        .unwrap()
}

/// Sessions of this test's database waiting for a lock.
async fn lock_waiters(pool: &deadpool_postgres::Pool) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The order ended either shipped with one live parcel and one OrderShipped, or cancelled with
/// no live parcel and no OrderShipped.
async fn assert_parcel_matches_order(fleet: &Fleet, order_id: &str) {
    let pool = fleet.pool();
    let record = parcel_record(pool, order_id).await;
    let live = record.shipped && !record.cancelled;
    let shipped = emitted(pool, "OrderShipped", Some(order_id)).await.len();
    let status = status(pool, order_id).await;
    if status == "cancelled" {
        assert!(
            !live,
            "order {order_id} is cancelled (restocked, voided) but the carrier has its parcel: \
             {record:?}"
        );
        assert_eq!(shipped, 0);
    } else {
        assert_eq!(status, "completed");
        assert!(
            live,
            "order {order_id} completed without a parcel: {record:?}"
        );
        assert_eq!(shipped, 1);
    }
}

#[tokio::test]
async fn a_cancel_while_the_parcel_is_being_handed_over_leaves_no_parcel_for_a_cancelled_order() {
    let (fleet, carrier) = fleet_with(true, false).await;
    let pool = fleet.pool().clone();
    let ready = until_ready_to_ship(&fleet, "ord-race").await;

    // Fulfillment decides to ship and is held just before the carrier call.
    let shipping = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.deliver(&ready).await }
    });
    let (entered, release) = carrier.gate.as_ref().unwrap();
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("fulfillment never called the carrier");

    // The customer cancels; the stop request reaches fulfillment while the ship is in flight.
    fleet
        .publish_event(&cancellation("ord-race"))
        .await
        .unwrap();
    let stop = until_cancel_requested(&fleet).await;
    let stopping = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.deliver(&stop).await }
    });
    // Either the stop is applied now, or it waits for the ship's outcome on the order's lock.
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !stopping.is_finished() && lock_waiters(&pool).await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the stop neither finished nor waited");

    release.notify_one();
    tokio::time::timeout(Duration::from_secs(20), async {
        shipping.await.unwrap();
        stopping.await.unwrap();
    })
    .await
    .expect("ship and stop did not finish");
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_parcel_matches_order(&fleet, "ord-race").await;
}

#[tokio::test]
async fn a_crash_after_the_carrier_took_the_parcel_then_a_cancel_leaves_no_parcel_for_a_cancelled_order(
) {
    let (fleet, _carrier) = fleet_with(false, true).await;
    let ready = until_ready_to_ship(&fleet, "ord-crash-cancel").await;

    // The carrier takes the parcel; the process dies before its commit.
    assert!(fleet
        .deliver_to(HandlerName::Fulfillment, &ready, 1)
        .await
        .is_err());
    // Before the message comes back, the customer cancels.
    fleet
        .publish_event(&cancellation("ord-crash-cancel"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    // The OrderReadyToShip is received again.
    fleet.deliver(&ready).await;
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_parcel_matches_order(&fleet, "ord-crash-cancel").await;
}

#[tokio::test]
async fn a_crash_after_the_carrier_took_the_parcel_ends_in_one_parcel_and_one_order_shipped() {
    let (fleet, _carrier) = fleet_with(false, true).await;
    let ready = until_ready_to_ship(&fleet, "ord-crash").await;

    assert!(fleet
        .deliver_to(HandlerName::Fulfillment, &ready, 1)
        .await
        .is_err());
    fleet.deliver(&ready).await;
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(fleet.pool(), "ord-crash").await, "completed");
    // Asked twice, by key: one parcel.
    assert_eq!(parcel_record(fleet.pool(), "ord-crash").await.ship_calls, 2);
    assert_parcel_matches_order(&fleet, "ord-crash").await;
}

#[tokio::test]
async fn a_crash_after_the_carrier_cancelled_the_parcel_ends_in_one_shipment_cancelled() {
    let (fleet, _carrier) = fleet_crashing(false, true, true).await;
    let pool = fleet.pool().clone();
    let ready = until_ready_to_ship(&fleet, "ord-two-crashes").await;

    // The carrier takes the parcel, and the ship dies before its commit.
    assert!(fleet
        .deliver_to(HandlerName::Fulfillment, &ready, 1)
        .await
        .is_err());
    // The stop request meets `shipping`, cancels with the carrier, and dies before its commit.
    fleet
        .publish_event(&cancellation("ord-two-crashes"))
        .await
        .unwrap();
    let stop = until_cancel_requested(&fleet).await;
    assert!(fleet
        .deliver_to(HandlerName::Fulfillment, &stop, 1)
        .await
        .is_err());
    // The ship comes back first and hears that the parcel was cancelled; then the stop.
    fleet.deliver(&ready).await;
    fleet.deliver(&stop).await;
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-two-crashes").await, "cancelled");
    assert_eq!(
        emitted(&pool, "ShipmentCancelled", Some("ord-two-crashes"))
            .await
            .len(),
        1
    );
    assert_parcel_matches_order(&fleet, "ord-two-crashes").await;
}

#[tokio::test]
async fn the_sandbox_carrier_gives_one_parcel_per_order_and_refuses_a_cancelled_one() {
    use orderfleet::domain::events::{Address, SkuQuantity};
    let (pool, _) = support::fresh_db().await;
    let sandbox = SandboxCarrier::new(pool.clone());
    let address = Address {
        name: "Ada Lovelace".into(),
        line1: "12 St James's Square".into(),
        line2: None,
        city: "London".into(),
        postal_code: "SW1Y 4JH".into(),
        country: "GB".into(),
    };
    let lines = vec![SkuQuantity {
        sku: "TEA-1".into(),
        quantity: 1,
    }];
    let parcel = |order_id| Parcel {
        order_id,
        address: &address,
        lines: &lines,
    };

    let first = sandbox.ship(&parcel("o-1")).await.unwrap();
    assert_eq!(first, sandbox.ship(&parcel("o-1")).await.unwrap());
    let record = parcel_record(&pool, "o-1").await;
    assert!(record.shipped && !record.cancelled && record.ship_calls == 2);

    // Cancelled after it shipped: recalled, and asking again does not bring it back.
    assert_eq!(
        sandbox.cancel("o-1").await.unwrap(),
        Cancellation::Cancelled
    );
    assert_eq!(
        sandbox.ship(&parcel("o-1")).await,
        Err(CarrierError::Cancelled)
    );
    assert!(parcel_record(&pool, "o-1").await.cancelled);

    // Cancelled before it was ever shipped: no parcel, now or later.
    assert_eq!(
        sandbox.cancel("o-2").await.unwrap(),
        Cancellation::Cancelled
    );
    assert_eq!(
        sandbox.ship(&parcel("o-2")).await,
        Err(CarrierError::Cancelled)
    );
    let record = parcel_record(&pool, "o-2").await;
    assert!(!record.shipped && record.cancelled);
}

#[tokio::test]
async fn a_group_hands_its_parcels_over_in_one_call_and_a_crash_after_it_ends_in_one_parcel_per_order(
) {
    let (pool, url) = support::fresh_db().await;
    let side = orderfleet::store::db::pool(&url, 8).unwrap();
    let carrier = Arc::new(TestCarrier {
        sandbox: SandboxCarrier::new(side.clone()),
        gate: None,
        crash_after_first_ship: false,
        crash_after_first_cancel: false,
        grouping: true,
        hang_after_first_batch: true,
        ships: Mutex::new(0),
        cancels: Mutex::new(0),
        batches: Mutex::new(0),
    });
    let (fleet, carrier) = fleet_of(pool, &url, side, carrier);
    let orders = ["ord-g-1", "ord-g-2", "ord-g-3"];
    let mut ready = Vec::new();
    for id in orders {
        ready.push(until_ready_to_ship(&fleet, id).await);
    }
    let fulfillment = fleet.handler(HandlerName::Fulfillment).unwrap();
    let group: Vec<(&Envelope, u32)> = ready.iter().map(|e| (e, 1)).collect();

    // The group records its intents, the carrier takes all three parcels in one call, and the
    // process dies before its commit.
    let died = tokio::time::timeout(
        Duration::from_secs(3),
        execute_group(&*fulfillment, fleet.pool(), &group),
    )
    .await;
    assert!(died.is_err(), "the carrier call was meant to hang");
    for id in orders {
        let record = parcel_record(fleet.pool(), id).await;
        assert!(record.shipped && record.ship_calls == 1, "{id}: {record:?}");
    }

    // Delivered again: the same parcels, asked for by key in one call, and every order ships.
    let outcome = execute_group(&*fulfillment, fleet.pool(), &group).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(
        outcome
            .results
            .iter()
            .all(|r| matches!(r, Ok(Executed::Applied { .. }))),
        "{:?}",
        outcome.results
    );
    assert_eq!(*carrier.batches.lock().unwrap(), 2);
    assert_eq!(
        *carrier.ships.lock().unwrap(),
        0,
        "no parcel was asked for alone"
    );
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    for id in orders {
        assert_eq!(parcel_record(fleet.pool(), id).await.ship_calls, 2);
        assert_parcel_matches_order(&fleet, id).await;
    }
}

#[tokio::test]
async fn a_carrier_that_never_answers_is_given_up_before_the_handler_s_time_and_asked_again_by_key()
{
    let (fleet, carrier) = fleet_with(true, false).await;
    let ready = until_ready_to_ship(&fleet, "ord-silent-carrier").await;
    let fulfillment = fleet.handler(HandlerName::Fulfillment).unwrap();

    // The gate is never opened: the carrier takes the call and never answers.
    assert_gives_up_on_a_silent_call(&*fulfillment, fleet.pool(), &ready, "the carrier's ship")
        .await;

    // The carrier answers again; the retry finds the intent and ships once.
    carrier.gate.as_ref().unwrap().1.notify_one();
    fleet.deliver(&ready).await;
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_parcel_matches_order(&fleet, "ord-silent-carrier").await;
}
