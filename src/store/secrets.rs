//! Tenant secrets, sealed under the host key (see [`super::key`]) and opened only in memory.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::json;

use super::audit::Event;
use super::tenants::get_tenant;
use super::{check_identifier, Actor, Secret, Store, StoreError};

/// Larger than any PEM key or access token a provider needs.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
const MAX_NAME_LEN: usize = 64;

/// A secret's name and times, without its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SecretInfo {
    pub tenant_id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Store {
    /// Sets a tenant's secret `name` to `value`, replacing any value it had.
    pub fn put_secret(
        &self,
        actor: &Actor,
        tenant_id: &str,
        name: &str,
        value: &Secret,
    ) -> Result<SecretInfo, StoreError> {
        check_identifier("secret", name, MAX_NAME_LEN)?;
        if value.expose().is_empty() || value.expose().len() > MAX_SECRET_BYTES {
            let reason = format!("a secret holds 1 to {MAX_SECRET_BYTES} bytes");
            return Err(StoreError::invalid("value", reason));
        }
        let sealed = self.key.seal(tenant_id, name, value)?;
        self.mutate(actor, |transaction, now_ms| {
            get_tenant(transaction, tenant_id)?;
            let info = transaction.query_row(
                "INSERT INTO tenant_secrets
                     (tenant_id, name, nonce, ciphertext, created_at_ms, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (tenant_id, name) DO UPDATE SET nonce = excluded.nonce,
                     ciphertext = excluded.ciphertext, updated_at_ms = excluded.updated_at_ms
                 RETURNING created_at_ms, updated_at_ms",
                params![tenant_id, name, sealed.nonce, sealed.ciphertext, now_ms],
                |row| {
                    Ok(SecretInfo {
                        tenant_id: tenant_id.to_owned(),
                        name: name.to_owned(),
                        created_at_ms: row.get(0)?,
                        updated_at_ms: row.get(1)?,
                    })
                },
            )?;
            let event = Event::new("secret.put", target(tenant_id, name), &info);
            Ok((info, event))
        })
    }

    /// A tenant's secret, decrypted. Keep it no longer than needed, and never log it.
    pub fn get_secret(&self, tenant_id: &str, name: &str) -> Result<Secret, StoreError> {
        let (nonce, ciphertext): (Vec<u8>, Vec<u8>) = self
            .connection()
            .query_row(
                "SELECT nonce, ciphertext FROM tenant_secrets WHERE tenant_id = ?1 AND name = ?2",
                [tenant_id, name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found("secret", target_id(tenant_id, name)))?;
        self.key.open(tenant_id, name, &nonce, &ciphertext)
    }

    pub fn list_secrets(&self, tenant_id: &str) -> Result<Vec<SecretInfo>, StoreError> {
        let connection = self.connection();
        get_tenant(&connection, tenant_id)?;
        let mut statement = connection.prepare(
            "SELECT name, created_at_ms, updated_at_ms FROM tenant_secrets
             WHERE tenant_id = ?1 ORDER BY name",
        )?;
        let rows = statement.query_map([tenant_id], |row| {
            Ok(SecretInfo {
                tenant_id: tenant_id.to_owned(),
                name: row.get(0)?,
                created_at_ms: row.get(1)?,
                updated_at_ms: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_secret(
        &self,
        actor: &Actor,
        tenant_id: &str,
        name: &str,
    ) -> Result<(), StoreError> {
        self.mutate(actor, |transaction, _| {
            let deleted = transaction.execute(
                "DELETE FROM tenant_secrets WHERE tenant_id = ?1 AND name = ?2",
                [tenant_id, name],
            )?;
            if deleted == 0 {
                return Err(StoreError::not_found("secret", target_id(tenant_id, name)));
            }
            let detail = json!({ "tenant_id": tenant_id, "name": name });
            Ok(((), Event::new("secret.delete", target(tenant_id, name), &detail)))
        })
    }
}

fn target_id(tenant_id: &str, name: &str) -> String {
    format!("{tenant_id}/{name}")
}

fn target(tenant_id: &str, name: &str) -> String {
    format!("secret/{tenant_id}/{name}")
}
