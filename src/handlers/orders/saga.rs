//! The order saga's state machine, pure: the stored states and [`advance`], which derives an
//! order's next status from the whole row. It reads no clock and no database, so the tests
//! below cover every transition.

use crate::domain::events::CancelReason;

stored_states!(
    /// The saga's state of an order.
    pub Status in "order status" {
        Accepted = "accepted", 0;
        ReadyToShip = "ready_to_ship", 1;
        Shipped = "shipped", 2;
        Completed = "completed", 3;
        Cancelling = "cancelling", 2;
        Cancelled = "cancelled", 3;
        Returning = "returning", 3;
        Returned = "returned", 4;
        Rejected = "rejected", 4;
    }
);

stored_states!(
    /// What orders has heard from inventory.
    pub ReservationState in "reservation state of an order" {
        Pending = "pending", 0;
        Reserved = "reserved", 1;
        Rejected = "rejected", 1;
        Committed = "committed", 2;
        Released = "released", 3;
    }
);

stored_states!(
    /// What orders has heard from payments.
    pub PaymentState in "payment state of an order" {
        Pending = "pending", 0;
        Authorized = "authorized", 1;
        Failed = "failed", 1;
        Captured = "captured", 2;
        // The provider declined the capture after the parcel left: a person must look.
        CaptureFailed = "capture_failed", 2;
        Voided = "voided", 3;
        Refunded = "refunded", 3;
    }
);

stored_states!(
    /// What orders has heard from fulfillment.
    pub DeliveryState in "delivery state of an order" {
        Pending = "pending", 0;
        Shipped = "shipped", 1;
        Delivered = "delivered", 2;
        Failed = "failed", 2;
    }
);

impl Status {
    /// Completed, cancelled, returned or rejected: money and stock are settled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Cancelled | Status::Returned | Status::Rejected
        )
    }
}

/// The state of one order as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub status: Status,
    pub reservation: ReservationState,
    pub payment: PaymentState,
    pub delivery: DeliveryState,
}

/// What a status transition asks the handler to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    ReadyToShip,
    Cancel(CancelReason),
    Completed,
}

/// The next transition the order can take on its own, given everything heard so far; `None`
/// when it must wait. Applied repeatedly until it returns `None`.
pub fn advance(s: &Snapshot) -> Option<(Status, Effect)> {
    use DeliveryState as D;
    use PaymentState as P;
    use ReservationState as R;
    let money_settled = matches!(s.payment, P::Voided | P::Refunded);
    match s.status {
        Status::Accepted => {
            if s.reservation == R::Reserved && s.payment == P::Authorized {
                Some((Status::ReadyToShip, Effect::ReadyToShip))
            } else if matches!(s.reservation, R::Rejected | R::Released) {
                Some((Status::Cancelling, Effect::Cancel(CancelReason::OutOfStock)))
            } else if matches!(s.payment, P::Failed | P::Voided | P::Refunded) {
                Some((
                    Status::Cancelling,
                    Effect::Cancel(CancelReason::PaymentFailed),
                ))
            } else {
                None
            }
        }
        Status::Shipped => {
            if s.delivery == D::Failed {
                Some((Status::Returning, Effect::None))
            } else if s.delivery == D::Delivered
                && s.payment == P::Captured
                && s.reservation == R::Committed
            {
                Some((Status::Completed, Effect::Completed))
            } else {
                None
            }
        }
        Status::Cancelling if s.reservation == R::Released && money_settled => {
            Some((Status::Cancelled, Effect::None))
        }
        Status::Returning if s.reservation == R::Released && money_settled => {
            Some((Status::Returned, Effect::None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(status: Status, r: ReservationState, p: PaymentState, d: DeliveryState) -> Snapshot {
        Snapshot {
            status,
            reservation: r,
            payment: p,
            delivery: d,
        }
    }

    #[test]
    fn an_order_waits_for_both_reservation_and_authorization() {
        use DeliveryState::Pending as DP;
        use PaymentState as P;
        use ReservationState as R;
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Pending, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Pending, P::Authorized, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Authorized, DP)),
            Some((Status::ReadyToShip, Effect::ReadyToShip))
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Rejected, P::Authorized, DP)),
            Some((Status::Cancelling, Effect::Cancel(CancelReason::OutOfStock)))
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Failed, DP)),
            Some((
                Status::Cancelling,
                Effect::Cancel(CancelReason::PaymentFailed)
            ))
        );
    }

    #[test]
    fn cancelling_ends_only_when_stock_and_money_are_settled() {
        use DeliveryState::Pending as DP;
        use PaymentState as P;
        use ReservationState as R;
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Released, P::Authorized, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Reserved, P::Voided, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Released, P::Voided, DP)),
            Some((Status::Cancelled, Effect::None))
        );
    }

    #[test]
    fn stale_outcomes_never_move_a_state_back() {
        assert_eq!(
            PaymentState::Voided.advance_to(PaymentState::Authorized),
            PaymentState::Voided
        );
        assert_eq!(
            ReservationState::Released.advance_to(ReservationState::Committed),
            ReservationState::Released
        );
        assert_eq!(
            ReservationState::Pending.advance_to(ReservationState::Reserved),
            ReservationState::Reserved
        );
    }

    #[test]
    fn terminal_states_do_not_advance() {
        use PaymentState as P;
        use ReservationState as R;
        for s in [
            Status::Completed,
            Status::Cancelled,
            Status::Returned,
            Status::Rejected,
        ] {
            assert!(s.is_terminal());
            assert_eq!(
                advance(&snap(s, R::Reserved, P::Authorized, DeliveryState::Failed)),
                None
            );
        }
    }
}
