//! The engine thread's loop: take commands, drop aborted requests, admit waiting ones into
//! their model's batch, decode one token for every active sequence, deliver events.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::api::{Admitted, EngineConfig, EngineRequest, ResidentModel, SubmitError};
use super::batch::{Pending, StepCtx};
use super::handle::{Command, Shared};
use super::models::{smoke_test, Models};
use super::sequence::{finished_empty, Abort, RequestState};

/// How often undelivered events are retried while nothing else happens.
const RETRY_DELIVERY: Duration = Duration::from_millis(2);

pub(crate) struct Worker {
    cfg: EngineConfig,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    models: Models,
    waiting: VecDeque<Pending>,
    requests: HashMap<u64, RequestState>,
    next_request: u64,
    shutting_down: bool,
    disconnected: bool,
    logits: Vec<f32>,
}

impl Worker {
    pub fn new(cfg: EngineConfig, rx: Receiver<Command>, shared: Arc<Shared>) -> Self {
        let models = Models::new(cfg.max_resident, Arc::clone(&shared.snapshot));
        Self {
            cfg,
            rx,
            shared,
            models,
            waiting: VecDeque::new(),
            requests: HashMap::new(),
            next_request: 0,
            shutting_down: false,
            disconnected: false,
            logits: Vec::new(),
        }
    }

    pub fn run(mut self) {
        // Serving never needs gradients; grad mode is per thread, so this covers every step.
        let _no_grad = tch::no_grad_guard();
        tracing::info!(device = %synopsis_model::device_name(self.cfg.device), "engine started");
        while self.poll_commands() {
            self.check_aborts();
            self.admit();
            self.decode();
            self.deliver();
            let waiting = &self.waiting;
            self.models
                .evict_excess(|id| waiting.iter().any(|p| p.checkpoint_id == id));
            self.cfg
                .metrics
                .batch_size
                .set(self.models.active_sequences() as i64);
        }
        tracing::info!("engine stopped");
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.models.active_sequences() > 0
    }

    fn has_undelivered(&self) -> bool {
        self.requests.values().any(RequestState::has_undelivered)
    }

    /// Handles every command that arrived, blocking while there is nothing else to do.
    /// Returns false when the thread should exit.
    fn poll_commands(&mut self) -> bool {
        if !self.has_work() {
            let undelivered = self.has_undelivered();
            if (self.shutting_down || self.disconnected) && !undelivered {
                return false;
            }
            let first = if self.disconnected {
                // No command can arrive any more; only slow clients are left to wait for.
                std::thread::sleep(RETRY_DELIVERY);
                Err(RecvTimeoutError::Timeout)
            } else if undelivered {
                self.rx.recv_timeout(RETRY_DELIVERY)
            } else {
                self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            };
            match first {
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.disconnected = true,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(command) => self.handle(command),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return true;
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                request,
                submitted,
                reply,
            } => self.submit(request, submitted, reply),
            Command::Install {
                model,
                make_live,
                reply,
            } => {
                let _ = reply.send(self.install(*model, make_live));
            }
            Command::SetLive {
                checkpoint_id,
                reply,
            } => {
                let result = self.models.set_live(&checkpoint_id);
                if result.is_ok() {
                    tracing::info!(%checkpoint_id, "live model set");
                }
                let _ = reply.send(result);
            }
            Command::Shutdown => self.shutting_down = true,
        }
    }

    fn install(&mut self, mut model: ResidentModel, make_live: bool) -> Result<(), String> {
        // Serving only decodes, so the transposed LM head is worth its memory (docs/performance.md).
        model.loaded.model.enable_decode_head();
        if let Err(reason) = smoke_test(&model, self.cfg.device) {
            tracing::warn!(checkpoint_id = %model.checkpoint_id, %reason, "model refused");
            return Err(reason);
        }
        tracing::info!(checkpoint_id = %model.checkpoint_id, make_live, "model installed");
        self.models.install(model, make_live);
        let waiting = &self.waiting;
        self.models
            .evict_excess(|id| waiting.iter().any(|p| p.checkpoint_id == id));
        Ok(())
    }

    fn submit(
        &mut self,
        request: EngineRequest,
        submitted: Instant,
        reply: tokio::sync::oneshot::Sender<Result<Admitted, SubmitError>>,
    ) {
        let pending = if self.shutting_down {
            Err(SubmitError::ShuttingDown)
        } else {
            self.tokenize(&request)
        };
        let pending = match pending {
            Ok(pending) => pending,
            Err(e) => {
                self.shared.dequeued();
                let _ = reply.send(Err(e));
                return;
            }
        };
        let admitted = Admitted {
            checkpoint_id: pending.checkpoint_id.clone(),
            prompt_tokens: pending.prompt.len() as u32,
        };
        if reply.send(Ok(admitted)).is_err() {
            // The caller gave up before the answer: nobody will read the events.
            self.shared.dequeued();
            return;
        }
        let key = pending.request;
        let mut state = RequestState::new(
            request.request_id,
            request.events,
            request.deadline,
            submitted,
            pending.n as usize,
        );
        if pending.max_new_tokens == 0 {
            for index in 0..pending.n {
                state.send(finished_empty(index));
            }
            state.unfinished = 0;
            self.shared.dequeued();
        } else {
            self.waiting.push_back(pending);
        }
        self.requests.insert(key, state);
    }

    /// Resolves the model and tokenizes the prompt with its tokenizer.
    fn tokenize(&mut self, request: &EngineRequest) -> Result<Pending, SubmitError> {
        let checkpoint_id = match request.checkpoint_id.as_deref() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => self
                .models
                .live_id()
                .ok_or(SubmitError::NoModel)?
                .to_owned(),
        };
        let resident = self
            .models
            .get(&checkpoint_id)
            .ok_or_else(|| SubmitError::UnknownCheckpoint(checkpoint_id.clone()))?;
        let tok = &resident.model.loaded.tokenizer;
        let mut prompt = tok
            .encode(&request.prompt)
            .map_err(|e| SubmitError::Internal(format!("tokenizing the prompt: {e}")))?;
        if prompt.is_empty() {
            // GPT-2 starts documents after an end-of-text token; it is also what an empty
            // prompt means.
            prompt.push(tok.eos_id());
        }
        let n_positions =
            usize::try_from(resident.model.loaded.model.config().n_positions).unwrap_or(0);
        let max_new = request.max_new_tokens as usize;
        if prompt.len() + max_new > n_positions {
            return Err(SubmitError::PromptTooLong {
                tokens: prompt.len(),
                max: n_positions.saturating_sub(max_new),
            });
        }
        self.next_request += 1;
        Ok(Pending {
            request: self.next_request,
            checkpoint_id,
            prompt,
            n: request.n.max(1),
            max_new_tokens: request.max_new_tokens,
            sampling: request.sampling.clone(),
            seed: request.seed,
            stop: request.stop.clone(),
        })
    }

    /// Drops sequences whose client left or whose deadline passed, queued ones included.
    fn check_aborts(&mut self) {
        let now = Instant::now();
        let mut any = false;
        for request in self.requests.values_mut() {
            match request.check_abort(now) {
                Some(Abort::ClientGone) => {
                    any = true;
                    self.cfg.metrics.cancelled.inc_by(request.unfinished as u64);
                    tracing::debug!(request_id = %request.request_id, "client gone");
                }
                Some(Abort::DeadlineExceeded) => {
                    any = true;
                    tracing::debug!(request_id = %request.request_id, "deadline exceeded");
                }
                None => {}
            }
        }
        if !any {
            return;
        }
        let requests = &self.requests;
        let before = self.waiting.len();
        self.waiting
            .retain(|p| requests.get(&p.request).is_some_and(|r| r.abort.is_none()));
        for _ in self.waiting.len()..before {
            self.shared.dequeued();
        }
        for resident in self.models.iter_mut() {
            resident.batch.drop_aborted(requests);
        }
    }

    /// Moves waiting requests into their model's batch, oldest first, while there is room.
    fn admit(&mut self) {
        let mut active = self.models.active_sequences();
        let mut groups: Vec<(String, Vec<Pending>)> = Vec::new();
        while let Some(front) = self.waiting.front() {
            let n = front.n as usize;
            // A request wider than the whole batch still runs, alone.
            if active > 0 && active + n > self.cfg.max_batch.max(1) {
                break;
            }
            let Some(pending) = self.waiting.pop_front() else {
                break;
            };
            self.shared.dequeued();
            active += n;
            match groups
                .iter_mut()
                .find(|(id, _)| *id == pending.checkpoint_id)
            {
                Some((_, group)) => group.push(pending),
                None => groups.push((pending.checkpoint_id.clone(), vec![pending])),
            }
        }
        for (checkpoint_id, group) in groups {
            let keys: Vec<u64> = group.iter().map(|p| p.request).collect();
            let Some(resident) = self.models.get_mut(&checkpoint_id) else {
                // Cannot happen (a model awaited by a queued request is never evicted), but if
                // it did, ending the streams is the honest answer.
                keys.iter().for_each(|k| drop(self.requests.remove(k)));
                continue;
            };
            let mut ctx = StepCtx {
                requests: &mut self.requests,
                metrics: &self.cfg.metrics,
                logits: &mut self.logits,
                sampling_on_device: self.cfg.sampling_on_device,
            };
            let loaded = &resident.model.loaded;
            let batch = &mut resident.batch;
            let result = catch_unwind(AssertUnwindSafe(|| {
                batch.admit(&mut ctx, &loaded.model, &loaded.tokenizer, group)
            }));
            if result.is_err() {
                tracing::error!(%checkpoint_id, "prefill failed; ending the new requests");
                keys.iter().for_each(|k| drop(self.requests.remove(k)));
            }
        }
    }

    fn decode(&mut self) {
        for resident in self.models.iter_mut() {
            if resident.batch.is_empty() {
                continue;
            }
            let mut ctx = StepCtx {
                requests: &mut self.requests,
                metrics: &self.cfg.metrics,
                logits: &mut self.logits,
                sampling_on_device: self.cfg.sampling_on_device,
            };
            let loaded = &resident.model.loaded;
            let batch = &mut resident.batch;
            let result = catch_unwind(AssertUnwindSafe(|| {
                batch.step(&mut ctx, &loaded.model, &loaded.tokenizer)
            }));
            if result.is_err() {
                tracing::error!(
                    checkpoint_id = %resident.model.checkpoint_id,
                    "decoding step failed; ending the batch's requests"
                );
                for key in resident.batch.request_keys() {
                    self.requests.remove(&key);
                }
                resident.batch.clear();
            }
        }
    }

    /// Sends what each channel takes now and forgets requests with nothing left to do.
    fn deliver(&mut self) {
        for request in self.requests.values_mut() {
            request.flush();
        }
        self.requests.retain(|_, r| !r.is_done());
    }
}
