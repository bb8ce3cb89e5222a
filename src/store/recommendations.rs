//! "Bought together" recommendations, read from the item-to-item co-occurrence table
//! `co_purchases` that the personalization worker keeps (see
//! [`crate::handlers::personalization`]).
//!
//! `co_purchases(sku, other_sku, count)` holds both directions of every pair, so the
//! recommendations for a set of SKUs are one primary-key range scan per SKU, summed.

use anyhow::{Context, Result};
use deadpool_postgres::GenericClient;
use serde::Serialize;

/// One recommended product.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    /// The recommended SKU.
    pub sku: String,
    /// Its name from the catalogue (`products.doc->>'name'`); the SKU itself when the catalogue
    /// has no name for it.
    pub name: String,
    /// How many completed orders bought it together with any of the given SKUs, summed over
    /// those SKUs.
    pub score: i64,
}

/// The top `n` SKUs bought together with any of `skus`, excluding `skus` themselves, ordered by
/// score (descending) and then SKU, so that ties are stable.
pub async fn top_for_skus(
    client: &impl GenericClient,
    skus: &[String],
    n: usize,
) -> Result<Vec<Recommendation>> {
    if skus.is_empty() || n == 0 {
        return Ok(Vec::new());
    }
    // LIMIT takes a bigint; a usize beyond i64::MAX means "all of them".
    let limit = i64::try_from(n).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT c.other_sku,
                    COALESCE(p.doc->>'name', c.other_sku) AS name,
                    SUM(c.count)::bigint AS score
               FROM co_purchases c
               LEFT JOIN products p ON p.sku = c.other_sku
              WHERE c.sku = ANY($1) AND NOT (c.other_sku = ANY($1))
              GROUP BY c.other_sku, p.doc
              ORDER BY score DESC, c.other_sku
              LIMIT $2",
            &[&skus, &limit],
        )
        .await
        .context("reading bought-together recommendations")?;
    Ok(rows
        .iter()
        .map(|row| Recommendation {
            sku: row.get(0),
            name: row.get(1),
            score: row.get(2),
        })
        .collect())
}
