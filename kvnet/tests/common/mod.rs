//! A `kvferry-peer` child process for the two-process tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use kvnet::kvcore::{Descriptor, RegionId};

/// The byte at offset `i` of a peer's buffer made with `seed` (as kvferry-peer computes it).
pub fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

pub struct Peer {
    pub child: Child,
    pub stdin: ChildStdin,
    pub out: BufReader<ChildStdout>,
    pub addr: SocketAddr,
    pub region: RegionId,
    pub bytes: u64,
}

impl Peer {
    /// Starts a peer exporting `bytes` of `pattern(seed, _)`, with extra arguments and
    /// environment, and waits for its READY line.
    pub fn start(name: &str, bytes: u64, seed: u64, args: &[&str], env: &[(&str, &str)]) -> Peer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvferry-peer"));
        cmd.args([
            "--name",
            name,
            "--bytes",
            &bytes.to_string(),
            "--seed",
            &seed.to_string(),
        ]);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("peer starts");
        let stdin = child.stdin.take().expect("piped");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let line = read_line(&mut out);
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.first(), Some(&"READY"), "{line}");
        Peer {
            addr: w[1].parse().expect("address"),
            region: RegionId(w[2].parse().expect("region")),
            bytes: w[3].parse().expect("bytes"),
            child,
            stdin,
            out,
        }
    }

    /// The next line the peer prints.
    pub fn line(&mut self) -> String {
        read_line(&mut self.out)
    }

    /// Sends a command and returns the peer's answer.
    pub fn command(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("peer input");
        self.stdin.flush().expect("flush");
        self.line()
    }

    pub fn desc(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor {
            region: self.region,
            offset,
            len,
        }
    }
}

fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut s = String::new();
    out.read_line(&mut s).expect("peer output");
    s.trim().to_string()
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hello a dialer named `name` sends to `challenge`, with its proof of `token` (none: an
/// empty proof), for tests that speak the handshake by hand.
pub fn hello_for(
    challenge: &kvnet::kvcore::wire::Challenge,
    name: &str,
    version: u16,
    token: Option<&[u8]>,
) -> kvnet::kvcore::wire::Message {
    use kvnet::kvcore::auth::Role;
    let proof = token
        .and_then(|t| transcript(challenge, name).mac(t, Role::Dialer))
        .map(|p| p.to_vec())
        .unwrap_or_default();
    kvnet::kvcore::wire::Message::Hello(kvnet::kvcore::wire::Hello {
        name: name.into(),
        protocol_version: version,
        nonce: DIALER_NONCE,
        proof,
    })
}

/// The nonce hand-made dialers use (a listener's fresh nonce keeps every transcript new).
const DIALER_NONCE: [u8; 32] = [7u8; 32];

/// What a hand-made dialer named `name` and the listener of `challenge` agree on.
fn transcript<'a>(
    challenge: &'a kvnet::kvcore::wire::Challenge,
    name: &'a str,
) -> kvnet::kvcore::auth::Transcript<'a> {
    kvnet::kvcore::auth::Transcript {
        listener_nonce: &challenge.nonce,
        dialer_nonce: &DIALER_NONCE,
        listener_name: &challenge.name,
        dialer_name: name,
    }
}

/// A connection spoken by hand after a handshake made with [`hello_for`]: frames sealed as the
/// agent seals them when a token authenticated it (`kvcore::auth::seals`).
pub struct RawConn {
    pub stream: std::net::TcpStream,
    seals: Option<(kvnet::kvcore::auth::Seal, kvnet::kvcore::auth::Seal)>,
}

impl RawConn {
    /// Connects, reads the challenge and says hello as `name`; returns the connection and the
    /// listener's first answer (its proof, or a refusal).
    pub fn dial(
        addr: std::net::SocketAddr,
        name: &str,
        version: u16,
        token: Option<&[u8]>,
    ) -> (RawConn, Option<kvnet::kvcore::wire::Message>) {
        use kvnet::kvcore::auth::{seals, Role};
        use kvnet::kvcore::wire::Message;
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let Some(Message::Challenge(c)) = read_plain(&mut stream) else {
            panic!("expected a challenge")
        };
        stream
            .write_all(&hello_for(&c, name, version, token).encode())
            .expect("hello");
        let reply = read_plain(&mut stream);
        let seals = token
            .and_then(|t| transcript(&c, name).mac(t, Role::Session))
            .map(|k| seals(&k, Role::Dialer));
        (RawConn { stream, seals }, reply)
    }

    /// A frame's bytes as this connection sends it (sealed when it is).
    pub fn frame(&mut self, m: &kvnet::kvcore::wire::Message) -> Vec<u8> {
        let mut f = m.encode();
        if let Some((send, _)) = &mut self.seals {
            let tag = send.tag(&f);
            f.extend_from_slice(&tag);
        }
        f
    }

    pub fn send(&mut self, m: &kvnet::kvcore::wire::Message) -> std::io::Result<()> {
        use std::io::Write;
        let f = self.frame(m);
        self.stream.write_all(&f)
    }

    /// The next frame, its seal checked (None when the connection ended or the seal failed).
    pub fn recv(&mut self) -> Option<kvnet::kvcore::wire::Message> {
        use std::io::Read;
        let Some((_, recv)) = &mut self.seals else {
            return read_plain(&mut self.stream);
        };
        let frame = read_frame_bytes(&mut self.stream)?;
        let mut tag = [0u8; kvnet::kvcore::auth::TAG_LEN];
        self.stream.read_exact(&mut tag).ok()?;
        if recv.tag(&frame) != tag {
            return None;
        }
        kvnet::kvcore::wire::Message::decode(&frame).ok()
    }
}

fn read_frame_bytes(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    let mut rest = vec![0u8; len + 8];
    s.read_exact(&mut rest).ok()?;
    Some([&head[..], &rest].concat())
}

/// One unsealed frame (the handshake's, or any frame of a connection without a token).
pub fn read_plain(s: &mut std::net::TcpStream) -> Option<kvnet::kvcore::wire::Message> {
    kvnet::kvcore::wire::Message::decode(&read_frame_bytes(s)?).ok()
}
