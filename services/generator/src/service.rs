//! The `synopsis.v1.Generator` gRPC service: validates requests, renders the conditioning
//! template, hands requests to the engine and streams its events back; reports and changes
//! the served checkpoint.

use std::sync::Arc;
use std::time::Instant;

use synopsis_proto::v1 as pb;
use synopsis_proto::v1::generator_server::Generator;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::conditioning;
use crate::engine::{Admitted, EngineRequest, SeqEvent, SubmitError};
use crate::error::ServiceError;
use crate::load_checks::{check_checkpoint_id, lexical_absolute};
use crate::metrics::Outcome;
use crate::state::{State, StreamGuard};
use crate::swap::{self, SwapError};
use crate::validation::{self, FieldError, ValidRequest};

/// Engine events buffered per request; the engine holds back what does not fit.
const EVENTS_BUFFER: usize = 64;
/// Responses buffered per stream towards the client.
const RESPONSES_BUFFER: usize = 64;

type ResponseStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

pub struct GeneratorService {
    state: Arc<State>,
}

impl GeneratorService {
    pub fn new(state: Arc<State>) -> Self {
        GeneratorService { state }
    }
}

/// A fresh 128-bit request id in hex, for logs and `started.request_id`.
fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Random seeds stay below 2^53 so clients that read JSON numbers as doubles echo them exactly.
fn random_seed() -> u64 {
    rand::random::<u64>() & ((1 << 53) - 1)
}

fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    validation::parse_grpc_timeout(value).and_then(|d| Instant::now().checked_add(d))
}

/// What the producer needs to turn engine events into responses.
struct Started {
    started: pb::GenerateStarted,
    n: u32,
    deadline: Option<Instant>,
}

impl GeneratorService {
    async fn start(
        &self,
        request_id: &str,
        req: pb::GenerateRequest,
        deadline: Option<Instant>,
        events_tx: mpsc::Sender<SeqEvent>,
    ) -> Result<Started, ServiceError> {
        let state = &self.state;
        if state.is_draining() {
            return Err(ServiceError::Unavailable(
                "the generator is draining for shutdown; retry on another replica".into(),
            ));
        }
        let valid = validation::validate(req, &state.limits, random_seed)?;
        let pinned = valid.checkpoint_id.is_some();
        let mut target = self.target(&valid)?;
        loop {
            let (engine_request, model_input) =
                self.engine_request(request_id, &valid, &target, deadline, events_tx.clone())?;
            match state.engine.submit(engine_request).await {
                Ok(Admitted {
                    checkpoint_id,
                    prompt_tokens,
                }) => {
                    return Ok(Started {
                        started: pb::GenerateStarted {
                            request_id: request_id.to_string(),
                            checkpoint_id,
                            prompt_tokens,
                            seed: valid.seed,
                            model_input,
                        },
                        n: valid.n,
                        deadline,
                    })
                }
                // The live model was swapped and evicted between the lookup and the submit:
                // an unpinned request simply runs on the new live one.
                Err(SubmitError::UnknownCheckpoint(_)) if !pinned => {
                    let next = self.target(&valid)?;
                    if next.info.checkpoint_id == target.info.checkpoint_id {
                        return Err(SubmitError::UnknownCheckpoint(next.info.checkpoint_id).into());
                    }
                    target = next;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The checkpoint the request runs on: the pinned resident one, or the live one.
    fn target(&self, valid: &ValidRequest) -> Result<crate::engine::ModelSummary, ServiceError> {
        match &valid.checkpoint_id {
            Some(id) => self.state.resident(id).ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "checkpoint_id {id} is not resident on this generator (see ModelInfo)"
                ))
            }),
            None => self
                .state
                .engine
                .live()
                .ok_or_else(|| ServiceError::Unavailable("no model is live yet".into())),
        }
    }

    fn engine_request(
        &self,
        request_id: &str,
        valid: &ValidRequest,
        target: &crate::engine::ModelSummary,
        deadline: Option<Instant>,
        events: mpsc::Sender<SeqEvent>,
    ) -> Result<(EngineRequest, String), FieldError> {
        let id = &target.info.checkpoint_id;
        let template = self.state.template(id);
        let model_input =
            conditioning::render(template.as_ref(), id, &valid.prompt, &valid.conditions)?;
        let mut sampling = valid.sampling.clone();
        validation::cap_top_k(&mut sampling, target.vocab_size);
        let request = EngineRequest {
            request_id: request_id.to_string(),
            // Pinned to the checkpoint the template was rendered for, even if a swap happens
            // before the engine admits the request.
            checkpoint_id: Some(id.clone()),
            prompt: model_input.clone(),
            n: valid.n,
            max_new_tokens: valid.max_new_tokens,
            sampling,
            seed: valid.seed,
            stop: valid.stop.clone(),
            deadline,
            events,
        };
        Ok((request, model_input))
    }
}

/// Why a stream ended before all its sequences finished.
enum Cut {
    ClientGone,
    Deadline,
    Shutdown,
    EngineGone,
}

/// Forwards engine events to the client until every sequence finished, the client left, the
/// deadline passed or the drain grace ran out — also while the client is slow to read, so a
/// stalled reader cannot outlive its deadline. Dropping `events` on return tells the engine to
/// stop whatever sequences remain.
async fn pump(
    state: Arc<State>,
    started: Started,
    mut events: mpsc::Receiver<SeqEvent>,
    out: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    _guard: StreamGuard,
) {
    use pb::generate_response::Event;
    let n = started.n;
    let deadline = started.deadline;
    let mut stop = state.stop_signal();
    let mut finished = 0;
    let mut next = Some(Event::Started(started.started));
    let result: Result<(), Cut> = loop {
        if let Some(event) = next.take() {
            let response = Ok(pb::GenerateResponse { event: Some(event) });
            let sent = tokio::select! {
                sent = out.send(response) => sent.map_err(|_| Cut::ClientGone),
                () = sleep_until(deadline) => Err(Cut::Deadline),
                () = stopped(&mut stop) => Err(Cut::Shutdown),
            };
            if let Err(cut) = sent {
                break Err(cut);
            }
            if finished == n {
                break Ok(());
            }
        }
        let event = tokio::select! {
            event = events.recv() => event,
            () = out.closed() => break Err(Cut::ClientGone),
            () = sleep_until(deadline) => break Err(Cut::Deadline),
            () = stopped(&mut stop) => break Err(Cut::Shutdown),
        };
        next = Some(match event {
            Some(SeqEvent::Token {
                index,
                id,
                text,
                logprob,
            }) => Event::Token(pb::GeneratedToken {
                index,
                id,
                text,
                logprob,
            }),
            Some(SeqEvent::Finished {
                index,
                reason,
                text,
                generated_tokens,
                time_to_first_token_ms,
                tokens_per_second,
            }) => {
                finished += 1;
                Event::Finished(pb::GenerateFinished {
                    index,
                    reason: reason as i32,
                    text,
                    generated_tokens,
                    time_to_first_token_ms,
                    tokens_per_second,
                })
            }
            Some(SeqEvent::DeadlineExceeded) => break Err(Cut::Deadline),
            None => break Err(Cut::EngineGone),
        });
    };
    drop(events);
    let (outcome, status) = match result {
        Ok(()) => (Outcome::Ok, None),
        Err(Cut::ClientGone) => (Outcome::Cancelled, None),
        Err(Cut::Deadline) => (
            Outcome::DeadlineExceeded,
            Some(Status::from(ServiceError::DeadlineExceeded)),
        ),
        Err(Cut::Shutdown) => (
            Outcome::Unavailable,
            Some(Status::unavailable(
                "the generator shut down before the stream finished",
            )),
        ),
        Err(Cut::EngineGone) => (
            Outcome::Error,
            Some(Status::unavailable(
                "the engine stopped before the stream finished",
            )),
        ),
    };
    if outcome == Outcome::Unavailable {
        // The server is going away: no waiting for a slow reader.
        if let Some(status) = status {
            let _ = out.try_send(Err(status));
        }
    } else if let Some(status) = status {
        // Delivered after whatever the client has not read yet, unless it leaves or the
        // server is going away.
        tokio::select! {
            _ = out.send(Err(status)) => {}
            () = out.closed() => {}
            () = stopped(&mut stop) => {}
        }
    }
    state.metrics.request(outcome);
    info!(outcome = outcome.label(), "generate finished");
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it before the caller awaits again.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[tonic::async_trait]
impl Generator for GeneratorService {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline_of(&request);
        let request_id = new_request_id();
        let span = info_span!("generate", request_id = %request_id);
        // Counted before submitting, so a drain never misses a stream about to open.
        let guard = self.state.open_stream();
        let (events_tx, events_rx) = mpsc::channel(EVENTS_BUFFER);
        let started = self
            .start(&request_id, request.into_inner(), deadline, events_tx)
            .instrument(span.clone())
            .await;
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                let status: Status = e.into();
                self.state
                    .metrics
                    .request(Outcome::of_status(status.code()));
                span.in_scope(
                    || info!(code = ?status.code(), message = status.message(), "generate refused"),
                );
                return Err(status);
            }
        };
        span.in_scope(|| {
            info!(
                checkpoint_id = %started.started.checkpoint_id,
                prompt_tokens = started.started.prompt_tokens,
                n = started.n,
                seed = started.started.seed,
                "generate started"
            )
        });
        let (out_tx, out_rx) = mpsc::channel(RESPONSES_BUFFER);
        let state = Arc::clone(&self.state);
        tokio::spawn(pump(state, started, events_rx, out_tx, guard).instrument(span));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let state = &self.state;
        let resident = state.engine.resident();
        let live = resident.iter().find(|m| m.live);
        let response = pb::ModelInfoResponse {
            live_checkpoint_id: live
                .map(|m| m.info.checkpoint_id.clone())
                .unwrap_or_default(),
            resident: resident
                .iter()
                .map(|m| pb::ResidentCheckpoint {
                    info: Some(m.info.clone()),
                    live: m.live,
                    source: m.source.clone(),
                })
                .collect(),
            device: synopsis_model::device_name(state.device),
            dtype: live
                .map(|m| m.dtype.clone())
                .unwrap_or_else(|| state.dtype.name().to_string()),
            state: state.serving_state() as i32,
            refused: state.refused(),
            n_positions: live.map(|m| m.n_positions).unwrap_or(0),
            vocab_size: live.map(|m| m.vocab_size).unwrap_or(0),
            condition_columns: live
                .and_then(|m| state.template(&m.info.checkpoint_id))
                .map(|t| t.columns)
                .unwrap_or_default(),
        };
        Ok(Response::new(response))
    }

    async fn load_checkpoint(
        &self,
        request: Request<pb::LoadCheckpointRequest>,
    ) -> Result<Response<pb::LoadCheckpointResponse>, Status> {
        use pb::load_checkpoint_request::Source;
        let state = &self.state;
        let info = match request.into_inner().source {
            None => Err(FieldError::new("source", "must name a checkpoint_id or a path").into()),
            Some(Source::CheckpointId(id)) => self.load_by_id(id.trim()).await,
            Some(Source::Path(path)) => self.load_by_path(&path).await,
        };
        match info {
            Ok(info) => {
                info!(checkpoint_id = %info.checkpoint_id, "LoadCheckpoint made a checkpoint live");
                Ok(Response::new(pb::LoadCheckpointResponse {
                    info: Some(info),
                }))
            }
            Err(e) => {
                warn!(error = %e, "LoadCheckpoint failed");
                state.refresh_health().await;
                Err(e.into())
            }
        }
    }
}

impl GeneratorService {
    async fn load_by_id(&self, id: &str) -> Result<pb::CheckpointInfo, ServiceError> {
        check_checkpoint_id(id)?;
        if self.state.resident(id).is_some() {
            return swap::make_live(&self.state, id)
                .await
                .map_err(ServiceError::NotFound);
        }
        let Some(link) = self.state.trainer.clone() else {
            return Err(ServiceError::NotFound(format!(
                "checkpoint_id {id} is not resident and no trainer is followed (--trainer)"
            )));
        };
        crate::sources::trainer::fetch_and_install(&self.state, &link, id)
            .await
            .map_err(swap_error)
    }

    async fn load_by_path(&self, path: &str) -> Result<pb::CheckpointInfo, ServiceError> {
        if path.trim().is_empty() {
            return Err(FieldError::new("path", "must not be empty").into());
        }
        let shown = synopsis_common::quote(path);
        let outside = || {
            ServiceError::PermissionDenied(format!(
                "path {shown} is outside the directories this generator loads from \
                 (--load-root, --watch-dir, --cache-dir)"
            ))
        };
        // Held to the load roots as written first, so a path outside them is refused the same
        // way whether or not it exists (NOT_FOUND there would tell a caller what exists on
        // the host); then resolved (symlinks) and held to them again.
        let lexical = lexical_absolute(path).ok_or_else(outside)?;
        let roots = &self.state.load_roots;
        if !roots.iter().any(|root| lexical.starts_with(root)) {
            return Err(outside());
        }
        let dir = match std::fs::canonicalize(&lexical) {
            Ok(dir) if dir.is_dir() => dir,
            _ => {
                return Err(ServiceError::NotFound(format!(
                    "path {shown} is not a directory on the generator"
                )))
            }
        };
        if !roots.iter().any(|root| dir.starts_with(root)) {
            return Err(outside());
        }
        let source = format!("load:{}", dir.display());
        swap::install_dir(&self.state, &dir, &source, true)
            .await
            .map_err(swap_error)
    }
}

fn swap_error(e: SwapError) -> ServiceError {
    match e {
        SwapError::NotFound(m) => ServiceError::NotFound(m),
        SwapError::Unreachable(m) => ServiceError::Unavailable(m),
        SwapError::Task(m) => ServiceError::Internal(m),
        e @ (SwapError::Load(_)
        | SwapError::Template(_)
        | SwapError::Install(_)
        | SwapError::Download(_)) => ServiceError::Refused(format!("checkpoint refused: {e}")),
    }
}
