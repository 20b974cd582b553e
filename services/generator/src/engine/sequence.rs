//! One generated sequence (a row of a batch) and the request it belongs to: turning sampled
//! tokens into streamed text (UTF-8 safe, stop strings held back) and delivering events without
//! ever blocking the engine on a slow client.

use std::collections::VecDeque;
use std::time::Instant;

use synopsis_model::batch_sampling::RowRequest;
use synopsis_model::incremental::IncrementalDecoder;
use synopsis_model::sampling::{Sampled, Sampler};
use synopsis_model::tokenizer::Tokenizer;
use synopsis_proto::v1::FinishReason;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::api::SeqEvent;
use super::stop::StopMatcher;

/// Why a request stops before its sequences finish on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Abort {
    /// The client dropped its receiver.
    ClientGone,
    DeadlineExceeded,
}

/// Engine-side state of one request: its channel, the events that did not fit in it yet, and
/// how many of its sequences still decode.
pub(crate) struct RequestState {
    pub request_id: String,
    events: Sender<SeqEvent>,
    outbox: VecDeque<SeqEvent>,
    pub deadline: Option<Instant>,
    pub submitted: Instant,
    /// Sequences not finished yet (waiting or decoding).
    pub unfinished: usize,
    pub abort: Option<Abort>,
}

impl RequestState {
    pub fn new(
        request_id: String,
        events: Sender<SeqEvent>,
        deadline: Option<Instant>,
        submitted: Instant,
        n: usize,
    ) -> Self {
        Self {
            request_id,
            events,
            outbox: VecDeque::new(),
            deadline,
            submitted,
            unfinished: n,
            abort: None,
        }
    }

    /// Queues an event behind the ones not delivered yet, so each sequence's order holds.
    pub fn send(&mut self, event: SeqEvent) {
        if self.outbox.is_empty() {
            match self.events.try_send(event) {
                Ok(()) | Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(event)) => self.outbox.push_back(event),
            }
        } else {
            self.outbox.push_back(event);
        }
    }

    /// Delivers as many waiting events as the channel takes now.
    pub fn flush(&mut self) {
        while let Some(event) = self.outbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.outbox.clear();
                    return;
                }
            }
        }
    }

    pub fn client_gone(&self) -> bool {
        self.events.is_closed()
    }

    /// Checks the client and the deadline; returns the abort that just happened, if any.
    pub fn check_abort(&mut self, now: Instant) -> Option<Abort> {
        if self.abort.is_some() || self.unfinished == 0 {
            return None;
        }
        let abort = if self.client_gone() {
            Abort::ClientGone
        } else if self.deadline.is_some_and(|d| now >= d) {
            self.send(SeqEvent::DeadlineExceeded);
            Abort::DeadlineExceeded
        } else {
            return None;
        };
        self.abort = Some(abort);
        Some(abort)
    }

    /// Nothing left to decode or deliver: the engine forgets the request (dropping the sender
    /// ends the client's stream).
    pub fn is_done(&self) -> bool {
        (self.unfinished == 0 || self.abort.is_some())
            && (self.outbox.is_empty() || self.client_gone())
    }

    pub fn has_undelivered(&self) -> bool {
        !self.outbox.is_empty() && !self.client_gone()
    }
}

/// One row of a batch.
pub(crate) struct Sequence {
    /// Key of its request in the engine's request table.
    pub request: u64,
    pub index: u32,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// Prompt then generated ids: what the repetition penalty looks at.
    history: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: u32,
    /// The token to feed at the next decoding step.
    pub next_input: u32,
    text: String,
    first_token_at: Option<Instant>,
}

/// What accepting one sampled token produced.
pub(crate) struct Accepted {
    pub token: SeqEvent,
    pub finished: Option<SeqEvent>,
    /// Seconds from submission to this token, when it is the sequence's first.
    pub first_token_seconds: Option<f64>,
}

impl Sequence {
    pub fn new(
        request: u64,
        index: u32,
        sampler: Sampler,
        stop: StopMatcher,
        prompt: &[u32],
        max_new_tokens: u32,
    ) -> Self {
        let mut history = Vec::with_capacity(prompt.len() + max_new_tokens as usize);
        history.extend_from_slice(prompt);
        Self {
            request,
            index,
            sampler,
            decoder: IncrementalDecoder::new(),
            stop,
            history,
            prompt_len: prompt.len(),
            max_new_tokens,
            next_input: 0,
            text: String::new(),
            first_token_at: None,
        }
    }

    pub fn generated(&self) -> u32 {
        (self.history.len() - self.prompt_len) as u32
    }

    /// Samples the next token from this row's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sampler.sample(logits, &self.history)
    }

    /// What the batch sampler needs to choose this sequence's next token from row
    /// `logits_row` of the step's logits; draws the uniform it uses from this sequence's seed.
    pub fn row_request(&mut self, logits_row: usize) -> RowRequest<'_> {
        RowRequest::draw(&mut self.sampler, logits_row, &self.history)
    }

    /// Takes a sampled token: decodes it, applies stop strings and limits, and returns the
    /// events to stream. A sequence that returns `finished` leaves the batch.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        sampled: Sampled,
        submitted: Instant,
        now: Instant,
    ) -> Accepted {
        let id = sampled.token;
        self.history.push(id);
        self.next_input = id;
        let first_token_seconds = if self.first_token_at.is_none() {
            self.first_token_at = Some(now);
            Some(now.duration_since(submitted).as_secs_f64())
        } else {
            None
        };

        let mut reason = None;
        let mut text = if id == tok.eos_id() {
            reason = Some(FinishReason::Eos);
            String::new()
        } else {
            let delta = self.decoder.push(tok, id);
            let out = self.stop.push(&delta);
            if out.stopped {
                reason = Some(FinishReason::Stop);
            } else if self.generated() >= self.max_new_tokens {
                reason = Some(FinishReason::Length);
            }
            out.released
        };
        if matches!(reason, Some(FinishReason::Eos | FinishReason::Length)) {
            // The stream ends here: flush what the decoder and the matcher held back, which
            // may itself still complete a stop string.
            let tail = self.decoder.finish();
            let out = self.stop.push(&tail);
            text.push_str(&out.released);
            if out.stopped {
                reason = Some(FinishReason::Stop);
            } else {
                text.push_str(&self.stop.finish());
            }
        }
        self.text.push_str(&text);
        let token = SeqEvent::Token {
            index: self.index,
            id,
            text,
            logprob: sampled.logprob,
        };
        let finished = reason.map(|reason| self.finished_event(reason, submitted, now));
        Accepted {
            token,
            finished,
            first_token_seconds,
        }
    }

    fn finished_event(&self, reason: FinishReason, submitted: Instant, now: Instant) -> SeqEvent {
        let ttft_ms = self
            .first_token_at
            .map(|t| t.duration_since(submitted).as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let elapsed = now.duration_since(submitted).as_secs_f64();
        let generated = self.generated();
        SeqEvent::Finished {
            index: self.index,
            reason,
            text: self.text.clone(),
            generated_tokens: generated,
            time_to_first_token_ms: ttft_ms,
            tokens_per_second: if elapsed > 0.0 {
                f64::from(generated) / elapsed
            } else {
                0.0
            },
        }
    }
}

/// The `Finished` event of a sequence that ends before generating anything
/// (`max_new_tokens` = 0).
pub(crate) fn finished_empty(index: u32) -> SeqEvent {
    SeqEvent::Finished {
        index,
        reason: FinishReason::Length,
        text: String::new(),
        generated_tokens: 0,
        time_to_first_token_ms: 0.0,
        tokens_per_second: 0.0,
    }
}
