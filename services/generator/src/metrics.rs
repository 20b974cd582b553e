//! Prometheus metrics of the generator: request outcomes, hot swaps, and the engine's own
//! figures (queue, batch, tokens), all in one registry served on `--metrics-listen`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::engine::EngineMetrics;

/// How a Generate call ended, the `outcome` label of `synopsis_generator_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    InvalidArgument,
    NotFound,
    Unavailable,
    ResourceExhausted,
    DeadlineExceeded,
    Cancelled,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::InvalidArgument,
        Outcome::NotFound,
        Outcome::Unavailable,
        Outcome::ResourceExhausted,
        Outcome::DeadlineExceeded,
        Outcome::Cancelled,
        Outcome::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::NotFound => "not_found",
            Outcome::Unavailable => "unavailable",
            Outcome::ResourceExhausted => "resource_exhausted",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }

    pub fn of_status(code: tonic::Code) -> Outcome {
        match code {
            tonic::Code::Ok => Outcome::Ok,
            tonic::Code::InvalidArgument => Outcome::InvalidArgument,
            tonic::Code::NotFound => Outcome::NotFound,
            tonic::Code::Unavailable => Outcome::Unavailable,
            tonic::Code::ResourceExhausted => Outcome::ResourceExhausted,
            tonic::Code::DeadlineExceeded => Outcome::DeadlineExceeded,
            tonic::Code::Cancelled => Outcome::Cancelled,
            _ => Outcome::Error,
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    pub swaps: IntCounter,
    pub swap_failures: IntCounter,
    pub streams_in_flight: IntGauge,
    /// 1 for the live checkpoint (label `checkpoint_id`), no series when none is live.
    live_checkpoint: IntGaugeVec,
    refused_loads: IntCounterVec,
    pub engine: EngineMetrics,
}

/// The `reason` labels of `synopsis_generator_refused_loads_total`.
pub const REFUSAL_REASONS: [&str; 5] = ["download", "load", "template", "smoke_test", "other"];

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "synopsis_generator_requests_total",
                "Generate calls by how they ended",
            ),
            &["outcome"],
        )?;
        let swaps = IntCounter::new(
            "synopsis_generator_swaps_total",
            "Checkpoints made live after passing verification and the smoke test",
        )?;
        let swap_failures = IntCounter::new(
            "synopsis_generator_swap_failures_total",
            "Checkpoints refused at download, verification, loading or the smoke test",
        )?;
        let streams_in_flight = IntGauge::new(
            "synopsis_generator_streams_in_flight",
            "Generate streams currently open",
        )?;
        let live_checkpoint = IntGaugeVec::new(
            Opts::new(
                "synopsis_generator_live_checkpoint_info",
                "The checkpoint serving requests without a pin (value 1)",
            ),
            &["checkpoint_id"],
        )?;
        let refused_loads = IntCounterVec::new(
            Opts::new(
                "synopsis_generator_refused_loads_total",
                "Checkpoints refused, by why: download, load (verification or weights), \
                 template, smoke_test",
            ),
            &["reason"],
        )?;
        // Every label present at 0 from the start: a rate over a series that appears only at
        // its first event misses that event.
        for outcome in Outcome::ALL {
            requests.with_label_values(&[outcome.label()]);
        }
        for reason in REFUSAL_REASONS {
            refused_loads.with_label_values(&[reason]);
        }
        registry.register(Box::new(live_checkpoint.clone()))?;
        registry.register(Box::new(refused_loads.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(swaps.clone()))?;
        registry.register(Box::new(swap_failures.clone()))?;
        registry.register(Box::new(streams_in_flight.clone()))?;
        let engine = EngineMetrics::new(&registry)?;
        Ok(Metrics {
            registry,
            requests,
            swaps,
            swap_failures,
            streams_in_flight,
            live_checkpoint,
            refused_loads,
            engine,
        })
    }

    /// Marks `checkpoint_id` as the live checkpoint.
    pub fn set_live(&self, checkpoint_id: &str) {
        self.live_checkpoint.reset();
        self.live_checkpoint
            .with_label_values(&[checkpoint_id])
            .set(1);
    }

    /// Counts a refused checkpoint under `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused_load(&self, reason: &str) {
        self.refused_loads.with_label_values(&[reason]).inc();
    }

    pub fn request(&self, outcome: Outcome) {
        self.requests.with_label_values(&[outcome.label()]).inc();
    }

    pub fn requests_with(&self, outcome: Outcome) -> u64 {
        self.requests.with_label_values(&[outcome.label()]).get()
    }
}
