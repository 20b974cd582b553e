//! Prometheus metrics of the trainer, in a registry of its own (so two servers in one test
//! process do not collide), served by `synopsis_common::spawn_metrics`.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntGaugeVec, Opts, Registry};

use crate::runs::{self, RunTable, State};

/// Runs by state, counted when scraped: a gauge set after the fact would lag behind a run's
/// `finished` event, which a client may have received before the scrape.
#[derive(Clone, Debug)]
struct RunsByState {
    table: RunTable,
    gauge: IntGaugeVec,
}

impl Collector for RunsByState {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let states = runs::states(&self.table);
        for state in State::ALL {
            let n = states.iter().filter(|s| **s == state).count();
            self.gauge.with_label_values(&[state.name()]).set(n as i64);
        }
        self.gauge.collect()
    }
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub steps: IntCounter,
    pub tokens: IntCounter,
    pub tokens_per_second: Gauge,
    pub loss: Gauge,
    pub val_loss: Gauge,
    pub checkpoints: IntCounter,
    pub checkpoint_bytes: IntCounter,
}

impl Metrics {
    /// Metrics of a trainer whose runs are `table`.
    pub fn new(table: RunTable) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge = IntGaugeVec::new(
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
        registry.register(Box::new(RunsByState { table, gauge }))?;
        registry.register(Box::new(steps.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        registry.register(Box::new(loss.clone()))?;
        registry.register(Box::new(val_loss.clone()))?;
        registry.register(Box::new(checkpoints.clone()))?;
        registry.register(Box::new(checkpoint_bytes.clone()))?;
        Ok(Metrics {
            registry,
            steps,
            tokens,
            tokens_per_second,
            loss,
            val_loss,
            checkpoints,
            checkpoint_bytes,
        })
    }
}
