//! Server streams that follow something live: a run's events (replayed from the log, then
//! followed on the broadcast without gap or duplicate) and the checkpoint feed. Each is a
//! channel fed by a task that stops when the client goes away or the server drains.

use std::sync::Arc;

use synopsis_proto::v1::{train_event, CheckpointInfo, TrainEvent};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use crate::checkpoints::Catalog;
use crate::runs::Run;

/// Items buffered per stream before the producer waits for the client.
pub const STREAM_BUFFER: usize = 64;

pub type EventTx = mpsc::Sender<Result<TrainEvent, Status>>;

/// Resolves once the server drains (or is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it within this statement.
    let _ = drain.wait_for(|d| *d).await.is_ok();
}

fn is_finished(event: &TrainEvent) -> bool {
    matches!(event.event, Some(train_event::Event::Finished(_)))
}

/// Sends the run's events from `from_seq` until its `finished` event, the client leaving or
/// the server draining.
pub async fn follow_run(
    run: Arc<Run>,
    from_seq: u64,
    tx: EventTx,
    mut drain: watch::Receiver<bool>,
) {
    let mut next = from_seq;
    loop {
        // Subscribe before reading the log: an event missing from the read is in the channel.
        let mut rx = run.subscribe();
        let replay = {
            let run = run.clone();
            tokio::task::spawn_blocking(move || run.replay(next)).await
        };
        let replay = match replay {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                let _ = tx.send(Err(Status::from(e))).await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("replay failed: {e}"))))
                    .await;
                return;
            }
        };
        for event in replay {
            if event.seq < next {
                if is_finished(&event) {
                    let _ = tx.send(Err(ended_before(event.seq, from_seq))).await;
                    return;
                }
                continue;
            }
            next = event.seq + 1;
            let done = is_finished(&event);
            if tx.send(Ok(event)).await.is_err() || done {
                return;
            }
        }
        // A run turns terminal only by logging its `finished` event and then broadcasting it:
        // if it is terminal now, that event is either behind us or already in `rx` (subscribed
        // before the read). Send what `rx` holds and end instead of waiting for nothing.
        if run.state().is_terminal() {
            flush(&mut rx, &mut next, &tx).await;
            return;
        }
        loop {
            // Biased: events already broadcast go out before a drain is noticed (a drain
            // happens after the run's last event, which the client must still get).
            let received = tokio::select! {
                biased;
                received = rx.recv() => received,
                () = drained(&mut drain) => {
                    flush(&mut rx, &mut next, &tx).await;
                    return;
                }
                () = tx.closed() => return,
            };
            match received {
                Ok(event) => match forward(event, &mut next, &tx).await {
                    Forward::Sent => {}
                    Forward::EndedBefore(last) => {
                        let _ = tx.send(Err(ended_before(last, from_seq))).await;
                        return;
                    }
                    Forward::Gap => break,
                    Forward::Done => return,
                },
                // Fell behind the broadcast: catch up from the log.
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

enum Forward {
    Sent,
    /// The run finished before the seq the client asked to start from: nothing will come.
    /// Carries the seq of the run's `finished` event.
    EndedBefore(u64),
    /// A seq was skipped (should not happen: the log is written first); re-read the log.
    Gap,
    /// The run finished or the client left.
    Done,
}

/// Sends `event` if it is the next one; duplicates are dropped.
async fn forward(event: TrainEvent, next: &mut u64, tx: &EventTx) -> Forward {
    if event.seq < *next {
        if is_finished(&event) {
            return Forward::EndedBefore(event.seq);
        }
        return Forward::Sent;
    }
    if event.seq > *next {
        return Forward::Gap;
    }
    *next += 1;
    let done = is_finished(&event);
    if tx.send(Ok(event)).await.is_err() || done {
        Forward::Done
    } else {
        Forward::Sent
    }
}

/// Sends what is already queued on the broadcast (used when draining).
async fn flush(rx: &mut broadcast::Receiver<TrainEvent>, next: &mut u64, tx: &EventTx) {
    while let Ok(event) = rx.try_recv() {
        match forward(event, next, tx).await {
            Forward::Sent => {}
            Forward::EndedBefore(last) => {
                let _ = tx.send(Err(ended_before(last, *next))).await;
                return;
            }
            Forward::Gap | Forward::Done => return,
        }
    }
}

/// The status ending a stream that asked to start past the run's last event: the answer
/// WatchRun gives at once for a run already finished, given when the run finishes.
fn ended_before(last_seq: u64, from_seq: u64) -> Status {
    Status::out_of_range(format!(
        "from_seq {from_seq} is past the end of the run: it finished with events 0..={last_seq}"
    ))
}

/// Sends the newest checkpoint (of `run_id` if set), then each new one.
pub async fn watch_checkpoints(
    catalog: Arc<Catalog>,
    run_id: Option<String>,
    tx: mpsc::Sender<Result<CheckpointInfo, Status>>,
    mut drain: watch::Receiver<bool>,
) {
    let mut rx = catalog.subscribe();
    let mut sent_first: Option<String> = None;
    if let Some(newest) = catalog.newest(run_id.as_deref()) {
        sent_first = Some(newest.checkpoint_id.clone());
        if tx.send(Ok(newest)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            biased;
            received = rx.recv() => match received {
                Ok(info) => {
                    if run_id.as_deref().is_some_and(|r| r != info.run_id) {
                        continue;
                    }
                    if sent_first.take().is_some_and(|id| id == info.checkpoint_id) {
                        continue;
                    }
                    if tx.send(Ok(info)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Checkpoints are minutes apart; losing some means a stalled client. The
                    // newest is what a follower wants anyway.
                    tracing::warn!(missed = n, "checkpoint watcher fell behind");
                    if let Some(newest) = catalog.newest(run_id.as_deref()) {
                        if tx.send(Ok(newest)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = drained(&mut drain) => return,
            () = tx.closed() => return,
        }
    }
}
