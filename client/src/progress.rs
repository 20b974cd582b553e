//! How a run looks while it is followed (`train`, `watch`): a progress bar per epoch with loss,
//! learning rate, tokens/s and ETA, and plain lines for the dataset, epochs, samples and
//! checkpoints. Without a terminal on stderr there is no bar: step lines are printed at a
//! modest rate instead, so logs stay readable. With `--json`, one line per event.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use synopsis_proto::v1::{train_event, DatasetStats, RunStarted, StepEvent, TrainEvent};

use crate::output::{self, format_bytes, format_loss};

/// Step lines printed per run when there is no progress bar to show every step.
const PLAIN_STEP_LINES: u64 = 50;

/// Renders the events of one run, in order.
#[derive(Debug)]
pub struct RunView {
    json: bool,
    tty: bool,
    bar: Option<ProgressBar>,
    bar_epoch: u32,
    epoch_start_step: u64,
    epochs: Option<u64>,
    steps_per_epoch: Option<u64>,
    total_steps: u64,
    last_step: u64,
    run_id: Option<String>,
    next_seq: u64,
}

impl RunView {
    pub fn new(json: bool, from_seq: u64) -> Self {
        Self {
            json,
            tty: std::io::stderr().is_terminal(),
            bar: None,
            bar_epoch: 0,
            epoch_start_step: 0,
            epochs: None,
            steps_per_epoch: None,
            total_steps: 0,
            last_step: 0,
            run_id: None,
            next_seq: from_seq,
        }
    }

    /// The run being shown, once an event has named it.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// Where a later `watch --from` should resume to see nothing twice.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn show(&mut self, event: &TrainEvent) -> anyhow::Result<()> {
        if self.run_id.is_none() {
            self.run_id = Some(event.run_id.clone());
        }
        self.next_seq = self.next_seq.max(event.seq + 1);
        if self.json {
            return output::emit(&output::train_event_json(event));
        }
        match &event.event {
            Some(train_event::Event::Started(s)) => self.started(&event.run_id, s),
            Some(train_event::Event::Step(s)) => self.step(s),
            Some(train_event::Event::Epoch(e)) => {
                self.close_bar();
                if e.step > self.epoch_start_step && e.epoch == 1 {
                    self.steps_per_epoch = Some(e.step - self.epoch_start_step);
                }
                let of = self.epochs.map(|n| format!("/{n}")).unwrap_or_default();
                self.say(&format!(
                    "epoch {}{of}: train loss {}, validation loss {} (perplexity {}), {:.0} s",
                    e.epoch,
                    format_loss(e.train_loss),
                    format_loss(e.val_loss),
                    perplexity(e.val_perplexity),
                    e.seconds
                ));
            }
            Some(train_event::Event::Sample(s)) => {
                let text = if s.text.starts_with(&s.prompt) {
                    s.text.clone()
                } else {
                    format!("{}{}", s.prompt, s.text)
                };
                // One line per sample: generated newlines would break the log's layout.
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                self.say(&format!("  sample: {text}"));
            }
            Some(train_event::Event::Checkpoint(c)) => self.say(&format!(
                "checkpoint {} written (epoch {}, step {}, validation loss {}, {}{})",
                c.checkpoint_id,
                c.epoch,
                c.step,
                format_loss(c.val_loss),
                format_bytes(c.size_bytes),
                if c.reason.is_empty() {
                    String::new()
                } else {
                    format!(", {}", c.reason)
                }
            )),
            Some(train_event::Event::Finished(f)) => {
                self.close_bar();
                let mut line = format!("run {} {}", event.run_id, output::run_state_name(f.state));
                // The trainer may repeat the state as the message; say it once.
                if !f.message.is_empty() && f.message != output::run_state_name(f.state) {
                    line.push_str(&format!(": {}", f.message));
                }
                if !f.last_checkpoint_id.is_empty() {
                    line.push_str(&format!(" (last checkpoint {})", f.last_checkpoint_id));
                }
                self.say(&line);
            }
            None => {}
        }
        Ok(())
    }

    /// Removes the bar (before the command prints its last words).
    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    fn started(&mut self, run_id: &str, s: &RunStarted) {
        self.total_steps = s.total_steps;
        self.epoch_start_step = s.start_step;
        self.last_step = s.start_step;
        if let Ok(config) = serde_json::from_str::<serde_json::Value>(&s.resolved_config_json) {
            self.epochs = find_u64(&config, "epochs").filter(|&n| n > 0);
            let max_steps = find_u64(&config, "max_steps").unwrap_or(0);
            // Only without a step limit do the planned steps split evenly into epochs.
            if let (Some(epochs), 0) = (self.epochs, max_steps) {
                self.steps_per_epoch = Some(s.total_steps.div_ceil(epochs));
            }
        }
        let resumed = if s.start_step > 0 {
            format!(", resuming at step {}", s.start_step)
        } else {
            String::new()
        };
        self.say(&format!(
            "run {run_id} started on {}: {} parameters, {} steps{resumed}",
            if s.device.is_empty() { "?" } else { &s.device },
            human_count(s.parameters),
            s.total_steps
        ));
        if let Some(d) = &s.dataset {
            for line in dataset_lines(d) {
                self.say(&line);
            }
        }
    }

    fn step(&mut self, s: &StepEvent) {
        if s.total_steps > 0 {
            self.total_steps = s.total_steps;
        }
        if s.epoch != self.bar_epoch {
            self.close_bar();
            self.bar_epoch = s.epoch;
            self.epoch_start_step = self.last_step.min(s.step.saturating_sub(1));
            if self.tty {
                self.bar = Some(self.new_bar(s.epoch));
            }
        }
        self.last_step = s.step;
        let message = format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s  step {}/{}",
            s.loss, s.lr, s.tokens_per_second, s.step, self.total_steps
        );
        match &self.bar {
            Some(bar) => {
                let position = s.step.saturating_sub(self.epoch_start_step);
                // The estimate of the epoch's length was short: stretch to what is left.
                if bar.length().is_some_and(|len| position > len) {
                    let remaining = self.total_steps.saturating_sub(self.epoch_start_step);
                    bar.set_length(remaining.max(position));
                }
                bar.set_position(position);
                bar.set_message(message);
            }
            None => {
                let every = (self.total_steps / PLAIN_STEP_LINES).max(1);
                if s.step % every == 0 || s.step == self.total_steps {
                    println!("epoch {} {message}", s.epoch);
                }
            }
        }
    }

    fn new_bar(&self, epoch: u32) -> ProgressBar {
        let remaining = self.total_steps.saturating_sub(self.epoch_start_step);
        let len = match self.steps_per_epoch {
            Some(n) => n.min(remaining),
            None => remaining,
        };
        let bar = ProgressBar::new(len.max(1));
        let template =
            "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len}  {msg}  ETA {eta} ({elapsed})";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let of = self.epochs.map(|n| format!("/{n}")).unwrap_or_default();
        bar.set_prefix(format!("epoch {epoch}{of}"));
        bar
    }

    fn close_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    /// Prints a line above the bar without tearing it.
    fn say(&self, line: &str) {
        // Lines carry server text (samples, messages): nothing in it may drive the terminal.
        let line = crate::output::safe_text(line);
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }
}

fn dataset_lines(d: &DatasetStats) -> Vec<String> {
    let mut lines = vec![format!(
        "dataset: {} rows read, {} kept (text column `{}`)",
        d.rows_read, d.rows_kept, d.text_column
    )];
    let counts = |map: &std::collections::HashMap<String, u64>| {
        let mut items: Vec<_> = map.iter().filter(|(_, &n)| n > 0).collect();
        items.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        items
            .iter()
            .map(|(k, n)| format!("{} {n}", k.replace('_', " ")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let dropped = counts(&d.dropped);
    if !dropped.is_empty() {
        lines.push(format!("  dropped: {dropped}"));
    }
    let modified = counts(&d.modified);
    if !modified.is_empty() {
        lines.push(format!("  modified: {modified}"));
    }
    lines.push(format!(
        "  train: {} documents, {} tokens; validation: {} documents, {} tokens",
        d.train_documents,
        human_count(d.train_tokens),
        d.eval_documents,
        human_count(d.eval_tokens)
    ));
    lines
}

fn perplexity(p: f64) -> String {
    if p.is_finite() {
        format!("{p:.2}")
    } else {
        "-".to_string()
    }
}

/// 124439808 → "124.4M": parameter and token counts are read, not copied.
fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

/// The first number stored under `key` anywhere in a JSON document.
fn find_u64(value: &serde_json::Value, key: &str) -> Option<u64> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| map.values().find_map(|v| find_u64(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_numbers_and_counts_read_well() {
        let v = serde_json::json!({"hyper": {"epochs": 6, "max_steps": 0}});
        assert_eq!(find_u64(&v, "epochs"), Some(6));
        assert_eq!(find_u64(&v, "seq_len"), None);
        assert_eq!(human_count(124_439_808), "124.4M");
        assert_eq!(human_count(850_000), "850.0k");
        assert_eq!(human_count(42), "42");
    }
}
