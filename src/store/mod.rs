//! The store: what the daemon must not forget, in one SQLite database.
//!
//! Tenants, their secrets, API tokens, pools, slots, jobs and the audit log live in one SQLite
//! file in WAL mode with `synchronous=FULL`: a call that returned has its change on disk, and a
//! daemon killed at any moment finds on restart every change it committed and none that it did
//! not. Every mutating call takes an [`Actor`] and writes its audit row in the same transaction
//! as its change, so the audit log and the tables cannot disagree.
//!
//! Tenant secrets are sealed with XChaCha20-Poly1305 under a host key kept in its own file
//! ([`key`]); the database alone reveals none of them. API tokens are kept as SHA-256 hashes.
//!
//! Concurrency: a [`Store`] owns one `rusqlite::Connection` behind a `std::sync::Mutex`, and
//! every call holds the lock for its whole transaction, so calls run one at a time and each sees
//! a consistent database. Every call blocks on disk I/O (a commit waits for an fsync), so async
//! code must not call the store on a runtime thread: it shares the store as `Arc<Store>` and
//! goes through [`Store::call`], which runs the closure on tokio's blocking pool. One connection
//! is enough: the daemon's writes are small and rare next to a VM revert. Other processes (an
//! operator's `sqlite3`, a second `Store` in a test) may open the same file; WAL lets them read
//! while the daemon writes, and the busy timeout makes a writer wait for another's transaction
//! instead of failing at once.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tracing::{info, warn};

mod audit;
mod deliveries;
mod jobs;
pub mod key;
mod schema;
mod secrets;
mod settings;
mod slots;
mod tenants;
mod tokens;

pub use audit::AuditEntry;
pub use jobs::{JobCursor, JobFilter, JobPage, JobRecord, JobState, JobTransition, NewJob};
pub use key::Secret;
pub use secrets::{SecretInfo, MAX_SECRET_BYTES};
pub use settings::{
    secret_names, AzureSettings, GithubScope, GithubSettings, LocalSettings, TenantSettings,
};
pub use slots::{PoolRecord, SlotRecord};
pub use tenants::{NewTenant, Tenant, TenantChange, TenantKind, MAX_CONCURRENT_JOBS, MAX_WEIGHT};
pub use tokens::{ApiToken, Grant, IssuedToken, Role, TOKEN_PREFIX};

use audit::Event;
use key::HostKey;

/// How long a call waits for another process's write transaction before it fails with
/// `SQLITE_BUSY`. Ours last milliseconds; an operator's `sqlite3` session may hold one longer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most rows one page of a listing returns.
pub const MAX_PAGE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("No {what} `{id}`")]
    NotFound { what: &'static str, id: String },
    #[error("A {what} with {field} `{value}` exists already")]
    Conflict { what: &'static str, field: &'static str, value: String },
    #[error("The {what} `{id}` is in use: {reason}")]
    InUse { what: &'static str, id: String, reason: String },
    #[error("Invalid value for `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("Job `{job}` cannot go from {from} to {to}")]
    Transition { job: String, from: JobState, to: JobState },
    #[error("Cannot prepare the database file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The database failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "SQLite kept journal mode `{mode}` instead of WAL; is the database on a local file system?"
    )]
    Journal { mode: String },
    #[error("Schema migration {version} ({name}) failed")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "The database has schema version {found}, newer than the {known} this warmpool knows: \
         it was written by a newer warmpool"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("The stored {what} `{id}` is unreadable: {reason}")]
    Corrupt { what: &'static str, id: String, reason: String },
    #[error("Cannot read or create the host key {path}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The host key {path} is unusable: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("Cannot decrypt secret `{name}` of tenant `{tenant}`: wrong host key or damaged data")]
    Crypto { tenant: String, name: String },
    #[error("The operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("The runtime shut down before the store call ran")]
    Cancelled,
}

impl StoreError {
    fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> StoreError {
        StoreError::Invalid { field: field.into(), reason: reason.to_string() }
    }

    fn not_found(what: &'static str, id: impl Into<String>) -> StoreError {
        StoreError::NotFound { what, id: id.into() }
    }
}

/// Who made a change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// Root on the host, through the local command line.
    LocalRoot,
    /// The daemon itself: slots changing state, the scheduler assigning jobs.
    Daemon,
    /// The holder of the API token with this id.
    Token(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::LocalRoot => f.write_str("local-root"),
            Actor::Daemon => f.write_str("daemon"),
            Actor::Token(id) => f.write_str(id),
        }
    }
}

/// Milliseconds since the Unix epoch, the unit of every time in the store.
type Clock = Box<dyn Fn() -> i64 + Send + Sync>;

fn system_clock() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

pub struct Store {
    path: PathBuf,
    connection: Mutex<Connection>,
    key: HostKey,
    clock: Clock,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `path`, creating it and migrating its schema as needed, with the
    /// host key at `key_path`, which is created on first use.
    pub fn open(path: &Path, key_path: &Path) -> Result<Store, StoreError> {
        prepare_database_file(path)?;
        let mut connection = Connection::open(path)?;
        configure(&connection)?;
        let (from, to) = schema::migrate(&mut connection, schema::MIGRATIONS)?;
        let key = key::bind(&mut connection, key_path)?;
        let path_text = path.display().to_string();
        info!(path = path_text, schema_version = to, migrated_from = from, "Opened the store");
        Ok(Store {
            path: path.to_owned(),
            connection: Mutex::new(connection),
            key,
            clock: Box::new(system_clock),
        })
    }

    /// Runs `f` on tokio's blocking pool: the way for async code to use the store.
    pub async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Cancelled),
        }
    }

    /// What `PRAGMA integrity_check` and `PRAGMA foreign_key_check` find wrong; empty when the
    /// database is sound.
    pub fn integrity_problems(&self) -> Result<Vec<String>, StoreError> {
        let connection = self.connection();
        let mut problems: Vec<String> = connection
            .prepare("PRAGMA integrity_check")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        problems.retain(|line| line != "ok");
        let mut foreign = connection.prepare("PRAGMA foreign_key_check")?;
        let dangling = foreign.query_map([], |row| {
            let table: String = row.get(0)?;
            let rowid: Option<i64> = row.get(1)?;
            let parent: String = row.get(2)?;
            Ok(format!("{table} row {rowid:?} points at a missing row of {parent}"))
        })?;
        for line in dangling {
            problems.push(line?);
        }
        Ok(problems)
    }

    /// The connection, whoever held it before. A call that panicked while holding the lock
    /// left no half-done change: its transaction rolled back when it was dropped.
    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Runs `change` in one write transaction and records the audit row it returns in the same
    /// transaction: either both reach the disk or neither does.
    fn mutate<T>(
        &self,
        actor: &Actor,
        change: impl FnOnce(&Transaction<'_>, i64) -> Result<(T, Event), StoreError>,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection();
        // IMMEDIATE takes the write lock up front, so a transaction that read something never
        // fails later with SQLITE_BUSY when it wants to write.
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now_ms = self.now_ms();
        let (value, event) = change(&transaction, now_ms)?;
        audit::insert(&transaction, now_ms, actor, &event)?;
        transaction.commit()?;
        Ok(value)
    }

    #[cfg(test)]
    fn set_clock(&mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) {
        self.clock = Box::new(clock);
    }
}

/// Creates the database file private to its owner before SQLite opens it. SQLite gives its
/// `-wal` and `-shm` files the database file's mode, so they are private too.
fn prepare_database_file(path: &Path) -> Result<(), StoreError> {
    let error = |source| StoreError::File { path: path.to_owned(), source };
    OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(error)?;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = match std::fs::metadata(&file) {
            Ok(metadata) => metadata.permissions().mode() & 0o777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(error(e)),
        };
        if mode != 0o600 {
            let mode = format!("{mode:04o}");
            warn!(path = %file.display(), mode, "Made a database file private");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(error)?;
        }
    }
    Ok(())
}

fn configure(connection: &Connection) -> Result<(), StoreError> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    let journal_mode: String =
        connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Journal { mode: journal_mode });
    }
    // FULL syncs the WAL on every commit: a committed change survives a power cut, not only a
    // crash of the daemon.
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Whether `e` is a UNIQUE or PRIMARY KEY constraint failure.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// Checks an identifier that becomes part of names and audit targets: 1 to `max_len` of a-z,
/// 0-9, `-` and `_`, starting with a letter.
fn check_identifier(field: &str, value: &str, max_len: usize) -> Result<(), StoreError> {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    let starts_well = value.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    if !plain || !starts_well || value.len() > max_len {
        return Err(StoreError::invalid(
            field,
            format!(
                "`{value}` must be 1 to {max_len} of a-z, 0-9, - and _, starting with a letter"
            ),
        ));
    }
    Ok(())
}

fn check_limit(limit: u32) -> Result<(), StoreError> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(StoreError::invalid("limit", format!("{limit} is not within 1..={MAX_PAGE}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
