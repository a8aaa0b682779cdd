//! A synthetic trace with another reuse shape than the production one, to check that a policy
//! chosen on one trace is not tuned to it: popular shared documents (Zipf), multi-turn sessions
//! whose turns come back after exponential think times, one-off requests, and a few long
//! system prompts. Deterministic for a seed.

use super::{Request, Trace};

/// splitmix64: small, seedable, good enough for workload shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Zipf(s) over 0..n by inversion of a precomputed CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut c: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = c.iter().sum();
        let mut acc = 0.0;
        for x in &mut c {
            acc += *x / total;
            *x = acc;
        }
        Zipf(c)
    }
    fn sample(&self, r: &mut Rng) -> usize {
        let u = r.unit();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

struct Session {
    blocks: Vec<u64>,
    turns_left: u32,
    due: f64,
}

/// `requests` requests; block ids are fresh integers, shared where prefixes are.
pub fn generate(seed: u64, requests: usize) -> Trace {
    let mut r = Rng(seed);
    let mut next_id = 0u64;
    let mut fresh = |n: u64| -> Vec<u64> {
        let v = (next_id..next_id + n).collect();
        next_id += n;
        v
    };
    let systems: Vec<Vec<u64>> = (0..8).map(|i| fresh(1 + i % 4 * 3)).collect();
    let system_pick = Zipf::new(systems.len(), 1.2);
    let docs: Vec<Vec<u64>> = (0..3000).map(|_| fresh(r.range(4, 48))).collect();
    let doc_pick = Zipf::new(docs.len(), 0.9);
    let mut sessions: Vec<Session> = Vec::new();
    let mut out = Vec::with_capacity(requests);
    let mut now = 0.0f64;
    while out.len() < requests {
        now += r.exp(250.0);
        // A session whose think time is over goes first.
        if let Some(i) = sessions.iter().position(|s| s.due <= now) {
            let mut s = sessions.swap_remove(i);
            let mut blocks = s.blocks.clone();
            blocks.extend(fresh(r.range(1, 6)));
            out.push(Request {
                at_ms: now as u64,
                blocks: blocks.clone(),
            });
            s.turns_left -= 1;
            if s.turns_left > 0 {
                s.blocks = blocks;
                s.due = now + r.exp(90_000.0);
                sessions.push(s);
            }
            continue;
        }
        let u = r.unit();
        let blocks = if u < 0.45 {
            // Document QA: a popular document, then a question nobody asks again.
            let mut b = docs[doc_pick.sample(&mut r)].clone();
            b.extend(fresh(r.range(1, 2)));
            b
        } else if u < 0.8 {
            // A new chat session under a system prompt.
            let mut b = systems[system_pick.sample(&mut r)].clone();
            b.extend(fresh(r.range(2, 10)));
            let turns = 1 + (r.exp(3.0) as u32).min(30);
            if turns > 1 {
                sessions.push(Session {
                    blocks: b.clone(),
                    turns_left: turns - 1,
                    due: now + r.exp(90_000.0),
                });
            }
            b
        } else {
            // One-off: a system prompt, then a long unshared body.
            let mut b = systems[system_pick.sample(&mut r)].clone();
            b.extend(fresh(r.range(4, 40)));
            b
        };
        out.push(Request {
            at_ms: now as u64,
            blocks,
        });
    }
    Trace {
        name: format!("synthetic-{seed}"),
        requests: out,
        block_tokens: 512,
    }
}

/// In Mooncake's format, so other tools can replay it too.
pub fn to_jsonl(t: &Trace) -> String {
    let mut s = String::new();
    for q in &t.requests {
        let ids: Vec<String> = q.blocks.iter().map(u64::to_string).collect();
        s.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": 0, \"hash_ids\": [{}]}}\n",
            q.at_ms,
            q.blocks.len() as u64 * t.block_tokens,
            ids.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_trace_and_prefixes_are_shared() {
        let a = generate(7, 2000);
        let b = generate(7, 2000);
        assert_eq!(a.requests, b.requests);
        assert_eq!(a.requests.len(), 2000);
        assert!(a.distinct() < a.references(), "some blocks are used again");
        let back = super::super::load::parse(
            "x",
            &to_jsonl(&a)
                .lines()
                .map(|l| serde_json::from_str(l).expect("test input"))
                .collect::<Vec<_>>(),
            16,
        )
        .expect("test input");
        assert_eq!(back.requests, a.requests);
    }
}
