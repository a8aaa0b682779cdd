//! kvnet: agents and transports. A decode node pulls a request's KV blocks out of a prefill
//! node's registered memory (or a prefill node pushes them), with a notification when done.
//! Built on `kvcore`; never depends on `kvtier`.
//!
//! ## NIXL's shapes, kvferry's bytes
//!
//! The agent follows NIXL's model: named agents; registered memory exported as regions of
//! `(address, length, device)` with a memory kind (host/pinned host ≈ NIXL DRAM, device ≈ VRAM,
//! file ≈ FILE); metadata carrying one connection blob per transport (NIXL's per-backend
//! connection info) and per-region remote keys; READ/WRITE of descriptor lists; notifications as
//! `(agent, bytes)`.
//!
//! Where the bytes differ, and why:
//! - Metadata, transfer notices and notifications are kvcore frames (magic, version, length,
//!   xxh3 checksum), not NIXL's `nixlSerDes` strings: every field is typed and capped, and a
//!   corrupted frame is detected rather than half-parsed.
//!
//! ## Stock NIXL agents
//!
//! Where a peer is a stock NIXL agent, the agent speaks NIXL's own bytes (`kvcore::nixl`):
//! `Agent::nixl_metadata` / `load_nixl_metadata` exchange NIXL metadata blobs, `nixl_fetch_metadata`
//! / `nixl_send_metadata` / `nixl_invalidate` use a NIXL listener, `AgentConfig::nixl_listen`
//! serves NIXL's side channel, and notifications to and from NIXL peers are NIXL's UCX active
//! messages. Transfers are the UCX backend's, with NIXL's settings (error mode PEER, flush before
//! the notification). UCX versions must be close: load a recent libucp (the `libucx-cu12` wheel).
//! - Regions carry ids; descriptors name `(region id, offset, len)` rather than raw addresses,
//!   so a TCP peer can only name memory inside what was exported to it, and stale ids after
//!   deregistration fail the bounds check.
//! - Metadata may carry KV cache layouts (geometry, strides, TP rank) so the reading side plans
//!   its copies without another round trip; NIXL leaves that to the engine.
//! - The side channel authenticates both ways: each side proves the shared token with an
//!   HMAC-SHA256 over its role, both nonces and both names (`kvcore::auth`), and the dialer
//!   sends nothing about itself before the listener proved itself; everything after is sealed
//!   under the session key (frames and bulk bytes). NIXL's socket side channel has no
//!   authentication.
//! - Notifications between kvferry agents travel on the side channel only (after the data,
//!   when UCX moved it): a UCX active message names no authenticated sender, so one counts only
//!   as a stock NIXL agent's, where NIXL interop is enabled, never under a kvferry peer's name.
//!
//! ## Inside
//!
//! `registry` owns every exported region's life (holds, claims, map/unmap order); `transport`
//! is the trait the TCP and UCX transports implement, each with its own state; `ctx` is what
//! they share (registry, peer table, inbox); `agent` composes them. No transport imports the
//! agent or another transport.
//! - Over TCP the serving side checks every descriptor against its exports, and then asks the
//!   owner (`Agent::set_serve_check`: kvferry's connector allows READs of granted blocks only).
//!   UCX one-sided operations are never checked at the target: UCX's software RMA serves any
//!   address of the process to any endpoint, and its wire-up is unauthenticated, so a UCX
//!   agent trusts the fabric (the README says what that means for an operator).

pub mod agent;
mod ctx;
pub mod error;
mod framing;
mod inbox;
mod mem;
mod nixl;
mod peers;
mod registry;
mod tcp;
mod transport;
pub(crate) mod ucx;

pub use agent::{Agent, AgentConfig};
pub use error::NetError;
pub use inbox::{MAX_QUEUED_NOTIFICATIONS, MAX_QUEUED_NOTIFICATION_BYTES};
pub use kvcore;
pub use peers::{MAX_PEERS, MAX_PEER_METADATA};
pub use tcp::{CallHandler, ServeCheck, Verdict};
pub use transport::{TransferDone, TransferId, TransportKind};
