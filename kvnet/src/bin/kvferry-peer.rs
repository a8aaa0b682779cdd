//! kvferry-peer: exports a buffer of blocks over kvferry's transports and serves it until stdin
//! closes. Handy to test a node's network path, and the far side of kvnet's two-process tests.
//!
//! ```text
//! kvferry-peer --name NAME [--bytes N] [--seed S] [--listen ADDR] [--token T] [--insecure]
//!              [--transports ucx,tcp] [--ucx-no-peer-errors]
//! (a non-loopback --listen needs --token, or --insecure to serve anyone who connects)
//! stdout:  READY <listen addr> <region id> <bytes>
//!          NOTIF <from> <payload as text>       (for every notification received)
//! stdin:   dereg | connect <addr> | notify <peer> <text> | quit
//! ```

use std::io::{BufRead, Write};
use std::time::Duration;

use kvnet::kvcore::{MemKind, Region, RegionId};
use kvnet::{Agent, AgentConfig, TransportKind};

/// The byte at offset `i` of a buffer made with `seed`: both sides of a test compute it.
fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kvferry-peer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut name = "peer".to_string();
    let mut bytes: u64 = 64 << 20;
    let mut seed = 1u64;
    let mut cfg_listen = None;
    let mut token = None;
    let mut insecure = false;
    let mut peer_errors = true;
    let mut transports = vec![TransportKind::Ucx, TransportKind::Tcp];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = val()?,
            "--bytes" => bytes = val()?.parse()?,
            "--seed" => seed = val()?.parse()?,
            "--listen" => cfg_listen = Some(val()?.parse()?),
            "--token" => token = Some(val()?),
            "--insecure" => insecure = true,
            "--ucx-no-peer-errors" => peer_errors = false,
            "--transports" => {
                transports = val()?
                    .split(',')
                    .map(|t| match t {
                        "tcp" => Ok(TransportKind::Tcp),
                        "ucx" => Ok(TransportKind::Ucx),
                        o => Err(format!("unknown transport {o}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let mut cfg = AgentConfig::new(name);
    if let Some(l) = cfg_listen {
        cfg.listen = l;
    }
    cfg.token = token;
    cfg.insecure = insecure;
    cfg.transports = transports;
    cfg.ucx_peer_errors = peer_errors;
    // Declared before the agent, so dropped after it on every path out of this function (an
    // error returned with `?` included): no peer or UCX operation can outlive the memory.
    let mut buf: Vec<u8> = (0..bytes).map(|i| pattern(seed, i)).collect();
    let agent = Agent::new(cfg)?;
    // SAFETY: `buf` is dropped after `agent` (declared before it), and this program never
    // touches it again while serving.
    let region = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: bytes,
        })
    }?;
    let mut out = std::io::stdout();
    writeln!(out, "READY {} {} {}", agent.listen_addr(), region.0, bytes)?;
    out.flush()?;
    // Print notifications as they come, on a thread of their own.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdin = std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        for n in agent.wait_notifications(Duration::from_millis(20)) {
            writeln!(
                out,
                "NOTIF {} {}",
                n.from,
                String::from_utf8_lossy(&n.payload)
            )?;
            out.flush()?;
        }
        match rx.try_recv() {
            Ok(line) => {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("dereg") => {
                        agent.deregister(RegionId(region.0))?;
                        writeln!(out, "DEREG")?;
                    }
                    Some("connect") => {
                        let addr = words.next().ok_or("connect needs an address")?.parse()?;
                        writeln!(out, "CONNECTED {}", agent.connect(addr)?)?;
                    }
                    Some("notify") => {
                        let peer = words.next().ok_or("notify needs a peer")?;
                        let text: Vec<&str> = words.collect();
                        agent.notify(peer, text.join(" ").into_bytes())?;
                        writeln!(out, "NOTIFIED")?;
                    }
                    Some("quit") => break,
                    _ => writeln!(out, "ERROR unknown command")?,
                }
                out.flush()?;
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        }
    }
    drop(agent);
    drop(buf);
    let _ = stdin;
    Ok(())
}
