//! Trace files. Mooncake's (one JSON object per line, `hash_ids` naming 512-token blocks) and a
//! simple one for users' own logs: one request per line or a JSON array, each
//! `{"timestamp": ms, "tokens": [token ids]}` (`prompt_token_ids` also accepted), hashed into
//! chained blocks of `block_tokens` tokens the way kvferry hashes prompts.

use std::collections::HashMap;
use std::path::Path;

use kvferry::kvcore::{BlockHash, PrefixHasher};
use serde_json::Value;

use super::{Request, Trace};

/// Mooncake's traces name blocks of this many tokens.
pub const MOONCAKE_BLOCK_TOKENS: u64 = 512;

pub fn load(path: &Path, block_tokens: u64) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let records: Vec<Value> = if text.trim_start().starts_with('[') {
        match serde_json::from_str(&text) {
            Ok(Value::Array(v)) => v,
            Ok(_) => return Err(format!("{}: not a JSON array", path.display())),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
            })
            .collect::<Result<_, _>>()?
    };
    let name = path
        .file_name()
        .map_or_else(|| "trace".into(), |n| n.to_string_lossy().into_owned());
    parse(&name, &records, block_tokens)
}

pub fn parse(name: &str, records: &[Value], block_tokens: u64) -> Result<Trace, String> {
    let hasher = PrefixHasher::new(block_tokens.clamp(1, 1 << 20) as usize);
    let mut ids: HashMap<BlockHash, u64> = HashMap::new();
    let mut requests = Vec::with_capacity(records.len());
    let mut mooncake = None;
    for (i, r) in records.iter().enumerate() {
        let at_ms = r
            .get("timestamp")
            .and_then(Value::as_u64)
            .unwrap_or(i as u64);
        let ints = |v: &Value| -> Result<Vec<u64>, String> {
            v.as_array()
                .ok_or_else(|| format!("{name}: request {i}: not a list"))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .ok_or_else(|| format!("{name}: request {i}: {x} is not an id"))
                })
                .collect()
        };
        let blocks = if let Some(h) = r.get("hash_ids") {
            mooncake = Some(true);
            ints(h)?
        } else if let Some(t) = r.get("tokens").or_else(|| r.get("prompt_token_ids")) {
            mooncake = Some(false);
            let tokens: Vec<u32> = ints(t)?
                .into_iter()
                .map(|x| u32::try_from(x).map_err(|_| format!("{name}: token {x} too large")))
                .collect::<Result<_, _>>()?;
            hasher
                .hash_prefix(&tokens)
                .into_iter()
                .map(|h| {
                    let next = ids.len() as u64;
                    *ids.entry(h).or_insert(next)
                })
                .collect()
        } else {
            return Err(format!(
                "{name}: request {i} has neither hash_ids nor tokens"
            ));
        };
        requests.push(Request { at_ms, blocks });
    }
    Ok(Trace {
        name: name.to_string(),
        requests,
        block_tokens: if mooncake == Some(true) {
            MOONCAKE_BLOCK_TOKENS
        } else {
            block_tokens
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prompts_sharing_a_prefix_share_its_blocks() {
        let recs: Vec<Value> = serde_json::from_str(
            r#"[{"timestamp": 5, "tokens": [1,2,3,4,5,6,7,8,9]},
                {"prompt_token_ids": [1,2,3,4,9,9,9,9]}]"#,
        )
        .expect("test input");
        let t = parse("t", &recs, 4).expect("test input");
        assert_eq!(t.requests[0].blocks.len(), 2, "only full blocks");
        assert_eq!(t.requests[1].blocks[0], t.requests[0].blocks[0]);
        assert_ne!(t.requests[1].blocks[1], t.requests[0].blocks[1]);
        assert_eq!(t.requests[0].at_ms, 5);
        assert_eq!(t.block_tokens, 4);
    }

    #[test]
    fn mooncake_lines_keep_their_ids() {
        let recs: Vec<Value> = vec![serde_json::from_str(
            r#"{"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [0, 7]}"#,
        )
        .expect("test input")];
        let t = parse("m", &recs, 16).expect("test input");
        assert_eq!(t.requests[0].blocks, vec![0, 7]);
        assert_eq!(t.block_tokens, MOONCAKE_BLOCK_TOKENS);
        assert!(parse("bad", &[serde_json::json!({"x": 1})], 16).is_err());
    }
}
