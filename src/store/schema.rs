//! The database schema, as an ordered list of migrations.
//!
//! `PRAGMA user_version` counts the migrations a database has had. Opening applies the missing
//! ones in order, each in its own transaction together with the bump of `user_version`, so a
//! crash in the middle of a migration leaves the database at the version before it, to be
//! migrated again on the next open. A released migration is never edited: a change to the
//! schema is a new step at the end of the list. A database whose version is beyond the list was
//! written by a newer warmpool, and is refused rather than misread.
//!
//! Times are milliseconds since the Unix epoch. Tables are STRICT, so a value of the wrong type
//! is an error rather than a silent conversion.

use rusqlite::{Connection, TransactionBehavior};
use tracing::info;

use super::StoreError;

pub(super) struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

pub(super) const MIGRATIONS: &[Migration] = &[
    Migration { name: "initial", sql: INITIAL },
    Migration { name: "ci-service detail", sql: CI_SERVICE_DETAIL },
];

/// What CI services say of jobs, and the webhook deliveries already acted upon, which a
/// service may send again.
const CI_SERVICE_DETAIL: &str = r#"
ALTER TABLE jobs ADD COLUMN detail TEXT CHECK (detail IS NULL OR json_valid(detail));

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    received_at_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at_ms);
"#;

const INITIAL: &str = r#"
-- Facts about the database itself, such as which host key seals its secrets.
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('github', 'azure', 'local')),
    settings TEXT NOT NULL CHECK (json_valid(settings)),
    weight INTEGER NOT NULL CHECK (weight > 0),
    max_concurrent_jobs INTEGER NOT NULL CHECK (max_concurrent_jobs >= 0),
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE tenant_secrets (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    nonce BLOB NOT NULL CHECK (length(nonce) = 24),
    ciphertext BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
) STRICT;

-- A token without a tenant is an admin token.
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_at_ms INTEGER NOT NULL,
    last_used_at_ms INTEGER,
    revoked_at_ms INTEGER
) STRICT;
CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id);

CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    image_generation INTEGER NOT NULL CHECK (image_generation >= 0),
    updated_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE slots (
    pool TEXT NOT NULL REFERENCES pools (name),
    slot_index INTEGER NOT NULL CHECK (slot_index >= 0),
    state TEXT NOT NULL CHECK (state IN ('empty', 'building', 'saved', 'restoring', 'ready',
        'running', 'reverting', 'quarantined', 'rebuilding')),
    job_id TEXT REFERENCES jobs (id) ON DELETE SET NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (pool, slot_index)
) STRICT;
CREATE INDEX slots_job ON slots (job_id);

-- `seq` orders jobs for keyset pagination; `id` is the job's name everywhere else.
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    pool TEXT NOT NULL REFERENCES pools (name),
    slot_index INTEGER,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'assigned', 'started', 'finished', 'failed')),
    queued_at_ms INTEGER NOT NULL,
    assigned_at_ms INTEGER,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    exit_code INTEGER,
    failure TEXT,
    FOREIGN KEY (pool, slot_index) REFERENCES slots (pool, slot_index)
) STRICT;
CREATE INDEX jobs_tenant ON jobs (tenant_id, seq);
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE INDEX jobs_queued_at ON jobs (queued_at_ms);

-- `actor` is a token id, `local-root` or `daemon`; `detail` is JSON, never a secret.
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL CHECK (json_valid(detail))
) STRICT;
"#;

/// Brings the database up to the last of `migrations`. Returns the versions before and after.
pub(super) fn migrate(
    connection: &mut Connection,
    migrations: &[Migration],
) -> Result<(u32, u32), StoreError> {
    let known = u32::try_from(migrations.len()).expect("fewer than 2^32 migrations");
    let mut first = None;
    loop {
        // Read and bump the version in one write transaction: a second process opening the
        // same database at the same moment waits, then sees the migration done.
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: u32 = transaction.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let from = *first.get_or_insert(version);
        if version > known {
            return Err(StoreError::SchemaTooNew { found: version, known });
        }
        if version == known {
            return Ok((from, version));
        }
        let step = &migrations[version as usize];
        let next = version + 1;
        transaction.execute_batch(step.sql).map_err(|source| StoreError::Migration {
            version: next,
            name: step.name,
            source,
        })?;
        transaction.pragma_update(None, "user_version", next)?;
        transaction.commit()?;
        info!(version = next, migration = step.name, "Applied a schema migration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(connection: &Connection) -> u32 {
        connection.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap()
    }

    #[test]
    fn an_empty_database_gets_every_migration() {
        let mut connection = Connection::open_in_memory().unwrap();
        let (from, to) = migrate(&mut connection, MIGRATIONS).unwrap();
        assert_eq!((from, to), (0, MIGRATIONS.len() as u32));
        assert_eq!(user_version(&connection), MIGRATIONS.len() as u32);
    }

    #[test]
    fn migrating_twice_changes_nothing() {
        let mut connection = Connection::open_in_memory().unwrap();
        migrate(&mut connection, MIGRATIONS).unwrap();
        let (from, to) = migrate(&mut connection, MIGRATIONS).unwrap();
        assert_eq!(from, to);
    }

    #[test]
    fn a_failing_migration_leaves_the_version_before_it_and_no_half_of_it() {
        let mut connection = Connection::open_in_memory().unwrap();
        let broken = [
            Migration { name: "initial", sql: INITIAL },
            Migration { name: "broken", sql: "CREATE TABLE extra (x INTEGER); SELECT nonsense" },
        ];
        let err = migrate(&mut connection, &broken).unwrap_err();
        assert!(matches!(err, StoreError::Migration { version: 2, name: "broken", .. }), "{err:?}");
        assert_eq!(user_version(&connection), 1);
        let extra: i64 = connection
            .query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'extra'", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(extra, 0, "the failed step's first statement was rolled back");
    }

    #[test]
    fn a_database_from_a_newer_warmpool_is_refused() {
        let mut connection = Connection::open_in_memory().unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut connection, MIGRATIONS).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, known: 2 }), "{err:?}");
    }
}
