//! The host key, which seals tenant secrets, and [`Secret`], which holds one in memory.
//!
//! The key is 32 random bytes in a file of its own, mode 0600, created on the first open. It is
//! kept apart from the database so that a copy of the database (a backup, a support bundle)
//! reveals no secret. A key file that group or others could read is refused: the key would no
//! longer be the host's alone.
//!
//! Each secret is sealed with XChaCha20-Poly1305 under a fresh random 24-byte nonce, with the
//! tenant id and the secret's name as associated data: a ciphertext copied onto another
//! tenant's or another name's row fails to open instead of decrypting as the wrong secret.
//!
//! The database records a fingerprint of the key that sealed its secrets, so that opening it
//! with another key (a restored database with a new key file, or the reverse) fails at once
//! with a clear error instead of every secret failing later.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::StoreError;

pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 24;
/// The `meta` row that holds the fingerprint of the key the database's secrets are sealed with.
const KEY_ID_ROW: &str = "host_key_id";

/// A secret's plaintext, held in memory only while it is needed.
///
/// It has no `Display`, its `Debug` prints `Secret(..)`, and its bytes are zeroed when it is
/// dropped, so that it cannot reach a log line or a panic message by accident: reading it takes
/// a call to [`Secret::expose`], which a reviewer can search for.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as text, when it is UTF-8 (API tokens, PEM keys).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Secret {
        Secret::new(text.into_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A sealed secret as it is stored.
pub(super) struct Sealed {
    pub nonce: [u8; NONCE_BYTES],
    pub ciphertext: Vec<u8>,
}

pub(super) struct HostKey {
    cipher: XChaCha20Poly1305,
    /// A fingerprint of the key, safe to store next to what it seals.
    id: String,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostKey(..)")
    }
}

impl HostKey {
    pub(super) fn from_bytes(bytes: &[u8; KEY_BYTES]) -> HostKey {
        let mut hasher = Sha256::new();
        hasher.update(b"warmpool host key id v1\0");
        hasher.update(bytes);
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hasher.finalize());
        HostKey { cipher: XChaCha20Poly1305::new(Key::from_slice(bytes)), id }
    }

    /// Reads the key file, or returns `None` when there is none.
    fn load(path: &Path) -> Result<Option<HostKey>, StoreError> {
        let io_error = |source| StoreError::KeyFile { path: path.to_owned(), source };
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(e)),
        };
        // The checks look at the opened file, not the path, so a file swapped in between
        // cannot pass them.
        check_private(path, &file.metadata().map_err(io_error)?)?;
        let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_BYTES + 1));
        Read::by_ref(&mut file)
            .take(KEY_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        let bytes: &[u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| StoreError::Key {
            path: path.to_owned(),
            reason: format!("it must hold exactly {KEY_BYTES} bytes"),
        })?;
        Ok(Some(HostKey::from_bytes(bytes)))
    }

    /// Creates a new key file, whole or not at all: the key is written and synced under a
    /// temporary name, then linked to `path`, which fails if another process created it first.
    fn create(path: &Path) -> Result<HostKey, StoreError> {
        let io_error = |source| StoreError::KeyFile { path: path.to_owned(), source };
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        getrandom::fill(bytes.as_mut_slice()).map_err(StoreError::Random)?;

        let temporary = temporary_path(path);
        let _ = std::fs::remove_file(&temporary);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error)?;
        let written = file
            .write_all(bytes.as_slice())
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::hard_link(&temporary, path));
        let _ = std::fs::remove_file(&temporary);
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return HostKey::load(path)?.ok_or_else(|| io_error(e));
            }
            Err(e) => return Err(io_error(e)),
        }
        sync_parent(path).map_err(io_error)?;
        info!(path = %path.display(), "Created the host key");
        Ok(HostKey::from_bytes(&bytes))
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn seal(
        &self,
        tenant_id: &str,
        name: &str,
        plaintext: &Secret,
    ) -> Result<Sealed, StoreError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(StoreError::Random)?;
        let aad = associated_data(tenant_id, name);
        let payload = Payload { msg: plaintext.expose(), aad: &aad };
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .map_err(|_| crypto_error(tenant_id, name))?;
        Ok(Sealed { nonce, ciphertext })
    }

    pub(super) fn open(
        &self,
        tenant_id: &str,
        name: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Secret, StoreError> {
        if nonce.len() != NONCE_BYTES {
            return Err(crypto_error(tenant_id, name));
        }
        let aad = associated_data(tenant_id, name);
        let payload = Payload { msg: ciphertext, aad: &aad };
        let plaintext = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| crypto_error(tenant_id, name))?;
        Ok(Secret::new(plaintext))
    }
}

/// Loads or creates the key at `path` and checks it against the fingerprint that the database
/// recorded. While the database holds no sealed secret, the fingerprint follows the key; once
/// it holds one, only the key that sealed it is accepted, and a missing key is not replaced by
/// a new one, which could open nothing.
pub(super) fn bind(connection: &mut Connection, path: &Path) -> Result<HostKey, StoreError> {
    let key_error = |reason: String| StoreError::Key { path: path.to_owned(), reason };
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let recorded: Option<String> = transaction
        .query_row("SELECT value FROM meta WHERE name = ?1", [KEY_ID_ROW], |row| row.get(0))
        .optional()?;
    let sealed: i64 =
        transaction.query_row("SELECT count(*) FROM tenant_secrets", [], |row| row.get(0))?;
    let key = match HostKey::load(path)? {
        Some(key) => key,
        None if sealed > 0 => {
            let reason =
                format!("it is missing, and it sealed the {sealed} secrets in the database");
            return Err(key_error(reason));
        }
        None => HostKey::create(path)?,
    };
    match recorded.as_deref() {
        Some(id) if id == key.id() => return Ok(key),
        Some(_) if sealed > 0 => {
            let reason =
                format!("it is not the key that sealed the {sealed} secrets in the database");
            return Err(key_error(reason));
        }
        Some(_) => {
            warn!(path = %path.display(), "The host key changed; the database held no secrets")
        }
        None => {}
    }
    transaction.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        [KEY_ID_ROW, key.id()],
    )?;
    transaction.commit()?;
    Ok(key)
}

fn check_private(path: &Path, metadata: &std::fs::Metadata) -> Result<(), StoreError> {
    let key_error = |reason: String| StoreError::Key { path: path.to_owned(), reason };
    if !metadata.is_file() {
        return Err(key_error("it is not a regular file".into()));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_error(format!(
            "its mode is {mode:04o}, so others than its owner may read it; \
             it must be 0600 (`chmod 600 {}`)",
            path.display()
        )));
    }
    Ok(())
}

/// Binds a ciphertext to its row. The NUL separators cannot occur in ids or names.
fn associated_data(tenant_id: &str, name: &str) -> Vec<u8> {
    format!("warmpool tenant secret v1\0{tenant_id}\0{name}").into_bytes()
}

fn crypto_error(tenant_id: &str, name: &str) -> StoreError {
    StoreError::Crypto { tenant: tenant_id.to_owned(), name: name.to_owned() }
}

fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Makes the new directory entry durable, not only the file's contents.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> HostKey {
        HostKey::from_bytes(&[fill; KEY_BYTES])
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_sealed_secret_opens_with_its_key_tenant_and_name() {
        let sealed = key(1).seal("t1", "app_key", &Secret::from("pem".to_owned())).unwrap();
        let opened = key(1).open("t1", "app_key", &sealed.nonce, &sealed.ciphertext).unwrap();
        assert_eq!(opened.expose(), b"pem");
    }

    #[test]
    fn a_wrong_key_fails_to_open_cleanly() {
        let sealed = key(1).seal("t1", "app_key", &Secret::from("pem".to_owned())).unwrap();
        let err = key(2).open("t1", "app_key", &sealed.nonce, &sealed.ciphertext).unwrap_err();
        assert!(matches!(err, StoreError::Crypto { .. }), "{err:?}");
    }

    #[test]
    fn a_ciphertext_moved_to_another_tenant_or_name_fails_to_open() {
        let sealed = key(1).seal("t1", "app_key", &Secret::from("pem".to_owned())).unwrap();
        assert!(key(1).open("t2", "app_key", &sealed.nonce, &sealed.ciphertext).is_err());
        assert!(key(1).open("t1", "other", &sealed.nonce, &sealed.ciphertext).is_err());
    }

    #[test]
    fn every_seal_uses_a_new_nonce() {
        let secret = Secret::from("pem".to_owned());
        let a = key(1).seal("t1", "n", &secret).unwrap();
        let b = key(1).seal("t1", "n", &secret).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let secret = Secret::from("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        assert_eq!(format!("{:?}", key(1)), "HostKey(..)");
    }

    #[test]
    fn a_created_key_file_is_private_and_loads_as_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        let created = HostKey::create(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), KEY_BYTES as u64);
        assert_eq!(HostKey::load(&path).unwrap().unwrap().id(), created.id());
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "the temporary file is gone");
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        std::fs::write(&path, [7u8; KEY_BYTES]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = HostKey::load(&path).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Key { .. }), "{err:?}");
        assert!(message.contains("0644") && message.contains("chmod 600"), "{message}");
    }

    #[test]
    fn a_key_file_of_the_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        std::fs::write(&path, [7u8; KEY_BYTES + 1]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = HostKey::load(&path).unwrap_err();
        assert!(err.to_string().contains("exactly 32 bytes"), "{err}");
    }
}
