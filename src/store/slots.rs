//! Pools and their slots as last recorded, so that a restarted daemon knows which domains,
//! overlays and jobs were its own.
//!
//! Pools are never deleted: a pool dropped from the configuration keeps its row, and the jobs
//! that ran on it keep naming it.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, Row, ToSql};
use serde::Serialize;

use super::audit::Event;
use super::{check_identifier, Actor, Store, StoreError};
use crate::slot::SlotState;

/// As long as the configuration allows a pool name to be.
const MAX_POOL_NAME_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolRecord {
    pub name: String,
    /// The generation of the image the pool's clean snapshots were built from.
    pub image_generation: u64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotRecord {
    pub pool: String,
    pub index: u32,
    pub state: SlotState,
    /// The job the slot is running or was last handed.
    pub job_id: Option<String>,
    pub updated_at_ms: i64,
}

impl ToSql for SlotState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for SlotState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        SlotState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown slot state `{text}`").into()))
    }
}

impl Store {
    /// Records a pool, or the new image generation of a known one.
    pub fn upsert_pool(
        &self,
        actor: &Actor,
        name: &str,
        image_generation: u64,
    ) -> Result<PoolRecord, StoreError> {
        check_identifier("pool", name, MAX_POOL_NAME_LEN)?;
        let generation = i64::try_from(image_generation)
            .map_err(|_| StoreError::invalid("image_generation", "is too large"))?;
        self.mutate(actor, |transaction, now_ms| {
            transaction.execute(
                "INSERT INTO pools (name, image_generation, updated_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET image_generation = excluded.image_generation,
                     updated_at_ms = excluded.updated_at_ms",
                params![name, generation, now_ms],
            )?;
            let pool =
                PoolRecord { name: name.to_owned(), image_generation, updated_at_ms: now_ms };
            let event = Event::new("pool.upsert", format!("pool/{name}"), &pool);
            Ok((pool, event))
        })
    }

    pub fn list_pools(&self) -> Result<Vec<PoolRecord>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT name, image_generation, updated_at_ms FROM pools ORDER BY name")?;
        let rows = statement.query_map([], |row| {
            let generation: i64 = row.get(1)?;
            Ok(PoolRecord {
                name: row.get(0)?,
                image_generation: u64::try_from(generation)
                    .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(1, generation))?,
                updated_at_ms: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a slot's state and job.
    pub fn upsert_slot(
        &self,
        actor: &Actor,
        pool: &str,
        index: u32,
        state: SlotState,
        job_id: Option<&str>,
    ) -> Result<SlotRecord, StoreError> {
        self.mutate(actor, |transaction, now_ms| {
            check_pool_exists(transaction, pool)?;
            if let Some(job_id) = job_id {
                check_job_exists(transaction, job_id)?;
            }
            transaction.execute(
                "INSERT INTO slots (pool, slot_index, state, job_id, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (pool, slot_index) DO UPDATE SET state = excluded.state,
                     job_id = excluded.job_id, updated_at_ms = excluded.updated_at_ms",
                params![pool, index, state, job_id, now_ms],
            )?;
            let slot = SlotRecord {
                pool: pool.to_owned(),
                index,
                state,
                job_id: job_id.map(str::to_owned),
                updated_at_ms: now_ms,
            };
            let event = Event::new("slot.upsert", format!("slot/{pool}/{index}"), &slot);
            Ok((slot, event))
        })
    }

    /// Every slot, or only `pool`'s when it is given.
    pub fn list_slots(&self, pool: Option<&str>) -> Result<Vec<SlotRecord>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT pool, slot_index, state, job_id, updated_at_ms FROM slots
             WHERE ?1 IS NULL OR pool = ?1 ORDER BY pool, slot_index",
        )?;
        let rows = statement.query_map([pool], slot_columns)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn slot_columns(row: &Row<'_>) -> rusqlite::Result<SlotRecord> {
    Ok(SlotRecord {
        pool: row.get(0)?,
        index: row.get(1)?,
        state: row.get(2)?,
        job_id: row.get(3)?,
        updated_at_ms: row.get(4)?,
    })
}

fn exists(
    connection: &Connection,
    sql: &str,
    values: impl rusqlite::Params,
) -> rusqlite::Result<bool> {
    connection.query_row(sql, values, |row| row.get(0))
}

pub(super) fn check_pool_exists(connection: &Connection, pool: &str) -> Result<(), StoreError> {
    if !exists(connection, "SELECT EXISTS (SELECT 1 FROM pools WHERE name = ?1)", [pool])? {
        return Err(StoreError::not_found("pool", pool));
    }
    Ok(())
}

pub(super) fn check_slot_exists(
    connection: &Connection,
    pool: &str,
    index: u32,
) -> Result<(), StoreError> {
    let sql = "SELECT EXISTS (SELECT 1 FROM slots WHERE pool = ?1 AND slot_index = ?2)";
    if !exists(connection, sql, params![pool, index])? {
        return Err(StoreError::not_found("slot", format!("{pool}/{index}")));
    }
    Ok(())
}

fn check_job_exists(connection: &Connection, id: &str) -> Result<(), StoreError> {
    if !exists(connection, "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1)", [id])? {
        return Err(StoreError::not_found("job", id));
    }
    Ok(())
}
