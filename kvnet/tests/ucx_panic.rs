//! A panic on the UCX thread (injected as a bug would cause it): transfers in flight fail in
//! bounded time, the memory they touch — and every region UCX mapped — stays held (UCX's leaked
//! context may still reach it), and the agent goes on serving over TCP. (Dropping such an agent
//! aborts the process: this test leaks it.)
//! Runs with `--features fault-injection`.

use std::time::Duration;

use kvnet::kvcore::{Descriptor, MemKind, Region};
use kvnet::{Agent, AgentConfig, NetError, TransportKind};

mod common;

use common::{pattern, Peer};

#[test]
fn a_panicking_ucx_thread_fails_transfers_keeps_their_memory_and_tcp_carries_on() {
    std::env::set_var("UCX_TLS", "tcp,self");
    std::env::set_var("UCX_NET_DEVICES", "lo");
    let mut cfg = AgentConfig::new("decode");
    cfg.transports = vec![TransportKind::Ucx, TransportKind::Tcp];
    cfg.timeout = Duration::from_secs(5);
    let agent = Agent::new(cfg).expect("agent");
    if agent.ucx_library().is_none() {
        eprintln!(
            "kvferry-test skipped: no usable libucp (install libucx0 or set KVFERRY_UCX_LIB)"
        );
        return;
    }
    const BIG: usize = 64 << 20;
    // Leaked on purpose: after the panic UCX may still write these buffers, so this test may
    // never free them (deregistration says Busy, as the contract asks the caller to keep them).
    let big: &'static mut [u8] = Box::leak(vec![0u8; BIG].into_boxed_slice());
    let idle: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let reg = |b: &mut [u8]| {
        // SAFETY: both buffers are leaked, so they outlive the agent and any UCX operation.
        unsafe {
            agent.register(Region {
                kind: MemKind::Host,
                base: b.as_mut_ptr() as u64,
                len: b.len() as u64,
            })
        }
        .expect("register")
    };
    let (r_big, r_idle) = (reg(big), reg(idle));
    let p = Peer::start(
        "prefill",
        BIG as u64,
        8,
        &["--transports", "ucx,tcp"],
        &[("UCX_TLS", "tcp,self"), ("UCX_NET_DEVICES", "lo")],
    );
    assert_eq!(agent.connect(p.addr).expect("handshake"), "prefill");
    assert_eq!(agent.transport_for("prefill"), Some(TransportKind::Ucx));
    let l = [Descriptor {
        region: r_big,
        offset: 0,
        len: BIG as u64,
    }];
    let id = agent
        .read(&l, "prefill", &[p.desc(0, BIG as u64)], None)
        .expect("posted");
    // Queued right behind the transfer: the thread posts its operations, then panics.
    agent.inject_ucx_panic();
    let done = agent
        .wait(id, Duration::from_secs(30))
        .expect("a transfer in flight ends in bounded time");
    let e = done.result.expect_err("it fails");
    assert!(e.to_string().contains("panicked"), "{e}");
    // Its memory stays held, and so does every region UCX mapped.
    for r in [r_big, r_idle] {
        assert!(
            matches!(agent.deregister(r), Err(NetError::Busy(_))),
            "region {r} is kept"
        );
    }
    // The agent goes on over TCP.
    assert_eq!(agent.transport_for("prefill"), Some(TransportKind::Tcp));
    let small: &'static mut [u8] = Box::leak(vec![0u8; 1 << 20].into_boxed_slice());
    // A new region cannot be mapped by the dead UCX thread; without a live UCX it is refused.
    // SAFETY: leaked, like the others.
    let r = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: small.as_mut_ptr() as u64,
            len: small.len() as u64,
        })
    };
    match r {
        Ok(r_small) => {
            let l = [Descriptor {
                region: r_small,
                offset: 0,
                len: 1 << 20,
            }];
            let id = agent
                .read(&l, "prefill", &[p.desc(0, 1 << 20)], None)
                .expect("posted over TCP");
            agent
                .wait(id, Duration::from_secs(30))
                .expect("bounded")
                .result
                .expect("read over TCP");
            assert!(small
                .iter()
                .enumerate()
                .all(|(i, &x)| x == pattern(8, i as u64)));
        }
        Err(e) => panic!("registering for TCP after the UCX thread died: {e}"),
    }
    // Dropping it would abort the process (its registered memory may still be reached through
    // UCX's leaked context, so `register`'s contract cannot be kept): the test leaks it, as it
    // leaks the buffers.
    std::mem::forget(agent);
}
