//! Which blocks leaving DRAM are worth an NVMe write, and how many writes the drive can take.
//!
//! Every block evicted from G2 written to G3 is, on a chat workload, mostly a write of a block
//! nobody reads again (three in four blocks of the production trace are used once), and drives
//! are rated for a number of full writes a day. Two independent gates: [`Admission`] (is this
//! block likely to be read from G3?) and [`WriteBudget`] (a token bucket over bytes written: a
//! write over budget is dropped, never queued, so a busy drive never stalls eviction).

use std::time::Duration;

use kvcore::BlockHash;

use crate::policy::sketch::FrequencySketch;

/// Which blocks leaving G2 are written to G3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admission {
    /// Every block.
    #[default]
    Always,
    /// Blocks read back (onboarded) at least this many times.
    MinHits(u32),
    /// TinyLFU (Einziger et al., 2017): written while G3 has free slots, and after that only
    /// when the block was used at least as often recently as the block G3 would evict for it
    /// (frequencies from a count-min sketch aged every `n` × G3's capacity uses: a shorter
    /// memory writes more and loses fewer G3 hits; `bench/RESULTS.md` has the frontier).
    Frequency(u32),
}

/// `frequency` without a window: the knee of the measured frontier.
pub const DEFAULT_FREQUENCY_WINDOW: u32 = 4;

impl std::str::FromStr for Admission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "always" | "all" => Ok(Admission::Always),
            "frequency" | "tinylfu" => Ok(Admission::Frequency(DEFAULT_FREQUENCY_WINDOW)),
            _ => {
                let number = |n: &str| -> Result<u32, String> {
                    n.parse().map_err(|e| format!("admission {s:?}: {e}"))
                };
                if let Some(n) = s.strip_prefix("min-hits:") {
                    Ok(Admission::MinHits(number(n)?))
                } else if let Some(n) = s.strip_prefix("frequency:") {
                    match number(n)? {
                        0 => Err(format!("admission {s:?}: the window is at least 1")),
                        n => Ok(Admission::Frequency(n)),
                    }
                } else {
                    Err(format!(
                        "unknown admission {s:?}; one of always, frequency[:N], min-hits:N"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admission::Always => f.write_str("always"),
            Admission::MinHits(n) => write!(f, "min-hits:{n}"),
            Admission::Frequency(n) => write!(f, "frequency:{n}"),
        }
    }
}

/// A cap on bytes written to G3: `bytes_per_sec` on average, up to `burst_bytes` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteBudget {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

impl WriteBudget {
    /// A drive of `capacity_bytes` written at most `dwpd` times its capacity a day, with a
    /// minute of that as burst.
    pub fn drive_writes_per_day(capacity_bytes: u64, dwpd: f64) -> WriteBudget {
        let per_sec = (capacity_bytes as f64 * dwpd / 86_400.0).max(1.0) as u64;
        WriteBudget {
            bytes_per_sec: per_sec,
            burst_bytes: per_sec.saturating_mul(60),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionCounters {
    /// Blocks leaving G2 written to G3.
    pub admitted: u64,
    /// Not written: admission judged them unlikely to be read from G3.
    pub rejected: u64,
    /// Not written: admitted, but over the write budget.
    pub dropped: u64,
    pub bytes_admitted: u64,
}

/// What to do with a block leaving G2 that G3 does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Write,
    Reject,
    /// Over the write budget.
    Drop,
}

/// The gates' state: the sketch, the bucket, the counters.
pub struct Gate {
    admission: Admission,
    sketch: Option<FrequencySketch>,
    budget: Option<(WriteBudget, f64, Duration)>,
    block_bytes: u64,
    pub counters: AdmissionCounters,
}

impl Gate {
    pub fn new(
        admission: Admission,
        budget: Option<WriteBudget>,
        g3_blocks: u64,
        block_bytes: u64,
    ) -> Gate {
        let sketch = match admission {
            Admission::Frequency(n) => {
                let period = g3_blocks.max(1).saturating_mul(u64::from(n.max(1)));
                Some(FrequencySketch::new(period, period))
            }
            _ => None,
        };
        Gate {
            admission,
            sketch,
            // A burst under one block would drop every write.
            budget: budget.map(|b| {
                let b = WriteBudget {
                    burst_bytes: b.burst_bytes.max(block_bytes),
                    ..b
                };
                (b, b.burst_bytes as f64, Duration::ZERO)
            }),
            block_bytes,
            counters: AdmissionCounters::default(),
        }
    }

    /// A use of `h` (a save or a load), for the frequency sketch.
    pub fn record(&mut self, h: &BlockHash) {
        if let Some(s) = &mut self.sketch {
            s.increment(h);
        }
    }

    /// Whether `h` (onboarded `hits` times) goes to G3. `g3_victim` is the block G3 would evict
    /// for it (`None`: a slot is free). `now` is a monotonic time (the engine's clock, or a
    /// trace's), for the budget. Counts rejections and drops; [`Gate::wrote`] counts writes.
    pub fn judge(
        &mut self,
        h: &BlockHash,
        hits: u32,
        g3_victim: Option<&BlockHash>,
        now: Duration,
    ) -> Verdict {
        let admit = match self.admission {
            Admission::Always => true,
            Admission::MinHits(n) => hits >= n,
            Admission::Frequency(_) => match (g3_victim, &self.sketch) {
                (None, _) | (_, None) => true,
                (Some(v), Some(s)) => s.estimate(h) >= s.estimate(v),
            },
        };
        if !admit {
            self.counters.rejected += 1;
            return Verdict::Reject;
        }
        if let Some((b, tokens, last)) = &mut self.budget {
            let dt = now.saturating_sub(*last).as_secs_f64();
            *last = now.max(*last);
            *tokens = (*tokens + dt * b.bytes_per_sec as f64).min(b.burst_bytes as f64);
            if *tokens < self.block_bytes as f64 {
                self.counters.dropped += 1;
                return Verdict::Drop;
            }
            *tokens -= self.block_bytes as f64;
        }
        Verdict::Write
    }

    /// A block judged `Write` was written (a G3 slot was found for it).
    pub fn wrote(&mut self) {
        self.counters.admitted += 1;
        self.counters.bytes_admitted += self.block_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> BlockHash {
        BlockHash::from_u64(i)
    }

    #[test]
    fn frequency_admits_while_room_then_only_what_beats_the_victim() {
        let mut g = Gate::new(Admission::Frequency(4), None, 100, 4096);
        for _ in 0..5 {
            g.record(&h(1));
        }
        g.record(&h(2));
        g.record(&h(3));
        assert_eq!(g.judge(&h(2), 0, None, Duration::ZERO), Verdict::Write);
        assert_eq!(
            g.judge(&h(2), 0, Some(&h(1)), Duration::ZERO),
            Verdict::Reject
        );
        assert_eq!(
            g.judge(&h(1), 0, Some(&h(2)), Duration::ZERO),
            Verdict::Write
        );
        assert_eq!(
            g.judge(&h(3), 0, Some(&h(2)), Duration::ZERO),
            Verdict::Write,
            "ties go in"
        );
        assert_eq!(g.counters.admitted, 0, "nothing written yet");
    }

    #[test]
    fn the_budget_drops_writes_over_it_and_refills_with_time() {
        let b = WriteBudget {
            bytes_per_sec: 4096,
            burst_bytes: 8192,
        };
        let mut g = Gate::new(Admission::Always, Some(b), 100, 4096);
        let t0 = Duration::from_secs(10);
        assert_eq!(g.judge(&h(1), 0, None, t0), Verdict::Write);
        assert_eq!(g.judge(&h(2), 0, None, t0), Verdict::Write);
        assert_eq!(g.judge(&h(3), 0, None, t0), Verdict::Drop);
        assert_eq!(
            g.judge(&h(3), 0, None, t0 + Duration::from_secs(1)),
            Verdict::Write
        );
        assert_eq!(g.counters.dropped, 1);
        g.wrote();
        assert_eq!(g.counters.bytes_admitted, 4096);
        // A burst under one block still lets a block through per block's worth of time.
        let tiny = WriteBudget {
            bytes_per_sec: 1024,
            burst_bytes: 1,
        };
        let mut g = Gate::new(Admission::Always, Some(tiny), 100, 4096);
        assert_eq!(g.judge(&h(1), 0, None, t0), Verdict::Write);
        assert_eq!(g.judge(&h(2), 0, None, t0), Verdict::Drop);
        let later = t0 + Duration::from_secs(4);
        assert_eq!(g.judge(&h(2), 0, None, later), Verdict::Write);
    }

    #[test]
    fn names_parse() {
        for a in [
            Admission::Always,
            Admission::MinHits(2),
            Admission::Frequency(8),
        ] {
            assert_eq!(a.to_string().parse::<Admission>(), Ok(a));
        }
        assert_eq!(
            "tinylfu".parse(),
            Ok(Admission::Frequency(DEFAULT_FREQUENCY_WINDOW))
        );
        assert!("sometimes".parse::<Admission>().is_err());
        assert!("frequency:0".parse::<Admission>().is_err());
    }
}
