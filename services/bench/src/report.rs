//! The tables the benchmarks print: every figure beside its reference, the ratio and the target,
//! so a reader sees at a glance what was met and what was not.

/// A plain-text table with aligned columns (Markdown-compatible).
#[derive(Debug, Clone)]
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Table {
            title: title.to_string(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as text: a title line, then `| a | b |` rows padded to the widest cell.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..columns)
                .map(|i| {
                    let cell = cells.get(i).map(String::as_str).unwrap_or("");
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = format!("\n{}\n", self.title);
        out.push_str(&line(&self.headers));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// A figure with three significant digits, without scientific notation for everyday sizes.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `ours / reference` as "1.62×".
pub fn ratio(ours: f64, reference: f64) -> String {
    if reference > 0.0 && ours.is_finite() && reference.is_finite() {
        format!("{:.2}×", ours / reference)
    } else {
        "n/a".into()
    }
}

/// Whether `ours / reference` reaches `at_least` (a higher-is-better figure).
pub fn verdict_at_least(ours: f64, reference: f64, at_least: f64) -> String {
    if !(reference > 0.0 && ours.is_finite()) {
        return format!("≥ {at_least}×: not measured");
    }
    let r = ours / reference;
    if r >= at_least {
        format!("≥ {at_least}×: met")
    } else {
        format!("≥ {at_least}×: MISSED")
    }
}

/// Whether `ours / reference` stays at or under `at_most` (a lower-is-better figure).
pub fn verdict_at_most(ours: f64, reference: f64, at_most: f64) -> String {
    if !(reference > 0.0 && ours.is_finite()) {
        return format!("≤ {at_most}×: not measured");
    }
    if ours / reference <= at_most {
        format!("≤ {at_most}×: met")
    } else {
        format!("≤ {at_most}×: MISSED")
    }
}

/// Bytes as MiB.
pub fn mib(bytes: f64) -> String {
    format!("{} MiB", num(bytes / f64::from(1u32 << 20)))
}

/// The best (highest) of repeated throughput measurements; the machine is shared, so the
/// best run is the one least disturbed by others.
pub fn best(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// The median of repeated latency measurements.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
