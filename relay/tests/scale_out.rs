//! Scale-out end to end (docs/scale-out.md, PROTOCOL.md §16): `switchyard` processes behind
//! HAProxy on loopback, routed by `X-Pyrycode-Server` with deploy/haproxy's configuration.
//!
//! The story, for 50 server-ids each with a binary and three phones exchanging frames:
//! 1. three nodes: every binary and phone meet through HAProxy;
//! 2. the node holding most binaries is killed (SIGKILL): its binaries reconnect and claim their
//!    ids elsewhere, their phones re-dial, traffic resumes; nothing else moves;
//! 3. a fourth node is added: every id gets a fourth phone and 20 new ids start, and all meet;
//!    the test counts the binaries and phone sessions this broke;
//! 4. (shipped configuration only) the busiest node is drained with SIGTERM: HAProxy marks it
//!    down on `/healthz` 503 and moves its sessions before the node stops accepting.
//!
//! The story runs twice, once per way of adding a node (§16.3): the stick table of
//! deploy/haproxy/haproxy.cfg (shipped) and a SIGHUP rebalance of the other nodes (the same
//! file without its "# pin" lines). Every frame carries its origin (server-id, phone, phone
//! connection, sequence number); a binary checks every envelope is for its id, a phone that every
//! frame is the echo of one it sent on that connection, in order. Figures are printed (run with
//! `--nocapture`) and written to `target/tmp/scale_out-<variant>.txt`.
//!
//! Needs `haproxy` (2.2 or later; `.ci/run` installs it with `apt-get install haproxy`). Under CI
//! (`CI` set) a missing haproxy fails the tests; elsewhere they are skipped with a notice, so
//! `cargo test --workspace` works on a fresh machine. `SWITCHYARD_SKIP_HAPROXY=1` skips them
//! explicitly.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

mod common;

use common::http_get;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy");

/// Server-ids of the first story and their phones each.
const IDS: usize = 50;
const PHONES: usize = 3;
/// Ids started once the fourth node is in, and their phones each.
const NEW_IDS: usize = 20;
const NEW_ID_PHONES: usize = 2;
/// A phone sends a frame this often; the binary echoes each one.
const SEND_EVERY: Duration = Duration::from_millis(250);
/// The longest any phase may take to settle.
const PHASE_BOUND: Duration = Duration::from_secs(25);

/// Relay flags shared by every node: short timers, the per-address limits out of the way (every
/// client is 127.0.0.1), and a drain delay well above HAProxy's inter × fall (600 ms).
const RELAY_FLAGS: &[&str] = &[
    "--trust-forwarded-for",
    "--workers",
    "1",
    "--ping-interval",
    "1s",
    "--pong-timeout",
    "3s",
    "--grace",
    "3s",
    "--probe-timeout",
    "1s",
    "--close-timeout",
    "1s",
    "--drain-delay",
    "2s",
    "--drain-timeout",
    "2s",
    "--max-connections-per-ip",
    "10000",
    "--rate-burst",
    "100000",
];

/// The two scale-out tests share two cores with everything else: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn stick_table_adds_a_node_without_breaking_a_session() {
    scale_out(Join::StickTable);
}

#[test]
fn sighup_rebalance_adds_a_node_by_reconnecting_binaries() {
    scale_out(Join::SighupRebalance);
}

/// How the fourth node is brought in (PROTOCOL.md §16.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// (b) ids pinned by the stick table: nothing else to do.
    StickTable,
    /// (a) no pinning: SIGHUP every other node once HAProxy has the new one up.
    SighupRebalance,
}

impl Join {
    fn name(self) -> &'static str {
        match self {
            Join::StickTable => "stick-table",
            Join::SighupRebalance => "sighup-rebalance",
        }
    }
}

/// Runs the whole story (nothing when skipped).
fn scale_out(join: Join) {
    let Some(haproxy) = haproxy_or_skip() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = WorkDir::new(join.name());
    let mut report = Report::new(join);
    writeln!(report, "haproxy: {}", haproxy_version(&haproxy)).unwrap();

    let mut cluster = Cluster::start(&haproxy, &dir, join);
    for k in 0..3 {
        cluster.start_node(k);
    }
    cluster.wait_servers_up(&[0, 1, 2]);
    cluster.check_node_ids(&[0, 1, 2]);

    // 1. Everybody meets.
    let clients = Clients::new(cluster.front, IDS + NEW_IDS);
    let t = Instant::now();
    for idx in 0..IDS {
        clients.start(idx, PHONES);
    }
    let met = report.wait("every pair to meet", || {
        clients.board.exchanged_since(0..IDS, t)
    }) - t;
    let before: Vec<u64> = (0..3).map(|k| cluster.binaries_on(k)).collect();
    writeln!(
        report,
        "meet: {IDS} server-ids x (1 binary + {PHONES} phones) met through HAProxy in {}; \
         binaries per node {before:?}",
        ms(met)
    )
    .unwrap();
    report.check(
        before.iter().sum::<u64>() == IDS as u64,
        "every binary is counted on one node",
    );

    // 2. The busiest node is killed.
    let victim = (0..3).max_by_key(|k| before[*k]).unwrap();
    let t0 = Instant::now();
    cluster.kill(victim);
    let healed = report.wait("the killed node's pairs to exchange again", || {
        clients.board.exchanged_since(0..IDS, t0)
    }) - t0;
    let f = clients.board.figures(0..IDS, t0);
    writeln!(
        report,
        "node loss (SIGKILL {}): {} binaries reconnected, all pairs exchanging again {} after the \
         kill",
        cluster.nodes[victim].name,
        f.reconnected.len(),
        ms(healed)
    )
    .unwrap();
    f.describe(&mut report);
    report.check(
        f.reconnected.len() as u64 == before[victim],
        "exactly the killed node's binaries reconnect",
    );
    report.check(
        f.phone_sessions_of
            .iter()
            .all(|i| f.reconnected.contains(i)),
        "only phones of the killed node's ids lose their session",
    );
    let survivors: Vec<usize> = (0..3).filter(|k| *k != victim).collect();
    let after: u64 = survivors.iter().map(|k| cluster.binaries_on(*k)).sum();
    report.check(after == IDS as u64, "every id is held again");

    // 3. A fourth node joins.
    cluster.start_node(3);
    let t1 = Instant::now();
    cluster.admin("set server relay_nodes/node4 state ready");
    let up = cluster.wait_servers_up(&[3]) - t1;
    writeln!(
        report,
        "join: node4 up in HAProxy {} after `state ready`",
        ms(up)
    )
    .unwrap();
    if join == Join::SighupRebalance {
        for k in &survivors {
            cluster.nodes[*k].proc().signal("HUP");
        }
    }
    for idx in 0..IDS {
        clients.add_phone(idx);
    }
    for idx in IDS..IDS + NEW_IDS {
        clients.start(idx, NEW_ID_PHONES);
    }
    let joined = report.wait("every pair to exchange after the join", || {
        clients.board.exchanged_since(0..IDS + NEW_IDS, t1)
    }) - t1;
    let f = clients.board.figures(0..IDS, t1);
    let live: Vec<usize> = survivors.iter().copied().chain([3]).collect();
    let per_node: Vec<(String, u64)> = live
        .iter()
        .map(|k| (cluster.nodes[*k].name.clone(), cluster.binaries_on(*k)))
        .collect();
    writeln!(
        report,
        "join ({}): every old id's new phone and {NEW_IDS} new ids exchanging {} after \
         `state ready`; binaries that had to reconnect: {} of {IDS}; phone sessions broken: {}; \
         binaries per node now {per_node:?}",
        join.name(),
        ms(joined),
        f.reconnected.len(),
        f.phone_sessions_broken
    )
    .unwrap();
    f.describe(&mut report);
    report.check(cluster.binaries_on(3) > 0, "node4 holds binaries");
    match join {
        Join::StickTable => {
            report.check(f.reconnected.is_empty(), "no binary reconnects");
            report.check(f.phone_sessions_broken == 0, "no phone session breaks");
        }
        // Every holder on the old nodes is closed 1012 and reconnects (§16.3).
        Join::SighupRebalance => {
            report.check(f.reconnected.len() == IDS, "every binary reconnects")
        }
    }

    // 4. Graceful removal of the busiest node (shipped configuration only).
    if join == Join::StickTable {
        drain(&mut cluster, &clients, &live, &mut report);
    }

    let frames = clients.board.checked.load(Ordering::SeqCst);
    let violations = clients.stop();
    report.check(
        violations.is_empty(),
        &format!(
            "no frame delivered to the wrong peer or out of order:\n{}",
            violations.join("\n")
        ),
    );
    writeln!(
        report,
        "wrong-peer check: {frames} frames checked at their receiver, none misdelivered"
    )
    .unwrap();
    report.finish();
}

/// SIGTERM with `--drain-delay 2s`: `/healthz` 503, HAProxy marks the node down and cuts its
/// sessions while the node still accepts; its pairs meet elsewhere; the node exits 0.
fn drain(cluster: &mut Cluster, clients: &Clients, live: &[usize], report: &mut Report) {
    let k = *live
        .iter()
        .max_by_key(|k| cluster.binaries_on(**k))
        .unwrap();
    let held = cluster.binaries_on(k);
    let all = 0..IDS + NEW_IDS;
    let t2 = Instant::now();
    cluster.nodes[k].proc().signal("TERM");
    let (mut draining, mut down, mut empty, mut exited, mut healed) =
        (None, None, None, None, None);
    while exited.is_none() || healed.is_none() {
        let now = Instant::now();
        report.check(
            now - t2 < PHASE_BOUND,
            "the drained node exits and its pairs meet again",
        );
        if exited.is_none() {
            if let Some(status) = cluster.nodes[k].proc().try_exit() {
                report.check(status.success(), "the drained node exits 0");
                exited = Some(now);
            } else if let Some((status, body)) = healthz(cluster.nodes[k].addr) {
                if status == 503 && body["status"] == "draining" {
                    draining.get_or_insert(now);
                }
                if down.is_some()
                    && body["connected_binaries"] == 0
                    && body["connected_phones"] == 0
                {
                    empty.get_or_insert(now);
                }
            }
            if down.is_none() && cluster.server_state(k) != Some(2) {
                // Marked down while the process still runs and accepts (healthz answered above).
                down = Some(now);
            }
        }
        // Once its sessions are gone, every pair must find its binary again.
        if healed.is_none() && empty.is_some() && clients.board.exchanged_since(all.clone(), t2) {
            healed = Some(now);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (exited, healed) = (exited.unwrap(), healed.unwrap() - t2);
    report.check(draining.is_some(), "/healthz answers 503 draining");
    report.check(down.is_some(), "HAProxy marks the draining node down");
    report.check(
        empty.is_some(),
        "the node's sessions are gone before it stops accepting",
    );
    let (draining, down, empty) = (draining.unwrap(), down.unwrap(), empty.unwrap());
    let f = clients.board.figures(all, t2);
    writeln!(
        report,
        "drain (SIGTERM {}, --drain-delay 2s): /healthz 503 after {}, HAProxy marked it down \
         after {}, its {} binaries and their phones gone from it after {}, all pairs exchanging \
         again after {}, process exited 0 after {}",
        cluster.nodes[k].name,
        ms(draining - t2),
        ms(down - t2),
        held,
        ms(empty - t2),
        ms(healed),
        ms(exited - t2)
    )
    .unwrap();
    f.describe(report);
    report.check(
        f.reconnected.len() as u64 == held,
        "exactly the drained node's binaries reconnect",
    );
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The haproxy executable, or `None` to skip (asked for, or missing outside CI); under CI a
/// missing haproxy panics.
fn haproxy_or_skip() -> Option<PathBuf> {
    if std::env::var_os("SWITCHYARD_SKIP_HAPROXY").is_some_and(|v| v == "1") {
        eprintln!("skipped: SWITCHYARD_SKIP_HAPROXY=1");
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file());
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    match found {
        Some(p) => Some(p),
        None if !ci => {
            eprintln!(
                "skipped: haproxy not found; `apt-get install haproxy` runs the scale-out test \
                 (under CI it is required)"
            );
            None
        }
        None => panic!(
            "haproxy not found (PATH, /usr/sbin, /usr/local/sbin). The scale-out test needs \
             HAProxy 2.2 or later: `apt-get install haproxy` (.ci/run does this), or set \
             SWITCHYARD_SKIP_HAPROXY=1 to skip it explicitly."
        ),
    }
}

fn haproxy_version(haproxy: &Path) -> String {
    let out = Command::new(haproxy)
        .arg("-v")
        .output()
        .expect("haproxy -v");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().unwrap_or("?").trim().to_owned()
}

/// A child process, killed and reaped on drop (also on panic).
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let log = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        Proc { child }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory (configuration, admin socket, logs), kept when the test fails.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(name: &str) -> WorkDir {
        // Short, under /tmp: a Unix socket path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!(
            "switchyard-scale-out-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("work dir");
        WorkDir(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scale-out logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A port nobody listens on right now.
///
/// Taken below the kernel's ephemeral range when there is room: the fourth node binds its port
/// seconds after it was chosen, and hundreds of client sockets draw ephemeral ports meanwhile.
fn free_addr() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(0);
    if ephemeral_low > 12_000 {
        let span = ephemeral_low - 10_000;
        let start = std::process::id() as usize * 7919;
        for _ in 0..span {
            let port = 10_000 + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % span;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
                return l.local_addr().expect("addr");
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

struct Node {
    /// `--node-id`, e.g. `n1`.
    name: String,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("node running")
    }
}

/// The relay nodes and HAProxy in front of them. Fields drop in order: nodes, then HAProxy.
struct Cluster {
    front: SocketAddr,
    admin: PathBuf,
    nodes: Vec<Node>,
    _haproxy: Proc,
}

impl Cluster {
    /// Writes the test configuration (four server slots, the fourth disabled), checks it with
    /// `haproxy -c` and starts HAProxy. No node is started yet.
    fn start(haproxy: &Path, dir: &WorkDir, join: Join) -> Cluster {
        let front = free_addr();
        let admin = dir.0.join("admin.sock");
        let nodes: Vec<Node> = (1..=4)
            .map(|n| Node {
                name: format!("n{n}"),
                addr: free_addr(),
                metrics: free_addr(),
                log: dir.0.join(format!("n{n}.log")),
                proc: None,
            })
            .collect();
        let config = test_config(join, front, free_addr(), &admin, &nodes);
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let check = Command::new(haproxy)
            .args(["-c", "-L", "local", "-f"])
            .arg(&path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused the test configuration (HAProxy 2.2 or later is needed):\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let proc = Proc::spawn(
            Command::new(haproxy)
                .args(["-db", "-L", "local", "-f"])
                .arg(&path),
            &dir.0.join("haproxy.log"),
        );
        let cluster = Cluster {
            front,
            admin,
            nodes,
            _haproxy: proc,
        };
        wait_until("HAProxy's runtime API", Duration::from_secs(10), || {
            UnixStream::connect(&cluster.admin).is_ok()
        });
        cluster
    }

    fn start_node(&mut self, k: usize) {
        let node = &mut self.nodes[k];
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", &node.addr.to_string()])
            .args(["--metrics-listen", &node.metrics.to_string()])
            .args(["--node-id", &node.name])
            .args(RELAY_FLAGS);
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("SWITCHYARD_")
                || n.starts_with("PYRYCODE_RELAY_")
                || n == "FLY_APP_NAME"
            {
                cmd.env_remove(&name);
            }
        }
        let mut proc = Proc::spawn(&mut cmd, &node.log);
        let addr = node.addr;
        wait_until(
            &format!("{} to answer /healthz", node.name),
            Duration::from_secs(10),
            || {
                if let Some(status) = proc.try_exit() {
                    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                    panic!("{} exited at start ({status}):\n{log}", node.name);
                }
                healthz(addr).is_some_and(|(s, _)| s == 200)
            },
        );
        node.proc = Some(proc);
    }

    fn kill(&mut self, k: usize) {
        // SIGKILL: no close frame, no drain; the kernel closes the node's sockets.
        drop(self.nodes[k].proc.take());
    }

    fn admin(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(&self.admin).expect("HAProxy runtime API");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// `srv_op_state` of node `k` in HAProxy (2 = running).
    fn server_state(&self, k: usize) -> Option<u8> {
        let server = format!("node{}", k + 1);
        self.admin("show servers state relay_nodes")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.get(3) == Some(&server.as_str()))
            .and_then(|cols| cols.get(5)?.parse().ok())
    }

    fn wait_servers_up(&self, ks: &[usize]) -> Instant {
        wait_until(
            "HAProxy to see the nodes up",
            Duration::from_secs(10),
            || ks.iter().all(|k| self.server_state(*k) == Some(2)),
        )
    }

    /// §16.4: the node id is on every log line and in `/metrics`.
    fn check_node_ids(&self, ks: &[usize]) {
        for k in ks {
            let node = &self.nodes[*k];
            wait_until("the listening log line", Duration::from_secs(5), || {
                std::fs::read_to_string(&node.log).is_ok_and(|l| l.contains("msg=listening"))
            });
            let metrics = http_get(node.metrics, "/metrics").expect("metrics").1;
            let info = format!("pyrycode_relay_node_info{{node=\"{}\"}} 1", node.name);
            assert!(metrics.contains(&info), "{} lacks {info}", node.name);
            let log = std::fs::read_to_string(&node.log).expect("node log");
            let tag = format!("node={}", node.name);
            assert!(
                log.lines().all(|l| l.contains(&tag)),
                "{} log lines without {tag}:\n{log}",
                node.name
            );
        }
    }

    /// `/healthz` `connected_binaries` of node `k`, asked directly (not through HAProxy).
    fn binaries_on(&self, k: usize) -> u64 {
        healthz(self.nodes[k].addr)
            .and_then(|(_, body)| body["connected_binaries"].as_u64())
            .unwrap_or(0)
    }
}

/// deploy/haproxy/haproxy-test.cfg.in filled in; first checks that its routing block is the one
/// deploy/haproxy/haproxy.cfg ships.
fn test_config(
    join: Join,
    front: SocketAddr,
    peer: SocketAddr,
    admin: &Path,
    nodes: &[Node],
) -> String {
    let shipped = std::fs::read_to_string(format!("{DEPLOY}/haproxy.cfg")).expect("haproxy.cfg");
    let template =
        std::fs::read_to_string(format!("{DEPLOY}/haproxy-test.cfg.in")).expect("template");
    assert_eq!(
        routing_block(&template),
        routing_block(&shipped),
        "the routing blocks of haproxy-test.cfg.in and haproxy.cfg differ"
    );
    let mut text = template
        .replace("@ADMIN@", &admin.display().to_string())
        .replace("@PEER@", &peer.to_string())
        .replace("@FRONT@", &front.to_string());
    for (n, node) in nodes.iter().enumerate() {
        text = text.replace(&format!("@NODE{}@", n + 1), &node.addr.to_string());
    }
    if join == Join::SighupRebalance {
        text = text
            .lines()
            .filter(|l| !l.trim_end().ends_with("# pin"))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    assert!(
        !text.contains('@'),
        "unfilled placeholder in the test configuration"
    );
    text
}

/// The directive lines between `# routing: begin` and `# routing: end`, comments dropped.
fn routing_block(config: &str) -> Vec<String> {
    let lines: Vec<&str> = config
        .lines()
        .skip_while(|l| l.trim() != "# routing: begin")
        .take_while(|l| l.trim() != "# routing: end")
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!lines.is_empty(), "no routing block");
    lines.into_iter().map(str::to_owned).collect()
}

fn healthz(addr: SocketAddr) -> Option<(u16, Value)> {
    let (status, body) = http_get(addr, "/healthz")?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// Polls `check` every 10 ms; when it first held, or `None` after `bound`.
fn poll_until(bound: Duration, mut check: impl FnMut() -> bool) -> Option<Instant> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > bound {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Instant::now())
}

fn wait_until(what: &str, bound: Duration, check: impl FnMut() -> bool) -> Instant {
    poll_until(bound, check)
        .unwrap_or_else(|| panic!("timed out after {bound:?} waiting for {what}"))
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Server-id `idx`: some carry a comma or a quote, which the routing must keep whole.
fn sid(idx: usize) -> String {
    match idx {
        i if i >= IDS => format!("new-{i:02}"),
        i if i % 10 == 3 => format!("sid,{i:02}"),
        i if i % 10 == 7 => format!("sid\"{i:02}"),
        i => format!("sid-{i:02}"),
    }
}

/// How a connection attempt or a connection ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// A WebSocket close frame with this code.
    Close(u16),
    /// TCP ended without a close frame.
    Gone,
    /// The upgrade was answered with this status instead of 101.
    Http(u16),
    /// No connection or no answer.
    NoAnswer,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Close(c) => write!(f, "close {c}"),
            End::Gone => f.write_str("TCP closed without a close frame"),
            End::Http(s) => write!(f, "HTTP {s}"),
            End::NoAnswer => f.write_str("no answer"),
        }
    }
}

/// What happened to one binary or phone, over all its connections.
#[derive(Default)]
struct PeerLog {
    /// 101s.
    opens: Vec<Instant>,
    /// Ends of upgraded connections, and whether the connection had exchanged a frame.
    ends: Vec<(Instant, End, bool)>,
    /// Dials answered with something other than 101.
    refusals: Vec<(Instant, End)>,
    /// Phones: echoes received.
    echoes: Vec<Instant>,
}

#[derive(Default)]
struct SidLog {
    binary: PeerLog,
    phones: Vec<PeerLog>,
}

/// State shared by the client threads and the test.
struct Board {
    stop: AtomicBool,
    logs: Vec<Mutex<SidLog>>,
    violations: Mutex<Vec<String>>,
    /// Frames checked at their receiver.
    checked: AtomicUsize,
}

/// What one phase did to a set of server-ids.
struct Figures {
    /// Ids whose binary's connection ended.
    reconnected: Vec<usize>,
    /// Ids with a phone whose live session ended.
    phone_sessions_of: Vec<usize>,
    phone_sessions_broken: usize,
    binary_ends: BTreeMap<End, usize>,
    binary_refusals: BTreeMap<End, usize>,
    phone_ends: BTreeMap<End, usize>,
    /// Ends of phone connections that never exchanged (rejections after the 101, e.g. 4404).
    phone_rejections: BTreeMap<End, usize>,
    phone_refusals: BTreeMap<End, usize>,
    /// Per reconnected id: time to its binary's connection end, to its next 101, and to every
    /// phone's next echo.
    ended: Vec<Duration>,
    reclaim: Vec<Duration>,
    heal: Vec<Duration>,
}

impl Board {
    fn log(&self, idx: usize) -> MutexGuard<'_, SidLog> {
        self.logs[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn violation(&self, text: String) {
        let mut v = self
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if v.len() < 50 {
            v.push(text);
        }
    }

    /// Every phone of every id in `ids` has had an echo after `t` and after the last end
    /// of its own connection and of its binary's.
    fn exchanged_since(&self, ids: std::ops::Range<usize>, t: Instant) -> bool {
        ids.into_iter().all(|idx| {
            let log = self.log(idx);
            let binary_end = log.binary.ends.last().map(|e| e.0);
            !log.phones.is_empty()
                && log.phones.iter().all(|p| {
                    let after = [binary_end, p.ends.last().map(|e| e.0)]
                        .into_iter()
                        .flatten()
                        .fold(t, Instant::max);
                    p.echoes.last().is_some_and(|e| *e > after)
                })
        })
    }

    fn figures(&self, ids: std::ops::Range<usize>, t: Instant) -> Figures {
        let mut f = Figures {
            reconnected: Vec::new(),
            phone_sessions_of: Vec::new(),
            phone_sessions_broken: 0,
            binary_ends: BTreeMap::new(),
            binary_refusals: BTreeMap::new(),
            phone_ends: BTreeMap::new(),
            phone_rejections: BTreeMap::new(),
            phone_refusals: BTreeMap::new(),
            ended: Vec::new(),
            reclaim: Vec::new(),
            heal: Vec::new(),
        };
        let count = |m: &mut BTreeMap<End, usize>, e: End| *m.entry(e).or_default() += 1;
        for idx in ids {
            let log = self.log(idx);
            let ends: Vec<_> = log.binary.ends.iter().filter(|e| e.0 > t).collect();
            for e in &ends {
                count(&mut f.binary_ends, e.1);
            }
            for r in log.binary.refusals.iter().filter(|r| r.0 > t) {
                count(&mut f.binary_refusals, r.1);
            }
            let mut broken = false;
            for p in &log.phones {
                for e in p.ends.iter().filter(|e| e.0 > t) {
                    if e.2 {
                        count(&mut f.phone_ends, e.1);
                        f.phone_sessions_broken += 1;
                        broken = true;
                    } else {
                        count(&mut f.phone_rejections, e.1);
                    }
                }
                for r in p.refusals.iter().filter(|r| r.0 > t) {
                    count(&mut f.phone_refusals, r.1);
                }
            }
            if broken {
                f.phone_sessions_of.push(idx);
            }
            if ends.is_empty() {
                continue;
            }
            f.reconnected.push(idx);
            f.ended.push(ends[0].0 - t);
            if let Some(open) = log.binary.opens.iter().find(|o| **o > t) {
                f.reclaim.push(*open - t);
            }
            // Every phone's first echo after its binary's and its own last end.
            let binary_end = ends[ends.len() - 1].0;
            let heal = log
                .phones
                .iter()
                .filter_map(|p| {
                    let after = p.ends.last().map_or(binary_end, |e| e.0.max(binary_end));
                    p.echoes.iter().find(|e| **e > after).map(|e| *e - t)
                })
                .max();
            f.heal.extend(heal);
        }
        f
    }
}

impl Figures {
    fn describe(&self, report: &mut Report) {
        let list = |m: &BTreeMap<End, usize>| {
            if m.is_empty() {
                return "nothing".to_owned();
            }
            m.iter()
                .map(|(e, n)| format!("{n} x {e}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.reclaim.is_empty() {
            writeln!(
                report,
                "  binary's connection ended after: {}; binary back (next 101) after: {}; every \
                 phone of the id exchanging after: {}",
                spread(&self.ended),
                spread(&self.reclaim),
                spread(&self.heal)
            )
            .unwrap();
        }
        writeln!(
            report,
            "  binaries saw: {}; their re-dials were refused with: {}",
            list(&self.binary_ends),
            list(&self.binary_refusals)
        )
        .unwrap();
        writeln!(
            report,
            "  phones saw their session end with: {}; re-dials rejected after the 101 with: {}; \
             refused with: {}",
            list(&self.phone_ends),
            list(&self.phone_rejections),
            list(&self.phone_refusals)
        )
        .unwrap();
    }
}

/// `min / median / max` of durations.
fn spread(ds: &[Duration]) -> String {
    let mut v = ds.to_vec();
    v.sort();
    if v.is_empty() {
        return "-".to_owned();
    }
    format!(
        "min {} / median {} / max {}",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// The client threads: one per binary and one per phone, each on its own connection as real
/// clients are (a slow dial never starves another peer's heartbeat).
struct Clients {
    front: SocketAddr,
    board: Arc<Board>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Clients {
    fn new(front: SocketAddr, ids: usize) -> Clients {
        Clients {
            front,
            board: Arc::new(Board {
                stop: AtomicBool::new(false),
                logs: (0..ids).map(|_| Mutex::default()).collect(),
                violations: Mutex::default(),
                checked: AtomicUsize::new(0),
            }),
            threads: Mutex::default(),
        }
    }

    /// Starts server-id `idx`: its binary and `phones` phones.
    fn start(&self, idx: usize, phones: usize) {
        let (board, front) = (self.board.clone(), self.front);
        self.spawn(format!("binary-{idx}"), move || {
            Binary::new(board, front, idx).run();
        });
        for _ in 0..phones {
            self.add_phone(idx);
        }
    }

    /// One more phone for server-id `idx`.
    fn add_phone(&self, idx: usize) {
        let p = {
            let mut log = self.board.log(idx);
            log.phones.push(PeerLog::default());
            log.phones.len() - 1
        };
        let (board, front) = (self.board.clone(), self.front);
        self.spawn(format!("phone-{idx}-{p}"), move || {
            Phone::new(board, front, idx, p).run();
        });
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::Builder::new()
            .name(name)
            .stack_size(256 * 1024)
            .spawn(f)
            .expect("spawn client thread");
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// Stops every client thread and returns the violations seen.
    fn stop(&self) -> Vec<String> {
        self.board.stop.store(true, Ordering::SeqCst);
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        std::mem::take(
            &mut *self
                .board
                .violations
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

type Ws = WebSocket<TcpStream>;

/// The longest a client thread blocks before looking at the stop flag again.
const POLL: Duration = Duration::from_millis(50);

enum Dialed {
    Open(Box<Ws>),
    Refused(End),
}

/// One upgrade through HAProxy, with short timeouts.
fn dial(front: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Dialed {
    let Ok(mut s) = TcpStream::connect_timeout(&front, Duration::from_secs(1)) else {
        return Dialed::Refused(End::NoAnswer);
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return Dialed::Refused(End::NoAnswer);
    }
    // Byte by byte, so a close frame right behind the 101 (4404) stays in the socket.
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            _ => return Dialed::Refused(End::NoAnswer),
        }
    }
    let status = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split(' ').nth(1)?.parse::<u16>().ok());
    match status {
        Some(101) => Dialed::Open(Box::new(WebSocket::from_raw_socket(s, Role::Client, None))),
        Some(code) => Dialed::Refused(End::Http(code)),
        None => Dialed::Refused(End::NoAnswer),
    }
}

/// The next data message within `within` (`None` if none came; pings are answered meanwhile),
/// or how the connection ended.
fn next_text(ws: &mut Ws, within: Duration) -> Result<Option<String>, End> {
    let _ = ws
        .get_mut()
        .set_read_timeout(Some(within.max(Duration::from_millis(1))));
    match ws.read() {
        Ok(Message::Text(t)) => Ok(Some(t.as_str().to_owned())),
        Ok(Message::Binary(_)) => Ok(Some("<binary message>".to_owned())),
        Ok(Message::Close(f)) => {
            let _ = ws.flush(); // the close reply
            Err(End::Close(f.map_or(1005, |f| u16::from(f.code))))
        }
        Ok(_) => Ok(None),
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            Ok(None)
        }
        Err(_) => Err(End::Gone),
    }
}

fn send(ws: &mut Ws, text: String) -> Result<(), End> {
    ws.send(Message::text(text)).map_err(|_| End::Gone)
}

/// Exponential backoff with ±25 % jitter: `base`, `2 base`, … up to `cap`.
fn backoff(rng: &mut u64, failures: u32, base: Duration, cap: Duration) -> Duration {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let d = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(cap);
    d.mul_f64(0.75 + (*rng % 1000) as f64 / 2000.0)
}

/// Sleeps until `at` in steps of [`POLL`]; `false` if the test stops meanwhile.
fn sleep_until(board: &Board, at: Instant) -> bool {
    loop {
        if board.stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        std::thread::sleep((at - now).min(POLL));
    }
}

fn seed(idx: usize, p: usize) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ ((idx * 64 + p) as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A binary: claims its id, echoes every phone frame back to its sender, and reconnects
/// whenever its connection ends (straight away after a 1012 rebalance, §16.3).
struct Binary {
    board: Arc<Board>,
    front: SocketAddr,
    idx: usize,
    sid: String,
    rng: u64,
}

impl Binary {
    fn new(board: Arc<Board>, front: SocketAddr, idx: usize) -> Binary {
        Binary {
            board,
            front,
            idx,
            sid: sid(idx),
            rng: seed(idx, 63),
        }
    }

    fn run(mut self) {
        let mut failures = 0;
        let mut retry_at = Instant::now();
        while sleep_until(&self.board, retry_at) {
            let headers = [
                ("X-Pyrycode-Server", self.sid.as_str()),
                ("X-Pyrycode-Version", "0.9.1"),
                ("User-Agent", "scale-out-binary"),
            ];
            // The first retry after a connection ends: 20 ms after a rebalance, else 50 ms.
            let mut base = Duration::from_millis(50);
            match dial(self.front, "/v1/server", &headers) {
                Dialed::Open(ws) => {
                    self.board.log(self.idx).binary.opens.push(Instant::now());
                    let Some(end) = self.serve(ws) else { return };
                    self.board
                        .log(self.idx)
                        .binary
                        .ends
                        .push((Instant::now(), end, true));
                    failures = 1;
                    if end == End::Close(1012) {
                        base = Duration::from_millis(20);
                    }
                }
                Dialed::Refused(e) => {
                    self.board
                        .log(self.idx)
                        .binary
                        .refusals
                        .push((Instant::now(), e));
                    failures += 1;
                }
            }
            let wait = backoff(&mut self.rng, failures, base, Duration::from_secs(1));
            retry_at = Instant::now() + wait;
        }
    }

    /// Echoes until the connection ends (`Some(how)`) or the test stops (`None`).
    fn serve(&mut self, mut ws: Box<Ws>) -> Option<End> {
        // conn_id → (phone, phone connection) seen in its frames: must never change.
        let mut phones = HashMap::new();
        while !self.board.stop.load(Ordering::SeqCst) {
            let text = match next_text(&mut ws, POLL) {
                Ok(Some(text)) => text,
                Ok(None) => continue,
                Err(end) => return Some(end),
            };
            if let Some(reply) = envelope(&self.board, self.idx, &self.sid, &mut phones, &text) {
                if let Err(end) = send(&mut ws, reply) {
                    return Some(end);
                }
            }
        }
        None
    }
}

/// A phone: sends a numbered frame every [`SEND_EVERY`] and checks the echoes; re-dials when
/// its connection ends (a 4404 means its binary is not there yet: back off and retry).
struct Phone {
    board: Arc<Board>,
    front: SocketAddr,
    idx: usize,
    p: usize,
    sid: String,
    rng: u64,
}

impl Phone {
    fn new(board: Arc<Board>, front: SocketAddr, idx: usize, p: usize) -> Phone {
        Phone {
            board,
            front,
            idx,
            p,
            sid: sid(idx),
            rng: seed(idx, p),
        }
    }

    fn run(mut self) {
        let mut failures = 0;
        let mut retry_at = Instant::now();
        let mut c = 0; // connections made
        while sleep_until(&self.board, retry_at) {
            let headers = [
                ("x-pyrycode-server", self.sid.as_str()),
                ("x-pyrycode-token", "opaque"),
                ("user-agent", "scale-out-phone"),
            ];
            match dial(self.front, "/v1/client", &headers) {
                Dialed::Open(ws) => {
                    self.board.log(self.idx).phones[self.p]
                        .opens
                        .push(Instant::now());
                    c += 1;
                    let Some((end, live)) = self.talk(ws, c) else {
                        return;
                    };
                    if end == End::Close(1012) {
                        self.board.violation(format!(
                            "{}: phone {} was closed 1012 (binaries only)",
                            self.sid, self.p
                        ));
                    }
                    self.board.log(self.idx).phones[self.p]
                        .ends
                        .push((Instant::now(), end, live));
                    failures = if live { 1 } else { failures + 1 };
                }
                Dialed::Refused(e) => {
                    self.board.log(self.idx).phones[self.p]
                        .refusals
                        .push((Instant::now(), e));
                    failures += 1;
                }
            }
            let base = Duration::from_millis(if failures > 1 { 100 } else { 50 });
            let wait = backoff(&mut self.rng, failures, base, Duration::from_millis(800));
            retry_at = Instant::now() + wait;
        }
    }

    /// Talks on connection `c` until it ends (`Some((how, whether it exchanged))`) or the test
    /// stops (`None`).
    fn talk(&mut self, mut ws: Box<Ws>, c: u64) -> Option<(End, bool)> {
        let (mut sent, mut echoed) = (0, 0);
        let mut next_send = Instant::now();
        while !self.board.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next_send {
                sent += 1;
                next_send = now + SEND_EVERY;
                let frame = json!({"sid": self.sid, "p": self.p, "c": c, "seq": sent});
                if let Err(end) = send(&mut ws, frame.to_string()) {
                    return Some((end, echoed > 0));
                }
            }
            let within = next_send
                .saturating_duration_since(Instant::now())
                .min(POLL);
            match next_text(&mut ws, within) {
                Ok(Some(text)) => {
                    let (board, idx) = (&self.board, self.idx);
                    if let Some(seq) = echo(board, idx, &self.sid, self.p, c, sent, echoed, &text) {
                        echoed = seq;
                        board.log(idx).phones[self.p].echoes.push(Instant::now());
                    }
                }
                Ok(None) => {}
                Err(end) => return Some((end, echoed > 0)),
            }
        }
        None
    }
}

/// A binary's check of one message from the relay; the echo to send back, if any.
fn envelope(
    board: &Board,
    idx: usize,
    sid: &str,
    phones: &mut HashMap<String, (u64, u64)>,
    text: &str,
) -> Option<String> {
    board.checked.fetch_add(1, Ordering::Relaxed);
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            board.violation(format!("binary {sid}: not JSON: {text}"));
            return None;
        }
    };
    let Some(conn_id) = v["conn_id"].as_str() else {
        board.violation(format!("binary {sid}: no conn_id: {text}"));
        return None;
    };
    if !conn_id.starts_with(&format!("client-{sid}-")) {
        board.violation(format!("binary {sid}: conn_id of another id: {text}"));
        return None;
    }
    let frame = match v.get("frame") {
        Some(f) => f,
        // A close notice (§8).
        None if v["close_code"].is_u64() => return None,
        None => {
            board.violation(format!("binary {sid}: neither frame nor notice: {text}"));
            return None;
        }
    };
    let (p, c) = (frame["p"].as_u64(), frame["c"].as_u64());
    if frame["sid"] != sid || p.is_none() || c.is_none() {
        board.violation(format!(
            "binary {sid} (#{idx}) got a frame for another peer: {text}"
        ));
        return None;
    }
    let origin = (p.unwrap(), c.unwrap());
    if let Some(known) = phones.insert(conn_id.to_owned(), origin) {
        if known != origin {
            board.violation(format!("binary {sid}: {conn_id} changed origin: {text}"));
        }
    }
    Some(json!({"conn_id": conn_id, "frame": frame}).to_string())
}

/// A phone's check of one message: the echo of a frame it sent on this connection, in order.
/// The sequence number echoed, if valid.
#[allow(clippy::too_many_arguments)]
fn echo(
    board: &Board,
    idx: usize,
    sid: &str,
    p: usize,
    c: u64,
    sent: u64,
    echoed: u64,
    text: &str,
) -> Option<u64> {
    board.checked.fetch_add(1, Ordering::Relaxed);
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let seq = v["seq"].as_u64().unwrap_or(0);
    let ours = v["sid"] == sid && v["p"] == p && v["c"] == c;
    if !ours || seq <= echoed || seq > sent {
        board.violation(format!(
            "phone {p} of {sid} (#{idx}), connection {c}, sent {sent}, echoed {echoed}, got: {text}"
        ));
        return None;
    }
    Some(seq)
}

// ---------------------------------------------------------------------------------------------
// Report

/// The figures: printed when the test ends and written to `target/tmp/scale_out-<variant>.txt`.
struct Report {
    join: Join,
    text: String,
}

impl Report {
    fn new(join: Join) -> Report {
        Report {
            join,
            text: format!(
                "scale-out ({}): {IDS} ids x {PHONES} phones, relays with {}\n",
                join.name(),
                RELAY_FLAGS.join(" ")
            ),
        }
    }

    /// Panics with the figures so far unless `ok`.
    fn check(&self, ok: bool, what: &str) {
        assert!(ok, "failed: {what}\n--- figures so far ---\n{}", self.text);
    }

    /// [`wait_until`] within [`PHASE_BOUND`], failing with the figures so far.
    fn wait(&self, what: &str, check: impl FnMut() -> bool) -> Instant {
        poll_until(PHASE_BOUND, check).unwrap_or_else(|| {
            panic!(
                "timed out after {PHASE_BOUND:?} waiting for {what}\n--- figures so far ---\n{}",
                self.text
            )
        })
    }

    fn finish(self) {
        print!("{}", self.text);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("scale_out-{}.txt", self.join.name()));
        let _ = std::fs::write(path, &self.text);
    }
}

impl fmt::Write for Report {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.text.push_str(s);
        Ok(())
    }
}
