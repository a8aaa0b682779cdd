//! Reading and writing kvcore frames on an async stream: the 12-byte header is judged before the
//! payload is read, so a hostile length never makes us buffer more than the cap.

use kvcore::wire::{Header, Message, HEADER_LEN, TRAILER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::NetError;

/// Control frames are small; bulk data travels outside frames.
pub(crate) const MAX_CONTROL_PAYLOAD: u32 = 16 << 20;

/// Frames before the peer authenticated (challenge, hello, proof) are tiny: a connection that
/// has proved nothing gets no bigger buffer than this.
pub(crate) const PRE_AUTH_PAYLOAD: u32 = 4 << 10;

pub(crate) async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: &str,
) -> Result<Message, NetError> {
    read_message_capped(s, peer, MAX_CONTROL_PAYLOAD).await
}

pub(crate) async fn read_message_capped<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: &str,
    cap: u32,
) -> Result<Message, NetError> {
    let frame = read_frame(s, peer, cap).await?;
    Ok(Message::decode_with_limit(&frame, cap)?)
}

/// One frame's bytes, its length judged by the header before the rest is read; not decoded.
pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: &str,
    cap: u32,
) -> Result<Vec<u8>, NetError> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head)
        .await
        .map_err(|e| io("read frame", peer, e))?;
    let h = Header::parse(&head, cap)?;
    let mut frame = vec![0u8; h.frame_len()];
    frame[..HEADER_LEN].copy_from_slice(&head);
    s.read_exact(&mut frame[HEADER_LEN..HEADER_LEN + h.payload_len as usize + TRAILER_LEN])
        .await
        .map_err(|e| io("read frame", peer, e))?;
    Ok(frame)
}

pub(crate) async fn write_message<S: AsyncWrite + Unpin>(
    s: &mut S,
    peer: &str,
    m: &Message,
) -> Result<(), NetError> {
    s.write_all(&m.encode())
        .await
        .map_err(|e| io("write frame", peer, e))
}

pub(crate) fn io(op: &'static str, peer: &str, source: std::io::Error) -> NetError {
    NetError::Io {
        op,
        peer: peer.to_string(),
        source,
    }
}
