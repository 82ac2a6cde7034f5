//! The libvirt implementation of [`Hypervisor`], through the `virt` crate.
//!
//! libvirt's client library blocks, so every call runs on tokio's blocking pool. One connection
//! is shared by all slots (libvirt connections are thread-safe); when libvirtd restarts, the
//! connection dies and the next call opens a new one.

use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirtState};
use virt::error::ErrorNumber;
use virt::sys;

use super::{DhcpHostChange, DomainMark, DomainState, Hypervisor, HypervisorError, NetworkInfo};

/// The XML namespace of the metadata element that marks a domain as a warmpool slot.
pub const METADATA_NAMESPACE: &str = "https://warmpool.dev/xmlns/slot/1";

pub struct Libvirt {
    uri: String,
    conn: Mutex<Option<Arc<Connect>>>,
}

impl Libvirt {
    /// Opens a connection to `uri`, failing at once if libvirtd does not answer.
    pub async fn connect(uri: &str) -> Result<Libvirt, HypervisorError> {
        // libvirt prints every error to stderr by default; they are returned as values instead.
        virt::error::clear_error_callback();
        let libvirt = Libvirt { uri: uri.to_owned(), conn: Mutex::new(None) };
        libvirt.connection().await?;
        Ok(libvirt)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    async fn connection(&self) -> Result<Arc<Connect>, HypervisorError> {
        if let Some(conn) = self.conn.lock().expect("connection lock").clone() {
            if conn.is_alive().unwrap_or(false) {
                return Ok(conn);
            }
        }
        let uri = self.uri.clone();
        let conn = tokio::task::spawn_blocking(move || Connect::open(Some(&uri)))
            .await
            .map_err(|e| HypervisorError::Task(e.to_string()))?
            .map_err(|e| HypervisorError::Connect {
                uri: self.uri.clone(),
                message: e.message().to_owned(),
            })?;
        let conn = Arc::new(conn);
        *self.conn.lock().expect("connection lock") = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, HypervisorError> + Send + 'static,
    {
        let conn = self.connection().await?;
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(|e| HypervisorError::Task(e.to_string()))?
    }
}

fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, HypervisorError> {
    match conn.lookup_domain_by_name(name) {
        Ok(domain) => Ok(Some(domain)),
        Err(e) if is_no_domain(&e) => Ok(None),
        Err(e) => Err(HypervisorError::operation("Lookup", name, e.message())),
    }
}

fn is_missing(e: &virt::error::Error, number: ErrorNumber) -> bool {
    e.code().is_known_and(|code| code == number)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code().is_known_and(|code| code == ErrorNumber::NoDomain)
}

fn require(conn: &Connect, name: &str) -> Result<Domain, HypervisorError> {
    lookup(conn, name)?.ok_or_else(|| HypervisorError::NoDomain { domain: name.to_owned() })
}

fn path_str(path: &Path) -> Result<String, HypervisorError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| HypervisorError::operation("Path", "-", "paths must be UTF-8"))
}

#[async_trait]
impl Hypervisor for Libvirt {
    async fn start(&self, xml: &str) -> Result<(), HypervisorError> {
        let xml = xml.to_owned();
        self.blocking(move |conn| {
            conn.create_domain_xml(&xml, 0)
                .map(drop)
                .map_err(|e| HypervisorError::operation("Start", "new domain", e.message()))
        })
        .await
    }

    async fn save(&self, name: &str, path: &Path) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        let path = path_str(path)?;
        self.blocking(move |conn| {
            let domain = require(conn, &name)?;
            let to = CString::new(path)
                .map_err(|e| HypervisorError::operation("Save", &name, e.to_string()))?;
            // SAFETY: `domain` holds a valid domain reference for the call's duration, `to` is
            // a NUL-terminated string that outlives it, and a null dxml is documented as "keep
            // the domain's own XML". The `virt` crate does not wrap virDomainSaveFlags.
            let rc = unsafe {
                sys::virDomainSaveFlags(domain.as_ptr(), to.as_ptr(), std::ptr::null(), 0)
            };
            if rc < 0 {
                let e = virt::error::Error::last_error();
                return Err(HypervisorError::operation("Save", &name, e.message()));
            }
            Ok(())
        })
        .await
    }

    async fn saved_xml(&self, path: &Path) -> Result<String, HypervisorError> {
        let path = path_str(path)?;
        self.blocking(move |conn| {
            conn.save_image_xml_desc(&path, 0)
                .map_err(|e| HypervisorError::operation("Read saved XML", &path, e.message()))
        })
        .await
    }

    async fn restore_paused(&self, path: &Path, xml: &str) -> Result<(), HypervisorError> {
        let path = path_str(path)?;
        let xml = xml.to_owned();
        self.blocking(move |conn| {
            conn.restore_domain_flags(&path, Some(&xml), sys::VIR_DOMAIN_SAVE_PAUSED)
                .map_err(|e| HypervisorError::operation("Restore", &path, e.message()))
        })
        .await
    }

    async fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            require(conn, &name)?
                .resume()
                .map_err(|e| HypervisorError::operation("Resume", &name, e.message()))
        })
        .await
    }

    async fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            let Some(domain) = lookup(conn, &name)? else { return Ok(()) };
            match domain.destroy() {
                Ok(()) => Ok(()),
                // Gone between the lookup and the destroy, or already shut off.
                Err(e) if is_no_domain(&e) => Ok(()),
                Err(e) if !domain.is_active().unwrap_or(true) => {
                    tracing::debug!(domain = %name, error = %e.message(), "Domain was already stopped");
                    Ok(())
                }
                Err(e) => Err(HypervisorError::operation("Destroy", &name, e.message())),
            }
        })
        .await
    }

    async fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            let Some(domain) = lookup(conn, &name)? else { return Ok(DomainState::Gone) };
            let state = match domain.state() {
                Ok((state, _reason)) => state,
                Err(e) if is_no_domain(&e) => return Ok(DomainState::Gone),
                Err(e) => return Err(HypervisorError::operation("State", &name, e.message())),
            };
            Ok(match state.unwrap_or(VirtState::NoState) {
                VirtState::Running | VirtState::Blocked => DomainState::Running,
                VirtState::Paused => DomainState::Paused,
                _ => DomainState::Stopped,
            })
        })
        .await
    }

    async fn marked_domains(&self) -> Result<Vec<DomainMark>, HypervisorError> {
        self.blocking(move |conn| {
            let domains = conn
                .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .map_err(|e| HypervisorError::operation("List", "domains", e.message()))?;
            let mut marks = Vec::new();
            for domain in domains {
                let Ok(metadata) = domain.metadata(
                    sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    Some(METADATA_NAMESPACE),
                    0,
                ) else {
                    continue;
                };
                let Ok(name) = domain.name() else { continue };
                marks.extend(DomainMark::parse(&name, &metadata));
            }
            Ok(marks)
        })
        .await
    }

    async fn network(&self, name: &str) -> Result<Option<NetworkInfo>, HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            let network = match conn.lookup_network_by_name(&name) {
                Ok(network) => network,
                Err(e) if is_missing(&e, ErrorNumber::NoNetwork) => return Ok(None),
                Err(e) => return Err(HypervisorError::operation("Lookup", &name, e.message())),
            };
            let failed = |e: virt::error::Error| {
                HypervisorError::operation("Describe network", &name, e.message())
            };
            let active = network.is_active().map_err(failed)?;
            let xml = network.xml_desc(0).map_err(failed)?;
            Ok(Some(NetworkInfo { xml, active }))
        })
        .await
    }

    async fn network_filter(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            let filter = match conn.lookup_nwfilter_by_name(&name) {
                Ok(filter) => filter,
                Err(e) if is_missing(&e, ErrorNumber::NoNwfilter) => return Ok(None),
                Err(e) => return Err(HypervisorError::operation("Lookup", &name, e.message())),
            };
            filter
                .xml_desc(0)
                .map(Some)
                .map_err(|e| HypervisorError::operation("Describe filter", &name, e.message()))
        })
        .await
    }

    async fn update_dhcp_host(
        &self,
        network: &str,
        change: DhcpHostChange,
    ) -> Result<(), HypervisorError> {
        let name = network.to_owned();
        self.blocking(move |conn| {
            let failed = |e: virt::error::Error| {
                HypervisorError::operation("Update DHCP hosts of", &name, e.message())
            };
            let network = conn.lookup_network_by_name(&name).map_err(failed)?;
            let (command, xml) = match &change {
                DhcpHostChange::Add(xml) => (sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, xml),
                DhcpHostChange::Delete(xml) => (sys::VIR_NETWORK_UPDATE_COMMAND_DELETE, xml),
            };
            // A transient network has no persistent definition to change.
            let mut flags = sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
            if network.is_persistent().map_err(failed)? {
                flags |= sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
            }
            network
                .update(command, sys::VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, xml, flags)
                .map_err(failed)
        })
        .await
    }
}
