//! Webhook deliveries already acted upon. A CI service sends a delivery again when it did not
//! see an answer in time, and an operator can redeliver by hand; each is acted upon once.

use rusqlite::{params, TransactionBehavior};

use super::{Store, StoreError};

/// How long a delivery id is remembered. GitHub redelivers within days at most.
const KEEP_MS: i64 = 7 * 24 * 3600 * 1000;
/// The longest delivery id kept; GitHub's are UUIDs.
const MAX_DELIVERY_ID_LEN: usize = 128;

impl Store {
    /// Records delivery `id`; `false` when it was recorded before, so it is not acted upon again.
    /// Deliveries older than a week are forgotten on the way.
    pub fn record_delivery(&self, id: &str) -> Result<bool, StoreError> {
        if id.is_empty()
            || id.len() > MAX_DELIVERY_ID_LEN
            || !id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(StoreError::invalid(
                "delivery",
                format!("a delivery id is 1 to {MAX_DELIVERY_ID_LEN} printable characters"),
            ));
        }
        let now_ms = self.now_ms();
        let mut connection = self.connection();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute(
            "DELETE FROM webhook_deliveries WHERE received_at_ms < ?1",
            [now_ms - KEEP_MS],
        )?;
        let inserted = transaction.execute(
            "INSERT OR IGNORE INTO webhook_deliveries (id, received_at_ms) VALUES (?1, ?2)",
            params![id, now_ms],
        )?;
        transaction.commit()?;
        Ok(inserted == 1)
    }
}
