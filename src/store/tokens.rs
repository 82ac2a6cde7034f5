//! API tokens: bearer tokens for the admin API, an admin's or one tenant's.
//!
//! A token is `wp_` and 32 random bytes from the operating system in unpadded base64url. Only
//! its SHA-256 hash is stored, so the database cannot be used to call the API; the plaintext is
//! returned once, when the token is created. A token is 256 random bits, so a plain hash is
//! enough: there is nothing to brute-force that a slow hash would protect.
//!
//! Verifying looks the hash up through its index, then compares the stored hash with the
//! presented token's in constant time. Revoked tokens stay in the table, so that the audit log's
//! token ids keep naming something.

use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::audit::Event;
use super::tenants::get_tenant;
use super::{Actor, Secret, Store, StoreError};

pub const TOKEN_PREFIX: &str = "wp_";
const TOKEN_BYTES: usize = 32;
/// The length of a token's base64url part: 32 bytes without padding.
const ENCODED_LEN: usize = 43;
const MAX_NAME_LEN: usize = 128;
/// `last_used_at_ms` is refreshed at most this often: a write (and an fsync) on every API
/// request would cost more than the timestamp is worth.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// A token as the store knows it: never its plaintext or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ApiToken {
    pub id: String,
    /// `None` for an admin token.
    pub tenant_id: Option<String>,
    pub name: String,
    pub created_at_ms: i64,
    pub last_used_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// A new token, with its plaintext: shown to its creator once, and never stored.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: ApiToken,
    pub plaintext: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    /// Sees and changes only this tenant.
    Tenant(String),
}

/// What a verified token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token_id: String,
    pub role: Role,
}

impl Grant {
    /// The actor that the changes made with this token are recorded under.
    pub fn actor(&self) -> Actor {
        Actor::Token(self.token_id.clone())
    }
}

impl Store {
    /// Creates a token for `tenant_id`, or an admin token when it is `None`.
    pub fn create_token(
        &self,
        actor: &Actor,
        tenant_id: Option<&str>,
        name: &str,
    ) -> Result<IssuedToken, StoreError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            let reason = format!("must be 1 to {MAX_NAME_LEN} bytes without control characters");
            return Err(StoreError::invalid("name", reason));
        }
        let plaintext = new_plaintext()?;
        let hash = hash(plaintext.expose());
        self.mutate(actor, |transaction, now_ms| {
            if let Some(tenant_id) = tenant_id {
                get_tenant(transaction, tenant_id)?;
            }
            let token = ApiToken {
                id: uuid::Uuid::new_v4().to_string(),
                tenant_id: tenant_id.map(str::to_owned),
                name: name.to_owned(),
                created_at_ms: now_ms,
                last_used_at_ms: None,
                revoked_at_ms: None,
            };
            transaction.execute(
                "INSERT INTO api_tokens (id, tenant_id, name, hash, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token.id, token.tenant_id, token.name, hash, token.created_at_ms],
            )?;
            let event = Event::new("token.create", target(&token.id), &token);
            Ok((IssuedToken { token, plaintext }, event))
        })
    }

    /// What `presented` may do, or `None` when it is not a live token: unknown, malformed or
    /// revoked alike, so a caller cannot tell them apart.
    pub fn verify_token(&self, presented: &str) -> Result<Option<Grant>, StoreError> {
        let well_formed = presented
            .strip_prefix(TOKEN_PREFIX)
            .is_some_and(|encoded| encoded.len() == ENCODED_LEN);
        if !well_formed {
            return Ok(None);
        }
        let presented_hash = hash(presented.as_bytes());
        let connection = self.connection();
        let Some(found) = find_by_hash(&connection, &presented_hash)? else {
            return Ok(None);
        };
        if !bool::from(found.hash.ct_eq(&presented_hash)) || found.token.revoked_at_ms.is_some() {
            return Ok(None);
        }
        self.touch(&connection, &found.token)?;
        let role = match found.token.tenant_id {
            Some(tenant_id) => Role::Tenant(tenant_id),
            None => Role::Admin,
        };
        Ok(Some(Grant { token_id: found.token.id, role }))
    }

    /// Every token, or only `tenant_id`'s when it is given; revoked ones included.
    pub fn list_tokens(&self, tenant_id: Option<&str>) -> Result<Vec<ApiToken>, StoreError> {
        let connection = self.connection();
        let mut statement = connection.prepare(&format!(
            "{SELECT_TOKEN} WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY created_at_ms, id"
        ))?;
        let rows = statement.query_map([tenant_id], token_columns)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a token. Revoking a revoked token keeps its first revocation time, and is
    /// recorded all the same: the attempt is worth knowing about.
    pub fn revoke_token(&self, actor: &Actor, id: &str) -> Result<ApiToken, StoreError> {
        self.mutate(actor, |transaction, now_ms| {
            transaction.execute(
                "UPDATE api_tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![id, now_ms],
            )?;
            let token = transaction
                .query_row(&format!("{SELECT_TOKEN} WHERE id = ?1"), [id], token_columns)
                .optional()?
                .ok_or_else(|| StoreError::not_found("token", id))?;
            let event = Event::new("token.revoke", target(&token.id), &token);
            Ok((token, event))
        })
    }

    /// Records that a token was used. This is bookkeeping, not a change anyone made, so it has
    /// no audit row: it would add one per API request.
    fn touch(&self, connection: &Connection, token: &ApiToken) -> Result<(), StoreError> {
        let now_ms = self.now_ms();
        let stale = match token.last_used_at_ms {
            Some(at_ms) => now_ms - at_ms >= LAST_USED_RESOLUTION_MS,
            None => true,
        };
        if stale {
            connection.execute(
                "UPDATE api_tokens SET last_used_at_ms = ?2 WHERE id = ?1",
                params![token.id, now_ms],
            )?;
        }
        Ok(())
    }
}

const SELECT_TOKEN: &str =
    "SELECT id, tenant_id, name, created_at_ms, last_used_at_ms, revoked_at_ms FROM api_tokens";

struct Found {
    token: ApiToken,
    hash: Vec<u8>,
}

fn find_by_hash(connection: &Connection, hash: &[u8]) -> Result<Option<Found>, StoreError> {
    let found = connection
        .query_row(
            "SELECT id, tenant_id, name, created_at_ms, last_used_at_ms, revoked_at_ms, hash
             FROM api_tokens WHERE hash = ?1",
            [hash],
            |row| Ok(Found { token: token_columns(row)?, hash: row.get(6)? }),
        )
        .optional()?;
    Ok(found)
}

fn token_columns(row: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        created_at_ms: row.get(3)?,
        last_used_at_ms: row.get(4)?,
        revoked_at_ms: row.get(5)?,
    })
}

fn new_plaintext() -> Result<Secret, StoreError> {
    let mut bytes = zeroize::Zeroizing::new([0u8; TOKEN_BYTES]);
    getrandom::fill(bytes.as_mut_slice()).map_err(StoreError::Random)?;
    let mut text = zeroize::Zeroizing::new(String::from(TOKEN_PREFIX));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes.as_slice(), &mut text);
    Ok(Secret::new(text.as_bytes().to_vec()))
}

fn hash(plaintext: &[u8]) -> [u8; 32] {
    Sha256::digest(plaintext).into()
}

fn target(id: &str) -> String {
    format!("token/{id}")
}
