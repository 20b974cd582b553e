//! `runs/<run_id>/events.jsonl`: every event of a run, one JSON object per line, appended and
//! flushed as it happens, so `WatchRun` can replay a run of an earlier process exactly.
//!
//! Each line carries `seq`, `time` and `kind` in clear (for people and `jq`) and the event
//! itself as base64 of its protobuf encoding (`pb`): replay sends back the very message that
//! was streamed live, with no second schema to keep in step with the proto.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};
use synopsis_proto::v1::{train_event, TrainEvent};

use crate::error::{Result, TrainerError};

pub const EVENTS_FILE: &str = "events.jsonl";

#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    time: f64,
    kind: String,
    pb: String,
}

/// Short name of an event's kind, as written in the log and in traces.
pub fn kind_of(event: &TrainEvent) -> &'static str {
    match &event.event {
        Some(train_event::Event::Started(_)) => "started",
        Some(train_event::Event::Step(_)) => "step",
        Some(train_event::Event::Epoch(_)) => "epoch",
        Some(train_event::Event::Checkpoint(_)) => "checkpoint",
        Some(train_event::Event::Sample(_)) => "sample",
        Some(train_event::Event::Finished(_)) => "finished",
        None => "none",
    }
}

/// Appends events to a run's log.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(EVENTS_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainerError::io(&path, e))?;
        // A line torn by a crash must not swallow the next event: end it first.
        if !ends_with_newline(&mut file).map_err(|e| TrainerError::io(&path, e))? {
            file.write_all(b"\n")
                .map_err(|e| TrainerError::io(&path, e))?;
        }
        Ok(EventWriter { path, file })
    }

    /// Writes one line and flushes it to the OS, so a reader sees it at once. (No fsync per
    /// event: losing the last events of a crash is acceptable, stalling training is not.)
    pub fn append(&mut self, event: &TrainEvent) -> Result<()> {
        let line = Line {
            seq: event.seq,
            time: event.time,
            kind: kind_of(event).to_string(),
            pb: base64::engine::general_purpose::STANDARD.encode(event.encode_to_vec()),
        };
        let mut text = serde_json::to_string(&line)
            .map_err(|e| TrainerError::Internal(format!("cannot encode event: {e}")))?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainerError::io(&self.path, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| TrainerError::io(&self.path, e))
    }
}

/// True for an empty file or one whose last byte is a newline.
fn ends_with_newline(file: &mut File) -> std::io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Every complete event of the log with `seq >= from_seq`, in order. A torn last line (the
/// process died mid-write, or a writer is appending right now) is skipped: a live follower
/// receives that event from the broadcast instead.
pub fn read_events(dir: &Path, from_seq: u64) -> Result<Vec<TrainEvent>> {
    let path = dir.join(EVENTS_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainerError::io(&path, e)),
    };
    let mut events = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| TrainerError::io(&path, e))?;
        let Ok(parsed) = serde_json::from_str::<Line>(&line) else {
            continue;
        };
        if parsed.seq < from_seq {
            continue;
        }
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(parsed.pb) else {
            continue;
        };
        if let Ok(event) = TrainEvent::decode(bytes.as_slice()) {
            events.push(event);
        }
    }
    Ok(events)
}

/// Number of events in the log (the next `seq` to write), counting complete lines only.
pub fn count_events(dir: &Path) -> Result<u64> {
    Ok(read_events(dir, 0)?.last().map(|e| e.seq + 1).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use synopsis_proto::v1::{RunFinished, StepEvent};

    fn step(seq: u64) -> TrainEvent {
        TrainEvent {
            run_id: "run-x".into(),
            seq,
            time: 1.5,
            event: Some(train_event::Event::Step(StepEvent {
                step: seq,
                loss: 2.5,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn events_round_trip_and_replay_from_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::open(dir.path()).unwrap();
        for seq in 0..5 {
            w.append(&step(seq)).unwrap();
        }
        let finished = TrainEvent {
            run_id: "run-x".into(),
            seq: 5,
            time: 2.0,
            event: Some(train_event::Event::Finished(RunFinished {
                state: 3,
                message: "done".into(),
                last_checkpoint_id: String::new(),
            })),
        };
        w.append(&finished).unwrap();
        let all = read_events(dir.path(), 0).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(all[2], step(2));
        assert_eq!(all[5], finished);
        let tail = read_events(dir.path(), 4).unwrap();
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(count_events(dir.path()).unwrap(), 6);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::open(dir.path()).unwrap();
        w.append(&step(0)).unwrap();
        drop(w);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(EVENTS_FILE))
            .unwrap();
        f.write_all(b"{\"seq\":1,\"time\":1.0,\"ki").unwrap();
        let events = read_events(dir.path(), 0).unwrap();
        assert_eq!(events, vec![step(0)]);
        // Reopened after the crash, the next event lands on a line of its own.
        let mut w = EventWriter::open(dir.path()).unwrap();
        w.append(&step(1)).unwrap();
        assert_eq!(read_events(dir.path(), 0).unwrap(), vec![step(0), step(1)]);
    }
}
