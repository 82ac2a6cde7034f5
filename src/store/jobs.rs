//! Jobs: one CI job of a tenant, from the queue to its end.
//!
//! ```text
//!            assign            start             finish
//!  Queued ──────────> Assigned ──────> Started ──────────> Finished
//!    │  ^  requeue       │                │
//!    │  └────────────────┤                │ fail
//!    │ fail              │ fail           v
//!    └───────────────────┴────────────> Failed
//! ```
//!
//! A job is requeued when its slot stopped being ready before the job reached the guest.
//! Listings are newest first and paged by keyset: a page ends with a cursor, and the next page
//! holds the jobs recorded before it, so that jobs recorded meanwhile neither repeat nor push
//! others off a page.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Value, ValueRef};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, ToSql};
use serde::{Deserialize, Serialize};

use super::audit::Event;
use super::slots::{check_pool_exists, check_slot_exists};
use super::tenants::get_tenant;
use super::{check_limit, is_unique_violation, Actor, Store, StoreError};

/// The longest failure reason kept; a longer one, which a guest can cause, is cut.
pub const MAX_FAILURE_BYTES: usize = 4096;
const MAX_ID_LEN: usize = 128;
/// The largest detail a job keeps from its CI service.
const MAX_DETAIL_BYTES: usize = 16 * 1024;
/// The page size of a [`JobFilter`] that does not choose one.
const DEFAULT_PAGE: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Assigned,
    Started,
    Finished,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Started,
        JobState::Finished,
        JobState::Failed,
    ];

    /// The transition table: whether a job may go from `self` to `to`.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Assigned)
                | (Queued, Failed)
                | (Assigned, Queued)
                | (Assigned, Started)
                | (Assigned, Failed)
                | (Started, Finished)
                | (Started, Failed)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Started => "started",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for JobState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for JobState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown job state `{text}`").into()))
    }
}

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobTransition {
    /// The job was handed to slot `slot_index` of its pool.
    Assign { slot_index: u32 },
    /// The slot stopped being ready before the job reached it; the job waits again.
    Requeue,
    /// The guest started the job.
    Start,
    /// The guest reported the job finished.
    Finish { exit_code: i32 },
    /// The job ended without the guest reporting it finished.
    Fail { reason: String },
}

impl JobTransition {
    fn state(&self) -> JobState {
        match self {
            JobTransition::Assign { .. } => JobState::Assigned,
            JobTransition::Requeue => JobState::Queued,
            JobTransition::Start => JobState::Started,
            JobTransition::Finish { .. } => JobState::Finished,
            JobTransition::Fail { .. } => JobState::Failed,
        }
    }

    fn action(&self) -> &'static str {
        match self {
            JobTransition::Assign { .. } => "job.assign",
            JobTransition::Requeue => "job.requeue",
            JobTransition::Start => "job.start",
            JobTransition::Finish { .. } => "job.finish",
            JobTransition::Fail { .. } => "job.fail",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub tenant_id: String,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: String,
    pub tenant_id: String,
    pub pool: String,
    pub slot_index: Option<u32>,
    pub state: JobState,
    pub queued_at_ms: i64,
    pub assigned_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub failure: Option<String>,
    /// What the job's CI service says of it, e.g. a GitHub job's id, repository, runner and
    /// conclusion.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

/// Where a page of jobs ended. Opaque to callers; it travels through the API as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor(i64);

impl fmt::Display for JobCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for JobCursor {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<JobCursor, StoreError> {
        match text.parse::<i64>() {
            Ok(seq) if seq > 0 => Ok(JobCursor(seq)),
            _ => Err(StoreError::invalid("after", format!("`{text}` is not a job cursor"))),
        }
    }
}

/// Which jobs to list. Every filter that is set must match.
#[derive(Debug, Clone)]
pub struct JobFilter {
    pub tenant_id: Option<String>,
    pub state: Option<JobState>,
    /// Only jobs queued at or after this time.
    pub queued_since_ms: Option<i64>,
    /// Only jobs queued before this time.
    pub queued_before_ms: Option<i64>,
    /// Continue after the page that ended with this cursor.
    pub after: Option<JobCursor>,
    pub limit: u32,
}

impl Default for JobFilter {
    fn default() -> JobFilter {
        JobFilter {
            tenant_id: None,
            state: None,
            queued_since_ms: None,
            queued_before_ms: None,
            after: None,
            limit: DEFAULT_PAGE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPage {
    pub jobs: Vec<JobRecord>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<JobCursor>,
}

impl Store {
    /// Records a job of `tenant_id` waiting for a slot of `pool`.
    pub fn record_job(&self, actor: &Actor, new: NewJob) -> Result<JobRecord, StoreError> {
        check_job_id(&new.id)?;
        self.mutate(actor, |transaction, now_ms| {
            get_tenant(transaction, &new.tenant_id)?;
            check_pool_exists(transaction, &new.pool)?;
            let job = JobRecord {
                id: new.id,
                tenant_id: new.tenant_id,
                pool: new.pool,
                slot_index: None,
                state: JobState::Queued,
                queued_at_ms: now_ms,
                assigned_at_ms: None,
                started_at_ms: None,
                finished_at_ms: None,
                exit_code: None,
                failure: None,
                detail: None,
            };
            transaction
                .execute(
                    "INSERT INTO jobs (id, tenant_id, pool, state, queued_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![job.id, job.tenant_id, job.pool, job.state, job.queued_at_ms],
                )
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict { what: "job", field: "id", value: job.id.clone() }
                    } else {
                        e.into()
                    }
                })?;
            let event = Event::new("job.record", target(&job.id), &job);
            Ok((job, event))
        })
    }

    /// Moves a job on, refusing a transition that its state does not allow.
    pub fn transition_job(
        &self,
        actor: &Actor,
        id: &str,
        transition: JobTransition,
    ) -> Result<JobRecord, StoreError> {
        self.mutate(actor, |transaction, now_ms| {
            let mut job = get_job(transaction, id)?;
            let to = transition.state();
            if !job.state.can_become(to) {
                return Err(StoreError::Transition { job: job.id, from: job.state, to });
            }
            let action = transition.action();
            apply(transaction, &mut job, transition, now_ms)?;
            update(transaction, &job)?;
            let event = Event::new(action, target(&job.id), &job);
            Ok((job, event))
        })
    }

    /// Replaces what the job's CI service says of it.
    pub fn set_job_detail(
        &self,
        actor: &Actor,
        id: &str,
        detail: serde_json::Value,
    ) -> Result<JobRecord, StoreError> {
        let text = detail.to_string();
        if text.len() > MAX_DETAIL_BYTES {
            return Err(StoreError::invalid("detail", format!("over {MAX_DETAIL_BYTES} bytes")));
        }
        self.mutate(actor, |transaction, _| {
            let mut job = get_job(transaction, id)?;
            transaction.execute("UPDATE jobs SET detail = ?2 WHERE id = ?1", params![id, text])?;
            job.detail = Some(detail);
            let event = Event::new("job.detail", target(&job.id), &job);
            Ok((job, event))
        })
    }

    pub fn get_job(&self, id: &str) -> Result<JobRecord, StoreError> {
        get_job(&self.connection(), id)
    }

    /// One page of the jobs that match `filter`, newest first.
    pub fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        check_limit(filter.limit)?;
        let (sql, values) = list_query(filter);
        let connection = self.connection();
        let mut statement = connection.prepare(&sql)?;
        let rows = statement.query_map(params_from_iter(values), |row| {
            Ok((row.get::<_, i64>(0)?, job_columns(row, 1)?))
        })?;
        let mut rows: Vec<(i64, JobRecord)> = rows.collect::<Result<_, _>>()?;

        // One row more than the page was read, to know whether another page follows.
        let more = rows.len() > filter.limit as usize;
        rows.truncate(filter.limit as usize);
        let next = match rows.last() {
            Some((seq, _)) if more => Some(JobCursor(*seq)),
            _ => None,
        };
        Ok(JobPage { jobs: rows.into_iter().map(|(_, job)| job).collect(), next })
    }
}

/// The statement and its values for `filter`; only the filters that are set become conditions,
/// so that SQLite can use the index of the one that narrows most.
fn list_query(filter: &JobFilter) -> (String, Vec<Value>) {
    let mut sql = format!("SELECT seq, {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
    let mut values = Vec::new();
    let mut condition = |clause: &str, value: Value| {
        sql.push_str(clause);
        values.push(value);
    };
    if let Some(tenant_id) = &filter.tenant_id {
        condition(" AND tenant_id = ?", Value::Text(tenant_id.clone()));
    }
    if let Some(state) = filter.state {
        condition(" AND state = ?", Value::Text(state.as_str().into()));
    }
    if let Some(since_ms) = filter.queued_since_ms {
        condition(" AND queued_at_ms >= ?", Value::Integer(since_ms));
    }
    if let Some(before_ms) = filter.queued_before_ms {
        condition(" AND queued_at_ms < ?", Value::Integer(before_ms));
    }
    if let Some(JobCursor(seq)) = filter.after {
        condition(" AND seq < ?", Value::Integer(seq));
    }
    condition(" ORDER BY seq DESC LIMIT ?", Value::Integer(i64::from(filter.limit) + 1));
    (sql, values)
}

fn apply(
    connection: &Connection,
    job: &mut JobRecord,
    transition: JobTransition,
    now_ms: i64,
) -> Result<(), StoreError> {
    job.state = transition.state();
    match transition {
        JobTransition::Assign { slot_index } => {
            check_slot_exists(connection, &job.pool, slot_index)?;
            job.slot_index = Some(slot_index);
            job.assigned_at_ms = Some(now_ms);
        }
        JobTransition::Requeue => {
            job.slot_index = None;
            job.assigned_at_ms = None;
        }
        JobTransition::Start => job.started_at_ms = Some(now_ms),
        JobTransition::Finish { exit_code } => {
            job.exit_code = Some(exit_code);
            job.finished_at_ms = Some(now_ms);
        }
        JobTransition::Fail { reason } => {
            job.failure = Some(cut(reason, MAX_FAILURE_BYTES));
            job.finished_at_ms = Some(now_ms);
        }
    }
    Ok(())
}

fn update(connection: &Connection, job: &JobRecord) -> Result<(), StoreError> {
    connection.execute(
        "UPDATE jobs SET slot_index = ?2, state = ?3, assigned_at_ms = ?4, started_at_ms = ?5,
             finished_at_ms = ?6, exit_code = ?7, failure = ?8
         WHERE id = ?1",
        params![
            job.id,
            job.slot_index,
            job.state,
            job.assigned_at_ms,
            job.started_at_ms,
            job.finished_at_ms,
            job.exit_code,
            job.failure,
        ],
    )?;
    Ok(())
}

const JOB_COLUMNS: &str = "id, tenant_id, pool, slot_index, state, queued_at_ms, assigned_at_ms,
    started_at_ms, finished_at_ms, exit_code, failure, detail";

fn get_job(connection: &Connection, id: &str) -> Result<JobRecord, StoreError> {
    connection
        .query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], |row| {
            job_columns(row, 0)
        })
        .optional()?
        .ok_or_else(|| StoreError::not_found("job", id))
}

/// A job from the row's columns, starting at column `first`.
fn job_columns(row: &Row<'_>, first: usize) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: row.get(first)?,
        tenant_id: row.get(first + 1)?,
        pool: row.get(first + 2)?,
        slot_index: row.get(first + 3)?,
        state: row.get(first + 4)?,
        queued_at_ms: row.get(first + 5)?,
        assigned_at_ms: row.get(first + 6)?,
        started_at_ms: row.get(first + 7)?,
        finished_at_ms: row.get(first + 8)?,
        exit_code: row.get(first + 9)?,
        failure: row.get(first + 10)?,
        detail: row
            .get::<_, Option<String>>(first + 11)?
            .map(|text| serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)),
    })
}

/// Job ids become parts of audit targets and URLs: printable ASCII without `/`.
fn check_job_id(id: &str) -> Result<(), StoreError> {
    let plain = id.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if id.is_empty() || id.len() > MAX_ID_LEN || !plain {
        let reason = format!("must be 1 to {MAX_ID_LEN} printable ASCII characters without /");
        return Err(StoreError::invalid("id", reason));
    }
    Ok(())
}

/// `text` cut to at most `max_bytes`, on a character boundary.
fn cut(mut text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes {
        let end = (0..=max_bytes).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
    text
}

fn target(id: &str) -> String {
    format!("job/{id}")
}
