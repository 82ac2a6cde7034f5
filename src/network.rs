//! Guest networks: a slot's interface on a NAT network of libvirt, behind the `warmpool-guest`
//! network filter.
//!
//! A guest is hostile, so its network lets it reach the internet and nothing else. Three layers
//! do that, and the daemon checks each before a pool may use it:
//!
//! - the libvirt network (`host-setup/network/warmpool-network.xml`) forwards with NAT and
//!   isolates its ports, so the bridge forwards no frame from one guest to another;
//! - the filter (`host-setup/network/warmpool-guest.xml`, compared rule by rule with the copy
//!   built into the daemon) drops spoofed MAC and IP addresses, IPv6, and IPv4 toward the
//!   guest network, link-local and metadata addresses and the ranges passed to it;
//! - each slot gets a fixed MAC and IPv4 address, reserved in the network's DHCP server and
//!   passed to the filter, which therefore needs no address learning and holds across reverts.
//!
//! The ranges passed to the filter are the host's own IPv4 addresses outside the guest network
//! and the configured `guest_blocked_ranges`. The host's addresses are read again for every
//! start and restore of a slot, whose restore XML gets the filter reference of that moment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::info;

use crate::config::{Config, PoolConfig};
use crate::hypervisor::{DhcpHostChange, Hypervisor, HypervisorError};
use crate::slot::domain_name;

/// The name of the network filter every slot's interface references.
pub const FILTER_NAME: &str = "warmpool-guest";

/// The filter as `host-setup/setup` defines it; libvirt's must have the same rules.
const FILTER_XML: &str = include_str!("../host-setup/network/warmpool-guest.xml");

/// The ranges the filter drops by rules of its own; host addresses inside them need no rule.
const FILTER_DROPS: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(168, 63, 129, 16), 32),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(224, 0, 0, 0), 3),
];

/// QEMU's own OUI: libvirt hands out MACs under it too, and no physical card uses it.
const MAC_PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("libvirt has no network `{network}`: define it with host-setup/setup")]
    NoNetwork { network: String },
    #[error("Network `{network}` is not running: start it with `virsh net-start {network}`")]
    Inactive { network: String },
    #[error("Network `{network}` is unfit for guests: {reason}")]
    Unfit { network: String, reason: String },
    #[error("libvirt has no network filter `{FILTER_NAME}`: define it with host-setup/setup")]
    NoFilter,
    #[error(
        "Network filter `{FILTER_NAME}` differs from the one warmpool ships ({difference}): \
         update it with host-setup/setup"
    )]
    FilterDiffers { difference: String },
    #[error(
        "Network `{network}` has room for {room} guests, but its pools have {slots} slots: \
         give it a larger subnet with host-setup/setup --guest-network"
    )]
    Full { network: String, room: usize, slots: usize },
    #[error("Cannot read the XML of {what}: {message}")]
    Xml { what: String, message: String },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

/// An IPv4 range in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(address: Ipv4Addr, prefix: u8) -> Ipv4Net {
        let net = Ipv4Net { address, prefix: prefix.min(32) };
        Ipv4Net { address: Ipv4Addr::from(u32::from(address) & net.mask()), ..net }
    }

    fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            prefix => u32::MAX << (32 - u32::from(prefix)),
        }
    }

    pub fn contains(self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.address)
    }

    /// The addresses a host may have: all but the network's first and last address (for
    /// prefixes up to /30).
    fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.address);
        let size = 1u64 << (32 - u32::from(self.prefix));
        let (skip_ends, count) = if size > 2 { (1, size - 2) } else { (0, size) };
        (0..count).map(move |n| Ipv4Addr::from(first + skip_ends + n as u32))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(text: &str) -> Result<Ipv4Net, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: Ipv4Addr =
            address.parse().map_err(|_| format!("`{text}` is not an IPv4 address or range"))?;
        let prefix = match prefix {
            None => 32,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(prefix) if prefix <= 32 => prefix,
                _ => return Err(format!("`{text}` has a prefix length outside 0 to 32")),
            },
        };
        let net = Ipv4Net::new(address, prefix);
        if net.address != address {
            return Err(format!("`{text}` has host bits set; the range is `{net}`"));
        }
        Ok(net)
    }
}

/// One slot's place on its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddress {
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// What a pool's slots need to be on a checked network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetwork {
    pub name: String,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The configured `guest_blocked_ranges`.
    pub configured: Vec<Ipv4Net>,
    /// Each slot's address, by slot index.
    pub slots: Vec<SlotAddress>,
}

impl GuestNetwork {
    /// The ranges the filter drops besides its own: the configured ones and the host's own
    /// addresses as the kernel lists them now, so that a slot started or restored after the
    /// host gained an address is kept from it too.
    pub fn blocked(&self) -> Vec<Ipv4Net> {
        let mut blocked: BTreeSet<Ipv4Net> = self.configured.iter().copied().collect();
        blocked.extend(host_ranges(&host_addresses(), self.subnet));
        // The filter needs at least one value for its list; loopback is dropped anyway.
        if blocked.is_empty() {
            blocked.insert(Ipv4Net::new(Ipv4Addr::LOCALHOST, 32));
        }
        blocked.into_iter().collect()
    }

    /// The `<interface>` element of slot `index`, for the template's `{{interface}}`.
    pub fn interface_xml(&self, index: usize) -> String {
        format!(
            "<interface type='network'>\n      <source network='{network}'/>\n      \
             <mac address='{mac}'/>\n      <model type='virtio'/>\n      {filterref}\n    \
             </interface>",
            network = crate::template::xml_escape(&self.name),
            mac = self.slots[index].mac,
            filterref = self.filterref_xml(index),
        )
    }

    /// The `<filterref>` of slot `index`, with the parameters as they are now.
    pub fn filterref_xml(&self, index: usize) -> String {
        let mut parameters = vec![
            ("IP", self.slots[index].ip.to_string()),
            ("GATEWAY", self.gateway.to_string()),
            ("GUEST_NET", self.subnet.address.to_string()),
            ("GUEST_MASK", self.subnet.prefix.to_string()),
        ];
        for range in self.blocked() {
            parameters.push(("BLOCKED_NET", range.address.to_string()));
            parameters.push(("BLOCKED_MASK", range.prefix.to_string()));
        }
        let parameters: String = parameters
            .iter()
            .map(|(name, value)| format!("\n        <parameter name='{name}' value='{value}'/>"))
            .collect();
        format!("<filterref filter='{FILTER_NAME}'>{parameters}\n      </filterref>")
    }
}

/// `xml` with its filter reference replaced by `filterref`, or `None` when it has none. The
/// filter's parameters are the host's business, not the guest's, so libvirt restores a memory
/// image with other ones.
pub fn with_filterref(xml: &str, filterref: &str) -> Option<String> {
    let (start, end) = filterref_span(xml)?;
    Some(format!("{}{filterref}{}", &xml[..start], &xml[end..]))
}

/// `xml` without its filter reference: what a clean snapshot depends on.
pub fn without_filterref(xml: &str) -> String {
    with_filterref(xml, "").unwrap_or_else(|| xml.to_owned())
}

fn filterref_span(xml: &str) -> Option<(usize, usize)> {
    let start = xml.find("<filterref")?;
    let end = start + xml[start..].find("</filterref>")? + "</filterref>".len();
    Some((start, end))
}

/// Checks every network the pools use, reserves their slots' addresses, and returns, for each
/// pool with a network, its [`GuestNetwork`] or why it must not be served.
pub async fn prepare(
    hypervisor: &dyn Hypervisor,
    config: &Config,
) -> BTreeMap<String, Result<Arc<GuestNetwork>, Arc<NetworkError>>> {
    let mut by_network: BTreeMap<&str, Vec<&PoolConfig>> = BTreeMap::new();
    for pool in &config.pools {
        if let Some(network) = &pool.network {
            by_network.entry(network).or_default().push(pool);
        }
    }
    let mut prepared = BTreeMap::new();
    for (network, pools) in by_network {
        let configured = config.guest_blocked_ranges.as_slice();
        match prepare_network(hypervisor, network, &pools, configured).await {
            Ok(networks) => prepared.extend(networks.into_iter().map(|(k, v)| (k, Ok(v)))),
            Err(e) => {
                let e = Arc::new(e);
                prepared.extend(pools.iter().map(|pool| (pool.name.clone(), Err(e.clone()))));
            }
        }
    }
    prepared
}

async fn prepare_network(
    hypervisor: &dyn Hypervisor,
    network: &str,
    pools: &[&PoolConfig],
    configured: &[Ipv4Net],
) -> Result<BTreeMap<String, Arc<GuestNetwork>>, NetworkError> {
    check_filter(hypervisor).await?;
    let shape = network_shape(hypervisor, network).await?;
    let names: Vec<(String, usize)> = pools
        .iter()
        .flat_map(|pool| (0..pool.slots as usize).map(|index| (pool.name.clone(), index)))
        .collect();
    let addresses = allocate(&shape, &names)?;
    reserve(hypervisor, network, &shape, &addresses).await?;

    let mut networks = BTreeMap::new();
    for pool in pools {
        let slots = (0..pool.slots as usize)
            .map(|index| addresses[&(pool.name.clone(), index)].clone())
            .collect();
        let guest_network = GuestNetwork {
            name: network.to_owned(),
            gateway: shape.gateway,
            subnet: shape.subnet,
            configured: configured.to_vec(),
            slots,
        };
        networks.insert(pool.name.clone(), Arc::new(guest_network));
    }
    info!(network, pools = pools.len(), slots = names.len(), "Guest network checked");
    Ok(networks)
}

/// The host's addresses that no rule of the filter drops already, as /32 ranges.
fn host_ranges(host_addresses: &[Ipv4Addr], subnet: Ipv4Net) -> Vec<Ipv4Net> {
    let covered = |address: Ipv4Addr| {
        subnet.contains(address)
            || FILTER_DROPS
                .iter()
                .any(|(net, prefix)| Ipv4Net::new(*net, *prefix).contains(address))
    };
    let uncovered = host_addresses.iter().filter(|address| !covered(**address));
    uncovered.map(|address| Ipv4Net::new(*address, 32)).collect()
}

/// What the daemon needs to know of a libvirt network, checked for what isolation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetworkShape {
    network: String,
    gateway: Ipv4Addr,
    subnet: Ipv4Net,
    /// The DHCP server's reservations.
    hosts: Vec<DhcpHost>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DhcpHost {
    mac: String,
    ip: Option<Ipv4Addr>,
    name: Option<String>,
}

impl DhcpHost {
    fn xml(&self) -> String {
        let mut xml = format!("<host mac='{}'", self.mac);
        if let Some(ip) = self.ip {
            xml.push_str(&format!(" ip='{ip}'"));
        }
        if let Some(name) = &self.name {
            xml.push_str(&format!(" name='{}'", crate::template::xml_escape(name)));
        }
        xml.push_str("/>");
        xml
    }
}

async fn network_shape(
    hypervisor: &dyn Hypervisor,
    network: &str,
) -> Result<NetworkShape, NetworkError> {
    let info = hypervisor
        .network(network)
        .await?
        .ok_or_else(|| NetworkError::NoNetwork { network: network.to_owned() })?;
    if !info.active {
        return Err(NetworkError::Inactive { network: network.to_owned() });
    }
    parse_network(network, &info.xml)
}

fn parse_network(network: &str, xml: &str) -> Result<NetworkShape, NetworkError> {
    let unfit = |reason: &str| NetworkError::Unfit {
        network: network.to_owned(),
        reason: reason.to_owned(),
    };
    let document = roxmltree::Document::parse(xml).map_err(|e| NetworkError::Xml {
        what: format!("network `{network}`"),
        message: e.to_string(),
    })?;
    let root = document.root_element();
    let child = |name: &str| root.children().find(|node| node.has_tag_name(name));
    let mode = child("forward").map(|forward| forward.attribute("mode").unwrap_or("nat"));
    if mode != Some("nat") {
        return Err(unfit("it does not forward with NAT (<forward mode='nat'/>)"));
    }
    let isolated = child("port").and_then(|port| port.attribute("isolated"));
    if isolated != Some("yes") {
        return Err(unfit("its ports are not isolated (<port isolated='yes'/>)"));
    }
    let ipv4 = root
        .children()
        .filter(|node| node.has_tag_name("ip"))
        .find(|ip| matches!(ip.attribute("family"), None | Some("ipv4")))
        .ok_or_else(|| unfit("it has no IPv4 address"))?;
    let gateway: Ipv4Addr = ipv4
        .attribute("address")
        .and_then(|address| address.parse().ok())
        .ok_or_else(|| unfit("its IPv4 address is missing or malformed"))?;
    let prefix = match (ipv4.attribute("prefix"), ipv4.attribute("netmask")) {
        (Some(prefix), _) => prefix.parse::<u8>().ok().filter(|prefix| *prefix <= 30),
        (None, Some(netmask)) => netmask.parse::<Ipv4Addr>().ok().and_then(prefix_of_mask),
        (None, None) => None,
    }
    .ok_or_else(|| unfit("its IPv4 prefix is missing, malformed or longer than /30"))?;
    let dhcp = ipv4
        .children()
        .find(|node| node.has_tag_name("dhcp"))
        .ok_or_else(|| unfit("its IPv4 address has no DHCP server"))?;
    let hosts = dhcp
        .children()
        .filter(|node| node.has_tag_name("host"))
        .filter_map(|host| {
            Some(DhcpHost {
                mac: host.attribute("mac")?.to_ascii_lowercase(),
                ip: host.attribute("ip").and_then(|ip| ip.parse().ok()),
                name: host.attribute("name").map(str::to_owned),
            })
        })
        .collect();
    let subnet = Ipv4Net::new(gateway, prefix);
    Ok(NetworkShape { network: network.to_owned(), gateway, subnet, hosts })
}

fn prefix_of_mask(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0 && prefix <= 30).then_some(prefix as u8)
}

/// Gives every slot an address of the subnet other than the gateway's. A slot's first choice
/// comes from a hash of its pool and index, and a taken address sends it on to the next free
/// one, in the order of pool names and indices: so slots keep their addresses when pools are
/// added, removed or resized, unless they had to move aside for a slot that is new.
fn allocate(
    shape: &NetworkShape,
    slots: &[(String, usize)],
) -> Result<BTreeMap<(String, usize), SlotAddress>, NetworkError> {
    let hosts: Vec<Ipv4Addr> = shape.subnet.hosts().filter(|ip| *ip != shape.gateway).collect();
    if slots.len() > hosts.len() {
        return Err(NetworkError::Full {
            network: shape.network.clone(),
            room: hosts.len(),
            slots: slots.len(),
        });
    }
    let mut ordered = slots.to_vec();
    ordered.sort();
    let mut taken = vec![false; hosts.len()];
    let mut addresses = BTreeMap::new();
    for (pool, index) in ordered {
        let digest = Sha256::digest(format!("{pool}/{index}").as_bytes());
        let first = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        let mut position = (first % hosts.len() as u64) as usize;
        while taken[position] {
            position = (position + 1) % hosts.len();
        }
        taken[position] = true;
        let ip = hosts[position];
        addresses.insert((pool, index), SlotAddress { mac: mac_of(ip), ip });
    }
    Ok(addresses)
}

/// The MAC of the slot with address `ip`: QEMU's prefix and the address's last three bytes,
/// unique on the network's bridge for any subnet up to a /8.
fn mac_of(ip: Ipv4Addr) -> String {
    let [_, b, c, d] = ip.octets();
    let [x, y, z] = MAC_PREFIX;
    format!("{x:02x}:{y:02x}:{z:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Makes the network's DHCP server hand each slot its address: adds what is missing, removes
/// reservations that would hand a slot's MAC, address or name to anything else, and those of
/// slots its pools no longer have.
async fn reserve(
    hypervisor: &dyn Hypervisor,
    network: &str,
    shape: &NetworkShape,
    addresses: &BTreeMap<(String, usize), SlotAddress>,
) -> Result<(), NetworkError> {
    let wanted: Vec<DhcpHost> = addresses
        .iter()
        .map(|((pool, index), address)| DhcpHost {
            mac: address.mac.clone(),
            ip: Some(address.ip),
            name: Some(domain_name(pool, *index)),
        })
        .collect();
    let pools: BTreeSet<&str> = addresses.keys().map(|(pool, _)| pool.as_str()).collect();
    let pools: Vec<&str> = pools.into_iter().collect();
    let (stale, missing) = reservation_changes(&shape.hosts, &wanted, &pools);
    for host in stale {
        hypervisor.update_dhcp_host(network, DhcpHostChange::Delete(host.xml())).await?;
    }
    for host in &missing {
        hypervisor.update_dhcp_host(network, DhcpHostChange::Add(host.xml())).await?;
    }
    if !missing.is_empty() {
        info!(network, added = missing.len(), "Slot addresses reserved in DHCP");
    }
    Ok(())
}

/// The reservations to delete and the wanted ones to add. A reservation goes when it clashes
/// with a wanted one in MAC, address or name, or when it names a slot beyond the end of one of
/// `pools` (a pool that shrank). Reservations of other names are the operator's and stay.
fn reservation_changes<'a>(
    present: &'a [DhcpHost],
    wanted: &'a [DhcpHost],
    pools: &[&str],
) -> (Vec<&'a DhcpHost>, Vec<&'a DhcpHost>) {
    let clashes = |host: &DhcpHost, other: &DhcpHost| {
        host.mac == other.mac
            || (host.ip.is_some() && host.ip == other.ip)
            || (host.name.is_some() && host.name == other.name)
    };
    let slot_of_ours = |host: &DhcpHost| {
        let Some(name) = &host.name else { return false };
        pools.iter().any(|pool| {
            let index = name.strip_prefix(&format!("warmpool-{pool}-"));
            index.is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    let stale = present
        .iter()
        .filter(|host| !wanted.contains(host))
        .filter(|host| wanted.iter().any(|w| clashes(host, w)) || slot_of_ours(host))
        .collect();
    let missing = wanted.iter().filter(|host| !present.contains(host)).collect();
    (stale, missing)
}

/// Checks that libvirt's `warmpool-guest` filter has the rules of the built-in copy. libvirt
/// applies a changed filter to running guests at once, so slots check it again before every
/// start and restore.
pub async fn check_filter(hypervisor: &dyn Hypervisor) -> Result<(), NetworkError> {
    static EXPECTED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let expected =
        EXPECTED.get_or_init(|| filter_rules(FILTER_XML).expect("the built-in filter parses"));
    let xml = hypervisor.network_filter(FILTER_NAME).await?.ok_or(NetworkError::NoFilter)?;
    let present = filter_rules(&xml)?;
    match first_difference(expected, &present) {
        None => Ok(()),
        Some(difference) => Err(NetworkError::FilterDiffers { difference }),
    }
}

/// A filter reduced to what decides traffic: its chain and, in order, each rule's attributes
/// and its match element with sorted attributes. Comments, whitespace, attribute order and
/// the UUID that libvirt adds do not count.
fn filter_rules(xml: &str) -> Result<Vec<String>, NetworkError> {
    let document = roxmltree::Document::parse(xml).map_err(|e| NetworkError::Xml {
        what: format!("network filter `{FILTER_NAME}`"),
        message: e.to_string(),
    })?;
    let root = document.root_element();
    let mut rules = vec![format!("filter {}", canonical(root))];
    for node in root.children().filter(roxmltree::Node::is_element) {
        if node.has_tag_name("uuid") {
            continue;
        }
        let mut rule = canonical(node);
        for matcher in node.children().filter(roxmltree::Node::is_element) {
            rule.push_str(" | ");
            rule.push_str(&canonical(matcher));
        }
        rules.push(rule);
    }
    Ok(rules)
}

fn canonical(node: roxmltree::Node) -> String {
    let mut attributes: Vec<String> =
        node.attributes().map(|a| format!("{}='{}'", a.name(), a.value())).collect();
    attributes.sort();
    format!("<{} {}>", node.tag_name().name(), attributes.join(" "))
}

fn first_difference(expected: &[String], present: &[String]) -> Option<String> {
    let pairs = expected.iter().zip(present.iter()).enumerate();
    if let Some((n, (want, have))) = pairs.clone().find(|(_, (want, have))| want != have) {
        return Some(format!("element {n}: expected {want}, found {have}"));
    }
    match expected.len().cmp(&present.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(format!("missing {}", expected[present.len()])),
        std::cmp::Ordering::Less => Some(format!("extra {}", present[expected.len()])),
    }
}

/// The host's own IPv4 addresses, on every interface, as the kernel lists them now.
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocates, or fails and writes nothing.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return addresses;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed; its
        // `ifa_addr`, when not null, points to a sockaddr whose family says its real type.
        unsafe {
            let address = (*entry).ifa_addr;
            if !address.is_null() && i32::from((*address).sa_family) == libc::AF_INET {
                let address = &*(address as *const libc::sockaddr_in);
                addresses.push(Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)));
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    addresses.sort();
    addresses.dedup();
    addresses
}

#[cfg(test)]
mod tests;
