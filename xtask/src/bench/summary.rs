//! The key numbers of every benchmark part as nb / contender ratios beside their targets: one
//! table at the end of a run, and `target/bench/summary.json` after a full run.

use std::fmt::Write as _;

/// What a key number should be.
#[derive(Clone, Copy)]
pub enum Target {
    /// The ratio nb / contender at least this.
    AtLeast(f64),
    /// The ratio nb / contender at most this (latency: lower is better).
    AtMost(f64),
    /// nb's own number below this (no contender, e.g. memory in MB).
    Below(f64),
    /// Reported only.
    None,
}

/// One key number of a part: nb's value, the contender's, and the target for their ratio.
pub struct Key {
    pub part: &'static str,
    /// What is compared, with its unit, e.g. "HTTP kept-alive req/s vs HAProxy".
    pub what: String,
    pub nb: f64,
    /// The contender's value; `None` when nb's number stands alone.
    pub other: Option<f64>,
    pub target: Target,
    /// The target is ours, not one the README's benchmark section or the issue set (marked `*` in
    /// the table).
    pub assumed: bool,
}

impl Key {
    /// nb / contender, when there is a contender.
    pub fn ratio(&self) -> Option<f64> {
        self.other.map(|o| self.nb / o)
    }

    /// Whether the target is met; `None` when there is no target.
    pub fn met(&self) -> Option<bool> {
        match (self.target, self.ratio()) {
            (Target::AtLeast(t), Some(r)) => Some(r >= t),
            (Target::AtMost(t), Some(r)) => Some(r <= t),
            (Target::Below(t), _) => Some(self.nb < t),
            _ => None,
        }
    }

    fn target_text(&self) -> String {
        let star = if self.assumed { "*" } else { "" };
        match self.target {
            Target::AtLeast(t) => format!(">= {t:.1}x{star}"),
            Target::AtMost(t) => format!("<= {t:.1}x{star}"),
            Target::Below(t) => format!("< {t}{star}"),
            Target::None => "-".into(),
        }
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Prints the keys as one table.
pub fn print(title: &str, keys: &[Key]) {
    println!("== {title}");
    println!(
        "   {:<5} {:<50} {:>10} {:>10} {:>7} {:>9} {:>7}",
        "part", "nb vs", "nb", "other", "ratio", "target", "met"
    );
    for k in keys {
        let met = match k.met() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "-",
        };
        println!(
            "   {:<5} {:<50} {:>10} {:>10} {:>7} {:>9} {:>7}",
            k.part,
            k.what,
            num(k.nb),
            k.other.map(num).unwrap_or_else(|| "-".into()),
            k.ratio()
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "-".into()),
            k.target_text(),
            met
        );
    }
    if keys.iter().any(|k| k.assumed) {
        println!("   * no target given for this number: parity with the contender assumed");
    }
}

/// The keys as a JSON array (hand-written: xtask carries no serializer).
pub fn json(keys: &[Key]) -> String {
    let opt = |v: Option<f64>| {
        v.map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "null".into())
    };
    let rows: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "    {{\"part\": \"{}\", \"what\": \"{}\", \"nb\": {:.3}, \"other\": {}, \
                 \"ratio\": {}, \"target\": \"{}\", \"target_assumed\": {}, \"met\": {}}}",
                k.part,
                k.what,
                k.nb,
                opt(k.other),
                opt(k.ratio()),
                k.target_text().trim_end_matches('*'),
                k.assumed,
                k.met()
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "null".into())
            )
        })
        .collect();
    let mut s = String::from("[\n");
    let _ = write!(s, "{}\n  ]", rows.join(",\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(nb: f64, other: Option<f64>, target: Target) -> Key {
        Key {
            part: "l7",
            what: "x".into(),
            nb,
            other,
            target,
            assumed: false,
        }
    }

    #[test]
    fn targets_judge_the_ratio_or_nbs_own_number() {
        assert_eq!(
            key(90.0, Some(100.0), Target::AtLeast(0.8)).met(),
            Some(true)
        );
        assert_eq!(
            key(70.0, Some(100.0), Target::AtLeast(0.8)).met(),
            Some(false)
        );
        assert_eq!(key(1.1, Some(1.0), Target::AtMost(1.0)).met(), Some(false));
        assert_eq!(key(12.0, None, Target::Below(30.0)).met(), Some(true));
        assert_eq!(key(12.0, Some(3.0), Target::None).met(), None);
        assert!(json(&[key(1.0, None, Target::None)]).contains("\"ratio\": null"));
    }
}
