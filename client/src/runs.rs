//! `synopsis runs`, `stop` and `checkpoints`: what the trainer has done and holds, as tables
//! for people and JSON lines for scripts.

use serde_json::json;
use synopsis_proto::v1::{
    ListCheckpointsRequest, ListRunsRequest, RunState, RunSummary, StopRunRequest,
};

use crate::cli::{CheckpointsArgs, StopArgs};
use crate::connect::{Servers, Service, TrainerApi};
use crate::output::{self, format_bytes, format_loss, format_time, run_state_name};

/// Every run the trainer knows.
async fn fetch_runs(servers: &Servers, client: &mut TrainerApi) -> anyhow::Result<Vec<RunSummary>> {
    Ok(client
        .list_runs(ListRunsRequest {})
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner()
        .runs)
}

pub async fn list_runs(servers: &Servers, json: bool) -> anyhow::Result<()> {
    let mut client = servers.trainer().await?;
    let runs = fetch_runs(servers, &mut client).await?;
    if json {
        for r in &runs {
            output::emit(&json!({
                "run_id": r.run_id,
                "run_name": r.run_name,
                "state": run_state_name(r.state),
                "created": r.created,
                "step": r.step,
                "total_steps": r.total_steps,
                "last_val_loss": r.last_val_loss,
                "last_checkpoint_id": r.last_checkpoint_id,
                "message": r.message,
            }))?;
        }
        return Ok(());
    }
    if runs.is_empty() {
        println!("no runs yet: start one with `synopsis train --data FILE.csv`");
        return Ok(());
    }
    let rows = runs
        .iter()
        .map(|r| {
            vec![
                r.run_id.clone(),
                r.run_name.clone(),
                run_state_name(r.state).to_string(),
                format!("{}/{}", r.step, r.total_steps),
                format_loss(r.last_val_loss),
                r.last_checkpoint_id.clone(),
                format_time(r.created),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "RUN",
            "NAME",
            "STATE",
            "STEP",
            "VAL LOSS",
            "LAST CHECKPOINT",
            "CREATED",
        ],
        &rows,
    );
    let news = |r: &&synopsis_proto::v1::RunSummary| {
        !r.message.is_empty() && r.message != run_state_name(r.state)
    };
    for r in runs.iter().filter(news) {
        println!("{}: {}", output::safe(&r.run_id), output::safe(&r.message));
    }
    Ok(())
}

pub async fn stop(servers: &Servers, args: &StopArgs, json: bool) -> anyhow::Result<()> {
    let mut client = servers.trainer().await?;
    let state = client
        .stop_run(StopRunRequest {
            run_id: args.run.clone(),
        })
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner()
        .state;
    let terminal = |state: i32| {
        matches!(
            RunState::try_from(state),
            Ok(RunState::Completed | RunState::Stopped | RunState::Failed)
        )
    };
    let (mut state, mut checkpoint) = (state, String::new());
    if !terminal(state) && !args.no_wait {
        if !json {
            eprintln!(
                "stop requested; waiting for run {} to write its checkpoint",
                args.run
            );
        }
        // The run stops at its next step boundary, after writing a checkpoint.
        loop {
            tokio::time::sleep(STOP_POLL).await;
            let runs = fetch_runs(servers, &mut client).await?;
            if let Some(run) = runs.into_iter().find(|r| r.run_id == args.run) {
                (state, checkpoint) = (run.state, run.last_checkpoint_id);
                if terminal(state) {
                    break;
                }
            }
        }
    }
    if json {
        output::emit(&json!({
            "run_id": args.run,
            "state": run_state_name(state),
            "last_checkpoint_id": checkpoint,
        }))?;
    } else if checkpoint.is_empty() {
        println!("run {}: {}", args.run, run_state_name(state));
    } else {
        println!(
            "run {}: {} (last checkpoint {checkpoint})",
            args.run,
            run_state_name(state)
        );
    }
    Ok(())
}

/// How often `stop` looks whether the run has stopped.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(250);

pub async fn checkpoints(
    servers: &Servers,
    args: &CheckpointsArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = servers.trainer().await?;
    let list = client
        .list_checkpoints(ListCheckpointsRequest {
            run_id: args.run.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner()
        .checkpoints;
    if json {
        for c in &list {
            output::emit(&output::checkpoint_json(c))?;
        }
        return Ok(());
    }
    if list.is_empty() {
        println!("no checkpoints yet");
        return Ok(());
    }
    let rows = list
        .iter()
        .map(|c| {
            vec![
                c.checkpoint_id.clone(),
                c.epoch.to_string(),
                c.step.to_string(),
                format_loss(c.val_loss),
                format_bytes(c.size_bytes),
                c.reason.clone(),
                format_time(c.created),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "CHECKPOINT",
            "EPOCH",
            "STEP",
            "VAL LOSS",
            "SIZE",
            "REASON",
            "CREATED",
        ],
        &rows,
    );
    Ok(())
}

/// Left-aligned columns, two spaces apart, widths from the content.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(output::safe_cell(cell).chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| output::safe_cell(c)).collect();
        line(cells.iter().map(String::as_str).collect());
    }
}
