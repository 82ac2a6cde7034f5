//! The boundary between the pool and the VM backend.
//!
//! The pool needs little from a hypervisor: start a transient domain from XML, save its memory
//! to a file (which stops it), restore it paused from that file, resume, destroy, and list. Each
//! domain's job port is a unix socket whose path the domain XML names, so the boundary needs no
//! channel plumbing of its own. [`libvirt::Libvirt`] is the real implementation;
//! [`fake::FakeHypervisor`] runs scripted guests in memory for unit tests.

use std::path::Path;

use async_trait::async_trait;

pub mod fake;
pub mod libvirt;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("Cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("Domain {domain} does not exist")]
    NoDomain { domain: String },
    #[error("{operation} of {domain} failed: {message}")]
    Operation { operation: &'static str, domain: String, message: String },
    #[error("The hypervisor task failed: {0}")]
    Task(String),
}

impl HypervisorError {
    pub fn operation(operation: &'static str, domain: &str, message: impl ToString) -> Self {
        HypervisorError::Operation {
            operation,
            domain: domain.to_owned(),
            message: message.to_string(),
        }
    }
}

/// The state of a domain as the pool cares about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    /// Shut off, crashed or otherwise not executing, but still known to the hypervisor.
    Stopped,
    /// Unknown to the hypervisor: a transient domain that stopped is gone.
    Gone,
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Starts a transient domain described by `xml`.
    async fn start(&self, xml: &str) -> Result<(), HypervisorError>;

    /// Saves the running domain's memory and device state to `path`. The domain stops.
    async fn save(&self, domain: &str, path: &Path) -> Result<(), HypervisorError>;

    /// The domain XML embedded in a memory image written by [`Hypervisor::save`].
    async fn saved_xml(&self, path: &Path) -> Result<String, HypervisorError>;

    /// Restores a domain paused from the memory image at `path`, with `xml` replacing the
    /// saved description (only host-side details such as disk paths may differ).
    async fn restore_paused(&self, path: &Path, xml: &str) -> Result<(), HypervisorError>;

    async fn resume(&self, domain: &str) -> Result<(), HypervisorError>;

    /// Stops a domain at once. A domain that is already gone is not an error.
    async fn destroy(&self, domain: &str) -> Result<(), HypervisorError>;

    async fn state(&self, domain: &str) -> Result<DomainState, HypervisorError>;

    /// Names of the running or paused domains whose XML carries `mark` in its metadata.
    async fn list_marked(&self, mark: &str) -> Result<Vec<String>, HypervisorError>;
}
