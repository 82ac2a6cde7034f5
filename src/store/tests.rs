//! Store tests on real SQLite files in temporary directories, with a clock that ticks one
//! millisecond per reading so that every change has its own time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::*;
use crate::slot::SlotState;

const ROOT: Actor = Actor::LocalRoot;
const START_MS: i64 = 1_700_000_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    clock: Arc<AtomicI64>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicI64::new(START_MS));
        let store = open_with_clock(dir.path(), &clock).unwrap();
        Fixture { dir, store, clock }
    }

    /// Closes the store and opens the same files again.
    fn reopen(self) -> Fixture {
        let Fixture { dir, store, clock } = self;
        drop(store);
        let store = open_with_clock(dir.path(), &clock).unwrap();
        Fixture { dir, store, clock }
    }

    fn database(&self) -> PathBuf {
        self.dir.path().join("warmpool.db")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("host.key")
    }

    /// A connection of its own, for looking under the store.
    fn raw(&self) -> Connection {
        Connection::open(self.database()).unwrap()
    }

    fn audit(&self) -> Vec<AuditEntry> {
        self.store.list_audit(None, MAX_PAGE).unwrap()
    }

    fn tenant(&self, name: &str) -> Tenant {
        let new = NewTenant {
            name: name.into(),
            kind: TenantKind::Local,
            settings: json!({}),
            weight: 1,
            max_concurrent_jobs: 2,
        };
        self.store.create_tenant(&ROOT, new).unwrap()
    }

    /// A pool `p` with slots 0 and 1.
    fn pool(&self) {
        self.store.upsert_pool(&Actor::Daemon, "p", 1).unwrap();
        for index in 0..2 {
            self.store.upsert_slot(&Actor::Daemon, "p", index, SlotState::Ready, None).unwrap();
        }
    }

    fn job(&self, id: &str, tenant: &Tenant) -> JobRecord {
        let new = NewJob { id: id.into(), tenant_id: tenant.id.clone(), pool: "p".into() };
        self.store.record_job(&Actor::Daemon, new).unwrap()
    }
}

fn open_with_clock(dir: &Path, clock: &Arc<AtomicI64>) -> Result<Store, StoreError> {
    let mut store = Store::open(&dir.join("warmpool.db"), &dir.join("host.key"))?;
    let clock = Arc::clone(clock);
    store.set_clock(move || clock.fetch_add(1, Ordering::SeqCst));
    Ok(store)
}

fn github_settings() -> Value {
    json!({ "owner": "acme", "app_id": 1, "installation_id": 2 })
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn secret(text: &str) -> Secret {
    Secret::from(text.to_owned())
}

// Opening.

#[test]
fn opening_creates_a_private_database_and_key() {
    let fixture = Fixture::new();
    fixture.tenant("acme");
    assert_eq!(mode(&fixture.database()), 0o600);
    assert_eq!(mode(&PathBuf::from(format!("{}-wal", fixture.database().display()))), 0o600);
    assert_eq!(mode(&fixture.key()), 0o600);
    let raw = fixture.raw();
    let journal: String = raw.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
    assert_eq!(journal, "wal");
    assert!(fixture.store.integrity_problems().unwrap().is_empty());
}

#[test]
fn an_existing_database_file_readable_by_others_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warmpool.db");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::open(&path, &dir.path().join("host.key")).unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn an_empty_file_is_migrated_to_the_current_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warmpool.db");
    std::fs::write(&path, b"").unwrap();
    Store::open(&path, &dir.path().join("host.key")).unwrap();
    let raw = Connection::open(&path).unwrap();
    let version: u32 = raw.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
    assert_eq!(version, schema::MIGRATIONS.len() as u32);
    let tables: BTreeSet<String> = raw
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for table in ["tenants", "tenant_secrets", "api_tokens", "pools", "slots", "jobs", "audit_log"]
    {
        assert!(tables.contains(table), "{table} missing from {tables:?}");
    }
}

#[test]
fn reopening_keeps_every_record() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    fixture.store.put_secret(&ROOT, &tenant.id, "app_key", &secret("pem")).unwrap();
    let issued = fixture.store.create_token(&ROOT, Some(&tenant.id), "ci").unwrap();
    fixture.pool();
    let job = fixture.job("j1", &tenant);
    let audit = fixture.audit();

    let fixture = fixture.reopen();
    assert_eq!(fixture.store.get_tenant(&tenant.id).unwrap(), tenant);
    assert_eq!(fixture.store.get_secret(&tenant.id, "app_key").unwrap().expose(), b"pem");
    let plaintext = issued.plaintext.expose_str().unwrap();
    assert!(fixture.store.verify_token(plaintext).unwrap().is_some());
    assert_eq!(fixture.store.list_slots(Some("p")).unwrap().len(), 2);
    assert_eq!(fixture.store.get_job("j1").unwrap(), job);
    assert_eq!(fixture.audit(), audit);
}

#[test]
fn a_database_from_a_newer_warmpool_is_refused() {
    let fixture = Fixture::new();
    fixture.raw().pragma_update(None, "user_version", 3).unwrap();
    let Fixture { dir, store, clock } = fixture;
    drop(store);
    let err = open_with_clock(dir.path(), &clock).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found: 3, known: 2 }), "{err:?}");
    assert!(err.to_string().contains("newer warmpool"), "{err}");
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Store::open(&fixture.database(), &fixture.key()).unwrap_err();
    assert!(matches!(err, StoreError::Key { .. }), "{err:?}");
    assert!(err.to_string().contains("0644"), "{err}");
}

#[test]
fn another_host_key_is_refused_once_secrets_are_sealed() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("s")).unwrap();
    std::fs::write(fixture.key(), [9u8; key::KEY_BYTES]).unwrap();
    let err = Store::open(&fixture.database(), &fixture.key()).unwrap_err();
    assert!(matches!(err, StoreError::Key { .. }), "{err:?}");
    assert!(err.to_string().contains("not the key that sealed the 1 secrets"), "{err}");
}

#[test]
fn a_lost_key_is_not_replaced_once_secrets_are_sealed() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("s")).unwrap();
    std::fs::remove_file(fixture.key()).unwrap();
    let err = Store::open(&fixture.database(), &fixture.key()).unwrap_err();
    assert!(err.to_string().contains("is missing"), "{err}");
    assert!(!fixture.key().exists(), "no new key was made");
}

#[test]
fn a_database_without_secrets_takes_a_new_key() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("s")).unwrap();
    fixture.store.delete_secret(&ROOT, &tenant.id, "key").unwrap();
    std::fs::remove_file(fixture.key()).unwrap();
    let fixture = fixture.reopen();
    assert!(fixture.key().exists());
    fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("new")).unwrap();

    // The new key is the one recorded now: a third key is refused.
    std::fs::write(fixture.key(), [9u8; key::KEY_BYTES]).unwrap();
    let err = Store::open(&fixture.database(), &fixture.key()).unwrap_err();
    assert!(matches!(err, StoreError::Key { .. }), "{err:?}");
}

// Secrets at rest.

#[test]
fn a_damaged_or_swapped_ciphertext_fails_to_decrypt_cleanly() {
    let fixture = Fixture::new();
    let a = fixture.tenant("a");
    let b = fixture.tenant("b");
    fixture.store.put_secret(&ROOT, &a.id, "key", &secret("secret of a")).unwrap();
    fixture.store.put_secret(&ROOT, &b.id, "key", &secret("secret of b")).unwrap();
    let raw = fixture.raw();

    // b's row gets a's nonce and ciphertext: it must not decrypt as a's secret.
    raw.execute(
        "UPDATE tenant_secrets SET (nonce, ciphertext) =
             (SELECT nonce, ciphertext FROM tenant_secrets WHERE tenant_id = ?1)
         WHERE tenant_id = ?2",
        [&a.id, &b.id],
    )
    .unwrap();
    let err = fixture.store.get_secret(&b.id, "key").unwrap_err();
    assert!(matches!(err, StoreError::Crypto { .. }), "{err:?}");

    raw.execute(
        "UPDATE tenant_secrets SET ciphertext = zeroblob(length(ciphertext)) WHERE tenant_id = ?1",
        [&a.id],
    )
    .unwrap();
    let err = fixture.store.get_secret(&a.id, "key").unwrap_err();
    assert!(matches!(err, StoreError::Crypto { .. }), "{err:?}");
}

#[test]
fn secrets_and_tokens_are_not_in_the_files_in_plain_text() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("PLAINTEXT-MARKER")).unwrap();
    let issued = fixture.store.create_token(&ROOT, None, "admin").unwrap();
    let plaintext = issued.plaintext.expose_str().unwrap();
    let database = fixture.database();
    let wal = PathBuf::from(format!("{}-wal", database.display()));
    let check = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("PLAINTEXT-MARKER"), "the secret is in {}", path.display());
        assert!(!text.contains(plaintext), "the token is in {}", path.display());
    };

    check(&database);
    check(&wal);
    // Closing checkpoints the WAL into the database file.
    let Fixture { dir: _dir, store, .. } = fixture;
    drop(store);
    check(&database);
}

// Tenants.

#[test]
fn tenants_are_created_listed_updated_and_deleted() {
    let fixture = Fixture::new();
    let new = NewTenant {
        name: "acme".into(),
        kind: TenantKind::Github,
        settings: github_settings(),
        weight: 3,
        max_concurrent_jobs: 4,
    };
    let created = fixture.store.create_tenant(&ROOT, new).unwrap();
    assert_eq!(created.kind, TenantKind::Github);
    assert_eq!(fixture.store.get_tenant(&created.id).unwrap(), created);
    let other = fixture.tenant("beta");
    assert_eq!(fixture.store.list_tenants().unwrap(), vec![created.clone(), other]);

    let change = TenantChange {
        name: Some("acme-corp".into()),
        settings: Some(json!({ "owner": "acme", "app_id": 1, "installation_id": 5 })),
        weight: Some(7),
        max_concurrent_jobs: None,
    };
    let updated = fixture.store.update_tenant(&ROOT, &created.id, change).unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.weight, updated.max_concurrent_jobs),
        ("acme-corp", 7, 4)
    );
    let TenantSettings::Github(settings) = &updated.settings else { panic!("{updated:?}") };
    assert_eq!(settings.installation_id, Some(5));
    assert!(updated.updated_at_ms > created.updated_at_ms);
    assert_eq!(updated.created_at_ms, created.created_at_ms);

    assert_eq!(fixture.store.delete_tenant(&ROOT, &created.id).unwrap(), updated);
    let err = fixture.store.get_tenant(&created.id).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "tenant", .. }), "{err:?}");
}

#[test]
fn tenant_names_are_unique() {
    let fixture = Fixture::new();
    fixture.tenant("acme");
    let beta = fixture.tenant("beta");
    let new = NewTenant {
        name: "acme".into(),
        kind: TenantKind::Local,
        settings: json!({}),
        weight: 1,
        max_concurrent_jobs: 1,
    };
    let err = fixture.store.create_tenant(&ROOT, new).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { what: "tenant", field: "name", .. }), "{err:?}");
    let rename = TenantChange { name: Some("acme".into()), ..TenantChange::default() };
    let err = fixture.store.update_tenant(&ROOT, &beta.id, rename).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
}

#[test]
fn invalid_tenants_are_refused_naming_the_field() {
    let fixture = Fixture::new();
    let field = |new: NewTenant| match fixture.store.create_tenant(&ROOT, new) {
        Err(StoreError::Invalid { field, .. }) => field,
        other => panic!("expected a validation error, got {other:?}"),
    };
    let good = NewTenant {
        name: "acme".into(),
        kind: TenantKind::Github,
        settings: github_settings(),
        weight: 1,
        max_concurrent_jobs: 1,
    };
    let without_installation = json!({ "owner": "acme", "app_id": 1 });
    assert_eq!(
        field(NewTenant { settings: without_installation, ..good.clone() }),
        "settings.installation_id"
    );
    assert_eq!(field(NewTenant { name: "Acme Corp".into(), ..good.clone() }), "name");
    assert_eq!(field(NewTenant { weight: 0, ..good.clone() }), "weight");
    assert_eq!(
        field(NewTenant { max_concurrent_jobs: 5000, ..good.clone() }),
        "max_concurrent_jobs"
    );
    // Settings are checked against the tenant's kind on update too.
    let tenant = fixture.store.create_tenant(&ROOT, good).unwrap();
    let change = TenantChange { settings: Some(json!({})), ..TenantChange::default() };
    let err = fixture.store.update_tenant(&ROOT, &tenant.id, change).unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { field, .. } if field == "settings.owner"),
        "{err:?}"
    );
}

#[test]
fn deleting_a_tenant_removes_its_secrets_tokens_and_jobs() {
    let fixture = Fixture::new();
    fixture.pool();
    let doomed = fixture.tenant("doomed");
    let kept = fixture.tenant("kept");
    for tenant in [&doomed, &kept] {
        fixture.store.put_secret(&ROOT, &tenant.id, "key", &secret("s")).unwrap();
        fixture.store.create_token(&ROOT, Some(&tenant.id), "ci").unwrap();
    }
    let doomed_token = fixture.store.create_token(&ROOT, Some(&doomed.id), "other").unwrap();
    fixture.job("doomed-job", &doomed);
    fixture
        .store
        .transition_job(&ROOT, "doomed-job", JobTransition::Fail { reason: "x".into() })
        .unwrap();

    fixture.store.delete_tenant(&ROOT, &doomed.id).unwrap();
    let count = |table: &str| -> i64 {
        fixture
            .raw()
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE tenant_id = ?1"),
                [&doomed.id],
                |row| row.get(0),
            )
            .unwrap()
    };
    assert_eq!((count("tenant_secrets"), count("api_tokens"), count("jobs")), (0, 0, 0));
    assert!(fixture
        .store
        .verify_token(doomed_token.plaintext.expose_str().unwrap())
        .unwrap()
        .is_none());
    assert_eq!(fixture.store.list_secrets(&kept.id).unwrap().len(), 1);
    assert_eq!(fixture.store.list_tokens(Some(&kept.id)).unwrap().len(), 1);
    let detail = fixture.audit().pop().unwrap().detail;
    assert_eq!(detail["removed"], json!({ "secrets": 1, "tokens": 2, "jobs": 1 }));
}

#[test]
fn a_tenant_with_unfinished_jobs_cannot_be_deleted() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("busy");
    fixture.job("running", &tenant);
    let err = fixture.store.delete_tenant(&ROOT, &tenant.id).unwrap_err();
    assert!(matches!(err, StoreError::InUse { what: "tenant", .. }), "{err:?}");
    assert!(fixture.store.get_tenant(&tenant.id).is_ok());
}

// Secrets.

#[test]
fn secrets_are_put_read_replaced_listed_and_deleted() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    let first = fixture.store.put_secret(&ROOT, &tenant.id, "app_key", &secret("one")).unwrap();
    assert_eq!(fixture.store.get_secret(&tenant.id, "app_key").unwrap().expose(), b"one");

    let second = fixture.store.put_secret(&ROOT, &tenant.id, "app_key", &secret("two")).unwrap();
    assert_eq!(fixture.store.get_secret(&tenant.id, "app_key").unwrap().expose(), b"two");
    assert_eq!(second.created_at_ms, first.created_at_ms);
    assert!(second.updated_at_ms > first.updated_at_ms);
    assert_eq!(fixture.store.list_secrets(&tenant.id).unwrap(), vec![second]);

    fixture.store.delete_secret(&ROOT, &tenant.id, "app_key").unwrap();
    let err = fixture.store.get_secret(&tenant.id, "app_key").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "secret", .. }), "{err:?}");
    let err = fixture.store.delete_secret(&ROOT, &tenant.id, "app_key").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "secret", .. }), "{err:?}");
}

#[test]
fn secrets_need_a_tenant_a_plain_name_and_a_bounded_size() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    let err = fixture.store.put_secret(&ROOT, "nobody", "key", &secret("x")).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "tenant", .. }), "{err:?}");
    let err = fixture.store.put_secret(&ROOT, &tenant.id, "a/b", &secret("x")).unwrap_err();
    assert!(matches!(&err, StoreError::Invalid { field, .. } if field == "secret"), "{err:?}");
    let huge = Secret::new(vec![0; MAX_SECRET_BYTES + 1]);
    let err = fixture.store.put_secret(&ROOT, &tenant.id, "key", &huge).unwrap_err();
    assert!(matches!(&err, StoreError::Invalid { field, .. } if field == "value"), "{err:?}");
}

// Tokens.

#[test]
fn a_new_token_is_shown_once_and_verifies_with_its_role() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    let issued = fixture.store.create_token(&ROOT, Some(&tenant.id), "ci").unwrap();
    let plaintext = issued.plaintext.expose_str().unwrap();
    assert!(plaintext.starts_with(TOKEN_PREFIX) && plaintext.len() == 3 + 43, "{plaintext}");
    assert!(!format!("{issued:?}").contains(plaintext), "Debug shows no plaintext");

    let grant = fixture.store.verify_token(plaintext).unwrap().unwrap();
    assert_eq!(grant, Grant { token_id: issued.token.id.clone(), role: Role::Tenant(tenant.id) });
    assert_eq!(grant.actor(), Actor::Token(issued.token.id.clone()));
    let admin = fixture.store.create_token(&ROOT, None, "admin").unwrap();
    let grant = fixture.store.verify_token(admin.plaintext.expose_str().unwrap()).unwrap();
    assert_eq!(grant.unwrap().role, Role::Admin);

    let listed = fixture.store.list_tokens(None).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].last_used_at_ms.is_some(), "verifying records the use");
}

#[test]
fn verify_rejects_revoked_unknown_and_malformed_tokens() {
    let fixture = Fixture::new();
    let issued = fixture.store.create_token(&ROOT, None, "admin").unwrap();
    let plaintext = issued.plaintext.expose_str().unwrap().to_owned();

    let mut altered = plaintext.clone().into_bytes();
    let last = altered.last_mut().unwrap();
    *last = if *last == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let unknown = format!("{TOKEN_PREFIX}{}", "A".repeat(43));
    for presented in [altered.as_str(), unknown.as_str(), "", "wp_", "Bearer x", &plaintext[3..]] {
        assert_eq!(fixture.store.verify_token(presented).unwrap(), None, "{presented}");
    }

    let revoked = fixture.store.revoke_token(&ROOT, &issued.token.id).unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    assert_eq!(fixture.store.verify_token(&plaintext).unwrap(), None);
    let again = fixture.store.revoke_token(&ROOT, &issued.token.id).unwrap();
    assert_eq!(again.revoked_at_ms, revoked.revoked_at_ms, "the first revocation time stays");
    let err = fixture.store.revoke_token(&ROOT, "no-such-token").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "token", .. }), "{err:?}");
}

#[test]
fn tokens_are_stored_as_hashes() {
    let fixture = Fixture::new();
    let issued = fixture.store.create_token(&ROOT, None, "admin").unwrap();
    let plaintext = issued.plaintext.expose_str().unwrap();
    let stored: Vec<u8> =
        fixture.raw().query_row("SELECT hash FROM api_tokens", [], |row| row.get(0)).unwrap();
    assert_eq!(stored, Sha256::digest(plaintext.as_bytes()).as_slice());
}

#[test]
fn a_token_for_an_unknown_tenant_is_refused() {
    let fixture = Fixture::new();
    let err = fixture.store.create_token(&ROOT, Some("nobody"), "ci").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "tenant", .. }), "{err:?}");
}

// Pools and slots.

#[test]
fn pools_and_slots_are_upserted_and_listed() {
    let fixture = Fixture::new();
    fixture.pool();
    let pool = fixture.store.upsert_pool(&ROOT, "p", 2).unwrap();
    assert_eq!(fixture.store.list_pools().unwrap(), vec![pool]);

    let tenant = fixture.tenant("acme");
    fixture.job("j1", &tenant);
    let slot =
        fixture.store.upsert_slot(&Actor::Daemon, "p", 1, SlotState::Running, Some("j1")).unwrap();
    let slots = fixture.store.list_slots(Some("p")).unwrap();
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[1], slot);
    assert_eq!(slots[0].state, SlotState::Ready);
    assert!(fixture.store.list_slots(Some("other")).unwrap().is_empty());
}

#[test]
fn slots_need_a_known_pool_and_job() {
    let fixture = Fixture::new();
    let err = fixture.store.upsert_slot(&ROOT, "nope", 0, SlotState::Empty, None).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "pool", .. }), "{err:?}");
    fixture.pool();
    let err = fixture.store.upsert_slot(&ROOT, "p", 0, SlotState::Running, Some("j")).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "job", .. }), "{err:?}");
}

// Jobs.

#[test]
fn job_transition_table_allows_only_the_diagram() {
    use JobState::*;
    let allowed: BTreeSet<(&str, &str)> = [
        (Queued, Assigned),
        (Queued, Failed),
        (Assigned, Queued),
        (Assigned, Started),
        (Assigned, Failed),
        (Started, Finished),
        (Started, Failed),
    ]
    .into_iter()
    .map(|(from, to)| (from.as_str(), to.as_str()))
    .collect();
    for from in JobState::ALL {
        for to in JobState::ALL {
            let expected = allowed.contains(&(from.as_str(), to.as_str()));
            assert_eq!(from.can_become(to), expected, "{from} -> {to}");
        }
    }
}

#[test]
fn a_job_goes_from_queued_to_finished_with_its_times() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("acme");
    let queued = fixture.job("j1", &tenant);
    assert_eq!((queued.state, queued.slot_index), (JobState::Queued, None));

    let step = |transition| fixture.store.transition_job(&Actor::Daemon, "j1", transition).unwrap();
    let assigned = step(JobTransition::Assign { slot_index: 1 });
    assert_eq!((assigned.state, assigned.slot_index), (JobState::Assigned, Some(1)));
    let requeued = step(JobTransition::Requeue);
    assert_eq!((requeued.slot_index, requeued.assigned_at_ms), (None, None));
    step(JobTransition::Assign { slot_index: 0 });
    let started = step(JobTransition::Start);
    let finished = step(JobTransition::Finish { exit_code: 3 });
    assert_eq!(finished.state, JobState::Finished);
    assert_eq!(finished.exit_code, Some(3));
    let times = [
        finished.queued_at_ms,
        finished.assigned_at_ms.unwrap(),
        started.started_at_ms.unwrap(),
        finished.finished_at_ms.unwrap(),
    ];
    assert!(times.windows(2).all(|pair| pair[0] < pair[1]), "{times:?}");
    assert_eq!(fixture.store.get_job("j1").unwrap(), finished);
}

#[test]
fn a_job_refuses_transitions_outside_its_table() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("acme");
    fixture.job("j1", &tenant);
    let err = fixture.store.transition_job(&ROOT, "j1", JobTransition::Start).unwrap_err();
    assert!(
        matches!(err, StoreError::Transition { from: JobState::Queued, to: JobState::Started, .. }),
        "{err:?}"
    );
    let err = fixture
        .store
        .transition_job(&ROOT, "j1", JobTransition::Assign { slot_index: 9 })
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "slot", .. }), "{err:?}");
    let err = fixture.store.transition_job(&ROOT, "nope", JobTransition::Start).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { what: "job", .. }), "{err:?}");
    assert_eq!(fixture.store.get_job("j1").unwrap().state, JobState::Queued);
}

#[test]
fn jobs_need_a_known_tenant_and_pool_and_a_new_plain_id() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("acme");
    let record = |id: &str, tenant_id: &str, pool: &str| {
        let new = NewJob { id: id.into(), tenant_id: tenant_id.into(), pool: pool.into() };
        fixture.store.record_job(&ROOT, new).unwrap_err()
    };
    assert!(matches!(record("j", "nobody", "p"), StoreError::NotFound { what: "tenant", .. }));
    assert!(matches!(record("j", &tenant.id, "q"), StoreError::NotFound { what: "pool", .. }));
    assert!(matches!(record("a/b", &tenant.id, "p"), StoreError::Invalid { .. }));
    fixture.job("j", &tenant);
    assert!(matches!(record("j", &tenant.id, "p"), StoreError::Conflict { what: "job", .. }));
}

#[test]
fn a_long_failure_reason_is_cut_on_a_character_boundary() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("acme");
    fixture.job("j1", &tenant);
    let reason = "é".repeat(jobs::MAX_FAILURE_BYTES);
    let failed = fixture.store.transition_job(&ROOT, "j1", JobTransition::Fail { reason }).unwrap();
    let kept = failed.failure.unwrap();
    assert!(kept.len() <= jobs::MAX_FAILURE_BYTES && kept.len() > jobs::MAX_FAILURE_BYTES - 2);
    assert!(kept.chars().all(|c| c == 'é'));
}

#[test]
fn pagination_returns_each_job_once_across_pages() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("acme");
    for i in 0..23 {
        fixture.job(&format!("j{i:02}"), &tenant);
    }
    let mut seen = Vec::new();
    let mut filter = JobFilter { limit: 5, ..JobFilter::default() };
    let mut pages = 0;
    loop {
        let page = fixture.store.list_jobs(&filter).unwrap();
        pages += 1;
        seen.extend(page.jobs.iter().map(|job| job.id.clone()));
        // A job recorded between pages is newer than the cursor: it must not appear.
        fixture.job(&format!("late{pages}"), &tenant);
        match page.next {
            Some(next) => filter.after = Some(next.to_string().parse().unwrap()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..23).rev().map(|i| format!("j{i:02}")).collect();
    assert_eq!(seen, expected, "newest first, each once");
    assert_eq!(pages, 5, "23 jobs in pages of 5, the last one short and without a cursor");
}

#[test]
fn jobs_are_filtered_by_tenant_state_and_time() {
    let fixture = Fixture::new();
    fixture.pool();
    let a = fixture.tenant("a");
    let b = fixture.tenant("b");
    let mut queued_at = Vec::new();
    for i in 0..6 {
        let tenant = if i % 2 == 0 { &a } else { &b };
        queued_at.push(fixture.job(&format!("j{i}"), tenant).queued_at_ms);
    }
    fixture.store.transition_job(&ROOT, "j0", JobTransition::Fail { reason: "x".into() }).unwrap();
    let ids = |filter: JobFilter| -> Vec<String> {
        fixture.store.list_jobs(&filter).unwrap().jobs.into_iter().map(|job| job.id).collect()
    };

    assert_eq!(
        ids(JobFilter { tenant_id: Some(a.id.clone()), ..JobFilter::default() }),
        ["j4", "j2", "j0"]
    );
    assert_eq!(ids(JobFilter { state: Some(JobState::Failed), ..JobFilter::default() }), ["j0"]);
    let range = JobFilter {
        queued_since_ms: Some(queued_at[1]),
        queued_before_ms: Some(queued_at[4]),
        ..JobFilter::default()
    };
    assert_eq!(ids(range), ["j3", "j2", "j1"]);
    let all = JobFilter {
        tenant_id: Some(b.id.clone()),
        state: Some(JobState::Queued),
        queued_since_ms: Some(queued_at[2]),
        ..JobFilter::default()
    };
    assert_eq!(ids(all), ["j5", "j3"]);
}

#[test]
fn page_sizes_and_cursors_are_checked() {
    let fixture = Fixture::new();
    for limit in [0, MAX_PAGE + 1] {
        let err =
            fixture.store.list_jobs(&JobFilter { limit, ..JobFilter::default() }).unwrap_err();
        assert!(matches!(&err, StoreError::Invalid { field, .. } if field == "limit"), "{err:?}");
    }
    assert!("x".parse::<JobCursor>().is_err());
    assert!("-1".parse::<JobCursor>().is_err());
}

// The audit log.

#[test]
fn every_mutation_leaves_exactly_one_audit_row() {
    let fixture = Fixture::new();
    let store = &fixture.store;
    let actor = Actor::Token("token-1".into());
    let mut expected = 0;
    let mut check = |action: &str, target_prefix: &str| {
        expected += 1;
        let audit = fixture.audit();
        assert_eq!(audit.len(), expected, "after {action}");
        let last = audit.last().unwrap();
        assert_eq!(last.action, action);
        assert_eq!(last.actor, "token-1");
        assert!(last.target.starts_with(target_prefix), "{} for {action}", last.target);
    };

    let tenant = store
        .create_tenant(
            &actor,
            NewTenant {
                name: "acme".into(),
                kind: TenantKind::Local,
                settings: json!({}),
                weight: 1,
                max_concurrent_jobs: 1,
            },
        )
        .unwrap();
    check("tenant.create", "tenant/");
    store
        .update_tenant(&actor, &tenant.id, TenantChange { weight: Some(2), ..Default::default() })
        .unwrap();
    check("tenant.update", "tenant/");
    store.put_secret(&actor, &tenant.id, "key", &secret("s")).unwrap();
    check("secret.put", "secret/");
    store.delete_secret(&actor, &tenant.id, "key").unwrap();
    check("secret.delete", "secret/");
    let issued = store.create_token(&actor, Some(&tenant.id), "ci").unwrap();
    check("token.create", "token/");
    store.revoke_token(&actor, &issued.token.id).unwrap();
    check("token.revoke", "token/");
    store.upsert_pool(&actor, "p", 1).unwrap();
    check("pool.upsert", "pool/p");
    store.upsert_slot(&actor, "p", 0, SlotState::Ready, None).unwrap();
    check("slot.upsert", "slot/p/0");
    let new = NewJob { id: "j1".into(), tenant_id: tenant.id.clone(), pool: "p".into() };
    store.record_job(&actor, new).unwrap();
    check("job.record", "job/j1");
    for (transition, action) in [
        (JobTransition::Assign { slot_index: 0 }, "job.assign"),
        (JobTransition::Requeue, "job.requeue"),
        (JobTransition::Assign { slot_index: 0 }, "job.assign"),
        (JobTransition::Start, "job.start"),
        (JobTransition::Finish { exit_code: 0 }, "job.finish"),
    ] {
        store.transition_job(&actor, "j1", transition).unwrap();
        check(action, "job/j1");
    }
    let new = NewJob { id: "j2".into(), tenant_id: tenant.id.clone(), pool: "p".into() };
    store.record_job(&actor, new).unwrap();
    check("job.record", "job/j2");
    store.transition_job(&actor, "j2", JobTransition::Fail { reason: "x".into() }).unwrap();
    check("job.fail", "job/j2");
    store.delete_tenant(&actor, &tenant.id).unwrap();
    check("tenant.delete", "tenant/");

    // Calls that fail change nothing and leave no row; reads and token checks leave none.
    let before = fixture.audit().len();
    assert!(store.delete_tenant(&actor, &tenant.id).is_err());
    assert!(store.put_secret(&actor, &tenant.id, "key", &secret("s")).is_err());
    assert!(store.transition_job(&actor, "j1", JobTransition::Start).is_err());
    assert!(store.verify_token(issued.plaintext.expose_str().unwrap()).unwrap().is_none());
    store.list_tenants().unwrap();
    assert_eq!(fixture.audit().len(), before);
}

#[test]
fn audit_details_hold_the_record_after_the_change() {
    let fixture = Fixture::new();
    let tenant = fixture.tenant("acme");
    let change = TenantChange { max_concurrent_jobs: Some(9), ..TenantChange::default() };
    let updated = fixture.store.update_tenant(&Actor::Daemon, &tenant.id, change).unwrap();
    let last = fixture.audit().pop().unwrap();
    assert_eq!(last.detail, serde_json::to_value(&updated).unwrap());
    assert_eq!(last.actor, "daemon");
    assert_eq!(last.at_ms, updated.updated_at_ms);
}

#[test]
fn the_audit_log_is_paged_in_order() {
    let fixture = Fixture::new();
    for i in 0..5 {
        fixture.tenant(&format!("t{i}"));
    }
    let first = fixture.store.list_audit(None, 3).unwrap();
    let rest = fixture.store.list_audit(Some(first.last().unwrap().id), 3).unwrap();
    let names: Vec<&str> =
        first.iter().chain(&rest).map(|entry| entry.detail["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);
}

// Async callers.

#[tokio::test]
async fn async_callers_use_the_store_through_the_blocking_pool() {
    let fixture = Fixture::new();
    let Fixture { dir: _dir, store, .. } = fixture;
    let store = Arc::new(store);
    let tenant = store
        .call(|store| {
            store.create_tenant(
                &ROOT,
                NewTenant {
                    name: "acme".into(),
                    kind: TenantKind::Local,
                    settings: json!({}),
                    weight: 1,
                    max_concurrent_jobs: 1,
                },
            )
        })
        .await
        .unwrap();
    let id = tenant.id.clone();
    let found = store.call(move |store| store.get_tenant(&id)).await.unwrap();
    assert_eq!(found, tenant);
}

#[test]
fn a_delivery_is_new_once_and_forgotten_after_a_week() {
    let fixture = Fixture::new();
    assert!(fixture.store.record_delivery("d-1").unwrap());
    assert!(!fixture.store.record_delivery("d-1").unwrap());
    assert!(fixture.store.record_delivery("d-2").unwrap());
    assert!(fixture.store.record_delivery("").is_err());
    fixture.clock.fetch_add(8 * 24 * 3600 * 1000, Ordering::SeqCst);
    assert!(fixture.store.record_delivery("d-1").unwrap(), "a week on, d-1 is forgotten");
}

#[test]
fn a_jobs_detail_is_kept_and_listed() {
    let fixture = Fixture::new();
    fixture.pool();
    let tenant = fixture.tenant("t");
    fixture.job("gh-1", &tenant);
    let detail = json!({ "github_job_id": 42, "conclusion": "success" });
    fixture.store.set_job_detail(&ROOT, "gh-1", detail.clone()).unwrap();
    assert_eq!(fixture.store.get_job("gh-1").unwrap().detail, Some(detail));
    let huge = json!({ "x": "y".repeat(20_000) });
    assert!(fixture.store.set_job_detail(&ROOT, "gh-1", huge).is_err());
}
