//! Output shared by every command: JSON lines for scripts (`--json`), and the small formatting
//! helpers (states, sizes, times) that keep the human output consistent across commands.

use std::io::Write;

use serde_json::{json, Value};
use synopsis_proto::v1::{
    train_event, CheckpointInfo, DatasetStats, FinishReason, RunState, ServingState, TrainEvent,
};

/// Longest server-supplied text shown in one table cell or line, in characters.
pub const MAX_CELL_CHARS: usize = 80;

fn escape_into(out: &mut String, c: char) {
    // Control characters and bidirectional overrides could rewrite the terminal or hide text.
    if c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

/// Server-supplied text as the CLI prints it on one line: every control character escaped
/// (no escape sequence reaches the terminal, no newline breaks a table).
pub fn safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        escape_into(&mut out, c);
    }
    out
}

/// [`safe`], cut to [`MAX_CELL_CHARS`] with an ellipsis: for table cells and names.
pub fn safe_cell(text: &str) -> String {
    let escaped = safe(text);
    if escaped.chars().count() <= MAX_CELL_CHARS {
        return escaped;
    }
    let mut cut: String = escaped.chars().take(MAX_CELL_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// Server-supplied prose (generated text, samples): newlines and tabs kept, every other
/// control character escaped.
pub fn safe_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' || c == '\t' {
            out.push(c);
        } else {
            escape_into(&mut out, c);
        }
    }
    out
}

/// Writes one JSON object as one line on stdout and flushes, so a reader sees it at once.
pub fn emit(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

pub fn run_state_name(state: i32) -> &'static str {
    match RunState::try_from(state) {
        Ok(RunState::Queued) => "queued",
        Ok(RunState::Running) => "running",
        Ok(RunState::Completed) => "completed",
        Ok(RunState::Stopped) => "stopped",
        Ok(RunState::Failed) => "failed",
        Ok(RunState::Unspecified) | Err(_) => "unknown",
    }
}

pub fn finish_reason_name(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Eos) => "eos",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Cancelled) => "cancelled",
        Ok(FinishReason::Unspecified) | Err(_) => "unknown",
    }
}

pub fn serving_state_name(state: i32) -> &'static str {
    match ServingState::try_from(state) {
        Ok(ServingState::Waiting) => "waiting",
        Ok(ServingState::Serving) => "serving",
        Ok(ServingState::Draining) => "draining",
        Ok(ServingState::Unspecified) | Err(_) => "unknown",
    }
}

/// "1.5 MB" style sizes (decimal units, as disks are sold).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "2026-11-29 09:13:09 UTC" from seconds since the Unix epoch (no time zone database needed).
pub fn format_time(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A finite loss as text, "-" when there was none (NaN).
pub fn format_loss(loss: f64) -> String {
    if loss.is_finite() {
        format!("{loss:.4}")
    } else {
        "-".to_string()
    }
}

pub fn checkpoint_json(c: &CheckpointInfo) -> Value {
    json!({
        "checkpoint_id": c.checkpoint_id,
        "run_id": c.run_id,
        "epoch": c.epoch,
        "step": c.step,
        "val_loss": c.val_loss,
        "sha256": c.sha256,
        "size_bytes": c.size_bytes,
        "created": c.created,
        "reason": c.reason,
        "condition_columns": c.condition_columns,
        "parameters": c.parameters,
    })
}

pub fn dataset_json(d: &DatasetStats) -> Value {
    json!({
        "rows_read": d.rows_read,
        "rows_kept": d.rows_kept,
        "dropped": d.dropped,
        "modified": d.modified,
        "train_documents": d.train_documents,
        "eval_documents": d.eval_documents,
        "train_tokens": d.train_tokens,
        "eval_tokens": d.eval_tokens,
        "text_column": d.text_column,
    })
}

/// One line of `train --json` / `watch --json`: the event's kind and fields, flat.
pub fn train_event_json(e: &TrainEvent) -> Value {
    let (kind, mut body) = match &e.event {
        Some(train_event::Event::Started(s)) => (
            "started",
            json!({
                // The trainer sends JSON; pass it through as an object when it parses.
                "config": serde_json::from_str::<Value>(&s.resolved_config_json)
                    .unwrap_or_else(|_| Value::String(s.resolved_config_json.clone())),
                "device": s.device,
                "parameters": s.parameters,
                "dataset": s.dataset.as_ref().map(dataset_json),
                "total_steps": s.total_steps,
                "start_step": s.start_step,
            }),
        ),
        Some(train_event::Event::Step(s)) => (
            "step",
            json!({
                "epoch": s.epoch, "step": s.step, "total_steps": s.total_steps, "loss": s.loss,
                "lr": s.lr, "tokens_per_second": s.tokens_per_second, "grad_norm": s.grad_norm,
            }),
        ),
        Some(train_event::Event::Epoch(s)) => (
            "epoch",
            json!({
                "epoch": s.epoch, "step": s.step, "train_loss": s.train_loss,
                "val_loss": s.val_loss, "val_perplexity": s.val_perplexity, "seconds": s.seconds,
            }),
        ),
        Some(train_event::Event::Checkpoint(c)) => ("checkpoint", checkpoint_json(c)),
        Some(train_event::Event::Sample(s)) => (
            "sample",
            json!({ "epoch": s.epoch, "prompt": s.prompt, "text": s.text }),
        ),
        Some(train_event::Event::Finished(f)) => (
            "finished",
            json!({
                "state": run_state_name(f.state),
                "message": f.message,
                "last_checkpoint_id": f.last_checkpoint_id,
            }),
        ),
        None => ("unknown", json!({})),
    };
    if let Value::Object(map) = &mut body {
        map.insert("event".into(), json!(kind));
        map.insert("run_id".into(), json!(e.run_id));
        map.insert("seq".into(), json!(e.seq));
        map.insert("time".into(), json!(e.time));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        assert_eq!(safe("a\u{1b}[2J\nb"), "a\\u{1b}[2J\\nb");
        assert_eq!(safe_text("line\nnext\u{7}"), "line\nnext\\u{7}");
        let long = safe_cell(&"x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_CELL_CHARS);
        assert!(safe("\u{202e}evil").starts_with("\\u{202e}"));
    }

    #[test]
    fn formats_times_and_sizes() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1_500_000), "1.5 MB");
        assert_eq!(format_loss(f64::NAN), "-");
    }

    #[test]
    fn event_json_is_flat_with_kind_and_nan_as_null() {
        let e = TrainEvent {
            run_id: "r1".into(),
            seq: 7,
            time: 1.5,
            event: Some(train_event::Event::Epoch(synopsis_proto::v1::EpochEvent {
                epoch: 2,
                val_loss: f64::NAN,
                ..Default::default()
            })),
        };
        let v = train_event_json(&e);
        assert_eq!(v["event"], "epoch");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["epoch"], 2);
        assert!(v["val_loss"].is_null());
    }
}
