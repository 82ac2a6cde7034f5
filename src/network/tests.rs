//! Network tests: parsing, address allocation, the filter comparison, and the daemon's check
//! against the fake hypervisor.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::config::Config;
use crate::guest::Run;
use crate::hypervisor::fake::{FakeHypervisor, FAKE_TEMPLATE};
use crate::metrics::Metrics;
use crate::slot::{Job, JobEvent};

/// host-setup/setup's network with its placeholders filled as for the default subnet.
fn network_xml() -> String {
    include_str!("../../host-setup/network/warmpool-network.xml")
        .replace("@NAME@", "warmpool")
        .replace("@BRIDGE@", "wp-br0")
        .replace("@GATEWAY@", "10.233.0.1")
        .replace("@PREFIX@", "24")
        .replace("@DHCP_START@", "10.233.0.2")
        .replace("@DHCP_END@", "10.233.0.254")
}

fn slots(pool: &str, count: usize) -> Vec<(String, usize)> {
    (0..count).map(|index| (pool.to_owned(), index)).collect()
}

#[test]
fn ranges_parse_in_cidr_notation_and_refuse_host_bits() {
    let net: Ipv4Net = "10.1.0.0/16".parse().unwrap();
    assert!(net.contains("10.1.200.3".parse().unwrap()));
    assert!(!net.contains("10.2.0.1".parse().unwrap()));
    assert_eq!("192.0.2.7".parse::<Ipv4Net>().unwrap().prefix, 32);
    assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().mask(), 0);
    let errors = ["10.1.0.1/16", "10.1.0.0/33", "10.1.0.0/x", "fd00::/8", "banana"];
    for text in errors {
        assert!(text.parse::<Ipv4Net>().is_err(), "{text} parsed");
    }
    let message = "10.1.0.1/16".parse::<Ipv4Net>().unwrap_err();
    assert!(message.contains("10.1.0.0/16"), "{message}");
}

#[test]
fn host_setups_network_passes_the_check() {
    let shape = parse_network("warmpool", &network_xml()).unwrap();
    assert_eq!(shape.gateway, Ipv4Addr::new(10, 233, 0, 1));
    assert_eq!(shape.subnet, "10.233.0.0/24".parse().unwrap());
    assert!(shape.hosts.is_empty());
}

#[test]
fn networks_without_nat_isolation_an_address_or_dhcp_are_unfit() {
    let xml = network_xml();
    let cases = [
        (xml.replace("<forward mode='nat'/>", "<forward mode='route'/>"), "NAT"),
        (xml.replace("<forward mode='nat'/>", ""), "NAT"),
        (xml.replace("<port isolated='yes'/>", ""), "isolated"),
        (xml.replace("<port isolated='yes'/>", "<port isolated='no'/>"), "isolated"),
        (xml.replace("prefix='24'", "prefix='31'"), "prefix"),
        (xml.replace("address='10.233.0.1'", "address='10.233.0'"), "address"),
        (xml.replace("<dhcp>", "<nodhcp>").replace("</dhcp>", "</nodhcp>"), "DHCP"),
        ("<network><name>x</name>".to_owned(), "XML"),
    ];
    for (xml, what) in cases {
        let e = parse_network("warmpool", &xml).unwrap_err().to_string();
        assert!(e.contains(what), "expected an error about {what}, got: {e}");
    }
    let netmask = xml.replace("prefix='24'", "netmask='255.255.255.0'");
    assert_eq!(parse_network("warmpool", &netmask).unwrap().subnet.prefix, 24);
}

#[test]
fn every_slot_gets_its_own_address_and_mac_and_keeps_them_when_pools_change() {
    let shape = parse_network("warmpool", &network_xml()).unwrap();
    let mut names = slots("linux", 20);
    names.extend(slots("windows", 10));
    let addresses = allocate(&shape, &names).unwrap();
    let ips: BTreeSet<Ipv4Addr> = addresses.values().map(|a| a.ip).collect();
    let macs: BTreeSet<&str> = addresses.values().map(|a| a.mac.as_str()).collect();
    assert_eq!((ips.len(), macs.len()), (30, 30));
    assert!(!ips.contains(&shape.gateway));
    assert!(ips.iter().all(|ip| shape.subnet.contains(*ip) && ip.octets()[3] != 255));

    // A new pool moves at most the few slots whose place it takes.
    let mut more = names.clone();
    more.extend(slots("arm", 5));
    let after = allocate(&shape, &more).unwrap();
    let kept = names.iter().filter(|name| addresses[*name] == after[*name]).count();
    assert!(kept >= 25, "only {kept} of 30 slots kept their addresses");
    assert_eq!(allocate(&shape, &names).unwrap(), addresses, "allocation is deterministic");
}

#[test]
fn a_network_too_small_for_its_slots_is_an_error() {
    let xml = network_xml().replace("prefix='24'", "prefix='29'");
    let shape = parse_network("warmpool", &xml).unwrap();
    assert_eq!(allocate(&shape, &slots("p", 5)).unwrap().len(), 5);
    let e = allocate(&shape, &slots("p", 6)).unwrap_err();
    assert!(matches!(e, NetworkError::Full { room: 5, slots: 6, .. }), "{e}");
}

#[test]
fn macs_carry_qemus_prefix_and_the_addresss_last_three_bytes() {
    assert_eq!(mac_of(Ipv4Addr::new(10, 233, 1, 17)), "52:54:00:e9:01:11");
}

#[test]
fn reservations_add_what_is_missing_and_remove_only_what_clashes() {
    let host = |mac: &str, ip: [u8; 4], name: &str| DhcpHost {
        mac: mac.into(),
        ip: Some(Ipv4Addr::from(ip)),
        name: Some(name.into()),
    };
    let wanted = vec![
        host("52:54:00:e9:00:05", [10, 233, 0, 5], "warmpool-a-0"),
        host("52:54:00:e9:00:06", [10, 233, 0, 6], "warmpool-a-1"),
    ];
    let present = vec![
        wanted[0].clone(),
        // An older address of slot 1 under its name, a slot pool `a` no longer has, another
        // daemon's pool, and the operator's own reservation.
        host("52:54:00:e9:00:09", [10, 233, 0, 9], "warmpool-a-1"),
        host("52:54:00:e9:00:0a", [10, 233, 0, 10], "warmpool-a-7"),
        host("52:54:00:e9:00:0b", [10, 233, 0, 11], "warmpool-other-0"),
        host("52:54:00:aa:bb:cc", [10, 233, 0, 100], "printer"),
    ];
    let (stale, missing) = reservation_changes(&present, &wanted, &["a"]);
    assert_eq!(stale, vec![&present[1], &present[2]]);
    assert_eq!(missing, vec![&wanted[1]]);
    assert_eq!(
        wanted[1].xml(),
        "<host mac='52:54:00:e9:00:06' ip='10.233.0.6' name='warmpool-a-1'/>"
    );
}

#[test]
fn the_filter_compares_equal_whatever_libvirt_does_to_its_layout() {
    let expected = filter_rules(FILTER_XML).unwrap();
    let relaid = FILTER_XML
        .replace("<filter name='warmpool-guest' chain='root'>", "<filter chain=\"root\" name=\"warmpool-guest\"><uuid>4c8d2e9e-574e-4008-b3b6-1e59205242b8</uuid>")
        .replace("\n    ", " ");
    assert_eq!(first_difference(&expected, &filter_rules(&relaid).unwrap()), None);
}

#[test]
fn the_filter_comparison_names_a_missing_or_changed_rule() {
    let expected = filter_rules(FILTER_XML).unwrap();
    let changed = FILTER_XML.replace("priority='-380'", "priority='380'");
    let difference = first_difference(&expected, &filter_rules(&changed).unwrap()).unwrap();
    assert!(difference.contains("priority='-380'"), "{difference}");

    let start = FILTER_XML.find("  <rule action='drop' direction='out' priority='-390'>").unwrap();
    let end = start + FILTER_XML[start..].find("</rule>").unwrap() + "</rule>".len();
    let missing = format!("{}{}", &FILTER_XML[..start], &FILTER_XML[end..]);
    let difference = first_difference(&expected, &filter_rules(&missing).unwrap()).unwrap();
    assert!(difference.contains("169.254.0.0"), "{difference}");
}

#[test]
fn the_ranges_the_filter_drops_itself_match_its_rules() {
    let document = roxmltree::Document::parse(FILTER_XML).unwrap();
    let fixed: BTreeSet<(Ipv4Addr, u8)> = document
        .descendants()
        .filter(|node| node.has_tag_name("ip"))
        .filter(|ip| ip.parent().and_then(|rule| rule.attribute("action")) == Some("drop"))
        .filter_map(|ip| {
            let address = ip.attribute("dstipaddr")?.parse().ok()?;
            Some((address, ip.attribute("dstipmask")?.parse().ok()?))
        })
        .collect();
    assert_eq!(fixed, FILTER_DROPS.into_iter().collect());
}

#[test]
fn host_addresses_outside_the_filters_own_ranges_are_blocked_one_by_one() {
    let subnet: Ipv4Net = "10.233.0.0/24".parse().unwrap();
    let addresses = ["127.0.0.1", "10.233.0.1", "169.254.169.254", "10.0.0.4", "203.0.113.9"];
    let addresses: Vec<Ipv4Addr> = addresses.iter().map(|a| a.parse().unwrap()).collect();
    let ranges = host_ranges(&addresses, subnet);
    assert_eq!(ranges, vec!["10.0.0.4/32".parse().unwrap(), "203.0.113.9/32".parse().unwrap()]);
    assert!(host_addresses().contains(&Ipv4Addr::LOCALHOST), "loopback is always there");
}

#[test]
fn the_interface_references_the_filter_with_every_parameter() {
    let network = GuestNetwork {
        name: "warmpool".into(),
        gateway: Ipv4Addr::new(10, 233, 0, 1),
        subnet: "10.233.0.0/24".parse().unwrap(),
        configured: vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.4/32".parse().unwrap()],
        slots: vec![SlotAddress {
            mac: "52:54:00:e9:00:07".into(),
            ip: Ipv4Addr::new(10, 233, 0, 7),
        }],
    };
    let xml = network.interface_xml(0);
    let document = roxmltree::Document::parse(&xml).unwrap();
    let parameter = |name: &str| -> Vec<String> {
        document
            .descendants()
            .filter(|node| node.attribute("name") == Some(name))
            .filter_map(|node| node.attribute("value").map(str::to_owned))
            .collect()
    };
    assert!(xml.contains("<source network='warmpool'/>"), "{xml}");
    assert!(xml.contains("<mac address='52:54:00:e9:00:07'/>"), "{xml}");
    assert!(xml.contains("<filterref filter='warmpool-guest'>"), "{xml}");
    assert_eq!(parameter("IP"), ["10.233.0.7"]);
    assert_eq!(parameter("GATEWAY"), ["10.233.0.1"]);
    assert_eq!(parameter("GUEST_NET"), ["10.233.0.0"]);
    assert_eq!(parameter("GUEST_MASK"), ["24"]);

    // The configured ranges and, one by one, the host's own addresses the filter's own rules
    // leave open, as the kernel lists them now.
    let blocked: Vec<(String, String)> =
        parameter("BLOCKED_NET").into_iter().zip(parameter("BLOCKED_MASK")).collect();
    let expected: Vec<(String, String)> = network
        .blocked()
        .iter()
        .map(|range| (range.address.to_string(), range.prefix.to_string()))
        .collect();
    assert_eq!(blocked, expected);
    assert!(blocked.contains(&("10.0.0.0".into(), "8".into())));
    assert!(blocked.contains(&("192.0.2.4".into(), "32".into())));
    for host in host_ranges(&host_addresses(), network.subnet) {
        assert!(blocked.contains(&(host.address.to_string(), "32".into())), "{host}");
    }
}

#[test]
fn a_restore_gets_the_filter_reference_of_its_moment_and_snapshots_do_not_depend_on_it() {
    let xml = "<domain><devices><interface><mac address='m'/><filterref filter='f'>\
        <parameter name='IP' value='1'/></filterref></interface></devices></domain>";
    let refreshed = with_filterref(xml, "<filterref filter='f'/>").unwrap();
    assert_eq!(
        refreshed,
        "<domain><devices><interface><mac address='m'/><filterref filter='f'/></interface>\
         </devices></domain>"
    );
    assert_eq!(
        without_filterref(xml),
        without_filterref(&refreshed.replace("'f'/>", "'f'></filterref>"))
    );
    assert_eq!(with_filterref("<domain/>", "x"), None);
    assert_eq!(without_filterref("<domain/>"), "<domain/>");
}

/// A configuration of two pools on `warmpool` and one without a network, with fake guests.
fn config(dir: &Path) -> Config {
    let template = dir.join("template.xml");
    let text = FAKE_TEMPLATE.replace("</domain>", "{{interface}}</domain>");
    std::fs::write(&template, text).unwrap();
    let image = dir.join("image.qcow2");
    crate::disk::test_image(&image);
    let pool = |name: &str, network: &str| {
        format!(
            "[[pool]]\nname = \"{name}\"\nimage = \"{image}\"\narch = \"x86_64\"\nvcpus = 1\n\
             memory_mib = 128\nslots = 2\nacceleration = \"tcg\"\ntemplate = \"{template}\"\n\
             boot_timeout_secs = 5\nnetwork = \"{network}\"\n",
            image = image.display(),
            template = template.display(),
        )
    };
    let text = format!(
        "state_dir = \"{dir}\"\nguest_blocked_ranges = [\"10.0.0.0/8\"]\n{}{}{}",
        pool("a", "warmpool"),
        pool("b", "warmpool"),
        pool("c", "none"),
        dir = dir.join("state").display(),
    );
    Config::parse(&text, Path::new("test")).unwrap()
}

async fn start_daemon(fake: &FakeHypervisor, config: &Config) -> crate::control::Control {
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(fake.clone());
    crate::daemon::start(config, hypervisor, Arc::new(Metrics::default())).await.unwrap()
}

fn define_good(fake: &FakeHypervisor) {
    fake.define_network("warmpool", &network_xml(), true);
    fake.define_filter(FILTER_NAME, FILTER_XML);
}

#[tokio::test]
async fn a_checked_network_reserves_every_slot_once_and_gives_pools_distinct_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let fake = FakeHypervisor::new();
    define_good(&fake);

    let prepared = prepare(&fake, &config).await;
    assert_eq!(prepared.keys().collect::<Vec<_>>(), ["a", "b"], "pool c has no network");
    let (a, b) = (prepared["a"].as_ref().unwrap(), prepared["b"].as_ref().unwrap());
    let ips: BTreeSet<Ipv4Addr> = a.slots.iter().chain(&b.slots).map(|slot| slot.ip).collect();
    assert_eq!(ips.len(), 4);
    assert!(a.blocked().contains(&"10.0.0.0/8".parse().unwrap()));
    let adds = || fake.calls().iter().filter(|c| c.starts_with("update_dhcp_host")).count();
    assert_eq!(adds(), 4);
    let xml = fake.network("warmpool").await.unwrap().unwrap().xml;
    assert!(xml.contains(&format!("ip='{}' name='warmpool-a-0'", a.slots[0].ip)), "{xml}");

    // A second start finds the reservations in place and changes nothing.
    let again = prepare(&fake, &config).await;
    assert_eq!(again["a"].as_ref().unwrap(), a);
    assert_eq!(adds(), 4);
}

#[tokio::test]
async fn a_missing_stopped_or_unfit_network_or_filter_refuses_its_pools_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let weakened = FILTER_XML.replace("priority='-380'", "priority='-381'");
    type SetUp = Box<dyn Fn(&FakeHypervisor)>;
    let cases: Vec<(&str, SetUp)> = vec![
        ("has no network filter", Box::new(|_| {})),
        ("has no network `warmpool`", Box::new(|fake| fake.define_filter(FILTER_NAME, FILTER_XML))),
        (
            "is not running",
            Box::new(|fake| {
                define_good(fake);
                fake.define_network("warmpool", &network_xml(), false);
            }),
        ),
        (
            "not isolated",
            Box::new(|fake| {
                define_good(fake);
                let shared = network_xml().replace("<port isolated='yes'/>", "");
                fake.define_network("warmpool", &shared, true);
            }),
        ),
        (
            "differs from the one warmpool ships",
            Box::new(move |fake| {
                define_good(fake);
                fake.define_filter(FILTER_NAME, &weakened);
            }),
        ),
    ];
    for (reason, set_up) in cases {
        let fake = FakeHypervisor::new();
        set_up(&fake);
        let prepared = prepare(&fake, &config).await;
        for pool in ["a", "b"] {
            let e = prepared[pool].as_ref().unwrap_err().to_string();
            assert!(e.contains(reason), "expected `{reason}`, got: {e}");
        }
    }
}

#[tokio::test]
async fn the_daemon_serves_pools_on_a_good_network_and_refuses_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let fake = FakeHypervisor::new();
    fake.define_network("warmpool", &network_xml(), true);
    let control = start_daemon(&fake, &config).await;

    let statuses = control.status().await;
    for status in &statuses[..2] {
        let refused = status.refused.as_deref().unwrap_or_default();
        assert!(refused.contains("no network filter"), "{status:?}");
        assert!(status.slots.is_empty());
    }
    assert_eq!(statuses[2].refused, None);
    let pool = &control.pools()[0];
    let (events, mut events_rx) = mpsc::channel(8);
    pool.submit(Job::new("j1".into(), Run::script("exit 0"), events));
    let event = tokio::time::timeout(Duration::from_secs(5), events_rx.recv()).await.unwrap();
    let Some(JobEvent::Failed { reason }) = event else { panic!("{event:?}") };
    assert!(reason.contains("pool `a` is not served") && reason.contains(FILTER_NAME), "{reason}");
    assert!(fake.domains().iter().all(|domain| domain.starts_with("warmpool-c-")));
    crate::daemon::shutdown(&control).await;
}

#[tokio::test]
async fn a_filter_changed_while_the_daemon_runs_keeps_every_guest_from_starting_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let fake = FakeHypervisor::new();
    define_good(&fake);
    let control = start_daemon(&fake, &config).await;
    let pool = &control.pools()[0];
    tokio::time::timeout(Duration::from_secs(10), pool.built()).await.unwrap();

    fake.define_filter(FILTER_NAME, &FILTER_XML.replace("priority='-380'", "priority='-381'"));
    let run = |id: &str| {
        let (events, mut events_rx) = mpsc::channel(8);
        pool.submit(Job::new(id.into(), Run::script("exit 0"), events));
        async move {
            let mut last = None;
            while let Some(event) = events_rx.recv().await {
                last = Some(event);
            }
            last.unwrap()
        }
    };
    // The two ready slots run a job each, then cannot be restored behind the changed filter.
    assert_eq!(run("j1").await, JobEvent::Finished { exit_code: 0 });
    assert_eq!(run("j2").await, JobEvent::Finished { exit_code: 0 });
    let last = tokio::time::timeout(Duration::from_secs(10), run("j3")).await.unwrap();
    let JobEvent::Failed { reason } = last else { panic!("{last:?}") };
    assert!(reason.contains("quarantined") && reason.contains("differs"), "{reason}");
    crate::daemon::shutdown(&control).await;
}
