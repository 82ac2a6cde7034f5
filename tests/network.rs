//! Guest network isolation, shown inside two network namespaces that the test creates and
//! removes, so that no packet of the test leaves them:
//!
//! - `host` (scripts/netns-libvirt): its own libvirtd with the `warmpool` network and filter
//!   that host-setup/setup defines; the daemon, with its HTTP API on every address; an SSH
//!   stand-in on port 22 of every address; `wp-meta` holding 169.254.169.254 and 168.63.129.16
//!   with a listener on port 80 each; and the uplink `wp-up` (198.51.100.1), its default route.
//! - `inet`, the stand-in internet behind the uplink: 203.0.113.10 with a listener on port 80.
//!
//! Two reference guests with a network run jobs: one listens, the other probes everything it
//! must not reach and the internet it must, including an address the host gained after the
//! daemon started. Each blocked address is shown to answer from the
//! host's side of the bridge, so that a probe is blocked by the filter and not by a missing
//! listener. Then the daemon is restarted with a filter that differs from warmpool's, and must
//! refuse the pool; host-setup/setup puts the filter right again.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::control::{Client, Request, Response};

const API_PORT: u16 = 9464;
const SSH_PORT: u16 = 22;
const GUEST_PORT: u16 = 7000;
const INTERNET: &str = "203.0.113.10";
const UPLINK_HOST: &str = "198.51.100.1";
const UPLINK_INET: &str = "198.51.100.2";
/// An address the host gains after the daemon started.
const LATE_ADDRESS: &str = "198.51.100.77";
const GATEWAY: &str = "10.233.0.1";
const BRIDGE: &str = "wp-br0";
const IMDS: &str = "169.254.169.254";
const WIRESERVER: &str = "168.63.129.16";
/// What every listener of the test sends first, so that an answer is told from silence.
const BANNER: &[u8] = b"probe-answer\n";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e}");
    });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The two namespaces, their libvirtd and everything in them; all removed on drop.
struct Namespaces {
    host: String,
    inet: String,
    dir: PathBuf,
}

impl Namespaces {
    fn create() -> Namespaces {
        let id = std::process::id() % 100_000;
        let namespaces = Namespaces {
            host: format!("wpn-{id}"),
            inet: format!("wpi-{id}"),
            dir: PathBuf::from(format!("/var/lib/warmpool-tests/netns-{id}")),
        };
        namespaces.remove();
        let script = repo().join("scripts/netns-libvirt");
        let dir = namespaces.dir.to_str().unwrap();
        run(script.to_str().unwrap(), &["start", &namespaces.host, dir]);
        namespaces.build_links();
        namespaces
    }

    fn build_links(&self) {
        let (host, inet) = (self.host.as_str(), self.inet.as_str());
        run("ip", &["netns", "add", inet]);
        run("ip", &["-n", inet, "link", "set", "lo", "up"]);
        run("ip", &["-n", host, "link", "add", "wp-up", "type", "veth", "peer", "wp-down"]);
        run("ip", &["-n", host, "link", "set", "wp-down", "netns", inet]);
        run("ip", &["-n", host, "addr", "add", &format!("{UPLINK_HOST}/24"), "dev", "wp-up"]);
        run("ip", &["-n", inet, "addr", "add", &format!("{UPLINK_INET}/24"), "dev", "wp-down"]);
        run("ip", &["-n", inet, "addr", "add", &format!("{INTERNET}/32"), "dev", "lo"]);
        for (ns, link) in [(host, "wp-up"), (inet, "wp-down")] {
            run("ip", &["-n", ns, "link", "set", link, "up"]);
        }
        run("ip", &["-n", host, "route", "add", "default", "via", UPLINK_INET]);

        // A dummy interface where the kernel has the driver; else one end of a veth pair,
        // whose other end stays in the namespace too, holds the addresses just as well.
        let dummy = Command::new("ip")
            .args(["-n", host, "link", "add", "wp-meta", "type", "dummy"])
            .output()
            .unwrap();
        if !dummy.status.success() {
            run(
                "ip",
                &["-n", host, "link", "add", "wp-meta", "type", "veth", "peer", "wp-meta-end"],
            );
            run("ip", &["-n", host, "link", "set", "wp-meta-end", "up"]);
        }
        for address in [IMDS, WIRESERVER] {
            run("ip", &["-n", host, "addr", "add", &format!("{address}/32"), "dev", "wp-meta"]);
        }
        run("ip", &["-n", host, "link", "set", "wp-meta", "up"]);
    }

    /// The command prefix that runs a program in the host namespace, beside its libvirtd.
    fn exec(&self) -> Vec<String> {
        let script = repo().join("scripts/netns-libvirt").display().to_string();
        vec![script, "exec".into(), self.host.clone(), self.dir.display().to_string(), "--".into()]
    }

    fn run_in_host(&self, args: &[&str]) -> Output {
        let exec = self.exec();
        let mut all: Vec<&str> = exec.iter().map(String::as_str).skip(1).collect();
        all.extend_from_slice(args);
        run(&exec[0], &all)
    }

    fn host_setup_network(&self) -> String {
        let setup = repo().join("host-setup/setup").display().to_string();
        let output = self.run_in_host(&[&setup, "--only", "network"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn remove(&self) {
        let script = repo().join("scripts/netns-libvirt");
        let _ = Command::new(script).args(["stop", &self.host]).arg(&self.dir).status();
        if Path::new("/run/netns").join(&self.inet).exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.inet]).status();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `f` on a thread that has entered the network namespace `netns`: sockets it opens
/// belong to that namespace for good, whichever thread uses them later.
fn in_namespace<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Path::new("/run/netns").join(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns(2) with a namespace file this thread holds open; it moves only the
        // calling thread, which ends with `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {}", path.display(), std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A listener in `netns` that sends [`BANNER`] to everyone who connects.
fn listen(netns: &str, address: SocketAddr) {
    let listener = in_namespace(netns, move || TcpListener::bind(address))
        .unwrap_or_else(|e| panic!("listen on {address} in {netns}: {e}"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(BANNER);
        }
    });
}

/// Whether `address` accepts a connection from inside `netns`.
fn answers_from(netns: &str, address: SocketAddr) -> bool {
    in_namespace(netns, move || {
        TcpStream::connect_timeout(&address, Duration::from_secs(3)).is_ok()
    })
}

/// The index of `interface` inside `netns`, for IPv6 link-local scopes.
fn interface_index(netns: &str, interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated name that outlives the call.
    in_namespace(netns, move || unsafe { libc::if_nametoindex(name.as_ptr()) })
}

/// The host's IPv6 link-local address on the bridge, which the kernel gives it once a guest's
/// port is up.
fn bridge_link_local(namespaces: &Namespaces) -> String {
    for _ in 0..100 {
        let output = namespaces
            .run_in_host(&["ip", "-6", "-o", "addr", "show", "dev", BRIDGE, "scope", "link"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let address = text.split_whitespace().skip_while(|word| *word != "inet6").nth(1);
        if let Some(address) = address.and_then(|a| a.split('/').next()) {
            if !text.contains("tentative") {
                return address.to_owned();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the bridge has no IPv6 link-local address");
}

fn tools_present() -> bool {
    let missing: Vec<&str> = ["ip", "nsenter", "unshare", "tini", "ebtables", "dnsmasq"]
        .into_iter()
        .filter(|tool| {
            !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|dir| dir.join(tool).exists())
        })
        .collect();
    match missing.as_slice() {
        [] => true,
        _ if std::env::var_os("CI").is_some() => panic!("missing tools: {missing:?}"),
        _ => {
            eprintln!("skipped: missing tools {missing:?} (run host-setup/setup)");
            false
        }
    }
}

/// The listening guest's job: prints its address, shows its listener answers locally, waits.
const LISTENER_JOB: &str = r#"
nc -ll -p 7000 -e echo probe-answer &
sleep 1
echo "self $(nc -w 2 127.0.0.1 7000 </dev/null)"
echo "address $(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)"
echo "mac $(cat /sys/class/net/eth0/address)"
sleep 45
"#;

/// The probing guest's job. Each probe prints `probe NAME answered` or `probe NAME blocked`.
/// The spoofing probes come last and put the guest's own addresses back after them.
const PROBE_JOB: &str = r#"
probe() { # name address port
    out=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$2" "$3" 2>/dev/null)
    if [ -n "$out" ]; then echo "probe $1 answered"; else echo "probe $1 blocked"; fi
}
IP=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
MAC=$(cat /sys/class/net/eth0/address)
echo "own $IP $MAC"
probe internet @INTERNET@ 80
# The network's DNS server knows the slots by their domain names.
if for name in @NAMES@; do nslookup "$name" @GATEWAY@ 2>/dev/null; done |
    grep -q "Address: @OTHER@\$"; then
    echo "probe dns answered"
else
    echo "probe dns blocked"
fi
probe imds @IMDS@ 80
probe wireserver @WIRESERVER@ 80
probe gateway-api @GATEWAY@ @API_PORT@
probe gateway-ssh @GATEWAY@ @SSH_PORT@
probe uplink-ssh @UPLINK_HOST@ @SSH_PORT@
probe late-address-ssh @LATE_ADDRESS@ @SSH_PORT@
probe other-guest @OTHER@ @GUEST_PORT@
probe gateway-ssh-ipv6 "@LINK_LOCAL@%eth0" @SSH_PORT@

# ARP that claims the other guest's address, to the gateway.
ip addr add @OTHER@/32 dev eth0
if arping -c 2 -w 3 -I eth0 -s @OTHER@ @GATEWAY@ 2>/dev/null | grep -q "Received [1-9]"; then
    echo "probe spoofed-arp answered"
else
    echo "probe spoofed-arp blocked"
fi
ip addr del @OTHER@/32 dev eth0

# Another source address, of the guest network but neither guest's.
for SPOOFED in 10.233.0.250 10.233.0.251 10.233.0.252; do
    [ "$SPOOFED/24" != "$IP" ] && [ "$SPOOFED" != @OTHER@ ] && break
done
ip addr del "$IP" dev eth0
ip addr add "$SPOOFED/24" dev eth0
ip route replace default via @GATEWAY@
probe spoofed-ip @INTERNET@ 80
ip addr del "$SPOOFED/24" dev eth0
ip addr add "$IP" dev eth0
ip route replace default via @GATEWAY@

# Another source MAC.
ip link set eth0 down
ip link set eth0 address 52:54:00:de:ad:01
ip link set eth0 up
ip route replace default via @GATEWAY@
probe spoofed-mac @INTERNET@ 80
ip link set eth0 down
ip link set eth0 address "$MAC"
ip link set eth0 up
ip route replace default via @GATEWAY@
probe internet-again @INTERNET@ 80
"#;

/// The probes and whether each must answer.
const EXPECTED: &[(&str, bool)] = &[
    ("internet", true),
    ("dns", true),
    ("imds", false),
    ("wireserver", false),
    ("gateway-api", false),
    ("gateway-ssh", false),
    ("uplink-ssh", false),
    ("late-address-ssh", false),
    ("other-guest", false),
    ("gateway-ssh-ipv6", false),
    ("spoofed-arp", false),
    ("spoofed-ip", false),
    ("spoofed-mac", false),
    ("internet-again", true),
];

fn exec_job(socket: &Path, script: &str) -> std::process::Child {
    Command::new(BIN)
        .args(["exec", "--socket"])
        .arg(socket)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads the listener job's output until it has told its address and MAC.
fn listener_facts(job: &mut std::process::Child) -> (String, String) {
    let mut lines = BufReader::new(job.stdout.take().unwrap()).lines();
    let (mut address, mut mac, mut self_check) = (None, None, None);
    while address.is_none() || mac.is_none() || self_check.is_none() {
        let line = lines.next().expect("the listener job ended early").unwrap();
        if let Some(rest) = line.strip_prefix("address ") {
            address = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("mac ") {
            mac = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("self ") {
            self_check = Some(rest.trim().to_owned());
        }
    }
    assert_eq!(self_check.as_deref(), Some("probe-answer"), "the listener does not listen");
    (address.unwrap(), mac.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn guests_reach_the_internet_and_nothing_else() {
    if !support::environment_ready(Arch::host()).await || !tools_present() {
        return;
    }
    let namespaces = Namespaces::create();
    let setup = namespaces.host_setup_network();
    assert!(setup.contains("done     network"), "host-setup did not define the network: {setup}");
    // libvirt turns IPv6 off on a bridge whose network has none; turned on, the host has a
    // link-local address there for the guests' IPv6 probes to aim at.
    let sysctl = format!("net.ipv6.conf.{BRIDGE}.disable_ipv6=0");
    namespaces.run_in_host(&["sysctl", "-qw", &sysctl]);

    let any: SocketAddr = format!("[::]:{SSH_PORT}").parse().unwrap();
    listen(&namespaces.host, any);
    for address in [IMDS, WIRESERVER] {
        listen(&namespaces.host, format!("{address}:80").parse().unwrap());
    }
    listen(&namespaces.inet, format!("{INTERNET}:80").parse().unwrap());

    let pool = TestPool::new("network", Arch::host(), 2, "network = \"warmpool\"");
    let _ = std::fs::remove_dir_all(&pool.state_dir);
    std::fs::create_dir_all(&pool.state_dir).unwrap();
    let config = pool.state_dir.join("warmpool.toml");
    let top = format!("api_listen = \"0.0.0.0:{API_PORT}\"\ndrain_grace_secs = 5\n");
    std::fs::write(&config, top + &pool.text).unwrap();
    let log = pool.state_dir.join("daemon.log");
    let socket = pool.config.control_socket.clone();
    let exec = namespaces.exec();
    let wrapper: Vec<&str> = exec.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_through(&wrapper, &config, &log, &[]);
    daemon.wait_ready(&socket).await;

    // The host gains an address; the slots' next restores keep the guests from it.
    namespaces.run_in_host(&["ip", "addr", "add", &format!("{LATE_ADDRESS}/32"), "dev", "wp-up"]);
    let quick: Vec<_> = (0..2).map(|_| exec_job(&socket, "true")).collect();
    for job in quick {
        assert!(job.wait_with_output().unwrap().status.success());
    }
    daemon.wait_ready(&socket).await;

    let link_local = bridge_link_local(&namespaces);
    let bridge_index = interface_index(&namespaces.host, BRIDGE);
    let link_local_ssh = SocketAddr::V6(std::net::SocketAddrV6::new(
        link_local.parse().unwrap(),
        SSH_PORT,
        0,
        bridge_index,
    ));

    let mut listener = exec_job(&socket, LISTENER_JOB);
    let (other, other_mac) = listener_facts(&mut listener);
    // Everything the guest must not reach answers on the host's side of the bridge.
    let controls: Vec<(&str, SocketAddr)> = vec![
        ("imds", format!("{IMDS}:80").parse().unwrap()),
        ("wireserver", format!("{WIRESERVER}:80").parse().unwrap()),
        ("gateway-api", format!("{GATEWAY}:{API_PORT}").parse().unwrap()),
        ("gateway-ssh", format!("{GATEWAY}:{SSH_PORT}").parse().unwrap()),
        ("uplink-ssh", format!("{UPLINK_HOST}:{SSH_PORT}").parse().unwrap()),
        ("late-address-ssh", format!("{LATE_ADDRESS}:{SSH_PORT}").parse().unwrap()),
        ("gateway-ssh-ipv6", link_local_ssh),
        ("internet", format!("{INTERNET}:80").parse().unwrap()),
    ];
    for (name, address) in &controls {
        assert!(answers_from(&namespaces.host, *address), "{name} ({address}) does not answer");
    }

    let script = PROBE_JOB
        .replace("@INTERNET@", INTERNET)
        .replace("@GATEWAY@", GATEWAY)
        .replace("@IMDS@", IMDS)
        .replace("@WIRESERVER@", WIRESERVER)
        .replace("@API_PORT@", &API_PORT.to_string())
        .replace("@SSH_PORT@", &SSH_PORT.to_string())
        .replace("@UPLINK_HOST@", UPLINK_HOST)
        .replace("@LATE_ADDRESS@", LATE_ADDRESS)
        .replace("@OTHER@", &other)
        .replace("@NAMES@", &format!("{} {}", pool.domain(0), pool.domain(1)))
        .replace("@GUEST_PORT@", &GUEST_PORT.to_string())
        .replace("@LINK_LOCAL@", &link_local);
    let prober = exec_job(&socket, &script).wait_with_output().unwrap();
    let output = String::from_utf8_lossy(&prober.stdout).into_owned();
    assert!(
        prober.status.success(),
        "the probe job failed: {output}{}",
        String::from_utf8_lossy(&prober.stderr)
    );
    let own_mac = output
        .lines()
        .find_map(|line| line.strip_prefix("own "))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .expect("the probing guest's MAC")
        .to_owned();

    let results: Vec<(String, bool)> = output
        .lines()
        .filter_map(|line| line.strip_prefix("probe "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, result)| (name.to_owned(), result == "answered"))
        .collect();
    let names: Vec<&str> = results.iter().map(|(name, _)| name.as_str()).collect();
    let expected: Vec<&str> = EXPECTED.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, expected, "the probes that ran:\n{output}");
    for ((name, answered), (_, must_answer)) in results.iter().zip(EXPECTED) {
        assert_eq!(answered, must_answer, "probe {name}: answered={answered}\n{output}");
    }

    // The spoofed ARP did not teach the host that the other guest's address is this guest's.
    let neighbours = namespaces.run_in_host(&["ip", "neigh", "show", &other, "dev", BRIDGE]);
    let neighbours = String::from_utf8_lossy(&neighbours.stdout).into_owned();
    assert!(!neighbours.contains(&own_mac), "ARP spoofing reached the host: {neighbours}");
    assert_ne!(own_mac, other_mac);

    let blocked = results.iter().filter(|(_, answered)| !answered).count();
    println!(
        "network isolation: {} probes tried from a guest, {blocked} blocked, {} answered \
         (internet and DNS), each as expected",
        results.len(),
        results.len() - blocked
    );

    let _ = listener.kill();
    let _ = listener.wait();
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(120)).success(), "{}", daemon.log());

    refuses_a_pool_whose_filter_differs(&namespaces, &pool, &wrapper, &config, &log).await;
}

/// The daemon refuses a pool whose filter lacks a rule; host-setup puts the rule back.
async fn refuses_a_pool_whose_filter_differs(
    namespaces: &Namespaces,
    pool: &TestPool,
    wrapper: &[&str],
    config: &Path,
    log: &Path,
) {
    let current = namespaces.run_in_host(&["virsh", "-q", "nwfilter-dumpxml", "warmpool-guest"]);
    let current = String::from_utf8_lossy(&current.stdout).into_owned();
    let weakened = remove_rule(&current, "169.254.0.0");
    let file = pool.state_dir.join("weakened-filter.xml");
    std::fs::write(&file, weakened).unwrap();
    namespaces.run_in_host(&["virsh", "-q", "nwfilter-define", file.to_str().unwrap()]);

    let socket = &pool.config.control_socket;
    let mut daemon = Daemon::start_through(wrapper, config, log, &[]);
    let refused = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            panic!("the daemon exited with {status}:\n{}", daemon.log());
        }
        if let Ok(Response::Status { pools }) = Client::call(socket, &Request::Status).await {
            break pools[0].refused.clone().expect("the pool is refused");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused.contains("differs from the one warmpool ships"), "{refused}");
    assert!(refused.contains("169.254.0.0"), "{refused}");
    let status = Command::new(BIN).args(["status", "--socket"]).arg(socket).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("  not served: Network filter `warmpool-guest` differs"), "{status}");
    let domains = namespaces.run_in_host(&["virsh", "-q", "list", "--all", "--name"]);
    assert!(String::from_utf8_lossy(&domains.stdout).trim().is_empty(), "a refused pool ran");

    let job =
        Command::new(BIN).args(["exec", "--socket"]).arg(socket).args(["--", "true"]).output();
    let job = job.unwrap();
    assert_eq!(job.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&job.stderr).into_owned();
    assert!(stderr.contains("not served") && stderr.contains("warmpool-guest"), "{stderr}");
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(60)).success(), "{}", daemon.log());

    let repaired = namespaces.host_setup_network();
    assert!(repaired.contains("done     network") && repaired.contains("filter"), "{repaired}");
    let again = namespaces.host_setup_network();
    assert!(again.starts_with("ok       network"), "host-setup is not idempotent: {again}");
}

/// The filter XML without the rule that mentions `address`.
fn remove_rule(filter: &str, address: &str) -> String {
    let at = filter.find(address).expect("the rule");
    let start = filter[..at].rfind("<rule").unwrap();
    let end = at + filter[at..].find("</rule>").unwrap() + "</rule>".len();
    format!("{}{}", &filter[..start], &filter[end..])
}
