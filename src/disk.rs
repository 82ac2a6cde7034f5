//! Disk files of a slot: qcow2 overlays and backing chains (`qemu-img`), and the copies of
//! firmware variables that a clean snapshot keeps.
//!
//! A slot's disk is a chain of three files:
//!
//! ```text
//! image (read-only, shared by the pool) <- clean overlay (frozen at snapshot) <- job overlay
//! ```
//!
//! The clean overlay holds what the guest wrote while it booted up to the snapshot; it is made
//! read-only once the memory image is saved, so that it matches that image forever. The job
//! overlay takes a job's writes and is thrown away by every revert.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("qemu-img could not be run: {0}")]
    Spawn(io::Error),
    #[error("qemu-img failed on {path}: {stderr}")]
    QemuImg { path: PathBuf, stderr: String },
    #[error("{operation} {path} failed: {source}")]
    File { operation: &'static str, path: PathBuf, source: io::Error },
}

fn file_error<'a>(
    operation: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::File { operation, path: path.to_owned(), source }
}

/// Creates an empty qcow2 overlay at `path` on top of `backing`, replacing any file there.
pub async fn create_overlay(path: &Path, backing: &Path) -> Result<(), DiskError> {
    remove_file(path).await?;
    let output = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(path)
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(DiskError::QemuImg { path: path.to_owned(), stderr });
    }
    Ok(())
}

/// Makes a clean overlay read-only and durable: it must match its memory image for as long as
/// the slot lives, across host crashes too.
pub async fn freeze(path: &Path) -> Result<(), DiskError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&owned)?;
        file.sync_all()?;
        std::fs::set_permissions(&owned, std::fs::Permissions::from_mode(0o444))
    })
    .await
    .map_err(|e| DiskError::File { operation: "Freeze", path: path.to_owned(), source: e.into() })?
    .map_err(file_error("Freeze", path))
}

/// Copies `from` over `to` through a temporary file, so that `to` is never half written.
pub async fn copy_file(from: &Path, to: &Path) -> Result<(), DiskError> {
    let partial = to.with_extension("partial");
    tokio::fs::copy(from, &partial).await.map_err(file_error("Copy", from))?;
    tokio::fs::rename(&partial, to).await.map_err(file_error("Rename", &partial))?;
    Ok(())
}

/// Copies the directory tree `from` over `to`, replacing what `to` held.
pub async fn copy_tree(from: &Path, to: &Path) -> Result<(), DiskError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        if to.exists() {
            std::fs::remove_dir_all(&to).map_err(file_error("Remove", &to))?;
        }
        copy_tree_blocking(&from, &to)
    })
    .await
    .map_err(|e| DiskError::File {
        operation: "Copy",
        path: PathBuf::new(),
        source: e.into(),
    })?
}

fn copy_tree_blocking(from: &Path, to: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(to).map_err(file_error("Create", to))?;
    let metadata = std::fs::metadata(from).map_err(file_error("Read", from))?;
    std::fs::set_permissions(to, metadata.permissions()).map_err(file_error("Chmod", to))?;
    chown_like(to, &metadata)?;
    for entry in std::fs::read_dir(from).map_err(file_error("Read", from))? {
        let entry = entry.map_err(file_error("Read", from))?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(file_error("Read", &entry.path()))?;
        if kind.is_dir() {
            copy_tree_blocking(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).map_err(file_error("Copy", &entry.path()))?;
            let metadata = entry.metadata().map_err(file_error("Read", &entry.path()))?;
            chown_like(&target, &metadata)?;
        }
    }
    Ok(())
}

/// TPM state belongs to the user QEMU runs as; a copy must keep that owner.
fn chown_like(path: &Path, metadata: &std::fs::Metadata) -> Result<(), DiskError> {
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(path, Some(metadata.uid()), Some(metadata.gid()))
        .map_err(file_error("Chown", path))
}

/// Writes `bytes` to `path` through a temporary file that is synced before it takes the name,
/// so that `path` holds either its old content or all of the new, after any crash.
pub async fn write_durably(path: &Path, bytes: Vec<u8>) -> Result<(), DiskError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let partial = owned.with_extension("partial");
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, &owned)?;
        if let Some(dir) = owned.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok::<_, io::Error>(())
    })
    .await
    .map_err(|e| DiskError::File { operation: "Write", path: path.to_owned(), source: e.into() })?
    .map_err(file_error("Write", path))
}

/// Flushes a file that another process wrote (a memory image) to stable storage.
pub async fn sync_file(path: &Path) -> Result<(), DiskError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&owned)?.sync_all())
        .await
        .map_err(|e| DiskError::File {
            operation: "Sync",
            path: path.to_owned(),
            source: e.into(),
        })?
        .map_err(file_error("Sync", path))
}

/// Removes a file; one that does not exist is already removed.
pub async fn remove_file(path: &Path) -> Result<(), DiskError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(file_error("Remove", path)(e)),
        _ => Ok(()),
    }
}

/// Removes a directory tree, including read-only files in it.
pub async fn remove_tree(path: &Path) -> Result<(), DiskError> {
    match tokio::fs::remove_dir_all(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(file_error("Remove", path)(e)),
        _ => Ok(()),
    }
}

/// Creates a directory, and any missing parent, that QEMU, running as another user, can pass
/// through but not list. The mode is set explicitly: the daemon's umask is not to be trusted.
pub async fn create_private_dir(path: &Path) -> Result<(), DiskError> {
    let missing: Vec<&Path> = path.ancestors().take_while(|dir| !dir.exists()).collect();
    tokio::fs::create_dir_all(path).await.map_err(file_error("Create", path))?;
    for dir in missing.into_iter().chain(std::iter::once(path)) {
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .await
            .map_err(file_error("Chmod", dir))?;
    }
    Ok(())
}

/// Creates a small empty qcow2 image, for tests of what sits on images.
#[cfg(test)]
pub(crate) fn test_image(path: &Path) {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1M")
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img create {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn backing_chain(path: &Path) -> String {
        let output = Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json"])
            .arg(path)
            .output()
            .await
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    }

    #[tokio::test]
    async fn overlay_chain_is_image_then_clean_then_job() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.qcow2");
        test_image(&image);
        let clean = dir.path().join("clean.qcow2");
        let job = dir.path().join("job.qcow2");
        create_overlay(&clean, &image).await.unwrap();
        freeze(&clean).await.unwrap();
        create_overlay(&job, &clean).await.unwrap();
        // Replacing an existing overlay works too: every revert does it.
        create_overlay(&job, &clean).await.unwrap();

        let chain = backing_chain(&job).await;
        let files: Vec<_> = ["job.qcow2", "clean.qcow2", "image.qcow2"]
            .iter()
            .map(|name| chain.find(&format!("/{name}\"")).expect(name))
            .collect();
        assert!(files.windows(2).all(|w| w[0] < w[1]), "{chain}");
        let mode = std::fs::metadata(&clean).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
    }

    #[tokio::test]
    async fn overlay_on_a_missing_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_overlay(&dir.path().join("o.qcow2"), &dir.path().join("missing.qcow2"))
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::QemuImg { .. }), "{err}");
        assert!(err.to_string().contains("o.qcow2"), "{err}");
    }

    #[tokio::test]
    async fn private_dirs_are_passable_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o077) };
        let created = create_private_dir(&nested).await;
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        created.unwrap();
        for path in [dir.path().join("a"), dir.path().join("a/b"), nested] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o711, "{}", path.display());
        }
    }

    #[tokio::test]
    async fn copy_tree_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir_all(from.join("tpm2")).unwrap();
        std::fs::write(from.join("tpm2/state"), b"clean").unwrap();
        std::fs::create_dir_all(to.join("tpm2")).unwrap();
        std::fs::write(to.join("tpm2/state"), b"dirty").unwrap();
        std::fs::write(to.join("tpm2/extra"), b"left by a job").unwrap();
        copy_tree(&from, &to).await.unwrap();
        assert_eq!(std::fs::read(to.join("tpm2/state")).unwrap(), b"clean");
        assert!(!to.join("tpm2/extra").exists());
    }
}
