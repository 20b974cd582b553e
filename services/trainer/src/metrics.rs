//! Prometheus metrics of the trainer, in a registry of its own (so two servers in one test
//! process do not collide), served by `synopsis_common::spawn_metrics`.

use prometheus::{Gauge, IntCounter, IntGaugeVec, Opts, Registry};

use crate::runs::{RunRecord, State};

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    runs: IntGaugeVec,
    pub steps: IntCounter,
    pub tokens: IntCounter,
    pub tokens_per_second: Gauge,
    pub loss: Gauge,
    pub val_loss: Gauge,
    pub checkpoints: IntCounter,
    pub checkpoint_bytes: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let runs = IntGaugeVec::new(
            Opts::new(
                "synopsis_trainer_runs",
                "Runs known to the trainer, by state.",
            ),
            &["state"],
        )?;
        let steps = IntCounter::new(
            "synopsis_trainer_steps_total",
            "Optimizer steps taken by this process.",
        )?;
        let tokens = IntCounter::new(
            "synopsis_trainer_tokens_total",
            "Training tokens processed by this process (no padding: sequences are packed).",
        )?;
        let tokens_per_second = Gauge::new(
            "synopsis_trainer_tokens_per_second",
            "Training throughput of the running run, as of its last step event.",
        )?;
        let loss = Gauge::new("synopsis_trainer_loss", "Training loss of the last step.")?;
        let val_loss = Gauge::new(
            "synopsis_trainer_val_loss",
            "Validation loss at the end of the last epoch.",
        )?;
        let checkpoints = IntCounter::new(
            "synopsis_trainer_checkpoints_total",
            "Checkpoints written by this process.",
        )?;
        let checkpoint_bytes = IntCounter::new(
            "synopsis_trainer_checkpoint_bytes_total",
            "Bytes of checkpoints written by this process.",
        )?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(steps.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        registry.register(Box::new(loss.clone()))?;
        registry.register(Box::new(val_loss.clone()))?;
        registry.register(Box::new(checkpoints.clone()))?;
        registry.register(Box::new(checkpoint_bytes.clone()))?;
        Ok(Metrics {
            registry,
            runs,
            steps,
            tokens,
            tokens_per_second,
            loss,
            val_loss,
            checkpoints,
            checkpoint_bytes,
        })
    }

    /// Recounts runs by state.
    pub fn set_runs(&self, records: &[RunRecord]) {
        for state in State::ALL {
            let n = records.iter().filter(|r| r.state == state).count();
            self.runs.with_label_values(&[state.name()]).set(n as i64);
        }
    }
}
