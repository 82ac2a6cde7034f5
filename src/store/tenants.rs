//! Tenants: the customers whose jobs the host runs, with their share of it.
//!
//! Deleting a tenant deletes its secrets, tokens and finished jobs with it (the schema cascades),
//! and is refused while it has a job that is not finished: a guest may be running it.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row, ToSql};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::audit::Event;
use super::{check_identifier, is_unique_violation, Actor, Store, StoreError, TenantSettings};

/// A tenant's weight is its share of the host next to other tenants with waiting jobs.
pub const MAX_WEIGHT: u32 = 1000;
/// More jobs at once than any host has slots; 0 stops a tenant's new jobs.
pub const MAX_CONCURRENT_JOBS: u32 = 4096;
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TenantKind {
    Github,
    Azure,
    Local,
}

impl TenantKind {
    pub const ALL: [TenantKind; 3] = [TenantKind::Github, TenantKind::Azure, TenantKind::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            TenantKind::Github => "github",
            TenantKind::Azure => "azure",
            TenantKind::Local => "local",
        }
    }
}

impl ToSql for TenantKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for TenantKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        TenantKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown tenant kind `{text}`").into()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub kind: TenantKind,
    pub settings: TenantSettings,
    pub weight: u32,
    pub max_concurrent_jobs: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Tenant {
    fn target(&self) -> String {
        format!("tenant/{}", self.id)
    }
}

/// A tenant to create; `settings` is checked against `kind`.
#[derive(Debug, Clone)]
pub struct NewTenant {
    pub name: String,
    pub kind: TenantKind,
    pub settings: Value,
    pub weight: u32,
    pub max_concurrent_jobs: u32,
}

/// What to change in a tenant; `None` keeps a value. The kind cannot change: a tenant of
/// another CI service is another tenant.
#[derive(Debug, Clone, Default)]
pub struct TenantChange {
    pub name: Option<String>,
    pub settings: Option<Value>,
    pub weight: Option<u32>,
    pub max_concurrent_jobs: Option<u32>,
}

impl Store {
    pub fn create_tenant(&self, actor: &Actor, new: NewTenant) -> Result<Tenant, StoreError> {
        check_identifier("name", &new.name, MAX_NAME_LEN)?;
        check_share(new.weight, new.max_concurrent_jobs)?;
        let settings = TenantSettings::parse(new.kind, &new.settings)?;
        self.mutate(actor, |transaction, now_ms| {
            let tenant = Tenant {
                id: uuid::Uuid::new_v4().to_string(),
                name: new.name,
                kind: new.kind,
                settings,
                weight: new.weight,
                max_concurrent_jobs: new.max_concurrent_jobs,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
            };
            transaction
                .execute(
                    "INSERT INTO tenants (id, name, kind, settings, weight, max_concurrent_jobs,
                         created_at_ms, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        tenant.id,
                        tenant.name,
                        tenant.kind,
                        tenant.settings.to_json_text(),
                        tenant.weight,
                        tenant.max_concurrent_jobs,
                        tenant.created_at_ms,
                        tenant.updated_at_ms,
                    ],
                )
                .map_err(|e| name_conflict(e, &tenant.name))?;
            let event = Event::new("tenant.create", tenant.target(), &tenant);
            Ok((tenant, event))
        })
    }

    pub fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare(&format!("{SELECT_TENANT} ORDER BY name"))?;
        let rows = statement.query_map([], tenant_columns)?;
        rows.map(|row| row?.into_tenant()).collect()
    }

    pub fn get_tenant(&self, id: &str) -> Result<Tenant, StoreError> {
        get_tenant(&self.connection(), id)
    }

    pub fn update_tenant(
        &self,
        actor: &Actor,
        id: &str,
        change: TenantChange,
    ) -> Result<Tenant, StoreError> {
        if let Some(name) = &change.name {
            check_identifier("name", name, MAX_NAME_LEN)?;
        }
        self.mutate(actor, |transaction, now_ms| {
            let mut tenant = get_tenant(transaction, id)?;
            apply(&mut tenant, change)?;
            tenant.updated_at_ms = now_ms;
            transaction
                .execute(
                    "UPDATE tenants SET name = ?2, settings = ?3, weight = ?4,
                         max_concurrent_jobs = ?5, updated_at_ms = ?6
                     WHERE id = ?1",
                    params![
                        tenant.id,
                        tenant.name,
                        tenant.settings.to_json_text(),
                        tenant.weight,
                        tenant.max_concurrent_jobs,
                        tenant.updated_at_ms,
                    ],
                )
                .map_err(|e| name_conflict(e, &tenant.name))?;
            let event = Event::new("tenant.update", tenant.target(), &tenant);
            Ok((tenant, event))
        })
    }

    /// Deletes a tenant with its secrets, tokens and jobs, and returns it as it was.
    pub fn delete_tenant(&self, actor: &Actor, id: &str) -> Result<Tenant, StoreError> {
        self.mutate(actor, |transaction, _| {
            let tenant = get_tenant(transaction, id)?;
            let active: i64 = transaction.query_row(ACTIVE_JOBS, [id], |row| row.get(0))?;
            if active > 0 {
                let reason = format!("{active} of its jobs are not finished");
                return Err(StoreError::InUse { what: "tenant", id: id.to_owned(), reason });
            }
            // What the deletion takes along, as the schema cascades it.
            let removed = json!({
                "secrets": count(transaction, "tenant_secrets", id)?,
                "tokens": count(transaction, "api_tokens", id)?,
                "jobs": count(transaction, "jobs", id)?,
            });
            transaction.execute("DELETE FROM tenants WHERE id = ?1", [id])?;
            let mut event = Event::new("tenant.delete", tenant.target(), &tenant);
            event.detail["removed"] = removed;
            Ok((tenant, event))
        })
    }
}

const SELECT_TENANT: &str = "SELECT id, name, kind, settings, weight, max_concurrent_jobs,
    created_at_ms, updated_at_ms FROM tenants";
const ACTIVE_JOBS: &str = "SELECT count(*) FROM jobs
    WHERE tenant_id = ?1 AND state IN ('queued', 'assigned', 'started')";

/// A tenant's row before its settings are checked.
struct TenantRow {
    id: String,
    name: String,
    kind: TenantKind,
    settings: String,
    weight: u32,
    max_concurrent_jobs: u32,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl TenantRow {
    fn into_tenant(self) -> Result<Tenant, StoreError> {
        let corrupt =
            |reason: String| StoreError::Corrupt { what: "tenant", id: self.id.clone(), reason };
        let value: Value =
            serde_json::from_str(&self.settings).map_err(|e| corrupt(e.to_string()))?;
        let settings =
            TenantSettings::parse(self.kind, &value).map_err(|e| corrupt(e.to_string()))?;
        Ok(Tenant {
            id: self.id,
            name: self.name,
            kind: self.kind,
            settings,
            weight: self.weight,
            max_concurrent_jobs: self.max_concurrent_jobs,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

fn tenant_columns(row: &Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: row.get(0)?,
        name: row.get(1)?,
        kind: row.get(2)?,
        settings: row.get(3)?,
        weight: row.get(4)?,
        max_concurrent_jobs: row.get(5)?,
        created_at_ms: row.get(6)?,
        updated_at_ms: row.get(7)?,
    })
}

pub(super) fn get_tenant(connection: &Connection, id: &str) -> Result<Tenant, StoreError> {
    connection
        .query_row(&format!("{SELECT_TENANT} WHERE id = ?1"), [id], tenant_columns)
        .optional()?
        .ok_or_else(|| StoreError::not_found("tenant", id))?
        .into_tenant()
}

fn apply(tenant: &mut Tenant, change: TenantChange) -> Result<(), StoreError> {
    if let Some(name) = change.name {
        tenant.name = name;
    }
    if let Some(settings) = change.settings {
        tenant.settings = TenantSettings::parse(tenant.kind, &settings)?;
    }
    tenant.weight = change.weight.unwrap_or(tenant.weight);
    tenant.max_concurrent_jobs = change.max_concurrent_jobs.unwrap_or(tenant.max_concurrent_jobs);
    check_share(tenant.weight, tenant.max_concurrent_jobs)
}

fn check_share(weight: u32, max_concurrent_jobs: u32) -> Result<(), StoreError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(StoreError::invalid(
            "weight",
            format!("{weight} is not within 1..={MAX_WEIGHT}"),
        ));
    }
    if max_concurrent_jobs > MAX_CONCURRENT_JOBS {
        return Err(StoreError::invalid(
            "max_concurrent_jobs",
            format!("{max_concurrent_jobs} is not within 0..={MAX_CONCURRENT_JOBS}"),
        ));
    }
    Ok(())
}

/// How many rows of `table` belong to tenant `id`.
fn count(connection: &Connection, table: &str, id: &str) -> Result<i64, StoreError> {
    let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = ?1");
    Ok(connection.query_row(&sql, [id], |row| row.get(0))?)
}

fn name_conflict(e: rusqlite::Error, name: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict { what: "tenant", field: "name", value: name.to_owned() }
    } else {
        e.into()
    }
}
