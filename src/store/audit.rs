//! The audit log: one row per change, written in the change's own transaction.
//!
//! An entry's `detail` is the changed record as it is after the change (for a deletion, as it
//! was, with what the deletion took along), so that replaying the log in order rebuilds the
//! tables. Secret values and token hashes are never part of it.

use rusqlite::{params, Transaction};
use serde::Serialize;
use serde_json::Value;

use super::{check_limit, Actor, Store, StoreError};

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    /// A token id, `local-root` or `daemon`.
    pub actor: String,
    /// What was done, as `tenant.create` or `job.start`.
    pub action: String,
    /// What it was done to, as `tenant/<id>` or `slot/<pool>/<index>`.
    pub target: String,
    #[schema(value_type = Object)]
    pub detail: Value,
}

/// A change's audit row, before it is written.
pub(super) struct Event {
    pub action: &'static str,
    pub target: String,
    pub detail: Value,
}

impl Event {
    pub fn new(action: &'static str, target: String, detail: &impl Serialize) -> Event {
        let detail = serde_json::to_value(detail).expect("store records serialise to JSON");
        Event { action, target, detail }
    }
}

pub(super) fn insert(
    transaction: &Transaction<'_>,
    at_ms: i64,
    actor: &Actor,
    event: &Event,
) -> Result<(), StoreError> {
    transaction.execute(
        "INSERT INTO audit_log (at_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at_ms, actor.to_string(), event.action, event.target, event.detail.to_string()],
    )?;
    Ok(())
}

impl Store {
    /// Up to `limit` audit entries in the order they were written, from the one after the
    /// entry with id `after` (from the first when `None`).
    pub fn list_audit(
        &self,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        check_limit(limit)?;
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT id, at_ms, actor, action, target, detail FROM audit_log
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = statement.query_map(params![after.unwrap_or(0), limit], |row| {
            Ok(AuditEntry {
                id: row.get(0)?,
                at_ms: row.get(1)?,
                actor: row.get(2)?,
                action: row.get(3)?,
                target: row.get(4)?,
                detail: row
                    .get::<_, String>(5)
                    .map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text)))?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
