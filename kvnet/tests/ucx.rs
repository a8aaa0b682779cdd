//! Two processes on loopback over UCX (shared memory / cma, and UCX's TCP transport), when a
//! libucp can be loaded; the tests say so and skip otherwise.

use std::io::Write;
use std::time::{Duration, Instant};

use kvnet::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvnet::{Agent, AgentConfig, NetError, TransportKind};

mod common;

use common::{pattern, Peer};

fn ucx_peer(name: &str, bytes: u64, seed: u64, tls: &str) -> Peer {
    Peer::start(
        name,
        bytes,
        seed,
        &["--transports", "ucx,tcp"],
        &[("UCX_TLS", tls), ("UCX_NET_DEVICES", "lo")],
    )
}

fn local(name: &str, bytes: usize) -> Option<(Agent, RegionId, Vec<u8>)> {
    let mut cfg = AgentConfig::new(name);
    cfg.transports = vec![TransportKind::Ucx];
    cfg.timeout = Duration::from_secs(5);
    let agent = Agent::new(cfg).expect("agent");
    if agent.ucx_library().is_none() {
        eprintln!(
            "SKIP: no usable libucp on this machine (install libucx0 or set KVFERRY_UCX_LIB)"
        );
        return None;
    }
    let mut buf = vec![0u8; bytes];
    // SAFETY: the buffer is returned alongside the agent; callers drop the agent first and read
    // the buffer only after transfers complete.
    let region = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: bytes as u64,
        })
    }
    .expect("register");
    Some((agent, region, buf))
}

/// UCX reads its settings from the environment when an agent starts: one test at a time.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn round_trip(tls: &str) {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("UCX_TLS", tls);
    std::env::set_var("UCX_NET_DEVICES", "lo");
    let Some((agent, region, mut buf)) = local("decode", 16 << 20) else {
        return;
    };
    let mut p = ucx_peer("prefill", 16 << 20, 11, tls);
    assert_eq!(agent.connect(p.addr).expect("handshake"), "prefill");
    assert_eq!(agent.transport_for("prefill"), Some(TransportKind::Ucx));
    let bs: u64 = 256 << 10;
    let order: Vec<u64> = (0..32).map(|i| (i * 13) % 64).collect();
    let l: Vec<_> = (0..32)
        .map(|i| Descriptor {
            region,
            offset: i * bs,
            len: bs,
        })
        .collect();
    let r: Vec<_> = order.iter().map(|&b| p.desc(b * bs, bs)).collect();
    let id = agent
        .read(&l, "prefill", &r, Some(b"pulled".to_vec()))
        .expect("posted");
    let done = agent.wait(id, Duration::from_secs(30)).expect("completes");
    assert_eq!(done.result.expect("read"), 32 * bs);
    for (i, &b) in order.iter().enumerate() {
        let got = &buf[(i as u64 * bs) as usize..((i as u64 + 1) * bs) as usize];
        assert!(
            got.iter()
                .enumerate()
                .all(|(k, &x)| x == pattern(11, b * bs + k as u64)),
            "{tls}: block {i}"
        );
    }
    assert_eq!(p.line(), "NOTIF decode pulled");
    // Push, then pull back.
    for (i, x) in buf.iter_mut().enumerate() {
        *x = (i % 253) as u8;
    }
    let id = agent
        .write(
            &[Descriptor {
                region,
                offset: 0,
                len: 1 << 20,
            }],
            "prefill",
            &[p.desc(4 << 20, 1 << 20)],
            Some(b"pushed".to_vec()),
        )
        .expect("posted");
    agent
        .wait(id, Duration::from_secs(30))
        .expect("completes")
        .result
        .expect("write");
    assert_eq!(p.line(), "NOTIF decode pushed");
    let id = agent
        .read(
            &[Descriptor {
                region,
                offset: 8 << 20,
                len: 1 << 20,
            }],
            "prefill",
            &[p.desc(4 << 20, 1 << 20)],
            None,
        )
        .expect("posted");
    agent
        .wait(id, Duration::from_secs(30))
        .expect("completes")
        .result
        .expect("read back");
    assert_eq!(buf[..1 << 20], buf[8 << 20..9 << 20], "{tls}");
    // The peer notifies us: over the side channel, whatever carries the data (a UCX active
    // message names no authenticated sender).
    writeln!(p.stdin, "connect {}", agent.listen_addr()).expect("cmd");
    assert_eq!(p.line(), "CONNECTED decode");
    writeln!(p.stdin, "notify decode over ucx").expect("cmd");
    assert_eq!(p.line(), "NOTIFIED");
    let n = agent.wait_notifications(Duration::from_secs(5));
    assert_eq!(
        n.first().map(|n| n.payload.as_slice()),
        Some(&b"over ucx"[..])
    );
    drop(agent);
    drop(buf);
}

/// A UCX active message carries whatever sender name its author wrote, and UCX's wire-up
/// authenticates nobody: whoever learns our worker address (it is in our metadata, and on the
/// fabric) can send one. Such a notification must never count as coming from a kvferry peer we
/// authenticated; only a stock NIXL agent we chose to load may notify us that way.
#[test]
fn a_ucx_notification_under_an_authenticated_peers_name_is_dropped() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("UCX_TLS", "sm,tcp,self");
    std::env::set_var("UCX_NET_DEVICES", "lo");
    let Some((agent, _region, buf)) = local("decode", 1 << 20) else {
        return;
    };
    let mut p = ucx_peer("prefill", 1 << 20, 3, "sm,tcp,self");
    assert_eq!(agent.connect(p.addr).expect("handshake"), "prefill");
    let ucx_agent = |name: &str| {
        let mut cfg = AgentConfig::new(name);
        cfg.transports = vec![TransportKind::Ucx];
        Agent::new(cfg).expect("agent")
    };
    // NIXL interop is on here (we load a stock NIXL agent), so NIXL-shaped notifications are
    // taken, but never under a kvferry peer's name.
    let nixl = ucx_agent("nixl-peer");
    agent
        .load_nixl_metadata(&nixl.nixl_metadata())
        .expect("load the NIXL peer");
    // The impostor takes the authenticated peer's name and our NIXL-shaped metadata (worker
    // address only), and notifies us over UCX as a NIXL agent would.
    let impostor = ucx_agent("prefill");
    let us = impostor
        .load_nixl_metadata(&agent.nixl_metadata())
        .expect("our metadata");
    impostor
        .notify(&us, b"forged release".to_vec())
        .expect("UCX sends it");
    // The NIXL agent gets through the same way: the channel works, so the silence below is
    // the refusal.
    let us = nixl
        .load_nixl_metadata(&agent.nixl_metadata())
        .expect("our metadata");
    nixl.notify(&us, b"genuine".to_vec()).expect("sent");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got
        .iter()
        .any(|n: &kvnet::kvcore::wire::Notification| n.from == "nixl-peer")
        && Instant::now() < deadline
    {
        got.extend(agent.wait_notifications(Duration::from_millis(100)));
    }
    // The forged one was sent first; give it as long again to (not) arrive.
    got.extend(agent.wait_notifications(Duration::from_millis(500)));
    assert!(
        got.iter()
            .any(|n| n.from == "nixl-peer" && n.payload == b"genuine"),
        "the loaded NIXL peer's notification arrives: {got:?}"
    );
    assert!(
        !got.iter().any(|n| n.from == "prefill"),
        "a UCX message claiming an authenticated peer's name is dropped: {got:?}"
    );
    // The real peer still notifies us (over the side channel).
    writeln!(p.stdin, "connect {}", agent.listen_addr()).expect("cmd");
    assert_eq!(p.line(), "CONNECTED decode");
    writeln!(p.stdin, "notify decode genuine").expect("cmd");
    assert_eq!(p.line(), "NOTIFIED");
    let n = agent.wait_notifications(Duration::from_secs(5));
    assert!(n
        .iter()
        .any(|n| n.from == "prefill" && n.payload == b"genuine"));
    drop((agent, impostor, nixl));
    drop(buf);
}

#[test]
fn shared_memory_round_trip_is_bit_exact() {
    round_trip("sm,tcp,self");
}

#[test]
fn ucx_tcp_round_trip_is_bit_exact() {
    round_trip("tcp,self");
}

#[test]
fn a_dead_ucx_peer_fails_transfers_in_bounded_time() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("UCX_TLS", "tcp,self");
    std::env::set_var("UCX_NET_DEVICES", "lo");
    let Some((agent, region, buf)) = local("decode", 64 << 20) else {
        return;
    };
    let mut p = ucx_peer("doomed", 64 << 20, 5, "tcp,self");
    agent.connect(p.addr).expect("handshake");
    // Eight reads into their own 8 MiB slices (two transfers may not write the same bytes).
    let ids: Vec<_> = (0..8u64)
        .map(|i| {
            let l = [Descriptor {
                region,
                offset: i * (8 << 20),
                len: 8 << 20,
            }];
            let r = [p.desc(i * (8 << 20), 8 << 20)];
            agent.read(&l, "doomed", &r, None).expect("posted")
        })
        .collect();
    // Killed at once: callers now post (and progress) UCX themselves, so a pause here would
    // let 64 MiB over loopback finish before the kill.
    p.child.kill().expect("kill");
    let t = Instant::now();
    let results: Vec<_> = ids
        .iter()
        .map(|&id| {
            agent
                .wait(id, Duration::from_secs(60))
                .expect("bounded")
                .result
        })
        .collect();
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(
        results.iter().any(|r| r.is_err()),
        "transfers in flight at the kill fail"
    );
    let l = [Descriptor {
        region,
        offset: 0,
        len: 64 << 20,
    }];
    let r = [p.desc(0, 64 << 20)];
    let id = agent.read(&l, "doomed", &r, None).expect("posted");
    let after = agent
        .wait(id, Duration::from_secs(60))
        .expect("bounded")
        .result;
    assert!(
        matches!(
            after,
            Err(NetError::Io { .. }) | Err(NetError::Timeout { .. })
        ),
        "{after:?}"
    );
    drop(agent);
    drop(buf);
}

/// Callers post and progress UCX themselves now: threads that post at once, some waiting on
/// their transfer (driving the worker) and some polling, each get their own blocks, bit-exact,
/// and every transfer completes exactly once.
#[test]
fn concurrent_callers_driving_ucx_get_their_own_blocks() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("UCX_TLS", "sm,tcp,self");
    std::env::set_var("UCX_NET_DEVICES", "lo");
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 25;
    let bs: u64 = 64 << 10;
    let Some((agent, region, buf)) = local("decode", (THREADS * 8 * bs) as usize) else {
        return;
    };
    let p = ucx_peer("prefill", 64 * bs, 5, "sm,tcp,self");
    assert_eq!(agent.connect(p.addr).expect("handshake"), "prefill");
    assert_eq!(agent.transport_for("prefill"), Some(TransportKind::Ucx));
    let ok = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for th in 0..THREADS {
            let (agent, p, ok) = (&agent, &p, &ok);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    // Thread `th` owns local blocks th*8..th*8+8; the remote blocks move.
                    let l: Vec<_> = (0..8)
                        .map(|i| Descriptor {
                            region,
                            offset: (th * 8 + i) * bs,
                            len: bs,
                        })
                        .collect();
                    let r: Vec<_> = (0..8)
                        .map(|i| p.desc(((round * 7 + th * 8 + i) % 64) * bs, bs))
                        .collect();
                    let id = agent.read(&l, "prefill", &r, None).expect("posted");
                    if th % 2 == 0 {
                        let d = agent.wait(id, Duration::from_secs(30)).expect("completes");
                        assert_eq!(d.result.expect("read"), 8 * bs);
                    } else {
                        // Short waits in a loop, as a caller polling between other work does:
                        // each drives the worker a little, and the UCX thread takes over between.
                        let until = Instant::now() + Duration::from_secs(30);
                        loop {
                            if let Some(d) = agent.wait(id, Duration::from_millis(1)) {
                                assert_eq!(d.result.expect("read"), 8 * bs);
                                break;
                            }
                            assert!(Instant::now() < until, "thread {th} round {round}");
                        }
                    }
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(ok.into_inner(), THREADS * ROUNDS);
    // The last round's blocks are in place, bit-exact.
    let round = ROUNDS - 1;
    for th in 0..THREADS {
        for i in 0..8 {
            let b = (round * 7 + th * 8 + i) % 64;
            let at = ((th * 8 + i) * bs) as usize;
            assert!(
                buf[at..at + bs as usize]
                    .iter()
                    .enumerate()
                    .all(|(k, &x)| x == pattern(5, b * bs + k as u64)),
                "thread {th} block {i}"
            );
        }
    }
    drop(agent);
    drop(buf);
}
