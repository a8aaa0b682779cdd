//! Two processes on loopback over the TCP transport: bit-exact reads and writes with
//! notifications, and every fault of the list — a peer killed mid-transfer, malformed and
//! truncated frames, descriptors outside exported memory, a stale region after deregistration,
//! a wrong protocol version, a wrong or missing token — each an error in bounded time, while
//! the agent keeps serving its other peers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kvnet::kvcore::auth::{Role, Transcript};
use kvnet::kvcore::wire::{
    Challenge, Hello, Kind, Message, Op, Proof, TransferNotice, PROTOCOL_VERSION,
};
use kvnet::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvnet::{Agent, AgentConfig, NetError};

mod common;

use common::{pattern, Peer};

/// A local agent with one registered buffer.
struct Local {
    agent: Agent,
    region: RegionId,
    buf: Vec<u8>,
}

impl Local {
    fn new(name: &str, bytes: usize, token: Option<&str>) -> Local {
        let mut cfg = AgentConfig::new(name);
        cfg.token = token.map(str::to_string);
        cfg.timeout = Duration::from_secs(5);
        cfg.transports = vec![kvnet::TransportKind::Tcp];
        let agent = Agent::new(cfg).expect("agent");
        let mut buf = vec![0u8; bytes];
        // SAFETY: `buf` is only read by the test after transfers complete, and the struct drops
        // the agent (field order) before the buffer.
        let region = unsafe {
            agent.register(Region {
                kind: MemKind::Host,
                base: buf.as_mut_ptr() as u64,
                len: bytes as u64,
            })
        }
        .expect("register");
        Local { agent, region, buf }
    }

    fn desc(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor {
            region: self.region,
            offset,
            len,
        }
    }

    fn wait(&self, id: u64) -> Result<u64, NetError> {
        self.agent
            .wait(id, Duration::from_secs(60))
            .expect("transfer finishes in bounded time")
            .result
    }
}

#[test]
fn reads_and_writes_are_bit_exact_with_notifications() {
    let mut p = Peer::start("prefill", 32 << 20, 7, &[], &[]);
    let mut l = Local::new("decode", 32 << 20, None);
    let name = l.agent.connect(p.addr).expect("handshake");
    assert_eq!(name, "prefill");
    // Scattered 256 KiB blocks, in a shuffled order.
    let bs = 256 << 10;
    let order: Vec<u64> = (0..64).map(|i| (i * 37) % 128).collect();
    let local: Vec<_> = (0..64).map(|i| l.desc(i * bs, bs)).collect();
    let remote: Vec<_> = order.iter().map(|&b| p.desc(b * bs, bs)).collect();
    let id = l
        .agent
        .read(&local, "prefill", &remote, Some(b"req-1 done".to_vec()))
        .expect("posted");
    assert_eq!(l.wait(id).expect("read"), 64 * bs);
    for (i, &b) in order.iter().enumerate() {
        let got = &l.buf[(i as u64 * bs) as usize..((i as u64 + 1) * bs) as usize];
        assert!(
            got.iter()
                .enumerate()
                .all(|(k, &x)| x == pattern(7, b * bs + k as u64)),
            "block {i}"
        );
    }
    assert_eq!(p.line(), "NOTIF decode req-1 done");

    // Push: write our bytes into the peer, then read them back.
    for (i, x) in l.buf.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let id = l
        .agent
        .write(
            &[l.desc(0, 1 << 20)],
            "prefill",
            &[p.desc(5 << 20, 1 << 20)],
            None,
        )
        .expect("posted");
    l.wait(id).expect("write");
    let id = l
        .agent
        .read(
            &[l.desc(8 << 20, 1 << 20)],
            "prefill",
            &[p.desc(5 << 20, 1 << 20)],
            None,
        )
        .expect("posted");
    l.wait(id).expect("read back");
    assert_eq!(l.buf[..1 << 20], l.buf[8 << 20..9 << 20]);

    // Notifications both ways, outside transfers.
    let line = p.command(&format!("connect {}", l.agent.listen_addr()));
    assert_eq!(line, "CONNECTED decode");
    assert_eq!(p.command("notify decode hello back"), "NOTIFIED");
    let n = l.agent.wait_notifications(Duration::from_secs(5));
    assert_eq!(
        (n[0].from.as_str(), n[0].payload.as_slice()),
        ("prefill", &b"hello back"[..])
    );
}

#[test]
fn a_peer_killed_mid_transfer_gives_errors_and_other_peers_still_work() {
    let mut doomed = Peer::start("doomed", 128 << 20, 1, &[], &[]);
    let good = Peer::start("good", 8 << 20, 2, &[], &[]);
    let l = Local::new("decode", 128 << 20, None);
    l.agent.connect(doomed.addr).expect("handshake");
    l.agent.connect(good.addr).expect("handshake");
    let remote = [doomed.desc(0, 128 << 20)];
    // Eight reads of 16 MiB each into their own slice of the buffer (reads into the same bytes
    // at once are refused: see below).
    let ids: Vec<_> = (0..8)
        .map(|i| {
            let mine = [l.desc(i * (16 << 20), 16 << 20)];
            let theirs = [doomed.desc(i * (16 << 20), 16 << 20)];
            l.agent
                .read(&mine, "doomed", &theirs, None)
                .expect("posted")
        })
        .collect();
    let again = l.agent.read(
        &[l.desc(4096, 4096)],
        "doomed",
        &[doomed.desc(0, 4096)],
        None,
    );
    assert!(
        matches!(&again, Err(NetError::Descriptors(m)) if m.contains("in flight")),
        "two transfers writing the same bytes at once: {again:?}"
    );
    std::thread::sleep(Duration::from_millis(30));
    doomed.child.kill().expect("kill");
    let t = Instant::now();
    let results: Vec<_> = ids.iter().map(|&id| l.wait(id)).collect();
    assert!(
        results.iter().any(|r| r.is_err()),
        "transfers in flight when the peer died must fail"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "errors arrive in bounded time"
    );
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(r, NetError::Io { .. } | NetError::Timeout { .. }),
            "{r}"
        );
    }
    let id = l
        .agent
        .read(&[l.desc(0, 4096)], "doomed", &[remote[0]], None);
    if let Ok(id) = id {
        assert!(l.wait(id).is_err(), "a dead peer cannot serve");
    }
    let id = l
        .agent
        .read(
            &[l.desc(0, 8 << 20)],
            "good",
            &[good.desc(0, 8 << 20)],
            None,
        )
        .expect("posted");
    l.wait(id).expect("the other peer still serves");
}

#[test]
fn descriptors_outside_exports_and_stale_regions_are_refused() {
    let mut p = Peer::start("prefill", 1 << 20, 3, &[], &[]);
    let l = Local::new("decode", 1 << 20, None);
    l.agent.connect(p.addr).expect("handshake");
    // Caught before anything is sent.
    let err = l
        .agent
        .read(
            &[l.desc(0, 4096)],
            "prefill",
            &[p.desc((1 << 20) - 100, 4096)],
            None,
        )
        .expect_err("outside");
    assert!(matches!(err, NetError::Region(_)), "{err}");
    let err = l
        .agent
        .read(&[l.desc(0, 4096)], "prefill", &[p.desc(0, 4000)], None)
        .expect_err("unequal pair");
    assert!(matches!(err, NetError::Descriptors(_)), "{err}");
    assert!(matches!(
        l.agent.read(&[], "nobody", &[], None),
        Err(NetError::UnknownPeer(_))
    ));
    // The peer deregisters and re-publishes its metadata: we then refuse the region ourselves.
    let stale = l.agent.peer_metadata("prefill").expect("loaded");
    assert_eq!(p.command("dereg"), "DEREG");
    let t = Instant::now();
    while l
        .agent
        .peer_metadata("prefill")
        .is_some_and(|m| !m.regions.is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the peer's update arrives"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = l
        .agent
        .read(&[l.desc(0, 4096)], "prefill", &[p.desc(0, 4096)], None);
    assert!(matches!(err, Err(NetError::Region(_))), "{err:?}");
    // A stale view (an update still in flight): the peer itself refuses reads and writes.
    l.agent
        .load_remote(&Message::Metadata(stale).encode())
        .expect("old metadata loads");
    let id = l
        .agent
        .read(&[l.desc(0, 4096)], "prefill", &[p.desc(0, 4096)], None)
        .expect("posted on stale metadata");
    let err = l.wait(id).expect_err("stale region");
    assert!(
        matches!(&err, NetError::Remote { message, .. } if message.contains("not registered")),
        "{err}"
    );
    // The peer's update may land again meanwhile (a publish that had to dial sends its
    // metadata in the handshake and once more after it): then we refuse it ourselves.
    match l
        .agent
        .write(&[l.desc(0, 4096)], "prefill", &[p.desc(0, 4096)], None)
    {
        // Refused by the peer, or by us on a fresh connection whose handshake showed the
        // exports changed.
        Ok(id) => assert!(matches!(
            l.wait(id),
            Err(NetError::Remote { .. }) | Err(NetError::Unavailable(_))
        )),
        Err(e) => assert!(matches!(e, NetError::Region(_)), "{e}"),
    }
    l.agent
        .notify("prefill", b"still here".to_vec())
        .expect("connection still works");
    assert_eq!(p.line(), "NOTIF decode still here");
}

/// A raw client speaking kvcore frames by hand, to send what a well-behaved agent never would.
fn raw_handshake(
    addr: SocketAddr,
    name: &str,
    version: u16,
    token: Option<&[u8]>,
) -> (common::RawConn, Message) {
    let (c, reply) = common::RawConn::dial(addr, name, version, token);
    (c, reply.expect("an answer to the hello"))
}

fn read_frame(s: &mut TcpStream) -> Message {
    common::read_plain(s).expect("valid frame")
}

#[test]
fn malformed_frames_and_bad_handshakes_are_refused_and_serving_goes_on() {
    let p = Peer::start("prefill", 1 << 20, 4, &["--token", "s3cret"], &[]);
    // Garbage, then a truncated frame: the peer drops those connections.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &Message::Hello(Hello {
            name: "x".into(),
            protocol_version: PROTOCOL_VERSION,
            nonce: [0; 32],
            proof: vec![],
        })
        .encode()[..9],
    ] {
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let _ = read_frame(&mut s); // the challenge
        s.write_all(junk).expect("send");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_ok() && rest.is_empty() || r.is_err(),
            "nothing is served to a bad frame"
        );
    }
    // Wrong protocol version: refused with a message naming both versions.
    let (_, reply) = raw_handshake(p.addr, "old", 99, Some(b"s3cret"));
    match reply {
        Message::Completion(c) => assert!(format!("{c:?}").contains("99"), "{c:?}"),
        m => panic!("expected a refusal, got {:?}", m.kind()),
    }
    // Wrong token and no token: refused.
    for tok in [Some(&b"guess"[..]), None] {
        let (_, reply) = raw_handshake(p.addr, "intruder", PROTOCOL_VERSION, tok);
        assert!(
            matches!(reply, Message::Completion(_)),
            "refused: {:?}",
            reply.kind()
        );
    }
    let wrong = Local::new("decode", 4096, Some("guess"));
    let err = wrong.agent.connect(p.addr).expect_err("wrong token");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // A correctly authenticated raw client forging a descriptor outside the export.
    let (mut s, reply) = raw_handshake(p.addr, "forger", PROTOCOL_VERSION, Some(b"s3cret"));
    assert_eq!(
        reply.kind(),
        Kind::Proof,
        "the listener proves itself first"
    );
    let reply = s.recv().expect("sealed metadata");
    assert_eq!(reply.kind(), Kind::Metadata);
    let Message::Metadata(md) = reply else {
        unreachable!()
    };
    let mut mine = md.clone();
    mine.name = "forger".into();
    mine.regions.clear();
    mine.caches.clear();
    mine.endpoints.clear();
    s.send(&Message::Metadata(mine)).expect("send");
    let forged = TransferNotice {
        transfer_id: 1,
        op: Op::Read,
        initiator: "forger".into(),
        descriptors: vec![Descriptor {
            region: p.region,
            offset: p.bytes - 10,
            len: 4096,
        }],
        notification: None,
    };
    s.send(&Message::Transfer(forged)).expect("send");
    match s.recv().expect("sealed answer") {
        Message::Completion(c) => assert!(format!("{c:?}").contains("runs past"), "{c:?}"),
        m => panic!("expected a refusal, got {:?}", m.kind()),
    }
    // And the right token still works.
    let ok = Local::new("decode", 1 << 20, Some("s3cret"));
    ok.agent.connect(p.addr).expect("authenticated");
    let id = ok
        .agent
        .read(
            &[ok.desc(0, 1 << 20)],
            "prefill",
            &[p.desc(0, 1 << 20)],
            None,
        )
        .expect("posted");
    ok.wait(id).expect("served");
    assert!(ok
        .buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern(4, i as u64)));
}

#[test]
fn device_memory_is_refused_where_no_cuda_transport_can_move_it() {
    let local = Local::new("gpu-less", 4096, None);
    // SAFETY: refused before anything would touch the (fake) device address.
    let r = unsafe {
        local.agent.register(Region {
            kind: MemKind::Device { ordinal: 0 },
            base: 1 << 40,
            len: 1 << 20,
        })
    };
    let e = r.expect_err("no CUDA transport here");
    assert!(!local.agent.device_memory());
    let msg = e.to_string();
    assert!(
        msg.contains("device memory") && msg.contains("pinned DRAM"),
        "{msg}"
    );
}

#[test]
fn connections_the_peer_closed_are_redialed_and_a_restarted_peer_is_not_read_blindly() {
    // The serving side closes idle connections after 100 ms.
    let mut cfg = AgentConfig::new("restarting");
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    cfg.idle_timeout = Duration::from_millis(100);
    let mut first_buf = vec![1u8; 1 << 20];
    let first = Agent::new(cfg.clone()).expect("agent");
    let port = first.listen_addr().port();
    // SAFETY: `first_buf` is declared before `first`, so it outlives it.
    let region = unsafe {
        first.register(Region {
            kind: MemKind::Host,
            base: first_buf.as_mut_ptr() as u64,
            len: first_buf.len() as u64,
        })
    }
    .expect("register");
    let l = Local::new("reader", 1 << 20, None);
    l.agent.connect(first.listen_addr()).expect("handshake");
    let read = |l: &Local| {
        let remote = Descriptor {
            region,
            offset: 0,
            len: 4096,
        };
        let id = l
            .agent
            .read(&[l.desc(0, 4096)], "restarting", &[remote], None)
            .expect("posted");
        l.wait(id)
    };
    assert_eq!(read(&l).expect("first read"), 4096);
    // Every pooled connection is closed by the peer while idle: reads redial, not fail.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(read(&l).expect("read after an idle close"), 4096);
        assert!(l.buf[..4096].iter().all(|&b| b == 1));
    }
    // The peer restarts on the same port under the same name, with other memory: the
    // transfer planned on its old metadata fails (never lands in whatever sits there now),
    // and the next one, on the metadata learnt meanwhile, reads the new memory.
    drop(first);
    drop(first_buf);
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    // Twice the size: its exports differ even if the allocator hands back the same address.
    let mut buf = vec![2u8; 2 << 20];
    let again = Agent::new(cfg).expect("same port");
    // SAFETY: `buf` is declared before `again`, so it outlives it.
    let id = unsafe {
        again.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: buf.len() as u64,
        })
    }
    .expect("register");
    assert_eq!(id, region, "the restarted peer exports under the same id");
    let err = read(&l).expect_err("planned on the old exports");
    assert!(err.to_string().contains("changed its exports"), "{err}");
    assert_eq!(read(&l).expect("read after the restart"), 4096);
    assert!(l.buf[..4096].iter().all(|&b| b == 2));
}

/// A listener that does not hold the token (or relays a wrong proof): the dialer refuses it
/// and sends it nothing about itself — no metadata, no keys, no addresses.
#[test]
fn a_dialer_with_a_token_refuses_a_listener_that_cannot_prove_it() {
    for proof in [Vec::new(), vec![0xAB; 32]] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let fake = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(
                &Message::Challenge(Challenge {
                    nonce: [3; 32],
                    name: "prefill".into(),
                })
                .encode(),
            )
            .expect("challenge");
            let hello = read_frame(&mut s);
            assert_eq!(hello.kind(), Kind::Hello);
            s.write_all(&Message::Proof(Proof { proof }).encode())
                .expect("proof");
            // Whatever the dialer sends now: it must not be its metadata.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest
        });
        let c = Local::new("decode", 4096, Some("s3cret"));
        let err = c.agent.connect(addr).expect_err("an unproven listener");
        assert!(matches!(err, NetError::Auth { .. }), "{err}");
        let sent = fake.join().expect("fake listener");
        assert!(
            sent.is_empty(),
            "the dialer sent {} bytes after a bad proof",
            sent.len()
        );
    }
}

/// The listener's own challenge reflected back at it: a proof for the dialer role never passes
/// as the listener's, so an agent cannot be made to authenticate to itself.
#[test]
fn reflected_and_replayed_proofs_are_refused() {
    let p = Peer::start("prefill", 1 << 20, 4, &["--token", "s3cret"], &[]);
    // Replay: a proof made for one challenge, sent against another.
    let mut s1 = TcpStream::connect(p.addr).expect("connect");
    s1.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let Message::Challenge(c1) = read_frame(&mut s1) else {
        panic!("challenge")
    };
    let nonce = [9u8; 32];
    let old = Transcript {
        listener_nonce: &c1.nonce,
        dialer_nonce: &nonce,
        listener_name: &c1.name,
        dialer_name: "decode",
    }
    .mac(b"s3cret", Role::Dialer)
    .expect("mac");
    let mut s2 = TcpStream::connect(p.addr).expect("connect");
    s2.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let Message::Challenge(c2) = read_frame(&mut s2) else {
        panic!("challenge")
    };
    assert_ne!(c1.nonce, c2.nonce, "every connection gets a fresh nonce");
    for proof in [old.to_vec(), {
        // Reflection: the listener's role proof for this very transcript.
        Transcript {
            listener_nonce: &c2.nonce,
            dialer_nonce: &nonce,
            listener_name: &c2.name,
            dialer_name: "decode",
        }
        .mac(b"s3cret", Role::Listener)
        .expect("mac")
        .to_vec()
    }] {
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let Message::Challenge(_) = read_frame(&mut s) else {
            panic!("challenge")
        };
        s.write_all(
            &Message::Hello(Hello {
                name: "decode".into(),
                protocol_version: PROTOCOL_VERSION,
                nonce,
                proof,
            })
            .encode(),
        )
        .expect("send");
        assert!(
            matches!(read_frame(&mut s), Message::Completion(_)),
            "a replayed or reflected proof was accepted"
        );
    }
    drop((s1, s2));
}

#[test]
fn listening_beyond_loopback_without_a_token_is_refused_unless_insecure_is_said() {
    let mut cfg = AgentConfig::new("open");
    cfg.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    let err = match Agent::new(cfg.clone()) {
        Ok(_) => panic!("an unauthenticated agent listened on every interface"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("without a token"), "{err}");
    cfg.token = Some(String::new());
    assert!(Agent::new(cfg.clone()).is_err(), "an empty token");
    cfg.token = Some("s3cret".into());
    Agent::new(cfg.clone()).expect("with a token");
    cfg.token = None;
    cfg.insecure = true;
    Agent::new(cfg).expect("insecure, said out loud");
}

/// A relay between an agent and its peer that flips one byte the peer sends, `at` bytes into
/// the connection (past the handshake): an attacker on the path who can rewrite traffic.
fn tampering_relay(peer: SocketAddr, at: usize) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let server = TcpStream::connect(peer).expect("connect");
        let (mut c2, mut s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
        });
        let (mut from, mut to) = (server, client);
        let mut seen = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= at && at < seen + n {
                buf[at - seen] ^= 0x01;
            }
            seen += n;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

#[test]
fn bytes_altered_on_the_path_fail_the_transfer_instead_of_landing_as_read() {
    let p = Peer::start("prefill", 1 << 20, 6, &["--token", "s3cret"], &[]);
    let relay = tampering_relay(p.addr, 256 << 10);
    let mut cfg = AgentConfig::new("decode");
    cfg.token = Some("s3cret".into());
    cfg.timeout = Duration::from_secs(5);
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    // One connection, so the transfer takes the relayed one the handshake left in the pool.
    cfg.connections_per_peer = 1;
    let agent = Agent::new(cfg).expect("agent");
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: `buf` outlives the agent (dropped first below) and is read after the transfer.
    let region = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: 1 << 20,
        })
    }
    .expect("register");
    // The relay forwards the handshake untouched: both sides authenticate.
    assert_eq!(agent.connect(relay).expect("handshake"), "prefill");
    let l = [Descriptor {
        region,
        offset: 0,
        len: 1 << 20,
    }];
    let id = agent
        .read(&l, "prefill", &[p.desc(0, 1 << 20)], None)
        .expect("posted");
    let r = agent
        .wait(id, Duration::from_secs(30))
        .expect("bounded")
        .result;
    let e = r.expect_err("a flipped bit in the data is caught, never reported as read");
    assert!(e.to_string().contains("seal"), "{e}");
    // A fresh connection (not relayed) reads the same bytes intact.
    let id = agent
        .read(&l, "prefill", &[p.desc(0, 1 << 20)], None)
        .expect("posted");
    agent
        .wait(id, Duration::from_secs(30))
        .expect("bounded")
        .result
        .expect("read");
    drop(agent);
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern(6, i as u64)));
}

#[test]
fn a_replayed_or_unsealed_frame_ends_the_connection_and_is_never_acted_on() {
    let mut p = Peer::start("prefill", 4096, 2, &["--token", "s3cret"], &[]);
    for attack in ["replay", "unsealed", "bad tag"] {
        let (mut c, reply) = raw_handshake(p.addr, "raw", PROTOCOL_VERSION, Some(b"s3cret"));
        assert_eq!(reply.kind(), Kind::Proof);
        let Some(Message::Metadata(mut md)) = c.recv() else {
            panic!("sealed metadata")
        };
        md.name = "raw".into();
        md.regions.clear();
        md.caches.clear();
        md.endpoints.clear();
        c.send(&Message::Metadata(md)).expect("metadata");
        let note = |text: &str| {
            Message::Notification(kvnet::kvcore::wire::Notification {
                from: "raw".into(),
                payload: text.as_bytes().to_vec(),
            })
        };
        let frame = c.frame(&note("first"));
        c.stream.write_all(&frame).expect("send");
        assert_eq!(p.line(), "NOTIF raw first");
        let bad = match attack {
            "replay" => frame,
            "unsealed" => note("unsealed").encode(),
            _ => {
                let mut f = c.frame(&note("tampered"));
                let n = f.len();
                f[n - 1] ^= 1;
                f
            }
        };
        c.stream.write_all(&bad).expect("send");
        // The peer closes the connection instead of acting on it.
        let mut rest = Vec::new();
        let _ = c.stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{attack}: nothing is answered");
        // The next thing the peer prints is a legitimate notification, not the attack's.
        let ok = Local::new("decode", 4096, Some("s3cret"));
        ok.agent.connect(p.addr).expect("authenticated");
        ok.agent
            .notify("prefill", format!("after {attack}").into_bytes())
            .expect("notify");
        assert_eq!(p.line(), format!("NOTIF decode after {attack}"), "{attack}");
    }
}

/// Rust users call the agent from async code too: its blocking calls must not panic there
/// (tokio refuses to block a runtime's thread), they wait on a thread of their own.
#[test]
fn the_blocking_api_works_from_inside_a_tokio_runtime() {
    let mut p = Peer::start("prefill", 1 << 16, 9, &["--token", "s3cret"], &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = rt.block_on(async {
        let local = Local::new("decode", 1 << 16, Some("s3cret"));
        assert_eq!(local.agent.connect(p.addr).expect("connect"), "prefill");
        local
            .agent
            .notify("prefill", b"from async".to_vec())
            .expect("notify");
        let id = local
            .agent
            .read(
                &[local.desc(0, 1 << 16)],
                "prefill",
                &[p.desc(0, 1 << 16)],
                None,
            )
            .expect("posted");
        local.wait(id).expect("read");
        local.agent.publish();
        local
    });
    assert_eq!(p.line(), "NOTIF decode from async");
    assert!(local
        .buf
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern(9, i as u64)));
}

/// A peer's READ of some bytes, then at once its WRITE of the same bytes, and again: each is
/// served. The peer can see a READ complete a moment before our task serving it lets go of its
/// claim on those bytes (a WRITE's claim is released before its completion goes out); that
/// claim ends by itself, so the next transfer waits for it instead of being refused. Timing
/// decides whether a round meets the window (`kvferry-bench net` met it about once in 500
/// transfers on a 2-core machine), so this is a stress run, not a reproduction.
#[test]
fn a_write_right_after_a_read_of_the_same_bytes_is_served() {
    let p = Peer::start("prefill", 16 << 20, 5, &[], &[]);
    let local = Local::new("decode", 16 << 20, None);
    local.agent.connect(p.addr).expect("connect");
    // Eight 2 MiB blocks per transfer: spread over the agent's four connections, so the WRITE's
    // parts land on connections other than the ones that served the READ's.
    for i in 0..60u64 {
        let l: Vec<_> = (0..8).map(|b| local.desc(b << 21, 2 << 20)).collect();
        let r: Vec<_> = (0..8).map(|b| p.desc(b << 21, 2 << 20)).collect();
        let id = local.agent.read(&l, "prefill", &r, None).expect("read");
        local
            .wait(id)
            .unwrap_or_else(|e| panic!("round {i}: the read: {e}"));
        let id = local.agent.write(&l, "prefill", &r, None).expect("write");
        local
            .wait(id)
            .unwrap_or_else(|e| panic!("round {i}: the write right after the read: {e}"));
    }
}

/// An agent bound to every interface (what an engine in a pod does) publishes `0.0.0.0:port`,
/// which no peer can dial from elsewhere: a peer keeps the address it reached it on instead,
/// for the connections it opens later (and the agent likewise for the dialer's).
#[test]
fn a_peer_listening_on_every_interface_is_dialed_where_it_was_reached() {
    let mut cfg = AgentConfig::new("prefill");
    cfg.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    cfg.token = Some("s3cret".into());
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    let pre = Agent::new(cfg).expect("listens on every interface with a token");
    let port = pre.listen_addr().port();
    let dec = Local::new("decode", 4096, Some("s3cret"));
    let name = dec
        .agent
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("connect");
    let md = dec.agent.peer_metadata(&name).expect("loaded");
    let tcp = md
        .endpoints
        .iter()
        .find(|e| e.transport == "tcp")
        .expect("a tcp endpoint");
    assert_eq!(
        std::str::from_utf8(&tcp.address).expect("utf-8"),
        format!("127.0.0.1:{port}")
    );
}

/// A notification on a pooled connection the peer closed as idle (after its own
/// `idle_timeout`) is not lost: the first write to such a connection succeeds, so the pool checks
/// for the peer's close before it reuses one.
#[test]
fn a_notification_after_the_peer_closed_the_idle_connection_arrives() {
    let mut cfg = AgentConfig::new("prefill");
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    cfg.idle_timeout = Duration::from_millis(100);
    let pre = Agent::new(cfg).expect("agent");
    let dec = Local::new("decode", 4096, None);
    dec.agent.connect(pre.listen_addr()).expect("connect");
    for i in 0..3 {
        // Longer than the peer's idle timeout: it closed the pooled connection.
        std::thread::sleep(Duration::from_millis(400));
        let text = format!("after idle {i}");
        dec.agent
            .notify("prefill", text.clone().into_bytes())
            .expect("notify");
        let got = pre.wait_notifications(Duration::from_secs(10));
        assert!(
            got.iter()
                .any(|n| n.from == "decode" && n.payload == text.as_bytes()),
            "round {i}: {got:?}"
        );
    }
}

/// A CallHandler runs on the agent's network runtime; an agent call it makes from there is
/// refused with an error rather than blocking a worker of the runtime that must carry it (two
/// such calls at once would stop the runtime for good).
#[test]
fn agent_calls_from_the_agents_own_network_thread_are_refused_not_hung() {
    use std::sync::{Arc, OnceLock};
    let mut cfg = AgentConfig::new("prefill");
    cfg.transports = vec![kvnet::TransportKind::Tcp];
    let pre = Arc::new(Agent::new(cfg).expect("agent"));
    let me: Arc<OnceLock<std::sync::Weak<Agent>>> = Arc::new(OnceLock::new());
    let _ = me.set(Arc::downgrade(&pre));
    let slot = me.clone();
    pre.set_call_handler(Arc::new(move |peer: &str, _payload: &[u8]| {
        let Some(agent) = slot.get().and_then(|w| w.upgrade()) else {
            return b"gone".to_vec();
        };
        match agent.notify(peer, b"from the handler".to_vec()) {
            Ok(()) => b"sent".to_vec(),
            Err(e) => format!("refused: {e}").into_bytes(),
        }
    }));
    let dec = Local::new("decode", 4096, None);
    dec.agent.connect(pre.listen_addr()).expect("connect");
    let reply = dec.agent.call("prefill", b"go".to_vec()).expect("answered");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(
        reply.starts_with("refused:") && reply.contains("network runtime"),
        "{reply}"
    );
}
