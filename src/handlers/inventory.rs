//! inventory: on-hand and reserved quantities per SKU, and the product catalogue.
//!
//! Restocks on `StockReceived`; keeps product documents from `ProductUpserted`.

use async_trait::async_trait;
use serde::Deserialize;

use crate::envelope::Envelope;
use crate::handlers::{Context, Handler};
use crate::outcome::HandlerError;

pub struct Inventory;

#[derive(Debug, Deserialize)]
struct StockReceived {
    sku: String,
    quantity: i64,
}

#[derive(Debug, Deserialize)]
struct ProductUpserted {
    sku: String,
    #[serde(flatten)]
    doc: serde_json::Map<String, serde_json::Value>,
}

fn decode<T: serde::de::DeserializeOwned>(event: &Envelope) -> Result<T, HandlerError> {
    serde_json::from_value(event.detail.clone()).map_err(|e| {
        HandlerError::poison(format!(
            "{} detail does not match its schema: {e}",
            event.detail_type
        ))
    })
}

#[async_trait]
impl Handler for Inventory {
    fn name(&self) -> &str {
        "inventory"
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            "StockReceived" => {
                let d: StockReceived = decode(event)?;
                if d.quantity <= 0 {
                    return Err(HandlerError::permanent(format!(
                        "StockReceived for {} has a non-positive quantity {}",
                        d.sku, d.quantity
                    )));
                }
                cx.tx
                    .execute(
                        "INSERT INTO stock (sku, on_hand) VALUES ($1, $2)
                         ON CONFLICT (sku) DO UPDATE SET on_hand = stock.on_hand + EXCLUDED.on_hand",
                        &[&d.sku, &d.quantity],
                    )
                    .await?;
                cx.tx
                    .execute(
                        "INSERT INTO stock_movements (sku, kind, quantity, event_key) VALUES ($1, 'received', $2, $3)",
                        &[&d.sku, &d.quantity, &event.event_key()],
                    )
                    .await?;
                Ok(())
            }
            "ProductUpserted" => {
                let d: ProductUpserted = decode(event)?;
                let mut doc = d.doc;
                doc.remove("event_id");
                doc.insert("sku".into(), serde_json::Value::String(d.sku.clone()));
                let doc = serde_json::Value::Object(doc);
                cx.tx
                    .execute(
                        "INSERT INTO products (sku, doc) VALUES ($1, $2)
                         ON CONFLICT (sku) DO UPDATE SET doc = EXCLUDED.doc, updated_at = now()",
                        &[&d.sku, &doc],
                    )
                    .await?;
                Ok(())
            }
            other => Err(HandlerError::permanent(format!(
                "inventory does not handle {other}"
            ))),
        }
    }
}
