//! Helpers shared by the CLI's integration tests: running the real binary, and serving fake
//! Trainer/Generator implementations over real sockets (no libtorch needed).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Output;

use synopsis_proto::v1::generator_server::{Generator, GeneratorServer};
use synopsis_proto::v1::trainer_server::{Trainer, TrainerServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_synopsis");

/// Runs `synopsis` with `args`, no inherited SYNOPSIS_* settings, stdin closed.
pub async fn run(args: &[&str]) -> Output {
    run_with_env(args, &[]).await
}

/// Runs `synopsis` with `args` and only the SYNOPSIS_* settings in `env`.
pub async fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("SYNOPSIS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("the synopsis binary runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

pub async fn serve_trainer<T: Trainer>(trainer: T) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TrainerServer::new(trainer))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

pub async fn serve_generator<G: Generator>(generator: G) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GeneratorServer::new(generator))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// Each stdout line parsed as JSON.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

use synopsis_proto::v1::{
    train_event, CheckpointInfo, DatasetStats, EpochEvent, RunFinished, RunStarted, RunState,
    SampleEvent, StepEvent, TrainEvent,
};

/// A complete two-epoch run of `run_id` as a trainer would record it (seq 0..), ending in
/// `final_state` unless that is `None` (a run still going).
pub fn run_events(run_id: &str, final_state: Option<RunState>) -> Vec<TrainEvent> {
    let mut events = vec![train_event::Event::Started(RunStarted {
        resolved_config_json: r#"{"hyper":{"epochs":2,"max_steps":0}}"#.into(),
        device: "cpu".into(),
        parameters: 1_234_567,
        dataset: Some(DatasetStats {
            rows_read: 10,
            rows_kept: 8,
            dropped: [("too_short".to_string(), 2)].into_iter().collect(),
            train_documents: 7,
            eval_documents: 1,
            train_tokens: 900,
            eval_tokens: 120,
            text_column: "Synopsis".into(),
            ..Default::default()
        }),
        total_steps: 8,
        start_step: 0,
    })];
    for epoch in 1..=2u32 {
        for i in 1..=4u64 {
            let step = u64::from(epoch - 1) * 4 + i;
            events.push(train_event::Event::Step(StepEvent {
                epoch,
                step,
                total_steps: 8,
                loss: 6.0 - step as f64 * 0.4,
                lr: 3e-4,
                tokens_per_second: 1500.0,
                grad_norm: 1.0,
            }));
        }
        let step = u64::from(epoch) * 4;
        let val_loss = 5.0 - f64::from(epoch) * 0.5;
        events.push(train_event::Event::Epoch(EpochEvent {
            epoch,
            train_loss: 5.5 - f64::from(epoch),
            val_loss,
            val_perplexity: val_loss.exp(),
            step,
            seconds: 2.0,
        }));
        events.push(train_event::Event::Sample(SampleEvent {
            epoch,
            prompt: "In a world where".into(),
            text: " robots dream of rain.".into(),
        }));
        events.push(train_event::Event::Checkpoint(CheckpointInfo {
            checkpoint_id: format!("{run_id}/step-{step:06}"),
            run_id: run_id.into(),
            epoch,
            step,
            val_loss,
            size_bytes: 2_000_000,
            reason: "epoch".into(),
            ..Default::default()
        }));
    }
    if let Some(state) = final_state {
        events.push(train_event::Event::Finished(RunFinished {
            state: state as i32,
            message: if state == RunState::Failed {
                "out of memory".into()
            } else {
                "done".into()
            },
            last_checkpoint_id: format!("{run_id}/step-000008"),
        }));
    }
    events
        .into_iter()
        .enumerate()
        .map(|(seq, event)| TrainEvent {
            run_id: run_id.into(),
            seq: seq as u64,
            time: 1_800_000_000.0 + seq as f64,
            event: Some(event),
        })
        .collect()
}
