//! notifications: emails the customer, exactly once per order and kind.
//!
//! | event | email (`emails.kind`) | recipient from |
//! |---|---|---|
//! | `OrderAccepted` | `confirmation`: lines, total, shipping address | the event |
//! | `OrderShipped` | `shipped`: carrier, tracking number, items | `orders` + `customers` |
//! | `PaymentVoided` of a cancelled order | `cancelled`: reason; hold released, or nothing charged | `orders` + `customers` |
//! | `PaymentRefunded` of a cancelled order | `cancelled`: reason; amount refunded | `orders` + `customers` |
//! | `PaymentRefunded` otherwise (a returned parcel) | `refunded`: amount | `orders` + `customers` |
//! | `OrderCompleted` | `recommendations` (marketing): "customers also bought", unsubscribe link | `orders` + `customers` |
//!
//! # Deliverability
//!
//! - **Suppression list** (`email_suppressions`). SES reports bounces and complaints through
//!   EventBridge (`aws.ses`, [`crate::domain::ses`]): a permanent bounce or a complaint
//!   suppresses every address it names; a transient bounce is counted in
//!   `email_transient_bounces` and suppresses nothing. Addresses are stored as a keyed hash
//!   and a masked form ([`crate::domain::deliverability::AddressHasher`]). Every email,
//!   transactional or not, to a suppressed address is recorded as `skipped` with the reason
//!   instead of being sent: it would only bounce again and hurt the sender's reputation.
//! - **Marketing consent** (`marketing_opt_outs`). The recommendations email is marketing: it
//!   carries an unsubscribe link to the shop's page with a signed token naming the customer,
//!   and `List-Unsubscribe` / `List-Unsubscribe-Post` headers (RFC 8058). The page publishes
//!   `MarketingOptOut`, which this handler records; an opted-out customer's recommendations
//!   email is `skipped`. Without `--unsubscribe-url` no marketing email is sent at all.
//!   Transactional email (confirmation, shipped, cancelled, refunded) ignores opt-outs.
//!
//! The cancellation email is sent on the payment outcome, not on `OrderCancelled`, because only
//! then is it known what happened to the money; payments answers every `OrderCancelled` with
//! exactly one `PaymentVoided` or `PaymentRefunded`. The reason comes from the order row, which
//! orders commits before it emits `OrderCancelled`, so it is always there by then. (A
//! `PaymentVoided` of an order that was not cancelled, a parcel returned before capture, sends
//! nothing: nothing was charged and the shipped email already went out.) This handler reads the
//! `orders`, `customers` and `products` tables of other handlers and writes only `emails` and
//! the deliverability tables below.
//!
//! # Exactly once, and the one exception
//!
//! Within the runtime's transaction (inbox claim, effects, outbox, one commit):
//!
//! 1. claim the `(order, kind)` row of `emails` with `INSERT ... ON CONFLICT DO NOTHING`. When
//!    a row exists, the email was sent (or failed for good) under an earlier event: nothing to
//!    do. A concurrent claim of the same key waits on the unique index until this transaction
//!    ends;
//! 2. compose and send;
//! 3. record `sent` (or `failed_permanent`) in the same row; the runtime commits.
//!
//! A retryable failure rolls everything back, claim included, and the event is retried with
//! backoff. A permanent refusal of the address or message is recorded as `failed_permanent` and
//! the handler succeeds: no retry loop, nothing in the DLQ. A configuration fault (credentials,
//! unverified sender) goes to the DLQ, to be redriven once fixed.
//!
//! The exception: if the process dies, or the commit fails, after the transport accepted the
//! email and before the commit, the claim is rolled back with everything else and the
//! redelivered event sends that email again. At most that one email repeats, and the copy
//! carries the same Message-ID (derived from order and kind) and, in the file outbox, the same
//! file name. No transport offers a transaction we could join, so this window cannot be
//! closed, only kept short: the send is the last thing before the commit. See
//! `docs/notifications.md`.
//!
//! With the file outbox (the default transport) the window closes: the file's name is the
//! email's key, so the copy overwrites the first. That is also why, with the file outbox and
//! only with it, events share transactions ([`crate::runtime::group`]): a group is claimed,
//! sent and recorded one event after the other and committed once, and a group rolled back
//! (by a neighbour's failure, or lost before its commit) and run again writes the same files.
//! Over SMTP or SES a send waits on a server, and a rolled-back group would deliver every
//! email it had sent again: one event per transaction.
//!
//! # What happens if two processes, or a crash, land here
//!
//! - Two processes, the same `(order, kind)` (a duplicate event under another id, or two
//!   events that both want the email): the second claim waits on the unique index while the
//!   first sends, and finds the row once the first commits: one email. If the first rolls back
//!   (a retryable send failure), the second claims and sends: still one. The wait lasts as long
//!   as the first's send, which the transport's timeout bounds.
//! - A crash before the transport accepted the email: nothing left the building; the
//!   redelivery claims and sends.
//! - A crash after the transport accepted it and before the commit: the email goes out again
//!   on redelivery (at least once, the window above). The copy has the same Message-ID, so a
//!   mail client that threads or de-duplicates by it shows one; the customer may still see two.
//! - Two groups (the file outbox) claiming the same `(order, kind)`s in opposite orders: each
//!   waits on the other's claim, PostgreSQL aborts one, and the event that hit it is retried
//!   later, when the other's row stands: one email.
//!
//! - Two SES reports about one address at once (a bounce and a complaint): each is an upsert
//!   on the address's hash, so the second waits on the row lock and then counts; the first
//!   reason stays. One report delivered twice (under one EventBridge id or two) has one SES
//!   feedback id, its inbox key, and is applied once.
//! - An opt-out and a recommendations email of the same customer at once: if the opt-out
//!   commits first the email is skipped; if the email's transaction read no opt-out, that one
//!   email goes out and every later one is skipped. An opt-out recorded twice changes nothing.
//!   Opt-outs are kept by customer id and by address (its keyed hash): a guest checkout has a
//!   new customer id with every order, and its address still says no.
//! - A suppression arriving while an email to the address is being sent: that email goes out
//!   (it was decided before); the next is skipped.
//!
//! Addresses are masked ([`mask`]) in every log line, in `emails.recipient_masked`, and in
//! every error text kept or logged; the deliverability tables hold a keyed hash and the masked
//! form, never the address.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, Currency, MarketingOptOut, Money, OrderAccepted, OrderCompleted, OrderShipped,
    PaymentRefunded, PaymentVoided,
};
use crate::domain::mask::{mask, redact};
use crate::domain::outcome::HandlerError;
use crate::domain::ses::{self, Feedback, SesEvent};
use crate::handlers::{Context, Handler};
use crate::providers::email::view::{self, format_minor, format_money, EmailView, MoneyOutcome};
use crate::providers::email::{ComposeError, EmailKey, EmailKind, Mailer, SendError};
use crate::store::db::{Cached, Tx};

/// Savepoint around the recommendations query: a failure there must not abort the email.
const RECOMMENDATIONS_SAVEPOINT: &str = "notifications_recommendations";

/// The notifications handler.
pub struct Notifications {
    mailer: Arc<Mailer>,
}

impl Notifications {
    /// Emails through `mailer`.
    pub fn new(mailer: Arc<Mailer>) -> Self {
        tracing::info!(
            transport = mailer.transport_name(),
            // The shop's own address, not a customer's: logged in full.
            from = %mailer.from(),
            templates = %mailer.templates_origin(),
            suppression_list = mailer.hasher().is_some(),
            "notifications configured"
        );
        match mailer.unsubscribe() {
            None => tracing::warn!(
                "no --unsubscribe-url (ORDERFLEET_UNSUBSCRIBE_URL): marketing emails (the \
                 recommendations email) are not sent at all; transactional emails are"
            ),
            Some(u) => tracing::info!(
                unsubscribe_url = %u.url,
                "marketing emails carry an unsubscribe link and List-Unsubscribe headers"
            ),
        }
        if mailer.hasher().is_none() {
            tracing::warn!(
                "no --email-hash-key (ORDERFLEET_EMAIL_HASH_KEY): SES bounces and complaints \
                 cannot be recorded (they are dead-lettered) and no address is suppressed"
            );
        }
        Notifications { mailer }
    }

    async fn confirmation(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let d: OrderAccepted = events::decode(event)?;
        let key = EmailKey::new(&d.order_id, EmailKind::Confirmation);
        let to = Recipient {
            email: d.customer.email.clone(),
            name: d.customer.name.clone(),
        };
        let Some(claim) = self.claim(cx.tx, &key, &to).await? else {
            return Ok(());
        };
        let skus: Vec<String> = d.lines.iter().map(|l| l.sku.clone()).collect();
        let names = product_names(cx.tx, &skus).await?;
        let lines = d
            .lines
            .iter()
            .map(|l| view::LineView {
                sku: l.sku.clone(),
                name: name_of(&names, &l.sku),
                quantity: l.quantity,
                unit_price: format_money(l.unit_price),
                line_total: format_minor(
                    i128::from(l.quantity) * i128::from(l.unit_price.amount_minor),
                    l.unit_price.currency,
                ),
            })
            .collect();
        let view = EmailView::Confirmation(view::Confirmation {
            order_id: d.order_id.clone(),
            customer_name: d.customer.name.clone(),
            placed_on: view::day(d.placed_at),
            lines,
            total: format_money(d.total),
            shipping: view::AddressView::from(&d.shipping_address),
        });
        self.deliver(cx, claim, &view, None).await
    }

    async fn shipped(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderShipped = events::decode(event)?;
        let order = order_facts(cx.tx, &d.order_id).await?;
        let key = EmailKey::new(&d.order_id, EmailKind::Shipped);
        let Some(claim) = self.claim(cx.tx, &key, &order.recipient).await? else {
            return Ok(());
        };
        let skus: Vec<String> = d.lines.iter().map(|l| l.sku.clone()).collect();
        let names = product_names(cx.tx, &skus).await?;
        let view = EmailView::Shipped(view::Shipped {
            order_id: d.order_id.clone(),
            customer_name: order.recipient.name.clone(),
            carrier: d.carrier.clone(),
            tracking_number: d.tracking_number.clone(),
            items: d
                .lines
                .iter()
                .map(|l| view::ItemView {
                    sku: l.sku.clone(),
                    name: name_of(&names, &l.sku),
                    quantity: l.quantity,
                })
                .collect(),
        });
        self.deliver(cx, claim, &view, None).await
    }

    async fn voided(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: PaymentVoided = events::decode(event)?;
        let order = order_facts(cx.tx, &d.order_id).await?;
        let Some(reason) = order.cancel_reason.clone() else {
            tracing::info!(
                order_id = %d.order_id,
                "payment voided for an order that was not cancelled; no email"
            );
            return Ok(());
        };
        let money = if d.authorization_id.is_some() {
            MoneyOutcome::AuthorizationVoided
        } else {
            MoneyOutcome::NothingCharged
        };
        self.cancelled(cx, &d.order_id, &order, reason, money, order.total)
            .await
    }

    async fn refunded(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: PaymentRefunded = events::decode(event)?;
        if d.amount.amount_minor == 0 && d.refunded_total.is_some() {
            // Nothing was left to refund (operators gave it all back before): their refund's
            // email said so already.
            return Ok(());
        }
        let order = order_facts(cx.tx, &d.order_id).await?;
        if let Some(reason) = order.cancel_reason.clone() {
            return self
                .cancelled(
                    cx,
                    &d.order_id,
                    &order,
                    reason,
                    MoneyOutcome::Refunded,
                    Some(d.amount),
                )
                .await;
        }
        let key = EmailKey::new(&d.order_id, EmailKind::Refunded);
        let Some(claim) = self.claim(cx.tx, &key, &order.recipient).await? else {
            return Ok(());
        };
        let view = EmailView::Refunded(view::Refunded {
            order_id: d.order_id.clone(),
            customer_name: order.recipient.name.clone(),
            amount: format_money(d.amount),
            returned: matches!(order.status.as_str(), "returning" | "returned"),
        });
        self.deliver(cx, claim, &view, None).await
    }

    async fn cancelled(
        &self,
        cx: &mut Context<'_>,
        order_id: &str,
        order: &OrderFacts,
        reason: String,
        money: MoneyOutcome,
        amount: Option<Money>,
    ) -> Result<(), HandlerError> {
        let key = EmailKey::new(order_id, EmailKind::Cancelled);
        let Some(claim) = self.claim(cx.tx, &key, &order.recipient).await? else {
            return Ok(());
        };
        let view = EmailView::Cancelled(view::Cancelled {
            order_id: order_id.to_string(),
            customer_name: order.recipient.name.clone(),
            reason,
            money,
            amount: amount.map(format_money).unwrap_or_default(),
        });
        self.deliver(cx, claim, &view, None).await
    }

    /// Claims `key` for this transaction. `None` when its email was already sent or failed for
    /// good under an earlier event.
    async fn claim(
        &self,
        tx: &Tx,
        key: &EmailKey,
        to: &Recipient,
    ) -> Result<Option<Claim>, HandlerError> {
        let masked = mask(&to.email);
        let message_id = self.mailer.message_id(key);
        let claimed = tx
            .execute_cached(
                "INSERT INTO emails (order_id, kind, recipient_masked, message_id, transport, status)
                 VALUES ($1, $2, $3, $4, $5, 'sending')
                 ON CONFLICT (order_id, kind) DO NOTHING",
                &[
                    &key.order_id,
                    &key.kind.as_str(),
                    &masked,
                    &message_id,
                    &self.mailer.transport_name(),
                ],
            )
            .await
            .map_err(|e| HandlerError::from_db("claiming the email", &e))?;
        if claimed == 0 {
            let status: Option<String> = tx
                .query_opt_cached(
                    "SELECT status FROM emails WHERE order_id = $1 AND kind = $2",
                    &[&key.order_id, &key.kind.as_str()],
                )
                .await?
                .map(|r| r.get(0));
            tracing::info!(
                order_id = %key.order_id,
                kind = key.kind.as_str(),
                recipient = %masked,
                status = status.as_deref().unwrap_or("unknown"),
                "email already handled for this order; not sending again"
            );
            return Ok(None);
        }
        if let Some(reason) = self.suppressed(tx, &to.email).await? {
            record_skip(tx, key, &masked, &format!("address suppressed: {reason}")).await?;
            return Ok(None);
        }
        Ok(Some(Claim {
            key: key.clone(),
            to: to.clone(),
            masked,
            message_id,
        }))
    }

    /// Why `address` is on the suppression list (`bounce` or `complaint`, with SES's subtype),
    /// or `None`. Always `None` without a hash key: nothing can have been suppressed.
    async fn suppressed(&self, tx: &Tx, address: &str) -> Result<Option<String>, HandlerError> {
        let Some(hasher) = self.mailer.hasher() else {
            return Ok(None);
        };
        let row = tx
            .query_opt_cached(
                "SELECT reason, detail FROM email_suppressions WHERE address_hash = $1",
                &[&hasher.hash(address)],
            )
            .await
            .map_err(|e| HandlerError::from_db("reading the suppression list", &e))?;
        Ok(row.map(|r| {
            let reason: String = r.get(0);
            match r.get::<_, Option<String>>(1) {
                Some(detail) => format!("{reason} ({detail})"),
                None => reason,
            }
        }))
    }

    /// The "customers also bought" email after a completed order: marketing. Not sent without
    /// an unsubscribe URL (said once at startup), without anything to recommend, or to a
    /// customer who opted out (recorded as skipped).
    async fn recommendations_email(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let d: OrderCompleted = events::decode(event)?;
        let Some(unsubscribe) = self.mailer.unsubscribe() else {
            return Ok(());
        };
        let skus: Vec<String> = d.lines.iter().map(|l| l.sku.clone()).collect();
        let recommendations = self.recommendations(cx.tx, &skus).await?;
        if recommendations.is_empty() {
            tracing::debug!(order_id = %d.order_id, "nothing to recommend; no recommendations email");
            return Ok(());
        }
        let order = order_facts(cx.tx, &d.order_id).await?;
        let key = EmailKey::new(&d.order_id, EmailKind::Recommendations);
        let Some(claim) = self.claim(cx.tx, &key, &order.recipient).await? else {
            return Ok(());
        };
        // By customer, or by address: a guest's next order has a customer id of its own.
        // (The mailer has a hasher whenever it has an unsubscribe link.)
        let address = self.mailer.hasher().map(|h| h.hash(&order.recipient.email));
        let opted_out = cx
            .tx
            .query_opt_cached(
                "SELECT channel FROM marketing_opt_outs WHERE customer_id = $1
                 UNION ALL
                 SELECT channel FROM marketing_opt_out_addresses WHERE address_hash = $2
                 LIMIT 1",
                &[&d.customer_id, &address],
            )
            .await
            .map_err(|e| HandlerError::from_db("reading the marketing opt-outs", &e))?;
        if let Some(row) = opted_out {
            let channel: String = row.get(0);
            let reason = format!("customer opted out of marketing email ({channel})");
            return record_skip(cx.tx, &key, &claim.masked, &reason).await;
        }
        let link = unsubscribe.link(&d.customer_id);
        let view = EmailView::Recommendations(view::Recommendations {
            order_id: d.order_id.clone(),
            customer_name: order.recipient.name.clone(),
            recommendations,
            unsubscribe_url: link.clone(),
        });
        self.deliver(cx, claim, &view, Some(&link)).await
    }

    /// A bounce or complaint SES reported: suppress, or count a transient bounce.
    async fn ses_feedback(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let Some(hasher) = self.mailer.hasher() else {
            return Err(HandlerError::permanent(format!(
                "{} from SES cannot be recorded: this worker has no --email-hash-key \
                 (ORDERFLEET_EMAIL_HASH_KEY); set it, then redrive",
                event.detail_type
            )));
        };
        let ses_event = SesEvent::decode(event)?;
        let message_id = ses_event.mail.message_id.as_str();
        let (recipients, reason, detail) = match ses_event.feedback()? {
            Feedback::TransientBounce {
                recipients,
                bounce_type,
            } => {
                for address in &recipients {
                    let masked = mask(address);
                    cx.tx
                        .execute_cached(
                            "INSERT INTO email_transient_bounces
                                    (address_hash, address_masked, last_event_id, first_seen, last_seen)
                             VALUES ($1, $2, $3, $4, $4)
                             ON CONFLICT (address_hash) DO UPDATE
                                SET bounces = email_transient_bounces.bounces + 1,
                                    last_event_id = EXCLUDED.last_event_id,
                                    last_seen = GREATEST(email_transient_bounces.last_seen,
                                                         EXCLUDED.last_seen)",
                            &[&hasher.hash(address), &masked, &event.id, &event.time],
                        )
                        .await
                        .map_err(|e| HandlerError::from_db("counting a transient bounce", &e))?;
                    tracing::info!(
                        recipient = %masked,
                        bounce_type = %bounce_type,
                        ses_message_id = message_id,
                        "transient bounce counted; the address is not suppressed"
                    );
                }
                return Ok(());
            }
            Feedback::PermanentBounce {
                recipients,
                sub_type,
            } => (recipients, "bounce", sub_type),
            Feedback::Complaint {
                recipients,
                feedback_type,
            } => (recipients, "complaint", feedback_type),
        };
        for address in &recipients {
            let masked = mask(address);
            // The first reason stays: a complaint after a bounce (or the reverse) only counts.
            cx.tx
                .execute_cached(
                    "INSERT INTO email_suppressions
                            (address_hash, address_masked, reason, detail, source_event_id,
                             last_event_id, ses_message_id, first_seen, last_seen)
                     VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $7)
                     ON CONFLICT (address_hash) DO UPDATE
                        SET events = email_suppressions.events + 1,
                            last_event_id = EXCLUDED.last_event_id,
                            ses_message_id = EXCLUDED.ses_message_id,
                            last_seen = GREATEST(email_suppressions.last_seen, EXCLUDED.last_seen)",
                    &[
                        &hasher.hash(address),
                        &masked,
                        &reason,
                        &detail,
                        &event.id,
                        &message_id,
                        &event.time,
                    ],
                )
                .await
                .map_err(|e| HandlerError::from_db("suppressing an address", &e))?;
            tracing::warn!(
                recipient = %masked,
                reason,
                detail = detail.as_deref().unwrap_or(""),
                ses_message_id = message_id,
                "address suppressed: no more email goes to it"
            );
        }
        if recipients.is_empty() {
            tracing::warn!(
                ses_message_id = message_id,
                reason,
                "SES event names no recipient; nothing suppressed"
            );
        }
        Ok(())
    }

    /// Records a customer's opt-out of marketing email.
    async fn opt_out(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: MarketingOptOut = events::decode(event)?;
        let id = d
            .customer
            .id
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let email = d
            .customer
            .email
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        // The customers it names, and the addresses: the given one, or the customer's.
        let (customers, addresses): (Vec<String>, Vec<String>) = match (id, email) {
            (Some(id), _) => {
                let known: Option<String> = cx
                    .tx
                    .query_opt_cached("SELECT email FROM customers WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| HandlerError::from_db("looking the customer up", &e))?
                    .and_then(|r| r.get(0));
                let addresses = email.map(str::to_string).or(known).into_iter().collect();
                (vec![id.to_string()], addresses)
            }
            (None, Some(email)) => {
                let customers = cx
                    .tx
                    .query_cached(
                        "SELECT id FROM customers WHERE lower(email) = lower($1) ORDER BY id",
                        &[&email],
                    )
                    .await
                    .map_err(|e| HandlerError::from_db("looking the address up", &e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                (customers, vec![email.to_string()])
            }
            (None, None) => {
                return Err(HandlerError::permanent(
                    "MarketingOptOut names no customer: give customer.id or customer.email",
                ))
            }
        };
        let key = event.event_key();
        if let Some(hasher) = self.mailer.hasher() {
            for address in &addresses {
                cx.tx
                    .execute_cached(
                        "INSERT INTO marketing_opt_out_addresses (address_hash, channel, event_id)
                         VALUES ($1, $2, $3) ON CONFLICT (address_hash) DO NOTHING",
                        &[&hasher.hash(address), &d.channel.as_str(), &key],
                    )
                    .await
                    .map_err(|e| HandlerError::from_db("recording the opt-out", &e))?;
            }
        } else if customers.is_empty() {
            tracing::warn!(
                recipient = %mask(email.unwrap_or("")),
                "MarketingOptOut: no customer has this address and this worker has no \
                 --email-hash-key to keep it by address; nothing recorded"
            );
        }
        for customer in &customers {
            let recorded = cx
                .tx
                .execute_cached(
                    "INSERT INTO marketing_opt_outs (customer_id, channel, event_id)
                     VALUES ($1, $2, $3) ON CONFLICT (customer_id) DO NOTHING",
                    &[customer, &d.channel.as_str(), &key],
                )
                .await
                .map_err(|e| HandlerError::from_db("recording the opt-out", &e))?;
            tracing::info!(
                customer_id = %customer,
                channel = d.channel.as_str(),
                already = recorded == 0,
                "customer opted out of marketing email"
            );
        }
        Ok(())
    }

    /// Composes, sends and records the claimed email; `unsubscribe` is a marketing email's
    /// link, for its List-Unsubscribe headers.
    async fn deliver(
        &self,
        cx: &Context<'_>,
        claim: Claim,
        view: &EmailView,
        unsubscribe: Option<&str>,
    ) -> Result<(), HandlerError> {
        let tx = cx.tx;
        let Claim {
            key,
            to,
            masked,
            message_id,
        } = claim;
        let message = match self
            .mailer
            .compose(&key, &to.email, &to.name, view, unsubscribe)
        {
            Ok(message) => message,
            Err(ComposeError::InvalidAddress { masked, reason }) => {
                let error = redact(&format!("invalid address {masked}: {reason}"), &to.email);
                return record_failure(tx, &key, &masked, &error).await;
            }
            Err(ComposeError::Build(reason)) => {
                // A template or builder defect: every email of this kind fails alike. The DLQ
                // keeps the event until a fixed build redrives it.
                return Err(HandlerError::permanent(redact(&reason, &to.email)));
            }
        };
        // The send ends before the handler's time does, leaving time to record it and commit:
        // a send abandoned by the runtime after the server accepted it would be repeated.
        let limit = cx.call_timeout(self.mailer.send_timeout());
        match self.mailer.send_within(&key, &message, limit).await {
            Ok(sent) => {
                tx.execute_cached(
                    "UPDATE emails SET status = 'sent', sent_at = now(), error = NULL,
                            provider_message_id = $3
                      WHERE order_id = $1 AND kind = $2",
                    &[&key.order_id, &key.kind.as_str(), &sent.provider_id],
                )
                .await
                .map_err(|e| HandlerError::from_db("recording the sent email", &e))?;
                tracing::info!(
                    order_id = %key.order_id,
                    kind = key.kind.as_str(),
                    recipient = %masked,
                    transport = self.mailer.transport_name(),
                    message_id = %message_id,
                    provider_id = sent.provider_id.as_deref().unwrap_or(""),
                    "email sent"
                );
                Ok(())
            }
            Err(SendError::Rejected(reason)) => {
                record_failure(tx, &key, &masked, &redact(&reason, &to.email)).await
            }
            Err(SendError::Transient(reason)) => Err(HandlerError::retry(format!(
                "sending the {} email to {masked}: {}",
                key.kind,
                redact(&reason, &to.email)
            ))),
            Err(SendError::Misconfigured(reason)) => Err(HandlerError::permanent(format!(
                "sending the {} email: {}; fix the email settings, then redrive",
                key.kind,
                redact(&reason, &to.email)
            ))),
        }
    }

    /// Up to the configured number of "bought together" products for `skus`. The query runs
    /// under a savepoint: recommendations are a nicety, so their failure is logged and no
    /// recommendations email goes out.
    async fn recommendations(
        &self,
        tx: &Tx,
        skus: &[String],
    ) -> Result<Vec<view::RecommendationView>, HandlerError> {
        let n = self.mailer.recommendations();
        if n == 0 || skus.is_empty() {
            return Ok(Vec::new());
        }
        tx.batch_execute(&format!("SAVEPOINT {RECOMMENDATIONS_SAVEPOINT}"))
            .await?;
        match crate::store::recommendations::top_for_skus(tx, skus, n).await {
            Ok(found) => {
                tx.batch_execute(&format!("RELEASE SAVEPOINT {RECOMMENDATIONS_SAVEPOINT}"))
                    .await?;
                Ok(found
                    .into_iter()
                    .filter(|r| !skus.contains(&r.sku))
                    .take(n)
                    .map(|r| view::RecommendationView {
                        sku: r.sku,
                        name: r.name,
                    })
                    .collect())
            }
            Err(e) => {
                tx.batch_execute(&format!(
                    "ROLLBACK TO SAVEPOINT {RECOMMENDATIONS_SAVEPOINT}"
                ))
                .await?;
                tracing::warn!(
                    error = format!("{e:#}"),
                    "no recommendations for this email"
                );
                Ok(Vec::new())
            }
        }
    }
}

#[async_trait]
impl Handler for Notifications {
    type Batch = ();

    fn name(&self) -> &str {
        "notifications"
    }

    /// With the file outbox, an email is a file whose name is its key, written locally: a
    /// group's emails are written one after the other in one transaction, and a group rolled
    /// back and run again overwrites the same files, so no email repeats. Over SMTP or SES a
    /// send waits on a server and a rolled-back group would deliver each of its emails again:
    /// one event per transaction, as the module documentation describes.
    fn group_commit(&self) -> bool {
        self.mailer.answers_locally()
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        if event.source == ses::SOURCE {
            return self.ses_feedback(event, cx).await;
        }
        match event.detail_type.as_str() {
            OrderAccepted::DETAIL_TYPE => self.confirmation(event, cx).await,
            OrderCompleted::DETAIL_TYPE => self.recommendations_email(event, cx).await,
            MarketingOptOut::DETAIL_TYPE => self.opt_out(event, cx).await,
            OrderShipped::DETAIL_TYPE => self.shipped(event, cx).await,
            PaymentVoided::DETAIL_TYPE => self.voided(event, cx).await,
            PaymentRefunded::DETAIL_TYPE => self.refunded(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "notifications does not handle {other}"
            ))),
        }
    }
}

/// Who an email goes to.
#[derive(Debug, Clone)]
struct Recipient {
    email: String,
    name: String,
}

/// A claimed `(order, kind)`: this transaction sends its email.
struct Claim {
    key: EmailKey,
    to: Recipient,
    masked: String,
    message_id: String,
}

/// Records a permanent refusal. The handler then succeeds: the event is done.
async fn record_failure(
    tx: &Tx,
    key: &EmailKey,
    masked: &str,
    error: &str,
) -> Result<(), HandlerError> {
    tx.execute_cached(
        "UPDATE emails SET status = 'failed_permanent', error = $3
          WHERE order_id = $1 AND kind = $2",
        &[&key.order_id, &key.kind.as_str(), &error],
    )
    .await
    .map_err(|e| HandlerError::from_db("recording the failed email", &e))?;
    tracing::warn!(
        order_id = %key.order_id,
        kind = key.kind.as_str(),
        recipient = %masked,
        error,
        "email refused for good; recorded as failed_permanent, not retried"
    );
    Ok(())
}

/// Records that the claimed email is not sent, and why. The handler then succeeds.
async fn record_skip(
    tx: &Tx,
    key: &EmailKey,
    masked: &str,
    reason: &str,
) -> Result<(), HandlerError> {
    tx.execute_cached(
        "UPDATE emails SET status = 'skipped', skip_reason = $3
          WHERE order_id = $1 AND kind = $2",
        &[&key.order_id, &key.kind.as_str(), &reason],
    )
    .await
    .map_err(|e| HandlerError::from_db("recording the skipped email", &e))?;
    tracing::info!(
        order_id = %key.order_id,
        kind = key.kind.as_str(),
        recipient = %masked,
        reason,
        "email not sent; recorded as skipped"
    );
    Ok(())
}

/// What notifications needs of an order it did not see accepted.
struct OrderFacts {
    recipient: Recipient,
    status: String,
    /// Set exactly when orders emitted `OrderCancelled` for it.
    cancel_reason: Option<String>,
    total: Option<Money>,
}

/// Reads the order and its customer, as orders committed them before emitting any event about
/// the order. A missing order is permanent: no later delivery can make it appear.
async fn order_facts(tx: &Tx, order_id: &str) -> Result<OrderFacts, HandlerError> {
    let row = tx
        .query_opt_cached(
            "SELECT c.email, c.name, o.status, o.cancel_reason, o.total_minor, o.currency::text
               FROM orders o JOIN customers c ON c.id = o.customer_id
              WHERE o.id = $1",
            &[&order_id],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading the order", &e))?
        .ok_or_else(|| {
            HandlerError::permanent(format!(
                "order {order_id} or its customer is unknown to orders; cannot address an email"
            ))
        })?;
    let total_minor: Option<i64> = row.get(4);
    let currency: Option<String> = row.get(5);
    let total = match (total_minor, currency.as_deref().map(Currency::new)) {
        (Some(minor), Some(Ok(currency))) => Some(Money::new(minor, currency)),
        _ => None,
    };
    Ok(OrderFacts {
        recipient: Recipient {
            email: row.get(0),
            name: row.get(1),
        },
        status: row.get(2),
        cancel_reason: row.get(3),
        total,
    })
}

/// Product names from the catalogue (`products.doc->>'name'`), by SKU.
async fn product_names(tx: &Tx, skus: &[String]) -> Result<HashMap<String, String>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT sku, doc->>'name' FROM products WHERE sku = ANY($1)",
            &[&skus],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading product names", &e))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: Option<String> = r.get(1);
            name.filter(|n| !n.trim().is_empty()).map(|n| (r.get(0), n))
        })
        .collect())
}

/// The product's name, or its SKU when the catalogue has none.
fn name_of(names: &HashMap<String, String>, sku: &str) -> String {
    names.get(sku).cloned().unwrap_or_else(|| sku.to_string())
}
