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
//! What it does not do: hide or protect the bytes after the handshake. An attacker on the path
//! can still read them, and one who relays both directions can ride the authenticated
//! connection. On an untrusted network, run kvferry over an encrypted fabric or link.

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
}
