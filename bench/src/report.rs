//! Result rows, printed as an aligned table or as JSON lines. Every row carries the physical
//! limit measured in the same run and the ratio to it.

use std::fmt::Write as _;

#[derive(Clone, Debug)]
pub struct Row {
    pub path: String,
    pub block_bytes: u64,
    pub batch: u64,
    pub gbps: f64,
    pub limit_gbps: f64,
    /// Extra named columns (e.g. `plan_ms`, `copies`).
    pub extra: Vec<(&'static str, Value)>,
}

#[derive(Clone, Debug)]
pub enum Value {
    Int(u64),
    Float(f64),
    Text(String),
}

impl Value {
    fn table(&self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => format!("{v:.3}"),
            Value::Text(s) => s.clone(),
        }
    }

    fn json(&self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => json_f64(*v),
            Value::Text(s) => json_str(s),
        }
    }
}

impl Row {
    pub fn ratio(&self) -> f64 {
        if self.limit_gbps > 0.0 {
            self.gbps / self.limit_gbps
        } else {
            0.0
        }
    }

    /// A limit is physical (memcpy, fio, ucx_perftest, a torch copy) unless its name says it
    /// is a peer's figure (`peer: ...`), which kvferry may beat.
    fn physical_limit(&self) -> bool {
        self.limit_gbps > 0.0
            && !self
                .extra
                .iter()
                .any(|(k, v)| *k == "limit" && matches!(v, Value::Text(t) if t.starts_with("peer")))
    }

    /// What a reader must know before trusting the row: above a physical limit by more than
    /// 10 % is a measurement error (the limit was not measured on the same pattern), and a
    /// timing whose repeats never settled is noisy.
    pub fn check(&self) -> &'static str {
        if self.physical_limit() && self.ratio() > 1.1 {
            return "ABOVE LIMIT: measurement error";
        }
        let noisy = self.extra.iter().any(|(k, v)| {
            *k == "spread" && matches!(v, Value::Float(x) if *x > crate::limits::NOISY)
        });
        if noisy {
            "noisy"
        } else {
            "ok"
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"path\":{},\"block_bytes\":{},\"batch\":{},\"gbps\":{},\"limit_gbps\":{},\"ratio\":{}",
            json_str(&self.path),
            self.block_bytes,
            self.batch,
            json_f64(self.gbps),
            json_f64(self.limit_gbps),
            json_f64(self.ratio())
        );
        for (k, v) in &self.extra {
            let _ = write!(s, ",{}:{}", json_str(k), v.json());
        }
        let _ = write!(
            s,
            ",\"check\":{},\"machine\":{}",
            json_str(self.check()),
            json_str(crate::limits::machine())
        );
        s.push('}');
        s
    }
}

pub fn json_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else {
        "null".into()
    }
}

pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn print(rows: &[Row], json: bool) {
    if json {
        for r in rows {
            println!("{}", r.to_json());
        }
        return;
    }
    // Rows with different extra columns get their own header.
    let mut start = 0;
    while start < rows.len() {
        let keys: Vec<&str> = rows[start].extra.iter().map(|(k, _)| *k).collect();
        let end = rows[start..]
            .iter()
            .position(|r| r.extra.iter().map(|(k, _)| *k).ne(keys.iter().copied()))
            .map_or(rows.len(), |p| start + p);
        print_table(&rows[start..end], &keys);
        start = end;
    }
}

fn print_table(rows: &[Row], extra_keys: &[&str]) {
    let mut header = vec![
        "path".to_string(),
        "block_bytes".into(),
        "batch".into(),
        "gbps".into(),
        "limit_gbps".into(),
        "ratio".into(),
    ];
    header.extend(extra_keys.iter().map(|k| k.to_string()));
    header.push("check".into());
    let mut cells: Vec<Vec<String>> = vec![header];
    for r in rows {
        let mut line = vec![
            r.path.clone(),
            r.block_bytes.to_string(),
            r.batch.to_string(),
            format!("{:.2}", r.gbps),
            format!("{:.2}", r.limit_gbps),
            format!("{:.3}", r.ratio()),
        ];
        line.extend(r.extra.iter().map(|(_, v)| v.table()));
        line.push(r.check().into());
        cells.push(line);
    }
    print_cells(&cells);
}

/// An aligned table: the first column left-aligned, the rest right-aligned.
pub fn print_cells(cells: &[Vec<String>]) {
    let columns = cells.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            cells
                .iter()
                .filter_map(|l| l.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in cells {
        let text: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let w = widths.get(i).copied().unwrap_or(0);
                if i == 0 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        println!("{}", text.join("  "));
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_carry_the_required_fields() {
        let r = Row {
            path: "plan:\"x\"".into(),
            block_bytes: 4096,
            batch: 8,
            gbps: 2.0,
            limit_gbps: 4.0,
            extra: vec![("plan_ms", Value::Float(1.5)), ("copies", Value::Int(3))],
        };
        let j = r.to_json();
        let head = "{\"path\":\"plan:\\\"x\\\"\",\"block_bytes\":4096,\"batch\":8,\"gbps\":2.000000,\"limit_gbps\":4.000000,\"ratio\":0.500000,\"plan_ms\":1.500000,\"copies\":3,\"check\":\"ok\",\"machine\":";
        assert!(j.starts_with(head), "{j}");
    }

    #[test]
    fn a_row_above_a_physical_limit_is_an_error_and_above_a_peer_is_not() {
        let row = |limit: &str, spread: f64| Row {
            path: "x".into(),
            block_bytes: 1,
            batch: 1,
            gbps: 2.0,
            limit_gbps: 1.0,
            extra: vec![
                ("spread", Value::Float(spread)),
                ("limit", Value::Text(limit.into())),
            ],
        };
        assert_eq!(
            row("memcpy x2", 0.0).check(),
            "ABOVE LIMIT: measurement error"
        );
        assert_eq!(row("peer: NIXL initiator", 0.0).check(), "ok");
        assert_eq!(row("peer: NIXL initiator", 0.5).check(), "noisy");
    }
}
