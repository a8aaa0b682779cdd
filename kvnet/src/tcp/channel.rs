//! One side-channel connection after its handshake: frames and bulk bytes, each sealed with the
//! session's keys when a token authenticated it (`kvcore::auth::Seal`: a tag after each frame
//! and after each run of bulk bytes). Without a token (loopback, or `insecure`) nothing is
//! sealed, as nothing was authenticated.

use std::io::IoSlice;

use kvcore::auth::{constant_time_eq, Seal, TAG_LEN};
use kvcore::wire::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::NetError;
use crate::framing::{io, read_message, MAX_CONTROL_PAYLOAD};

pub(crate) struct Channel {
    stream: TcpStream,
    pub peer: String,
    /// (what we send, what we receive).
    seals: Option<(Seal, Seal)>,
}

fn forged(peer: &str, what: &str) -> NetError {
    NetError::Auth {
        peer: peer.to_string(),
        reason: format!(
            "a {what} failed its seal (altered, injected, replayed or reordered on the way)"
        ),
    }
}

impl Channel {
    pub fn new(stream: TcpStream, peer: String, seals: Option<(Seal, Seal)>) -> Channel {
        Channel {
            stream,
            peer,
            seals,
        }
    }

    /// Whether the peer has neither closed this idle connection nor sent on it unasked. The
    /// first write to a connection the peer already closed succeeds (the kernel takes it), so a
    /// notification sent on it would be lost without an error: pooled connections are checked
    /// before reuse. A non-blocking peek of the socket itself, not tokio's cached readiness.
    pub fn is_open(&self) -> bool {
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&self.stream).peek(&mut b) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            // 0: the peer closed it; anything else: bytes nobody asked for.
            Ok(_) => false,
        }
    }

    /// A frame as it goes on the wire: encoded, then its seal.
    fn framed(&mut self, m: &Message) -> Vec<u8> {
        let mut frame = m.encode();
        if let Some((send, _)) = &mut self.seals {
            let tag = send.tag(&frame);
            frame.extend_from_slice(&tag);
        }
        frame
    }

    pub async fn send(&mut self, m: &Message) -> Result<(), NetError> {
        let frame = self.framed(m);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| io("write frame", &self.peer, e))
    }

    pub async fn recv(&mut self) -> Result<Message, NetError> {
        let Some((_, recv)) = &mut self.seals else {
            return read_message(&mut self.stream, &self.peer).await;
        };
        // The frame is read (bounded by its header) and checked before it is decoded.
        let frame =
            crate::framing::read_frame(&mut self.stream, &self.peer, MAX_CONTROL_PAYLOAD).await?;
        let mut tag = [0u8; TAG_LEN];
        self.stream
            .read_exact(&mut tag)
            .await
            .map_err(|e| io("read frame", &self.peer, e))?;
        if !constant_time_eq(&recv.tag(&frame), &tag) {
            return Err(forged(&self.peer, "frame"));
        }
        Ok(Message::decode_with_limit(&frame, MAX_CONTROL_PAYLOAD)?)
    }

    /// A frame, then every slice in order, then their seal, in the same vectored writes: one
    /// segment on the wire for a small transfer, so the peer wakes once for both.
    pub async fn send_with_bytes(&mut self, m: &Message, parts: &[&[u8]]) -> Result<(), NetError> {
        // The frame's seal comes first in the session's sequence, then the bytes' (as when
        // they were sent apart).
        let frame = Some(self.framed(m));
        let tag = self.seals.as_mut().map(|(send, _)| {
            let len = parts.iter().map(|p| p.len() as u64).sum();
            let mut t = send.next(len);
            for p in parts {
                t.update(p);
            }
            t.finish()
        });
        let mut bufs: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 2);
        if let Some(f) = &frame {
            bufs.push(IoSlice::new(f));
        }
        bufs.extend(parts.iter().map(|p| IoSlice::new(p)));
        if let Some(tag) = &tag {
            bufs.push(IoSlice::new(tag));
        }
        let mut rest: &mut [IoSlice<'_>] = &mut bufs;
        while !rest.is_empty() {
            // At most 1024 buffers per call (IOV_MAX).
            let n = rest.len().min(1024);
            let w = self
                .stream
                .write_vectored(&rest[..n])
                .await
                .map_err(|e| io("send", &self.peer, e))?;
            if w == 0 {
                return Err(io("send", &self.peer, std::io::ErrorKind::WriteZero.into()));
            }
            IoSlice::advance_slices(&mut rest, w);
        }
        Ok(())
    }

    /// Fills every buffer in order, then checks their seal: on an error the buffers hold
    /// whatever arrived, which the caller must not take as the peer's bytes.
    pub async fn recv_bytes(&mut self, dsts: Vec<&mut [u8]>) -> Result<(), NetError> {
        let len = dsts.iter().map(|d| d.len() as u64).sum();
        let mut tagger = self.seals.as_mut().map(|(_, recv)| recv.next(len));
        for dst in dsts {
            self.stream
                .read_exact(dst)
                .await
                .map_err(|e| io("receive", &self.peer, e))?;
            if let Some(t) = &mut tagger {
                t.update(dst);
            }
        }
        if let Some(t) = tagger {
            let mut tag = [0u8; TAG_LEN];
            self.stream
                .read_exact(&mut tag)
                .await
                .map_err(|e| io("receive", &self.peer, e))?;
            if !t.verify(&tag) {
                return Err(forged(&self.peer, "run of bulk bytes"));
            }
        }
        Ok(())
    }
}
