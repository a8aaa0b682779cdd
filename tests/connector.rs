//! The connector state machine with real parts: two connectors on loopback (a prefill engine and
//! a decode engine, host KV caches in vLLM's CPU layout), pulls under leases, offload and onboard
//! through the tiers, a prefill request nobody pulls, a prefill engine that is down, late
//! decoders after the blocks were reused, pulls that fail part-way, offers asked for by key.

use std::time::Duration;

use kvferry::connector::{ConnectorCounters, Finished};
use kvferry::kvnet::TransportKind;
use kvferry::lease::Generations;
use kvferry::prelude::*;
use kvferry::rendezvous::{prompt_digest, Posted};
use kvferry::scheduler::RemotePrefiller;
use kvferry::{Connector, ConnectorConfig, OffloadConfig, PdConfig, PullSpec, RemoteParams};

const BLOCKS: u32 = 64;

fn geometry() -> Geometry {
    Geometry::mha(2, 2, 64, Dtype::F32, 32).expect("geometry")
}

struct Engine {
    conn: Connector,
    cache: Vec<u8>,
    layout: CacheLayout,
}

fn engine(name: &str, offload: bool, pd: bool, seed: u8) -> Engine {
    let lease = Duration::from_millis(300);
    build(
        name,
        geometry(),
        offload,
        pd.then_some((0, lease)),
        (1, 0),
        seed,
    )
}

/// A connector over a host cache of `g` filled from `seed`; `pd`: the listening port (0: any)
/// and the lease.
fn build(
    name: &str,
    g: Geometry,
    offload: bool,
    pd: Option<(u16, Duration)>,
    tp: (u32, u32),
    seed: u8,
) -> Engine {
    build_on(TransportKind::Tcp, name, g, offload, pd, tp, None, seed)
}

#[allow(clippy::too_many_arguments)]
fn build_on(
    transport: TransportKind,
    name: &str,
    g: Geometry,
    offload: bool,
    pd: Option<(u16, Duration)>,
    tp: (u32, u32),
    total_kv_heads: Option<u32>,
    seed: u8,
) -> Engine {
    build_staged(
        transport,
        false,
        name,
        g,
        offload,
        pd,
        tp,
        total_kv_heads,
        seed,
    )
}

/// `build_on`, serving and landing P/D blocks through a staging copy when `staged`.
#[allow(clippy::too_many_arguments)]
fn build_staged(
    transport: TransportKind,
    staged: bool,
    name: &str,
    g: Geometry,
    offload: bool,
    pd: Option<(u16, Duration)>,
    tp: (u32, u32),
    total_kv_heads: Option<u32>,
    seed: u8,
) -> Engine {
    let layout = CacheLayout::named(g, BLOCKS, StrideOrder::Lbhnc).expect("layout");
    let mut cache: Vec<u8> = (0..layout.span_bytes())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let conn = Connector::new(ConnectorConfig {
        engine_id: name.into(),
        offload: offload.then_some(OffloadConfig {
            dram_blocks: 32,
            nvme: None,
            identity: "test-model".into(),
            caller_evicts: false,
            eviction: Default::default(),
            admission: Default::default(),
            write_budget: None,
            nvme_timeout: None,
        }),
        pd: pd.map(|(port, lease)| PdConfig {
            listen: format!("127.0.0.1:{port}").parse().expect("addr"),
            transport,
            token: None,
            insecure: false,
            lease,
            timeout: Duration::from_secs(5),
            staged,
        }),
        tp_size: tp.0,
        tp_rank: tp.1,
        total_kv_heads,
    })
    .expect("connector");
    // SAFETY: `cache` lives in the Engine next to the connector and is only read by the test
    // after the connector reported the transfers finished.
    unsafe { conn.register_cache(layout.clone(), cache.as_mut_ptr()) }.expect("register");
    Engine {
        conn,
        cache,
        layout,
    }
}

impl Engine {
    fn block(&self, b: u32) -> Vec<u8> {
        self.layout
            .block_runs(b)
            .expect("runs")
            .iter()
            .flat_map(|&(o, l)| self.cache[o as usize..(o + l) as usize].to_vec())
            .collect()
    }

    /// Polls until `pred` holds for what accumulated, or panics after 20 s.
    fn until(&self, mut pred: impl FnMut(&Finished) -> bool) -> Finished {
        let mut all = Finished::default();
        for _ in 0..2000 {
            let f = self.conn.poll();
            all.sending.extend(f.sending);
            all.recving.extend(f.recving);
            all.load_errors.extend(f.load_errors);
            all.offers.extend(f.offers);
            if pred(&all) {
                return all;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached: {all:?}");
    }
}

/// A pull of `remote` (on the prefill engine at `host:port`, TP `tp`) into `local`, under `grant`.
fn spec(
    addr: (&str, u16),
    tp: u32,
    req: &str,
    grant: u64,
    remote: &[u32],
    local: &[u32],
) -> PullSpec {
    PullSpec {
        remote_host: addr.0.into(),
        remote_port: addr.1,
        remote_request_id: req.into(),
        remote_tp_size: tp,
        grant,
        // The tests' offers name exactly the blocks pulled.
        offer_blocks: kvferry::lease::blocks_digest(remote),
        remote_blocks: remote.to_vec(),
        local_blocks: local.to_vec(),
    }
}

fn hashes(n: u32, salt: u64) -> Vec<BlockHash> {
    (0..n)
        .map(|i| BlockHash::from_u64(salt << 32 | u64::from(i)))
        .collect()
}

#[test]
fn decode_pulls_prefill_blocks_and_the_prefill_side_frees_them() {
    let prefill = engine("prefill", false, true, 1);
    let decode = engine("decode", false, true, 2);
    let addr = prefill.conn.listen_addr().expect("listening");
    let remote = vec![5u32, 9, 10, 11, 40];
    let local = vec![0u32, 1, 2, 30, 63];
    let g = Generations::new().issue();
    prefill.conn.finish("p-req", Some((g, &remote)));
    let host = addr.ip().to_string();
    decode.conn.pull(
        "d-req",
        &spec((&host, addr.port()), 1, "p-req", g, &remote, &local),
    );
    let got = decode.until(|f| f.recving.contains(&"d-req".to_string()));
    assert!(got.load_errors.is_empty(), "{got:?}");
    for (r, l) in remote.iter().zip(&local) {
        assert_eq!(prefill.block(*r), decode.block(*l), "block {r} -> {l}");
    }
    let freed = prefill.until(|f| f.sending.contains(&"p-req".to_string()));
    assert_eq!(freed.sending, vec!["p-req".to_string()]);
    let (p, d): (ConnectorCounters, ConnectorCounters) =
        (prefill.conn.counters(), decode.conn.counters());
    assert_eq!(p.pulls_served, 1);
    assert_eq!(p.lease_expired, 0);
    assert_eq!(d.pulled_blocks, 5);
    assert_eq!(d.pulled_bytes, 5 * geometry().block_bytes());
}

fn offer_of(f: &Finished, req: &str) -> Option<Option<Posted>> {
    f.offers
        .iter()
        .find(|(r, _)| r == req)
        .map(|(_, o)| o.clone())
}

/// llm-d's `offloading` protocol: the decoder asks before the prefill finished, gets the
/// offer once posted, pulls under its grant exactly as under `nixlv2`; a second decode engine
/// asking under the same key, a withdrawn key and a key nobody posts all come back as no offer.
#[test]
fn a_decoder_asks_by_key_until_the_prefill_posts_its_offer_then_pulls_it() {
    // A lease long enough for every ask below to end first.
    let lease = Some((0, Duration::from_secs(30)));
    let prefill = build("prefill", geometry(), false, lease, (1, 0), 1);
    let decode = engine("decode-a", false, true, 2);
    let other = engine("decode-b", false, true, 3);
    let addr = prefill.conn.listen_addr().expect("listening");
    let at = |key: &str| RemotePrefiller {
        key: key.into(),
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let wait = Duration::from_secs(10);
    decode.conn.ask("d-req", &at("kv-1"), wait);
    decode.conn.ask("d-nothing", &at("kv-2"), wait);
    decode
        .conn
        .ask("d-never", &at("kv-3"), Duration::from_millis(300));
    // Still pending: the prefill has posted nothing yet.
    std::thread::sleep(Duration::from_millis(100));
    assert!(decode.conn.poll().offers.is_empty());

    let remote = vec![5u32, 9, 10];
    let g = Generations::new().issue();
    let prompt = prompt_digest(&[1, 2, 3], b"");
    let made = RemoteParams {
        host: addr.ip().to_string(),
        port: addr.port(),
        request_id: "p-req".into(),
        engine_id: "prefill".into(),
        tp_size: 1,
        block_ids: remote.clone(),
        groups: 1,
        grant: g,
        expires_unix: 0.0,
        num_tokens: 96,
    };
    prefill.conn.finish("p-req", Some((g, &remote)));
    prefill.conn.post(
        "kv-1",
        Some(Posted {
            remote: made.clone(),
            prompt,
        }),
    );
    prefill.conn.post("kv-2", None);
    let got = decode.until(|f| f.offers.len() == 3);
    let posted = offer_of(&got, "d-req")
        .expect("answered")
        .expect("an offer");
    assert_eq!((&posted.remote, posted.prompt), (&made, prompt));
    assert_eq!(offer_of(&got, "d-nothing"), Some(None));
    assert_eq!(offer_of(&got, "d-never"), Some(None));
    // Another engine under the same key (a router's retry) is told there is none.
    other.conn.ask("o-req", &at("kv-1"), wait);
    let got = other.until(|f| !f.offers.is_empty());
    assert_eq!(offer_of(&got, "o-req"), Some(None));

    let local = vec![0u32, 1, 2];
    decode.conn.pull(
        "d-req",
        &spec(
            (&posted.remote.host, posted.remote.port),
            1,
            "p-req",
            posted.remote.grant,
            &remote,
            &local,
        ),
    );
    let got = decode.until(|f| f.recving.contains(&"d-req".to_string()));
    assert!(got.load_errors.is_empty(), "{got:?}");
    for (r, l) in remote.iter().zip(&local) {
        assert_eq!(prefill.block(*r), decode.block(*l), "block {r} -> {l}");
    }
    prefill.until(|f| f.sending.contains(&"p-req".to_string()));
    let (p, d) = (prefill.conn.counters(), decode.conn.counters());
    assert_eq!((p.offers_posted, p.pulls_served), (1, 1));
    assert_eq!((d.offers_fetched, d.offers_missed), (1, 2));
}

fn posted_at(addr: std::net::SocketAddr, req: &str) -> Posted {
    Posted {
        remote: RemoteParams {
            host: addr.ip().to_string(),
            port: addr.port(),
            request_id: req.into(),
            engine_id: "prefill".into(),
            tp_size: 1,
            block_ids: vec![1],
            groups: 1,
            grant: Generations::new().issue(),
            expires_unix: 0.0,
            num_tokens: 32,
        },
        prompt: prompt_digest(&[1], b""),
    }
}

/// A prefill engine restarted on the same address (a new agent name): the decoder's next ask
/// reaches the new one instead of failing on the old connection until its deadline.
#[test]
fn asks_reach_a_prefill_engine_restarted_on_the_same_address() {
    let port = port_pair();
    let lease = Some((port, Duration::from_secs(30)));
    let decode = engine("decode-r", false, true, 2);
    let at = |key: &str| RemotePrefiller {
        key: key.into(),
        host: "127.0.0.1".into(),
        port,
    };
    let first = build("prefill-1", geometry(), false, lease, (1, 0), 1);
    let addr = first.conn.listen_addr().expect("listening");
    first.conn.post("k1", Some(posted_at(addr, "a")));
    decode.conn.ask("d1", &at("k1"), Duration::from_secs(10));
    let got = decode.until(|f| !f.offers.is_empty());
    assert!(matches!(offer_of(&got, "d1"), Some(Some(_))), "{got:?}");
    drop(first);
    let second = build("prefill-2", geometry(), false, lease, (1, 0), 1);
    second.conn.post("k2", Some(posted_at(addr, "b")));
    decode.conn.ask("d2", &at("k2"), Duration::from_secs(10));
    let got = decode.until(|f| !f.offers.is_empty());
    let p = offer_of(&got, "d2").expect("answered").expect("an offer");
    assert_eq!(p.remote.request_id, "b");
}

/// An address that accepts connections and never answers (a client may name any host) holds
/// up only the asks to it: an ask to a live prefill engine is answered meanwhile.
#[test]
fn an_address_that_never_answers_does_not_hold_up_other_asks() {
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_port = hole.local_addr().expect("addr").port();
    let prefill = engine("prefill-live", false, true, 1);
    let addr = prefill.conn.listen_addr().expect("listening");
    prefill.conn.post("good", Some(posted_at(addr, "g")));
    let decode = engine("decode-h", false, true, 2);
    let to = |port, key: &str| RemotePrefiller {
        key: key.into(),
        host: "127.0.0.1".into(),
        port,
    };
    decode
        .conn
        .ask("stuck", &to(hole_port, "x"), Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(50));
    decode
        .conn
        .ask("live", &to(addr.port(), "good"), Duration::from_secs(10));
    let got = decode.until(|f| !f.offers.is_empty());
    assert!(matches!(offer_of(&got, "live"), Some(Some(_))), "{got:?}");
    // The stuck ask is still going (its handshake times out after 5 s): not reported yet.
    assert_eq!(offer_of(&got, "stuck"), None, "{got:?}");
    let got = decode.until(|f| offer_of(f, "stuck").is_some());
    assert_eq!(offer_of(&got, "stuck"), Some(None));
    drop(hole);
}

#[test]
fn a_prefill_request_nobody_pulls_is_freed_when_its_lease_ends() {
    let lease = Some((0, Duration::from_secs(1)));
    let prefill = build("lonely", geometry(), false, lease, (1, 0), 3);
    prefill
        .conn
        .finish("orphan", Some((Generations::new().issue(), &[1])));
    assert!(prefill.conn.poll().sending.is_empty(), "freed too early");
    let f = prefill.until(|f| !f.sending.is_empty());
    assert_eq!(f.sending, vec!["orphan".to_string()]);
    assert_eq!(prefill.conn.counters().lease_expired, 1);
}

#[test]
fn a_dead_prefill_engine_turns_into_load_errors_not_hangs() {
    let decode = engine("stranded", false, true, 4);
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    decode.conn.pull(
        "d",
        &spec(("127.0.0.1", port), 1, "gone", 1, &[1, 2], &[3, 4]),
    );
    let f = decode.until(|f| !f.recving.is_empty());
    assert_eq!(f.recving, vec!["d".to_string()]);
    assert_eq!(f.load_errors, vec![3, 4]);
    assert_eq!(decode.conn.counters().pull_failures, 1);
}

#[test]
fn offloaded_blocks_come_back_bit_exact_and_misses_are_load_errors() {
    let mut e = engine("offload", true, false, 5);
    let h = hashes(8, 7);
    let src: Vec<u32> = (10..18).collect();
    let items: Vec<(BlockHash, u32)> = h.iter().copied().zip(src.iter().copied()).collect();
    let before: Vec<Vec<u8>> = src.iter().map(|&b| e.block(b)).collect();
    e.conn.save("r1", &items).expect("save");
    e.conn.finish("r1", None);
    let f = e.until(|f| f.sending.contains(&"r1".to_string()));
    assert!(f.load_errors.is_empty());
    assert_eq!(e.conn.lookup(&h), 8);
    assert_eq!(e.conn.lookup(&hashes(3, 99)), 0);
    // Overwrite the destination blocks, load into them, and one block nobody saved.
    let dst: Vec<u32> = (40..48).collect();
    for &b in &dst {
        for (o, l) in e.layout.block_runs(b).expect("runs") {
            e.cache[o as usize..(o + l) as usize].fill(0);
        }
    }
    let mut load: Vec<(BlockHash, u32)> = h.iter().copied().zip(dst.iter().copied()).collect();
    load.push((BlockHash::from_u64(12345), 50));
    e.conn.load("r2", &load);
    let f = e.until(|f| f.recving.contains(&"r2".to_string()));
    assert_eq!(f.load_errors, vec![50]);
    for (i, &b) in dst.iter().enumerate() {
        assert_eq!(e.block(b), before[i], "block {b}");
    }
    let c = e.conn.counters();
    assert_eq!(
        (c.saved_blocks, c.onboarded_blocks, c.onboard_failed_blocks),
        (8, 8, 1)
    );
    assert!(e
        .conn
        .take_events()
        .iter()
        .any(|ev| matches!(ev, kvferry::kvtier::TierEvent::Stored { .. })));
}

#[test]
fn a_restarted_connector_announces_the_blocks_it_recovered_from_g3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = hashes(4, 11);
    let cfg = |name: &str| ConnectorConfig {
        engine_id: name.into(),
        offload: Some(OffloadConfig {
            dram_blocks: 16,
            nvme: Some((dir.path().to_path_buf(), 64)),
            identity: "test-model".into(),
            caller_evicts: false,
            eviction: Default::default(),
            admission: Default::default(),
            write_budget: None,
            nvme_timeout: None,
        }),
        pd: None,
        tp_size: 1,
        tp_rank: 0,
        total_kv_heads: None,
    };
    let layout = CacheLayout::named(geometry(), BLOCKS, StrideOrder::Lbhnc).expect("layout");
    let mut cache = vec![7u8; layout.span_bytes() as usize];
    {
        let c = Connector::new(cfg("first")).expect("connector");
        // SAFETY: `cache` outlives both connectors of this test.
        unsafe { c.register_cache(layout.clone(), cache.as_mut_ptr()) }.expect("register");
        let items: Vec<(BlockHash, u32)> = h.iter().copied().zip(0..4).collect();
        c.save("r", &items).expect("save");
        c.finish("r", None);
        c.drain(Duration::from_secs(10));
        assert_eq!(c.shutdown(Duration::from_secs(10)).expect("flush"), 4);
    }
    let c = Connector::new(cfg("second")).expect("connector");
    // SAFETY: as above.
    unsafe { c.register_cache(layout, cache.as_mut_ptr()) }.expect("register");
    let stored: Vec<BlockHash> = c
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            kvferry::kvtier::TierEvent::Stored { hash, .. } => Some(hash),
            _ => None,
        })
        .collect();
    for x in &h {
        assert!(stored.contains(x), "recovered block not announced");
    }
    assert_eq!(c.lookup(&h), 4);
}

/// An engine of a TP group: `heads` KV heads per rank, a fixed base port (0: any).
fn rank(name: &str, heads: u32, tp: u32, r: u32, port: u16, seed: u8) -> Engine {
    let g = Geometry::mha(2, heads, 64, Dtype::F32, 32).expect("geometry");
    build(
        name,
        g,
        false,
        Some((port, Duration::from_secs(60))),
        (tp, r),
        seed,
    )
}

/// Two consecutive free ports (rank r of a group listens on base + r).
fn port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn head_bytes(e: &Engine, block: u32, head: u32) -> Vec<u8> {
    let g = *e.layout.geometry();
    (0..g.layers)
        .flat_map(|l| {
            e.layout
                .runs(l, block, head..head + 1, 0..g.block_tokens)
                .expect("runs")
                .into_iter()
                .flat_map(|(o, n)| e.cache[o as usize..(o + n) as usize].to_vec())
                .collect::<Vec<u8>>()
        })
        .collect()
}

#[test]
fn decode_tp1_pulls_from_prefill_tp2_and_both_ranks_free() {
    let base = port_pair();
    let p0 = rank("p-tp2", 1, 2, 0, base, 1);
    let p1 = rank("p-tp2", 1, 2, 1, base, 2);
    let d = rank("d-tp1", 2, 1, 0, 0, 3);
    let g = Generations::new().issue();
    for p in [&p0, &p1] {
        p.conn.finish("req", Some((g, &[3, 4])));
    }
    d.conn.pull(
        "dreq",
        &spec(("127.0.0.1", base), 2, "req", g, &[3, 4], &[10, 20]),
    );
    let f = d.until(|f| f.recving.contains(&"dreq".to_string()));
    assert!(f.load_errors.is_empty(), "{f:?}");
    for (r, l) in [(3, 10), (4, 20)] {
        assert_eq!(head_bytes(&d, l, 0), head_bytes(&p0, r, 0));
        assert_eq!(head_bytes(&d, l, 1), head_bytes(&p1, r, 0));
    }
    for p in [&p0, &p1] {
        p.until(|f| f.sending.contains(&"req".to_string()));
    }
    // Two reads (one per prefill rank) filled the same two blocks.
    let c = d.conn.counters();
    assert_eq!(c.pulled_blocks, 2);
    assert_eq!(c.pulled_bytes, 2 * d.layout.geometry().block_bytes());
}

#[test]
fn prefill_tp1_frees_only_after_both_decode_ranks_pulled() {
    let base = port_pair();
    let p = rank("p-tp1", 2, 1, 0, base, 4);
    let d0 = rank("d-tp2", 1, 2, 0, 0, 5);
    let d1 = rank("d-tp2", 1, 2, 1, 0, 6);
    let g = Generations::new().issue();
    p.conn.finish("req", Some((g, &[7])));
    let spec = spec(("127.0.0.1", base), 1, "req", g, &[7], &[8]);
    d0.conn.pull("x", &spec);
    d0.until(|f| f.recving.contains(&"x".to_string()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        p.conn.poll().sending.is_empty(),
        "freed after one of two decode ranks"
    );
    d1.conn.pull("y", &spec);
    d1.until(|f| f.recving.contains(&"y".to_string()));
    p.until(|f| f.sending.contains(&"req".to_string()));
    assert_eq!(head_bytes(&d0, 8, 0), head_bytes(&p, 7, 0));
    assert_eq!(head_bytes(&d1, 8, 0), head_bytes(&p, 7, 1));
    assert_eq!(p.conn.counters().pulls_served, 1);
}

#[test]
fn a_decoder_that_reads_before_the_prefill_worker_heard_of_the_offer_waits_for_it() {
    let prefill = engine("early-prefill", false, true, 7);
    let decode = engine("early-decode", false, true, 8);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let g = Generations::new().issue();
    decode
        .conn
        .pull("d", &spec((&host, addr.port()), 1, "p", g, &[1], &[2]));
    // The release is answered "pending" until the engine reports the request finished.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        decode.conn.poll().recving.is_empty(),
        "reported before the grant was confirmed"
    );
    prefill.conn.finish("p", Some((g, &[1])));
    let f = decode.until(|f| f.recving.contains(&"d".to_string()));
    assert!(f.load_errors.is_empty(), "{f:?}");
    assert_eq!(decode.block(2), prefill.block(1));
    prefill.until(|f| f.sending == vec!["p".to_string()]);
    assert_eq!(prefill.conn.counters().pulls_served, 1);
}

/// Overwrites block `b` of an engine's cache, as a new request reusing it would.
fn reuse(e: &mut Engine, b: u32, byte: u8) {
    for (o, l) in e.layout.block_runs(b).expect("runs") {
        e.cache[o as usize..(o + l) as usize].fill(byte);
    }
}

/// Over TCP the prefill refuses to serve blocks whose grant ended; over UCX it cannot refuse a
/// one-sided read, and the release after the reads is what catches it.
fn late_decoder(transport: TransportKind) -> Option<ConnectorCounters> {
    if transport == TransportKind::Ucx && !ucx_loads() {
        return None;
    }
    let lease = Some((0, Duration::from_millis(300)));
    let g0 = geometry();
    let mut prefill = build_on(transport, "late-prefill", g0, false, lease, (1, 0), None, 9);
    let decode = build_on(transport, "late-decode", g0, false, lease, (1, 0), None, 10);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let g = Generations::new().issue();
    prefill.conn.finish("p", Some((g, &[3, 4])));
    // Nobody extends the lease: the engine gets the blocks back and reuses them.
    prefill.until(|f| f.sending == vec!["p".to_string()]);
    reuse(&mut prefill, 3, 0xAB);
    reuse(&mut prefill, 4, 0xAB);
    decode.conn.pull(
        "d",
        &spec((&host, addr.port()), 1, "p", g, &[3, 4], &[5, 6]),
    );
    let f = decode.until(|f| f.recving.contains(&"d".to_string()));
    assert_eq!(f.load_errors, vec![5, 6], "{transport:?}: {f:?}");
    assert_eq!(prefill.conn.counters().lease_expired, 1);
    Some(decode.conn.counters())
}

fn ucx_loads() -> bool {
    let mut cfg = kvferry::kvnet::AgentConfig::new("ucx-probe");
    cfg.transports = vec![TransportKind::Ucx];
    kvferry::kvnet::Agent::new(cfg).is_ok_and(|a| a.ucx_library().is_some())
}

#[test]
fn a_late_decoder_after_the_lease_ended_and_the_blocks_were_reused_gets_load_errors() {
    // TCP: the serving side refuses the reads (no live grant covers those blocks).
    let c = late_decoder(TransportKind::Tcp).expect("tcp");
    assert_eq!((c.pull_failures, c.pulls_stale, c.pulled_blocks), (1, 0, 0));
    // UCX: the bytes are read, but the release says the grant is gone: never reported loaded.
    match late_decoder(TransportKind::Ucx) {
        Some(c) => assert_eq!((c.pulls_stale, c.pulled_blocks), (1, 0)),
        None => println!("kvferry-test skipped late decoder over UCX: no libucp loads here"),
    }
}

#[test]
fn heartbeats_keep_a_waiting_decoders_blocks_past_the_lease() {
    // A lease of 1 s and a heartbeat every 100 ms: slack for a loaded machine.
    let prefill = build(
        "beat-prefill",
        geometry(),
        false,
        Some((0, Duration::from_secs(1))),
        (1, 0),
        11,
    );
    let decode = engine("beat-decode", false, true, 12);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let g = Generations::new().issue();
    prefill.conn.finish("p", Some((g, &[7, 8])));
    let s = spec((&host, addr.port()), 1, "p", g, &[7, 8], &[9, 10]);
    // Two and a half leases' worth of waiting, extended every 100 ms.
    for _ in 0..25 {
        decode.conn.extend(&s.target());
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            prefill.conn.poll().sending.is_empty(),
            "freed while extended"
        );
    }
    decode.conn.pull("d", &s);
    let f = decode.until(|f| f.recving.contains(&"d".to_string()));
    assert!(f.load_errors.is_empty(), "{f:?}");
    assert_eq!(decode.block(9), prefill.block(7));
    assert_eq!(decode.block(10), prefill.block(8));
    prefill.until(|f| f.sending == vec!["p".to_string()]);
    assert_eq!(prefill.conn.counters().lease_expired, 0);
}

#[test]
fn a_decoder_abort_frees_the_prefill_blocks_at_once() {
    let prefill = build(
        "abort-prefill",
        geometry(),
        false,
        Some((0, Duration::from_secs(600))),
        (1, 0),
        13,
    );
    let decode = engine("abort-decode", false, true, 14);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let g = Generations::new().issue();
    prefill.conn.finish("p", Some((g, &[1])));
    decode
        .conn
        .abort_remote(&spec((&host, addr.port()), 1, "p", g, &[1], &[1]).target());
    // Well inside the 600 s lease.
    prefill.until(|f| f.sending == vec!["p".to_string()]);
    assert_eq!(prefill.conn.counters().pulls_aborted, 1);
}

#[test]
fn a_pull_whose_second_rank_fails_is_reported_only_after_every_posted_read_ended() {
    let base = port_pair();
    let p0 = rank("pf-tp2", 1, 2, 0, base, 15);
    let p1 = rank("pf-tp2", 1, 2, 1, base, 16);
    let d = rank("df-tp1", 2, 1, 0, 0, 17);
    let g = Generations::new().issue();
    let remote: Vec<u32> = (0..20).collect();
    p0.conn.finish("req", Some((g, &remote)));
    p1.conn.finish("req", Some((g, &remote)));
    // Connect both ranks, then take rank 1 away: its read fails, rank 0's goes through.
    let warm = spec(("127.0.0.1", base), 2, "warm", 0, &[], &[]);
    d.conn.pull("warm", &warm);
    d.until(|f| f.recving.contains(&"warm".to_string()));
    drop(p1);
    let local: Vec<u32> = (20..40).collect();
    d.conn.pull(
        "dreq",
        &spec(("127.0.0.1", base), 2, "req", g, &remote, &local),
    );
    let f = d.until(|f| f.recving.contains(&"dreq".to_string()));
    let mut errs = f.load_errors.clone();
    errs.sort_unstable();
    assert_eq!(errs, local, "every block of a failed pull is a load error");
    // Reported means quiesced: nothing is in flight, and no byte lands afterwards.
    let snapshot: Vec<Vec<u8>> = local.iter().map(|&b| d.block(b)).collect();
    let rest = d.conn.drain(Duration::from_millis(500));
    assert!(
        rest.recving.is_empty() && rest.load_errors.is_empty(),
        "{rest:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    for (i, &b) in local.iter().enumerate() {
        assert_eq!(
            d.block(b),
            snapshot[i],
            "block {b} changed after the pull was reported"
        );
    }
    assert_eq!(d.conn.counters().pulled_blocks, 0);
    drop(p0);
}

#[test]
fn replicated_kv_heads_map_each_decode_rank_to_its_own_head() {
    // 2 KV heads; decode TP 4 replicates each head on two ranks (1 head per rank): rank 1 holds
    // head 0, rank 2 head 1. Prefill TP 1 holds both.
    let p = rank("rep-prefill", 2, 1, 0, 0, 18);
    let addr = p.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let g1 = Geometry::mha(2, 1, 64, Dtype::F32, 32).expect("geometry");
    let g = Generations::new().issue();
    p.conn.finish("req", Some((g, &[5])));
    for (r, head) in [(1u32, 0u32), (2, 1)] {
        let d = build_on(
            TransportKind::Tcp,
            "rep-decode",
            g1,
            false,
            Some((0, Duration::from_secs(60))),
            (4, r),
            Some(2),
            19,
        );
        d.conn
            .pull("d", &spec((&host, addr.port()), 1, "req", g, &[5], &[6]));
        let f = d.until(|f| f.recving.contains(&"d".to_string()));
        assert!(f.load_errors.is_empty(), "{f:?}");
        assert_eq!(
            head_bytes(&d, 6, 0),
            head_bytes(&p, 5, head),
            "decode rank {r}"
        );
    }
}

/// An offloading connector over G3 in `dir` for model `identity`, TP rank `r` of `tp`.
fn g3_engine(dir: &std::path::Path, identity: &str, tp: (u32, u32), seed: u8) -> Engine {
    let layout = CacheLayout::named(geometry(), BLOCKS, StrideOrder::Lbhnc).expect("layout");
    let mut cache: Vec<u8> = (0..layout.span_bytes())
        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed))
        .collect();
    let conn = Connector::new(ConnectorConfig {
        engine_id: format!("g3-{identity}"),
        offload: Some(OffloadConfig {
            dram_blocks: 16,
            nvme: Some((dir.to_path_buf(), 64)),
            identity: identity.into(),
            caller_evicts: false,
            eviction: Default::default(),
            admission: Default::default(),
            write_budget: None,
            nvme_timeout: None,
        }),
        pd: None,
        tp_size: tp.0,
        tp_rank: tp.1,
        total_kv_heads: None,
    })
    .expect("connector");
    // SAFETY: `cache` lives in the Engine next to the connector, dropped after it.
    unsafe { conn.register_cache(layout.clone(), cache.as_mut_ptr()) }
        .map_err(|e| e.to_string())
        .expect("register");
    Engine {
        conn,
        cache,
        layout,
    }
}

fn save_and_shutdown(e: &Engine, h: &[BlockHash]) {
    let items: Vec<(BlockHash, u32)> = h.iter().copied().zip(0..).collect();
    e.conn.save("r", &items).expect("save");
    e.conn.finish("r", None);
    e.until(|f| f.sending.contains(&"r".to_string()));
    e.conn.shutdown(Duration::from_secs(10)).expect("flush");
}

#[test]
fn replaced_weights_over_the_same_nvme_dir_never_load_the_old_models_kv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = hashes(4, 21);
    let old = g3_engine(dir.path(), "model=/m weights=v1", (1, 0), 1);
    save_and_shutdown(&old, &h);
    drop(old);
    let new = g3_engine(dir.path(), "model=/m weights=v2", (1, 0), 2);
    assert_eq!(new.conn.lookup(&h), 0, "the old weights' KV was offered");
    drop(new);
    let again = g3_engine(dir.path(), "model=/m weights=v1", (1, 0), 3);
    assert_eq!(again.conn.lookup(&h), 4);
}

#[test]
fn tp_ranks_on_one_nvme_dir_keep_their_own_heads_and_a_second_engine_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = hashes(2, 22);
    let r0 = g3_engine(dir.path(), "m", (2, 0), 4);
    let r1 = g3_engine(dir.path(), "m", (2, 1), 5);
    // A second engine of the same identity and rank on the same directory.
    let err = Connector::new(ConnectorConfig {
        engine_id: "dup".into(),
        offload: Some(OffloadConfig {
            dram_blocks: 16,
            nvme: Some((dir.path().to_path_buf(), 64)),
            identity: "m".into(),
            caller_evicts: false,
            eviction: Default::default(),
            admission: Default::default(),
            write_budget: None,
            nvme_timeout: None,
        }),
        pd: None,
        tp_size: 2,
        tp_rank: 0,
        total_kv_heads: None,
    })
    .expect("connector");
    let layout = CacheLayout::named(geometry(), BLOCKS, StrideOrder::Lbhnc).expect("layout");
    let mut cache = vec![0u8; layout.span_bytes() as usize];
    // SAFETY: `cache` outlives `err` (dropped at the end of this test, after it).
    let refused = unsafe { err.register_cache(layout, cache.as_mut_ptr()) };
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("in use")),
        "{:?}",
        refused.err()
    );
    drop(err);
    save_and_shutdown(&r0, &h);
    save_and_shutdown(&r1, &h);
    let want0: Vec<Vec<u8>> = (0..2).map(|b| r0.block(b)).collect();
    drop((r0, r1));
    let mut back = g3_engine(dir.path(), "m", (2, 0), 6);
    assert_eq!(back.conn.lookup(&h), 2);
    for b in 40..42 {
        reuse(&mut back, b, 0);
    }
    back.conn.load("l", &[(h[0], 40), (h[1], 41)]);
    let f = back.until(|f| f.recving.contains(&"l".to_string()));
    assert!(f.load_errors.is_empty(), "{f:?}");
    assert_eq!(back.block(40), want0[0], "rank 0 got another rank's bytes");
    assert_eq!(back.block(41), want0[1]);
}

#[test]
fn reset_cache_empties_the_tiers_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = hashes(3, 23);
    let e = g3_engine(dir.path(), "m", (1, 0), 7);
    let items: Vec<(BlockHash, u32)> = h.iter().copied().zip(0..).collect();
    e.conn.save("r", &items).expect("save");
    e.conn.finish("r", None);
    e.until(|f| f.sending.contains(&"r".to_string()));
    e.conn.flush(Duration::from_secs(10)).expect("flush");
    assert_eq!(e.conn.lookup(&h), 3);
    e.conn.reset_cache().expect("reset");
    assert_eq!(e.conn.lookup(&h), 0);
    drop(e);
    let e = g3_engine(dir.path(), "m", (1, 0), 8);
    assert_eq!(
        e.conn.lookup(&h),
        0,
        "a block from before the reset came back"
    );
}

/// `n` consecutive free ports.
fn port_run(n: u16) -> u16 {
    'search: loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        drop(a);
        if p > 65535 - n {
            continue;
        }
        for q in p..p + n {
            if std::net::TcpListener::bind(("127.0.0.1", q)).is_err() {
                continue 'search;
            }
        }
        return p;
    }
}

/// What every rank holding global head `g` has in it for block `b` (replicas agree, as real
/// TP ranks computing the same head do).
fn fill_heads(e: &mut Engine, heads: std::ops::Range<u32>, blocks: &[u32]) {
    let g = *e.layout.geometry();
    for (local, global) in heads.enumerate() {
        for &b in blocks {
            for l in 0..g.layers {
                for (o, n) in e
                    .layout
                    .runs(l, b, local as u32..local as u32 + 1, 0..g.block_tokens)
                    .expect("runs")
                {
                    for (i, x) in e.cache[o as usize..(o + n) as usize].iter_mut().enumerate() {
                        *x = (global as u8)
                            .wrapping_mul(67)
                            .wrapping_add((b as u8).wrapping_mul(13))
                            .wrapping_add((l as u8).wrapping_mul(5))
                            .wrapping_add(i as u8);
                    }
                }
            }
        }
    }
}

#[test]
fn every_prefill_and_decode_tp_size_maps_every_head_exactly() {
    // (total KV heads, per-rank geometry for a TP size); None: MLA (one latent every rank has).
    let shapes: [Option<u32>; 3] = [Some(2), Some(4), None];
    let remote = [3u32, 9];
    let local = [12u32, 40];
    for total in shapes {
        let geom = |tp: u32| match total {
            Some(h) => Geometry::mha(2, (h / tp).max(1), 64, Dtype::F32, 32).expect("geometry"),
            None => Geometry::mla(2, 128, Dtype::F32, 32).expect("geometry"),
        };
        let heads_of = |tp: u32, r: u32| match total {
            Some(h) => kvferry::kvcore::rank_heads(h, tp, r).expect("heads"),
            None => 0..1,
        };
        for p in [1u32, 2, 4] {
            for d in [1u32, 2, 4, 8] {
                let base = port_run(p as u16);
                let g = Generations::new().issue();
                let mut pre: Vec<Engine> = (0..p)
                    .map(|r| {
                        let mut e = build_on(
                            TransportKind::Tcp,
                            "tp-prefill",
                            geom(p),
                            false,
                            Some((base, Duration::from_secs(60))),
                            (p, r),
                            total,
                            1,
                        );
                        fill_heads(&mut e, heads_of(p, r), &remote);
                        e
                    })
                    .collect();
                for e in &pre {
                    e.conn.finish("req", Some((g, &remote)));
                }
                for r in 0..d {
                    let dec = build_on(
                        TransportKind::Tcp,
                        "tp-decode",
                        geom(d),
                        false,
                        Some((0, Duration::from_secs(60))),
                        (d, r),
                        total,
                        2,
                    );
                    dec.conn.pull(
                        "d",
                        &spec(("127.0.0.1", base), p, "req", g, &remote, &local),
                    );
                    let f = dec.until(|f| f.recving.contains(&"d".to_string()));
                    let case = format!("{total:?} heads, prefill TP {p} -> decode TP {d} rank {r}");
                    assert!(f.load_errors.is_empty(), "{case}: {f:?}");
                    // The expected bytes: a decode-sized engine filled with the right globals.
                    let mut want = build_on(
                        TransportKind::Tcp,
                        "tp-want",
                        geom(d),
                        false,
                        None,
                        (d, r),
                        total,
                        3,
                    );
                    fill_heads(&mut want, heads_of(d, r), &remote);
                    for (&rb, &lb) in remote.iter().zip(&local) {
                        for h in 0..heads_of(d, r).len() as u32 {
                            assert_eq!(
                                head_bytes(&dec, lb, h),
                                head_bytes(&want, rb, h),
                                "{case}: local head {h} of block {lb}"
                            );
                        }
                    }
                }
                // Every prefill rank frees once all d decode ranks released it.
                for e in &mut pre {
                    e.until(|f| f.sending.contains(&"req".to_string()));
                }
            }
        }
    }
}

#[test]
fn a_peer_reads_only_granted_blocks_and_never_writes() {
    let prefill = engine("guarded-prefill", false, true, 20);
    let addr = prefill.conn.listen_addr().expect("listening");
    // Declared before the agent, so dropped after it on every path (a failed assertion too).
    let mut mine = vec![0u8; 1 << 16];
    let mut cfg = kvferry::kvnet::AgentConfig::new("snoop");
    cfg.transports = vec![TransportKind::Tcp];
    let snoop = kvferry::kvnet::Agent::new(cfg).expect("agent");
    // SAFETY: `mine` outlives `snoop`: declared before it, so dropped after it.
    let local = unsafe {
        snoop.register(Region {
            kind: MemKind::Host,
            base: mine.as_mut_ptr() as u64,
            len: mine.len() as u64,
        })
    }
    .expect("register");
    let peer = snoop.connect(addr).expect("connect");
    let md = snoop.peer_metadata(&peer).expect("metadata");
    let cache = &md.caches[0];
    let run = |b: u32| cache.layout.block_runs(b).expect("runs")[0];
    let desc = |(off, len): (u64, u64)| Descriptor {
        region: cache.region,
        offset: off,
        len: len.min(1 << 16),
    };
    let dst = |len: u64| Descriptor {
        region: local,
        offset: 0,
        len: len.min(1 << 16),
    };
    let wait = |id| {
        snoop
            .wait(id, Duration::from_secs(10))
            .expect("completes")
            .result
    };
    // Block 7 is under no grant: refused (after the bounded wait for a grant to appear).
    let (off, len) = run(7);
    let id = snoop
        .read(&[dst(len)], &peer, &[desc((off, len))], None)
        .expect("posted");
    assert!(wait(id).is_err(), "an ungranted block was served");
    // Granted: served, and only while the grant lives.
    prefill
        .conn
        .finish("p", Some((Generations::new().issue(), &[7])));
    let id = snoop
        .read(&[dst(len)], &peer, &[desc((off, len))], None)
        .expect("posted");
    assert!(wait(id).is_ok());
    // Writes into the engine's cache are refused, granted or not.
    let id = snoop
        .write(&[dst(len)], &peer, &[desc((off, len))], None)
        .expect("posted");
    assert!(wait(id).is_err(), "a peer wrote into the KV cache");
}

#[test]
fn a_decoder_pulling_another_requests_blocks_under_its_grant_gets_load_errors() {
    let prefill = engine("mixed-prefill", false, true, 21);
    let decode = engine("mixed-decode", false, true, 22);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let mut gens = Generations::new();
    let (mine, victims) = (gens.issue(), gens.issue());
    prefill.conn.finish("mine", Some((mine, &[1, 2])));
    prefill.conn.finish("victim", Some((victims, &[5, 6])));
    // Params naming the victim's blocks under our grant: the serving side has both granted,
    // so the bytes move, but the release names other blocks than our offer's.
    decode.conn.pull(
        "d",
        &spec((&host, addr.port()), 1, "mine", mine, &[5, 6], &[9, 10]),
    );
    let f = decode.until(|f| f.recving.contains(&"d".to_string()));
    assert_eq!(f.load_errors, vec![9, 10], "{f:?}");
    let c = decode.conn.counters();
    assert_eq!((c.pulls_stale, c.pulled_blocks), (1, 0));
}

fn staged_engine(name: &str, transport: TransportKind, staged: bool, seed: u8) -> Engine {
    let lease = Some((0, Duration::from_millis(300)));
    build_staged(
        transport,
        staged,
        name,
        geometry(),
        false,
        lease,
        (1, 0),
        None,
        seed,
    )
}

/// P/D through staging copies (what a GPU cache without CUDA-capable UCX does, on host memory
/// here): staged prefill to plain decoder, plain to staged, staged to staged, over TCP and, where
/// it loads, UCX; the bytes land bit-exact in the decoder's cache and nowhere else.
#[test]
fn staged_exports_and_landings_move_blocks_bit_exact() {
    let mut transports = vec![TransportKind::Tcp];
    if ucx_loads() {
        transports.push(TransportKind::Ucx);
    } else {
        println!("kvferry-test skipped staged P/D over UCX: no libucp loads here");
    }
    let mut seed = 20;
    for t in transports {
        for (sp, sd) in [(true, false), (false, true), (true, true)] {
            seed += 2;
            let prefill = staged_engine("staged-prefill", t, sp, seed);
            let decode = staged_engine("staged-decode", t, sd, seed + 1);
            let before = decode.cache.clone();
            let addr = prefill.conn.listen_addr().expect("listening");
            let host = addr.ip().to_string();
            let (remote, local) = ([7u32, 8, 33], [1u32, 2, 60]);
            let g = Generations::new().issue();
            prefill.conn.finish("p", Some((g, &remote)));
            decode
                .conn
                .pull("d", &spec((&host, addr.port()), 1, "p", g, &remote, &local));
            let f = decode.until(|f| f.recving.contains(&"d".to_string()));
            assert!(f.load_errors.is_empty(), "{t:?} {sp}/{sd}: {f:?}");
            for (r, l) in remote.iter().zip(&local) {
                assert_eq!(
                    prefill.block(*r),
                    decode.block(*l),
                    "{t:?} {sp}/{sd}: {r} -> {l}"
                );
            }
            for b in (0..BLOCKS).filter(|b| !local.contains(b)) {
                for (o, l) in decode.layout.block_runs(b).expect("runs") {
                    let r = o as usize..(o + l) as usize;
                    assert_eq!(decode.cache[r.clone()], before[r], "block {b} was written");
                }
            }
            prefill.until(|f| f.sending == vec!["p".to_string()]);
            assert_eq!(decode.conn.counters().pulled_blocks, 3);
        }
    }
}

/// A decoder that reaches a staged prefill before its worker heard of the request (so before
/// the blocks were copied out) does not read until the grant is live, then gets the right bytes
/// — not what the staging copy held before.
#[test]
fn a_decoder_never_reads_a_staged_export_before_its_blocks_are_there() {
    let mut transports = vec![TransportKind::Tcp];
    if ucx_loads() {
        transports.push(TransportKind::Ucx);
    }
    for t in transports {
        let prefill = staged_engine("early-staged-prefill", t, true, 40);
        let decode = staged_engine("early-staged-decode", t, false, 41);
        let addr = prefill.conn.listen_addr().expect("listening");
        let host = addr.ip().to_string();
        let g = Generations::new().issue();
        decode
            .conn
            .pull("d", &spec((&host, addr.port()), 1, "p", g, &[4], &[9]));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            decode.conn.poll().recving.is_empty(),
            "{t:?}: reported early"
        );
        prefill.conn.finish("p", Some((g, &[4])));
        let f = decode.until(|f| f.recving.contains(&"d".to_string()));
        assert!(f.load_errors.is_empty(), "{t:?}: {f:?}");
        assert_eq!(decode.block(9), prefill.block(4), "{t:?}");
    }
}

/// A late decoder of a staged grant, after the blocks were reused and a new request staged
/// them: load errors, over TCP and UCX alike.
#[test]
fn a_late_decoder_of_a_staged_grant_after_reuse_gets_load_errors() {
    let mut transports = vec![TransportKind::Tcp];
    if ucx_loads() {
        transports.push(TransportKind::Ucx);
    }
    for t in transports {
        let mut prefill = staged_engine("late-staged-prefill", t, true, 50);
        let decode = staged_engine("late-staged-decode", t, true, 51);
        let addr = prefill.conn.listen_addr().expect("listening");
        let host = addr.ip().to_string();
        let mut gens = Generations::new();
        let (g, g2) = (gens.issue(), gens.issue());
        prefill.conn.finish("p", Some((g, &[3])));
        prefill.until(|f| f.sending == vec!["p".to_string()]);
        reuse(&mut prefill, 3, 0xCD);
        prefill.conn.finish("q", Some((g2, &[3])));
        decode
            .conn
            .pull("d", &spec((&host, addr.port()), 1, "p", g, &[3], &[5]));
        let f = decode.until(|f| f.recving.contains(&"d".to_string()));
        assert_eq!(f.load_errors, vec![5], "{t:?}: {f:?}");
        assert_eq!(decode.conn.counters().pulled_blocks, 0, "{t:?}");
    }
}

/// A device cache on a machine without a CUDA driver (or device) is refused at registration
/// with the reason, not at the first copy.
#[test]
fn a_device_cache_without_a_gpu_is_refused_with_the_reason() {
    if kvferry::kvtier::cuda::Gpu::open(0).is_ok() {
        println!("kvferry-test skipped the no-GPU refusal: this machine has a GPU");
        return;
    }
    let layout = CacheLayout::named(geometry(), BLOCKS, StrideOrder::Lbnhc).expect("layout");
    let conn = Connector::new(ConnectorConfig {
        engine_id: "no-gpu".into(),
        offload: Some(OffloadConfig {
            dram_blocks: 8,
            nvme: None,
            identity: "m".into(),
            caller_evicts: false,
            eviction: Default::default(),
            admission: Default::default(),
            write_budget: None,
            nvme_timeout: None,
        }),
        pd: None,
        tp_size: 1,
        tp_rank: 0,
        total_kv_heads: None,
    })
    .expect("connector");
    // SAFETY: the pointer is never dereferenced: registration fails before any copy can start.
    let e = unsafe { conn.register_device_cache(layout, 0, 0x7f00_0000_0000) }
        .expect_err("no GPU here");
    let msg = e.to_string();
    assert!(msg.contains("CUDA"), "{msg}");
}

/// A request offered again while its first staging copy may still run: the first grant's
/// decoder gets load errors (never the second copy's bytes as its own), the second's decoder
/// the right bytes, and the prefill frees the request only after the second grant ended.
#[test]
fn a_staged_request_offered_again_keeps_one_grant_and_frees_after_it() {
    let prefill = staged_engine("reoffer-prefill", TransportKind::Tcp, true, 60);
    let decode = staged_engine("reoffer-decode", TransportKind::Tcp, false, 61);
    let addr = prefill.conn.listen_addr().expect("listening");
    let host = addr.ip().to_string();
    let mut gens = Generations::new();
    let (g1, g2) = (gens.issue(), gens.issue());
    prefill.conn.finish("p", Some((g1, &[2, 3])));
    prefill.conn.finish("p", Some((g2, &[5, 6])));
    decode.conn.pull(
        "d1",
        &spec((&host, addr.port()), 1, "p", g1, &[2, 3], &[10, 11]),
    );
    let f = decode.until(|f| f.recving.contains(&"d1".to_string()));
    assert_eq!(f.load_errors.len(), 2, "the superseded grant: {f:?}");
    assert!(
        prefill.conn.poll().sending.is_empty(),
        "freed while the second grant is held"
    );
    decode.conn.pull(
        "d2",
        &spec((&host, addr.port()), 1, "p", g2, &[5, 6], &[12, 13]),
    );
    let f = decode.until(|f| f.recving.contains(&"d2".to_string()));
    assert!(f.load_errors.is_empty(), "{f:?}");
    assert_eq!(decode.block(12), prefill.block(5));
    assert_eq!(decode.block(13), prefill.block(6));
    prefill.until(|f| f.sending == vec!["p".to_string()]);
}
