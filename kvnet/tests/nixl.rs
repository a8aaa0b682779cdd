//! Interop with a stock NIXL agent (PyPI `nixl-cu12` 1.5.x, its bundled UCX) in another process,
//! over UCX on loopback: each side READs and WRITEs the other's registered blocks, notifications
//! cross both ways, metadata travels through NIXL's side channel (both directions) and as raw
//! blobs, and a NIXL peer that dies mid-transfer is an error on our side, not a hang.
//!
//! Skipped (with the reason printed) where NIXL or a libucp is missing, unless
//! `KVFERRY_REQUIRE_NIXL=1` (CI sets it) turns the skip into a failure.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kvnet::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvnet::{Agent, AgentConfig, NetError, TransportKind};
use sha2::{Digest, Sha256};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nixl_agent.py");

/// Byte `i` of a buffer filled with `seed` (the script's formula).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(131) + seed) % 251) as u8)
        .collect()
}

fn skip(why: &str) -> bool {
    if std::env::var("KVFERRY_REQUIRE_NIXL").is_ok_and(|v| v == "1") {
        panic!("NIXL interop required (KVFERRY_REQUIRE_NIXL=1) but: {why}");
    }
    eprintln!("SKIP: {why}");
    true
}

fn nixl_installed() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "try:\n import nixl_cu12._api\nexcept ImportError:\n import nixl_cu13._api",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || !skip("NIXL is not installed (pip install --no-deps nixl-cu12 numpy)")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct NixlPeer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    port: u16,
    base: u64,
}

impl NixlPeer {
    fn start(name: &str, bytes: usize, seed: u64, env: &[(&str, &str)]) -> NixlPeer {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args([
            SCRIPT,
            name,
            &port.to_string(),
            &bytes.to_string(),
            &seed.to_string(),
        ])
        .env("UCX_NET_DEVICES", "lo");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let stdin = child.stdin.take().expect("piped");
        let out = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                // NIXL logs on stdout too; only the script's answers matter.
                let answer = ["ok", "err", "ready"].iter().any(|p| l.starts_with(p));
                if answer && tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut p = NixlPeer {
            child,
            stdin,
            lines,
            port,
            base: 0,
        };
        let ready = p.line();
        let w: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(w.first(), Some(&"ready"), "{ready}");
        p.base = w[1].parse().expect("base address");
        p
    }

    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the NIXL agent answers within 60 s")
    }

    /// Sends a command; returns what follows `ok` (panics on `err`).
    fn ok(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("NIXL agent input");
        self.stdin.flush().expect("flush");
        let l = self.line();
        match l.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("NIXL agent: `{c}` -> {l}"),
        }
    }

    fn side_channel(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for NixlPeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Local {
    agent: Agent,
    region: RegionId,
    buf: Vec<u8>,
}

impl Local {
    fn desc(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor {
            region: self.region,
            offset,
            len,
        }
    }
}

fn local(name: &str, buf: Vec<u8>, tls: Option<&str>) -> Option<Local> {
    let mut cfg = AgentConfig::new(name);
    cfg.transports = vec![TransportKind::Ucx];
    cfg.timeout = Duration::from_secs(5);
    cfg.nixl_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.ucx_options = vec![("NET_DEVICES".into(), "lo".into())];
    if let Some(t) = tls {
        cfg.ucx_options.push(("TLS".into(), t.into()));
    }
    let agent = Agent::new(cfg).expect("agent");
    let Some(lib) = agent.ucx_library().map(str::to_owned) else {
        skip("no usable libucp (pip install libucx-cu12, or set KVFERRY_UCX_LIB)");
        return None;
    };
    eprintln!("kvferry side: {lib}");
    let mut buf = buf;
    // SAFETY: the buffer moves into `Local` with the agent; fields drop in declaration order,
    // so the agent (and every transfer) is gone before the buffer is freed. Its heap storage
    // does not move when the Vec does.
    let region = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: buf.len() as u64,
        })
    }
    .expect("register");
    Some(Local { agent, region, buf })
}

/// `n` blocks of `block` bytes taken from `src` in reverse block order (what the script's
/// scattered descriptors produce).
fn reversed(src: &[u8], block: usize, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| src[(n - 1 - i) * block..(n - i) * block].iter().copied())
        .collect()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn wait_notification(agent: &Agent, from: &str, payload: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for n in agent.wait_notifications(Duration::from_millis(200)) {
            if n.from == from && n.payload == payload {
                return;
            }
            eprintln!("(other notification from {}: {:?})", n.from, n.payload);
        }
    }
    panic!("no notification {payload:?} from {from}");
}

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;
const N: usize = 256;

#[test]
fn nixl_reads_and_writes_our_blocks_and_we_receive_its_notifications() {
    if !nixl_installed() {
        return;
    }
    let Some(me) = local("kvferry", pattern(7, 4 * MIB), None) else {
        return;
    };
    let mut nixl = NixlPeer::start("nixl", 4 * MIB, 3, &[]);
    let our_port = me.agent.nixl_listen_addr().expect("side channel").port();

    // NIXL's fetch_remote_metadata against our side channel.
    nixl.ok(&format!("fetch kvferry {our_port}"));
    let base = me.buf.as_ptr() as u64;

    // NIXL READs 256 scattered blocks of ours, then notifies.
    nixl.ok(&format!(
        "xfer READ kvferry {base} {BLOCK} {N} {}",
        hex(b"read-done")
    ));
    let want = reversed(&me.buf, BLOCK, N);
    assert_eq!(nixl.ok(&format!("sha 0 {}", BLOCK * N)), sha(&want));
    wait_notification(&me.agent, "nixl", b"read-done");

    // NIXL WRITEs into the upper half of ours; its notification follows the data.
    nixl.ok("fill 5");
    let target = base + 2 * MIB as u64;
    nixl.ok(&format!(
        "xfer WRITE kvferry {target} {BLOCK} {N} {}",
        hex(b"write-done")
    ));
    wait_notification(&me.agent, "nixl", b"write-done");
    let want = reversed(&pattern(5, BLOCK * N), BLOCK, N);
    assert!(
        me.buf[2 * MIB..2 * MIB + BLOCK * N] == want[..],
        "NIXL's WRITE landed bit-exact"
    );
    // The rest of our buffer is untouched.
    assert_eq!(me.buf[..2 * MIB], pattern(7, 4 * MIB)[..2 * MIB]);
    assert_eq!(
        me.buf[2 * MIB + BLOCK * N..],
        pattern(7, 4 * MIB)[2 * MIB + BLOCK * N..]
    );

    // A plain notification, and NIXL's invalidation of itself.
    nixl.ok(&format!("notify kvferry {}", hex(b"hello")));
    wait_notification(&me.agent, "nixl", b"hello");
    nixl.ok(&format!("sendmd {our_port}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while me.agent.peer_metadata("nixl").is_none() {
        assert!(
            Instant::now() < deadline,
            "NIXL's send_local_metadata arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nixl.ok(&format!("invalidate {our_port}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while me.agent.peer_metadata("nixl").is_some() {
        assert!(Instant::now() < deadline, "NIXL's invalidation arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = me
        .agent
        .read(&[me.desc(0, 8)], "nixl", &[me.desc(0, 8)], None)
        .expect_err("an invalidated peer is unknown");
    assert!(matches!(err, NetError::UnknownPeer(_)), "{err}");
}

#[test]
fn we_read_and_write_nixl_blocks_and_nixl_receives_our_notifications() {
    if !nixl_installed() {
        return;
    }
    let Some(mut me) = local("kvferry", vec![0u8; 4 * MIB], None) else {
        return;
    };
    let mut nixl = NixlPeer::start("nixl", 4 * MIB, 9, &[]);
    // Metadata over NIXL's side channel, both ways.
    assert_eq!(
        me.agent
            .nixl_fetch_metadata(nixl.side_channel())
            .expect("fetch"),
        "nixl"
    );
    me.agent
        .nixl_send_metadata(nixl.side_channel())
        .expect("send");

    // READ 256 scattered NIXL blocks into ours, with a notification.
    let remote: Vec<Descriptor> = (0..N)
        .map(|i| {
            let addr = nixl.base + ((N - 1 - i) * BLOCK) as u64;
            me.agent
                .remote_descriptor("nixl", MemKind::Host, addr, BLOCK as u64)
                .expect("inside NIXL's registration")
        })
        .collect();
    let ours: Vec<Descriptor> = (0..N)
        .map(|i| me.desc((i * BLOCK) as u64, BLOCK as u64))
        .collect();
    let id = me
        .agent
        .read(&ours, "nixl", &remote, Some(b"pulled".to_vec()))
        .expect("post read");
    let done = me.agent.wait(id, Duration::from_secs(30)).expect("done");
    assert_eq!(done.result.expect("read"), (BLOCK * N) as u64);
    assert_eq!(
        me.buf[..BLOCK * N],
        reversed(&pattern(9, BLOCK * N), BLOCK, N)[..]
    );
    assert_eq!(
        nixl.ok("notifs 1 20"),
        format!("kvferry:{}", hex(b"pulled"))
    );

    // WRITE our blocks into NIXL's upper half, scattered, with a notification.
    let data = pattern(77, BLOCK * N);
    me.buf[2 * MIB..2 * MIB + BLOCK * N].copy_from_slice(&data);
    let remote: Vec<Descriptor> = (0..N)
        .map(|i| {
            let addr = nixl.base + (2 * MIB + (N - 1 - i) * BLOCK) as u64;
            me.agent
                .remote_descriptor("nixl", MemKind::Host, addr, BLOCK as u64)
                .expect("inside NIXL's registration")
        })
        .collect();
    let ours: Vec<Descriptor> = (0..N)
        .map(|i| me.desc((2 * MIB + i * BLOCK) as u64, BLOCK as u64))
        .collect();
    let id = me
        .agent
        .write(&ours, "nixl", &remote, Some(b"pushed".to_vec()))
        .expect("post write");
    let done = me.agent.wait(id, Duration::from_secs(30)).expect("done");
    done.result.expect("write");
    assert_eq!(
        nixl.ok("notifs 1 20"),
        format!("kvferry:{}", hex(b"pushed"))
    );
    assert_eq!(
        nixl.ok(&format!("sha {} {}", 2 * MIB, BLOCK * N)),
        sha(&reversed(&data, BLOCK, N))
    );

    // A bare notification.
    me.agent.notify("nixl", b"bye".to_vec()).expect("notify");
    assert_eq!(nixl.ok("notifs 1 20"), format!("kvferry:{}", hex(b"bye")));

    // Memory outside NIXL's registration is refused before anything moves.
    let err = me
        .agent
        .remote_descriptor("nixl", MemKind::Host, nixl.base + 4 * MIB as u64 - 8, 16)
        .expect_err("past the end");
    assert!(matches!(err, NetError::Region(_)), "{err}");
}

#[test]
fn metadata_blobs_exchanged_directly_work_both_ways() {
    if !nixl_installed() {
        return;
    }
    let Some(me) = local("kvferry", pattern(1, MIB), None) else {
        return;
    };
    let mut nixl = NixlPeer::start("nixl", MIB, 2, &[]);
    let blob = nixl.ok("md");
    let blob: Vec<u8> = (0..blob.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&blob[i..i + 2], 16).expect("hex"))
        .collect();
    // NIXL's blob decodes and re-encodes to the same bytes, and loads as a peer.
    let md = kvnet::kvcore::nixl::NixlMetadata::decode(&blob).expect("NIXL metadata");
    assert_eq!(md.encode(), blob);
    assert_eq!(me.agent.load_nixl_metadata(&blob).expect("load"), "nixl");
    assert_eq!(
        nixl.ok(&format!("addmd {}", hex(&me.agent.nixl_metadata()))),
        "kvferry"
    );
    // One contiguous block each way.
    let remote = me
        .agent
        .remote_descriptor("nixl", MemKind::Host, nixl.base, 65536)
        .expect("remote");
    let id = me
        .agent
        .read(&[me.desc(0, 65536)], "nixl", &[remote], None)
        .expect("read");
    me.agent
        .wait(id, Duration::from_secs(30))
        .expect("done")
        .result
        .expect("read ok");
    assert_eq!(me.buf[..65536], pattern(2, 65536)[..]);
    let base = me.buf.as_ptr() as u64 + 65536;
    nixl.ok(&format!("xfer READ kvferry {base} 65536 1 -"));
    assert_eq!(nixl.ok("sha 0 65536"), sha(&pattern(1, 2 * 65536)[65536..]));
}

#[test]
fn a_nixl_peer_dying_mid_transfer_is_an_error_not_a_hang() {
    if !nixl_installed() {
        return;
    }
    const BIG: usize = 512 * MIB;
    // UCX's TCP transport (≈ 0.4 GB/s on loopback) keeps the transfer running long enough to
    // kill the peer in the middle of it.
    let Some(me) = local("kvferry", vec![0u8; BIG], Some("tcp")) else {
        return;
    };
    let mut nixl = NixlPeer::start("nixl", BIG, 4, &[("UCX_TLS", "tcp")]);
    me.agent
        .nixl_fetch_metadata(nixl.side_channel())
        .expect("fetch");
    let block = MIB as u64;
    let n = (BIG / MIB) as u64;
    let remote: Vec<Descriptor> = (0..n)
        .map(|i| {
            me.agent
                .remote_descriptor("nixl", MemKind::Host, nixl.base + i * block, block)
                .expect("remote")
        })
        .collect();
    let ours: Vec<Descriptor> = (0..n).map(|i| me.desc(i * block, block)).collect();
    let t = Instant::now();
    let id = me.agent.read(&ours, "nixl", &remote, None).expect("post");
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        me.agent.poll().is_empty(),
        "the transfer finished within 150 ms: too fast to kill it mid-way on this machine"
    );
    nixl.child.kill().expect("kill the NIXL agent");
    let _ = nixl.child.wait();
    let done = me
        .agent
        .wait(id, Duration::from_secs(60))
        .expect("the transfer ends (no hang)");
    let err = done.result.expect_err("a dead peer fails the transfer");
    eprintln!("after {:.2} s: {err}", t.elapsed().as_secs_f64());
    // Our deadline: the agent timeout plus the time the bytes need at 100 MB/s.
    assert!(t.elapsed() < Duration::from_secs(5 + 6 + 5), "{err}");
}
