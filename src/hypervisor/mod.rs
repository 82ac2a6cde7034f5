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

/// A virtual network: its XML (the running definition when it runs) and whether it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub xml: String,
    pub active: bool,
}

/// A change to a network's DHCP reservations; the string is a `<host mac='' ip='' name=''/>`
/// element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpHostChange {
    Add(String),
    Delete(String),
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

    /// The running or paused domains that carry warmpool's mark, with what it says.
    async fn marked_domains(&self) -> Result<Vec<DomainMark>, HypervisorError>;

    /// The virtual network `name` as libvirt describes it, or `None` when libvirt has none.
    async fn network(&self, name: &str) -> Result<Option<NetworkInfo>, HypervisorError>;

    /// The XML of the network filter `name`, or `None` when libvirt has none.
    async fn network_filter(&self, name: &str) -> Result<Option<String>, HypervisorError>;

    /// Adds or deletes a `<host>` entry of the network's DHCP server, in its running and in its
    /// persistent definition.
    async fn update_dhcp_host(
        &self,
        network: &str,
        change: DhcpHostChange,
    ) -> Result<(), HypervisorError>;

    /// Names of the running or paused domains marked as slots of `pool`.
    async fn list_marked(&self, pool: &str) -> Result<Vec<String>, HypervisorError> {
        let marks = self.marked_domains().await?;
        Ok(marks.into_iter().filter(|mark| mark.pool == pool).map(|mark| mark.domain).collect())
    }
}

/// What warmpool's metadata element on a domain says: which slot of which pool it is, and
/// which daemon (by its state directory) made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainMark {
    pub domain: String,
    pub pool: String,
    pub slot: Option<usize>,
    /// The state directory of the daemon that made the domain; absent on marks made before
    /// marks named their daemon.
    pub owner: Option<String>,
}

impl DomainMark {
    /// Reads the mark out of a domain's whole XML, or out of the element alone as libvirt
    /// returns it (under a prefix of its choosing), if it has one.
    pub fn parse(domain: &str, xml: &str) -> Option<DomainMark> {
        let start = match xml.find("<warmpool:slot") {
            Some(start) => start,
            None if !xml.contains("<domain") => xml.find('<')?,
            None => return None,
        };
        let element = &xml[start..];
        let element = &element[..element.find('>')?];
        Some(DomainMark {
            domain: domain.to_owned(),
            pool: crate::template::xml_unescape(&attribute(element, "pool")?),
            slot: attribute(element, "slot").and_then(|slot| slot.parse().ok()),
            owner: attribute(element, "owner").map(|owner| crate::template::xml_unescape(&owner)),
        })
    }
}

/// The value of `name="…"` (or `name='…'`) in one element's text.
fn attribute(element: &str, name: &str) -> Option<String> {
    for quote in ['"', '\''] {
        let key = format!(" {name}={quote}");
        if let Some(at) = element.find(&key) {
            let value = &element[at + key.len()..];
            return Some(value[..value.find(quote)?].to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_read_from_a_whole_domain_or_from_libvirts_metadata_element() {
        let xml = "<domain><name>d</name><metadata><warmpool:slot xmlns:warmpool=\"u\" \
                   pool=\"a&amp;b\" slot=\"2\" owner=\"/var/lib/warmpool\"/></metadata></domain>";
        let mark = DomainMark::parse("d", xml).unwrap();
        assert_eq!((mark.pool.as_str(), mark.slot), ("a&b", Some(2)));
        assert_eq!(mark.owner.as_deref(), Some("/var/lib/warmpool"));
        let element = "<ns:slot xmlns:ns=\"u\" pool='p' slot='0'/>";
        let mark = DomainMark::parse("d", element).unwrap();
        assert_eq!((mark.pool.as_str(), mark.slot, mark.owner), ("p", Some(0), None));
        assert_eq!(DomainMark::parse("d", "<domain><name>d</name></domain>"), None);
    }
}
