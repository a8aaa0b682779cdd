//! Request traces for cache-policy replay: loading (Mooncake's format, token-id prompts),
//! generating (a synthetic workload of another reuse shape), replaying through kvtier's real
//! index and admission gate, and the offline optimum to compare with.

pub mod belady;
pub mod connector;
pub mod load;
pub mod payload;
pub mod replay;
pub mod synth;

/// One request: when it arrived and its prompt's full blocks, in order (ids shared by requests
/// that share the prefix).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub at_ms: u64,
    pub blocks: Vec<u64>,
}

#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    pub requests: Vec<Request>,
    /// Tokens per block (for bytes written).
    pub block_tokens: u64,
}

impl Trace {
    pub fn references(&self) -> u64 {
        self.requests.iter().map(|r| r.blocks.len() as u64).sum()
    }

    pub fn distinct(&self) -> u64 {
        let mut s = std::collections::HashSet::new();
        for r in &self.requests {
            s.extend(r.blocks.iter().copied());
        }
        s.len() as u64
    }
}

/// Hits of one request against `has`: leading blocks only (a prefix cache cannot use a block
/// after one it does not have).
pub fn prefix_hits(blocks: &[u64], has: impl Fn(u64) -> bool) -> usize {
    blocks.iter().take_while(|b| has(**b)).count()
}
