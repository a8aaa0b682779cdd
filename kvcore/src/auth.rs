//! The side channel's mutual authentication, sans I/O. Both agents hold a shared token. The
//! listener sends a nonce and its name; the dialer answers with its name, its own nonce and a
//! proof; the listener checks it and answers with its proof; only then does the dialer send
//! anything about itself (metadata, keys, addresses).
//!
//! Each proof is HMAC-SHA256 keyed by the token over the role, both nonces and both names, so:
//! - a proof cannot be reflected (the roles differ) nor replayed (the other side's fresh nonce
//!   is in it);
//! - neither side can be impersonated to the other without the token, and a dialer does not
//!   sign whatever a listener hands it (its own nonce is in its proof and the listener must
//!   prove itself over that nonce);
//! - the names a connection authenticated are the ones in the proofs.
//!
//! After the handshake both sides hold a session key (the transcript's `Session` MAC) and seal
//! everything they send, frames and bulk bytes alike, with a [`Seal`] per direction: keyed
//! BLAKE3 over a sequence number, the length and the bytes. So an attacker on the path can
//! neither inject, alter, reorder, drop nor replay (within or across connections: each has its
//! own nonces, hence keys) anything a peer acts on without the connection failing.
//!
//! What it does not do: hide the bytes. An attacker on the path can read them (KV caches and
//! the prompts they encode); where that matters, run kvferry over an encrypted fabric or link.

use hmac::{Hmac, Mac};
use sha2::Sha256;

const LABEL: &[u8] = b"kvferry-auth-v2";

/// Which side a proof or key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Listener,
    /// The session key both derive.
    Session,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"dialer",
            Role::Listener => b"listener",
            Role::Session => b"session",
        }
    }
}

/// What both sides agreed on in a handshake.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    pub listener_nonce: &'a [u8; 32],
    pub dialer_nonce: &'a [u8; 32],
    pub listener_name: &'a str,
    pub dialer_name: &'a str,
}

impl Transcript<'_> {
    /// HMAC-SHA256(token, label ‖ role ‖ each field length-prefixed). `None` only if the MAC
    /// refused the key, which HMAC never does (it takes keys of any length); callers treat it
    /// as a failed authentication, never as a value.
    pub fn mac(&self, token: &[u8], role: Role) -> Option<[u8; 32]> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).ok()?;
        for field in [
            LABEL,
            role.tag(),
            self.listener_nonce.as_slice(),
            self.dialer_nonce.as_slice(),
            self.listener_name.as_bytes(),
            self.dialer_name.as_bytes(),
        ] {
            m.update(&(field.len() as u64).to_le_bytes());
            m.update(field);
        }
        Some(m.finalize().into_bytes().into())
    }

    /// Whether `proof` is `role`'s proof under `token`, in constant time.
    pub fn verify(&self, token: &[u8], role: Role, proof: &[u8]) -> bool {
        self.mac(token, role)
            .is_some_and(|want| constant_time_eq(&want, proof))
    }
}

/// Bytes of a seal's tag: 128 bits of keyed BLAKE3.
pub const TAG_LEN: usize = 16;

/// Which way a [`Seal`] protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    DialerToListener,
    ListenerToDialer,
}

/// One direction of a connection's sealing: each thing sent gets the next sequence number, so
/// the receiver's seal (same key, same count) verifies them in order and only in order.
pub struct Seal {
    key: [u8; 32],
    seq: u64,
}

/// An incremental tag over one sealed message (bulk bytes arrive in pieces).
pub struct Tagger {
    h: blake3::Hasher,
}

impl Tagger {
    pub fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
    }

    pub fn finish(self) -> [u8; TAG_LEN] {
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&self.h.finalize().as_bytes()[..TAG_LEN]);
        t
    }

    /// Whether `tag` is this message's, in constant time.
    pub fn verify(self, tag: &[u8]) -> bool {
        constant_time_eq(&self.finish(), tag)
    }
}

impl Seal {
    /// The seal for `dir` from a handshake's session key (`Transcript::mac(token, Session)`).
    pub fn new(session: &[u8; 32], dir: Direction) -> Seal {
        let context = match dir {
            Direction::DialerToListener => "kvferry side channel v3 seal dialer to listener",
            Direction::ListenerToDialer => "kvferry side channel v3 seal listener to dialer",
        };
        Seal {
            key: blake3::derive_key(context, session),
            seq: 0,
        }
    }

    /// Starts the next message, of `len` bytes in all.
    pub fn next(&mut self, len: u64) -> Tagger {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.seq.to_le_bytes());
        h.update(&len.to_le_bytes());
        self.seq += 1;
        Tagger { h }
    }

    /// The next message's tag, for bytes at hand.
    pub fn tag(&mut self, bytes: &[u8]) -> [u8; TAG_LEN] {
        let mut t = self.next(bytes.len() as u64);
        t.update(bytes);
        t.finish()
    }
}

/// Both seals of one side of a connection: (what we send, what we receive).
pub fn seals(session: &[u8; 32], role: Role) -> (Seal, Seal) {
    let (d2l, l2d) = (
        Seal::new(session, Direction::DialerToListener),
        Seal::new(session, Direction::ListenerToDialer),
    );
    match role {
        Role::Listener => (l2d, d2l),
        _ => (d2l, l2d),
    }
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(ln: &'a [u8; 32], dn: &'a [u8; 32], l: &'a str, d: &'a str) -> Transcript<'a> {
        Transcript {
            listener_nonce: ln,
            dialer_nonce: dn,
            listener_name: l,
            dialer_name: d,
        }
    }

    #[test]
    fn proofs_bind_role_nonces_names_and_token() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let x = t(&a, &b, "prefill", "decode");
        let p = x.mac(b"token", Role::Dialer).expect("mac");
        assert!(x.verify(b"token", Role::Dialer, &p));
        // Reflection: the dialer's proof is not the listener's.
        assert!(!x.verify(b"token", Role::Listener, &p));
        assert!(!x.verify(b"other", Role::Dialer, &p));
        for other in [
            t(&b, &b, "prefill", "decode"),
            t(&a, &a, "prefill", "decode"),
            t(&a, &b, "prefil", "decode"),
            t(&a, &b, "prefill", "decoder"),
            // Length prefixes: moving a byte between names changes the proof.
            t(&a, &b, "prefilld", "ecode"),
        ] {
            assert!(!other.verify(b"token", Role::Dialer, &p), "{other:?}");
        }
        assert!(!x.verify(b"token", Role::Dialer, &p[..31]));
        assert_ne!(x.mac(b"token", Role::Session), Some(p));
    }

    #[test]
    fn seals_verify_in_order_only_and_per_direction() {
        let session = [7u8; 32];
        let (mut d_send, mut d_recv) = seals(&session, Role::Dialer);
        let (mut l_send, mut l_recv) = seals(&session, Role::Listener);
        let (a, b) = (d_send.tag(b"first"), d_send.tag(b"second"));
        // Out of order, or replayed, fails; in order passes.
        let check = |seal: &mut Seal, msg: &[u8], tag: &[u8]| {
            let mut t = seal.next(msg.len() as u64);
            t.update(msg);
            t.verify(tag)
        };
        assert!(!check(&mut l_recv, b"second", &b));
        let (_, mut l_recv) = seals(&session, Role::Listener);
        assert!(check(&mut l_recv, b"first", &a));
        assert!(!check(&mut l_recv, b"first", &a), "a replay");
        // A tag of the other direction, or of altered bytes, fails.
        let c = l_send.tag(b"reply");
        assert!(!check(&mut l_recv, b"reply", &c));
        assert!(check(&mut d_recv, b"reply", &c));
        let e = d_send.tag(b"third");
        let (_, mut l2) = seals(&session, Role::Listener);
        l2.tag(b"first");
        l2.tag(b"second");
        assert!(!check(&mut l2, b"thirD", &e));
        // Pieces hash as the whole.
        let (mut s1, _) = seals(&session, Role::Dialer);
        let (mut s2, _) = seals(&session, Role::Dialer);
        let mut t = s1.next(10);
        t.update(b"01234");
        t.update(b"56789");
        assert_eq!(t.finish(), s2.tag(b"0123456789"));
        // Another session key, another tag.
        let (mut other, _) = seals(&[8u8; 32], Role::Dialer);
        assert_ne!(other.tag(b"first"), a);
    }
}
