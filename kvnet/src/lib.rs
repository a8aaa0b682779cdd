//! kvnet: agents and transports (UCX, TCP) with NIXL-shaped metadata and notifications. Built on
//! `kvcore`; never depends on `kvtier`.

pub use kvcore;
