//! kvtier: the tiered block store (pinned DRAM pool, NVMe through io_uring, block index, copy
//! engines). Built on `kvcore`; never depends on `kvnet`.

pub use kvcore;
