//! The store survives its writer being killed at any moment.
//!
//! The test runs its own binary again as a child that only writes (the ignored `writer` test,
//! selected by name and given the database path in `WARMPOOL_STORE_CRASH_CHILD`). The writer
//! creates, updates and deletes tenants, secrets, tokens and jobs as fast as it can until the
//! parent kills it with SIGKILL after a random delay. After each kill the parent reopens the
//! store and checks it: SQLite finds nothing wrong, replaying the audit log rebuilds exactly
//! the tenants, secrets, tokens and jobs in the tables (so no change lacks its audit row and no
//! audit row lacks its change), every secret opens and is the one its row names, and the store
//! takes new writes. Needs no libvirt; runs in a few seconds.
//!
//! SIGKILL tests a crash of the daemon, not a power cut: the page cache survives it, so this
//! does not show that `synchronous=FULL` reaches the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmpool::slot::SlotState;
use warmpool::store::{
    Actor, JobFilter, JobState, JobTransition, NewJob, NewTenant, Secret, Store, TenantChange,
    TenantKind,
};

/// Set in the child only, to the database it writes.
const CHILD_ENV: &str = "WARMPOOL_STORE_CRASH_CHILD";
/// What the writer prints once it has opened the store. libtest prints the test's name before
/// it on the same line.
const WRITING: &str = "store-crash-writer: writing";
const KILLS: u32 = 24;
const MIN_DELAY_MS: u64 = 5;
const MAX_DELAY_MS: u64 = 200;
/// Every few rounds the delay runs from the child's start rather than from its first write,
/// so that some kills land while it starts, opens or migrates the database.
const KILL_EARLY_EVERY: u32 = 4;
/// Far longer than the writer needs to start, even on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole test's budget.
const TEST_BUDGET: Duration = Duration::from_secs(50);
const POOL: &str = "crash";
const SLOTS: u32 = 2;
const WRITER_ACTOR: &str = "crash-writer";
/// Past this many tenants the writer deletes more than it creates.
const MAX_TENANTS: usize = 12;

fn key_path(database: &Path) -> PathBuf {
    database.with_extension("key")
}

/// xorshift64*: enough randomness for choosing delays and operations, from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    getrandom::u64().expect("the OS random number generator works") | 1
}

// The writer.

#[test]
#[ignore = "the writer that store_survives_sigkill_at_random_moments runs and kills"]
fn writer() {
    let Some(database) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let store = Store::open(&database, &key_path(&database)).expect("the writer opens the store");
    let mut writer = Writer::new(store);
    println!("{WRITING}");
    loop {
        writer.step();
    }
}

/// What the writer knows of the store; reloaded from it on every start.
struct Writer {
    store: Store,
    actor: Actor,
    rng: Rng,
    /// Unique per writer process, so that names never collide with an earlier writer's.
    prefix: String,
    sequence: u64,
    tenants: Vec<(String, TenantKind)>,
    open_jobs: BTreeMap<String, (String, JobState)>,
}

impl Writer {
    fn new(store: Store) -> Writer {
        let actor = Actor::Token(WRITER_ACTOR.into());
        store.upsert_pool(&actor, POOL, 1).unwrap();
        for index in 0..SLOTS {
            store.upsert_slot(&actor, POOL, index, SlotState::Ready, None).unwrap();
        }
        let tenants = store.list_tenants().unwrap().into_iter().map(|t| (t.id, t.kind)).collect();
        let mut open_jobs = BTreeMap::new();
        for state in [JobState::Queued, JobState::Assigned, JobState::Started] {
            let filter = JobFilter { state: Some(state), limit: 1000, ..JobFilter::default() };
            for job in store.list_jobs(&filter).unwrap().jobs {
                open_jobs.insert(job.id, (job.tenant_id, job.state));
            }
        }
        let rng = Rng(seed());
        let prefix = format!("w{}", std::process::id());
        Writer { store, actor, rng, prefix, sequence: 0, tenants, open_jobs }
    }

    fn step(&mut self) {
        self.sequence += 1;
        if self.tenants.is_empty() {
            return self.create_tenant();
        }
        match self.rng.below(10) {
            0 | 1 if self.tenants.len() < MAX_TENANTS => self.create_tenant(),
            0 | 1 => self.delete_tenant(),
            2 => self.update_tenant(),
            3 | 4 => self.put_secret(),
            5 => self.delete_secret(),
            6 => self.record_job(),
            7 | 8 => self.advance_job(),
            _ => self.token(),
        }
    }

    fn pick_tenant(&mut self) -> (String, TenantKind) {
        let index = self.rng.below(self.tenants.len() as u64) as usize;
        self.tenants[index].clone()
    }

    fn create_tenant(&mut self) {
        let n = self.sequence;
        let (kind, settings) = if n % 2 == 0 {
            (TenantKind::Github, json!({ "owner": "acme", "app_id": 1, "installation_id": n }))
        } else {
            (TenantKind::Local, json!({}))
        };
        let new = NewTenant {
            name: format!("{}-{n}", self.prefix),
            kind,
            settings,
            weight: 1,
            max_concurrent_jobs: (n % 4096) as u32,
        };
        let tenant = self.store.create_tenant(&self.actor, new).unwrap();
        self.tenants.push((tenant.id, tenant.kind));
    }

    /// Every update changes the tenant, so that a lost update or a lost audit row shows.
    fn update_tenant(&mut self) {
        let (id, kind) = self.pick_tenant();
        let n = self.sequence;
        let settings = (kind == TenantKind::Github)
            .then(|| json!({ "owner": "acme", "app_id": 1, "installation_id": n }));
        let change = TenantChange {
            weight: Some(1 + (n % 1000) as u32),
            max_concurrent_jobs: Some((n % 4096) as u32),
            settings,
            ..TenantChange::default()
        };
        self.store.update_tenant(&self.actor, &id, change).unwrap();
    }

    /// Deletes a tenant, failing its unfinished jobs first (one transaction each).
    fn delete_tenant(&mut self) {
        let (id, _) = self.pick_tenant();
        let jobs: Vec<String> = self
            .open_jobs
            .iter()
            .filter(|(_, (tenant, _))| *tenant == id)
            .map(|(job, _)| job.clone())
            .collect();
        for job in jobs {
            let fail = JobTransition::Fail { reason: "tenant deleted".into() };
            self.store.transition_job(&self.actor, &job, fail).unwrap();
            self.open_jobs.remove(&job);
        }
        self.store.delete_tenant(&self.actor, &id).unwrap();
        self.tenants.retain(|(tenant, _)| *tenant != id);
    }

    /// The value names its row, so the checker can tell a secret from its neighbour's.
    fn put_secret(&mut self) {
        let (id, _) = self.pick_tenant();
        let name = format!("s{}", self.rng.below(3));
        let value = Secret::from(format!("{id}/{name}/{}", self.sequence));
        self.store.put_secret(&self.actor, &id, &name, &value).unwrap();
    }

    fn delete_secret(&mut self) {
        let (id, _) = self.pick_tenant();
        if let Some(secret) = self.store.list_secrets(&id).unwrap().first() {
            self.store.delete_secret(&self.actor, &id, &secret.name).unwrap();
        }
    }

    fn record_job(&mut self) {
        let (tenant_id, _) = self.pick_tenant();
        let id = format!("{}-job-{}", self.prefix, self.sequence);
        let new = NewJob { id: id.clone(), tenant_id: tenant_id.clone(), pool: POOL.into() };
        self.store.record_job(&self.actor, new).unwrap();
        self.open_jobs.insert(id, (tenant_id, JobState::Queued));
    }

    fn advance_job(&mut self) {
        let Some((id, (tenant_id, state))) = self.open_jobs.pop_first() else {
            return self.record_job();
        };
        let slot_index = (self.sequence % u64::from(SLOTS)) as u32;
        let transition = match state {
            JobState::Queued => JobTransition::Assign { slot_index },
            JobState::Assigned => JobTransition::Start,
            _ if self.sequence % 3 == 0 => JobTransition::Fail { reason: "guest stopped".into() },
            _ => JobTransition::Finish { exit_code: (self.sequence % 256) as i32 },
        };
        let job = self.store.transition_job(&self.actor, &id, transition).unwrap();
        if job.state == JobState::Assigned {
            self.store
                .upsert_slot(&self.actor, POOL, slot_index, SlotState::Running, Some(&id))
                .unwrap();
        }
        if matches!(job.state, JobState::Queued | JobState::Assigned | JobState::Started) {
            self.open_jobs.insert(id, (tenant_id, job.state));
        }
    }

    fn token(&mut self) {
        let (id, _) = self.pick_tenant();
        let tokens = self.store.list_tokens(Some(&id)).unwrap();
        match tokens.iter().find(|token| token.revoked_at_ms.is_none()) {
            Some(token) if self.sequence % 2 == 0 => {
                self.store.revoke_token(&self.actor, &token.id).unwrap();
            }
            _ => {
                self.store.create_token(&self.actor, Some(&id), "ci").unwrap();
            }
        }
    }
}

// The parent.

/// Kills the writer if the parent panics, so that no writer outlives the test.
struct WriterProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl WriterProcess {
    fn spawn(database: &Path, stderr: &Path) -> WriterProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["writer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, database)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        WriterProcess { child, lines, stderr: stderr.to_owned() }
    }

    /// Waits until the writer has opened the store and begun to write.
    fn wait_writing(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.ends_with(WRITING) => return,
                Ok(_) => {}
                Err(_) => panic!("the writer did not start writing: {}", self.errors()),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the writer stopped by itself ({status}) before the kill: {}", self.errors());
        }
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for WriterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn store_survives_sigkill_at_random_moments() {
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("warmpool.db");
    let seed = seed();
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);

    let mut writes = 0;
    for round in 0..KILLS {
        let mut writer = WriterProcess::spawn(&database, &dir.path().join("writer.stderr"));
        if round % KILL_EARLY_EVERY != 0 {
            writer.wait_writing();
        }
        let delay_ms = MIN_DELAY_MS + rng.below(MAX_DELAY_MS - MIN_DELAY_MS + 1);
        std::thread::sleep(Duration::from_millis(delay_ms));
        writer.kill();

        writes = check(&database, round);
        eprintln!(
            "round {round}: killed after {delay_ms} ms; {writes} changes by the writer so far"
        );
        assert!(began.elapsed() < TEST_BUDGET, "the test ran out of time in round {round}");
    }
    assert!(writes >= 100, "the writer made only {writes} changes in {KILLS} rounds");
}

/// Reopens the store after a kill and checks everything the module doc promises. Returns how
/// many changes the writers have made so far.
fn check(database: &Path, round: u32) -> usize {
    let store = Store::open(database, &key_path(database)).expect("the store reopens");
    let raw = rusqlite::Connection::open(database).unwrap();
    let integrity: Vec<String> = rows(&raw, "PRAGMA integrity_check");
    assert_eq!(integrity, ["ok"], "round {round}");
    assert_eq!(store.integrity_problems().unwrap(), Vec::<String>::new(), "round {round}");

    let replayed = Replay::of(&raw);
    assert_eq!(replayed.tenants, tenant_rows(&raw), "round {round}: tenants vs. audit log");
    assert_eq!(replayed.secrets, secret_rows(&raw), "round {round}: secrets vs. audit log");
    assert_eq!(replayed.tokens, token_rows(&raw), "round {round}: tokens vs. audit log");
    assert_eq!(replayed.jobs, job_rows(&raw), "round {round}: jobs vs. audit log");
    for (tenant_id, name) in &replayed.secrets {
        let secret = store.get_secret(tenant_id, name).expect("every secret opens");
        let value = secret.expose_str().unwrap();
        assert!(value.starts_with(&format!("{tenant_id}/{name}/")), "round {round}: {name}");
    }
    takes_new_writes(&store, round);

    let writer_rows: i64 = raw
        .query_row("SELECT count(*) FROM audit_log WHERE actor = ?1", [WRITER_ACTOR], |row| {
            row.get(0)
        })
        .unwrap();
    writer_rows as usize
}

fn takes_new_writes(store: &Store, round: u32) {
    let new = NewTenant {
        name: format!("check-{round}"),
        kind: TenantKind::Local,
        settings: json!({}),
        weight: 1,
        max_concurrent_jobs: 1,
    };
    let tenant = store.create_tenant(&Actor::LocalRoot, new).expect("the store takes writes");
    let value = Secret::from(format!("{}/s0/check", tenant.id));
    store.put_secret(&Actor::LocalRoot, &tenant.id, "s0", &value).unwrap();
    assert_eq!(store.get_secret(&tenant.id, "s0").unwrap().expose(), value.expose());
}

/// What the tables hold according to the audit log alone.
#[derive(Default)]
struct Replay {
    /// Tenant id to the tenant's fields that the writer changes.
    tenants: BTreeMap<String, Value>,
    secrets: BTreeSet<(String, String)>,
    /// Token id to (tenant id, revoked).
    tokens: BTreeMap<String, (Option<String>, bool)>,
    /// Job id to (tenant id, state).
    jobs: BTreeMap<String, (String, String)>,
}

impl Replay {
    fn of(raw: &rusqlite::Connection) -> Replay {
        let mut replay = Replay::default();
        let mut statement =
            raw.prepare("SELECT action, detail FROM audit_log ORDER BY id").unwrap();
        let entries = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
            .unwrap();
        for entry in entries {
            let (action, detail) = entry.unwrap();
            replay.apply(&action, &serde_json::from_str(&detail).unwrap());
        }
        replay
    }

    fn apply(&mut self, action: &str, detail: &Value) {
        let text = |key: &str| detail[key].as_str().unwrap().to_owned();
        match action {
            "tenant.create" | "tenant.update" => {
                self.tenants.insert(text("id"), tenant_fields(detail));
            }
            "tenant.delete" => self.delete_tenant(&text("id")),
            "secret.put" => {
                self.secrets.insert((text("tenant_id"), text("name")));
            }
            "secret.delete" => {
                self.secrets.remove(&(text("tenant_id"), text("name")));
            }
            "token.create" | "token.revoke" => {
                let tenant = detail["tenant_id"].as_str().map(str::to_owned);
                let revoked = !detail["revoked_at_ms"].is_null();
                self.tokens.insert(text("id"), (tenant, revoked));
            }
            action if action.starts_with("job.") => {
                self.jobs.insert(text("id"), (text("tenant_id"), text("state")));
            }
            "pool.upsert" | "slot.upsert" => {}
            other => panic!("unexpected audit action {other}"),
        }
    }

    /// What the schema's cascade removes with a tenant.
    fn delete_tenant(&mut self, id: &str) {
        self.tenants.remove(id);
        self.secrets.retain(|(tenant, _)| tenant != id);
        self.tokens.retain(|_, (tenant, _)| tenant.as_deref() != Some(id));
        self.jobs.retain(|_, (tenant, _)| tenant != id);
    }
}

fn tenant_fields(tenant: &Value) -> Value {
    json!({
        "name": tenant["name"],
        "kind": tenant["kind"],
        "settings": tenant["settings"],
        "weight": tenant["weight"],
        "max_concurrent_jobs": tenant["max_concurrent_jobs"],
    })
}

fn rows<T: rusqlite::types::FromSql>(raw: &rusqlite::Connection, sql: &str) -> Vec<T> {
    let mut statement = raw.prepare(sql).unwrap();
    let rows = statement.query_map([], |row| row.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn tenant_rows(raw: &rusqlite::Connection) -> BTreeMap<String, Value> {
    let sql = "SELECT json_object('id', id, 'name', name, 'kind', kind,
        'settings', json(settings), 'weight', weight, 'max_concurrent_jobs', max_concurrent_jobs)
        FROM tenants";
    let tenants: Vec<String> = rows(raw, sql);
    tenants
        .iter()
        .map(|text| {
            let tenant: Value = serde_json::from_str(text).unwrap();
            (tenant["id"].as_str().unwrap().to_owned(), tenant_fields(&tenant))
        })
        .collect()
}

fn secret_rows(raw: &rusqlite::Connection) -> BTreeSet<(String, String)> {
    let mut statement = raw.prepare("SELECT tenant_id, name FROM tenant_secrets").unwrap();
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn token_rows(raw: &rusqlite::Connection) -> BTreeMap<String, (Option<String>, bool)> {
    let sql = "SELECT id, tenant_id, revoked_at_ms IS NOT NULL FROM api_tokens";
    let mut statement = raw.prepare(sql).unwrap();
    let rows =
        statement.query_map([], |row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?)))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn job_rows(raw: &rusqlite::Connection) -> BTreeMap<String, (String, String)> {
    let mut statement = raw.prepare("SELECT id, tenant_id, state FROM jobs").unwrap();
    let rows =
        statement.query_map([], |row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?)))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}
