//! `synopsis model` and `synopsis load`: what the generator serves, and making a chosen
//! checkpoint live (pinning one, or rolling back to an earlier one).

use serde_json::json;
use synopsis_proto::v1::{load_checkpoint_request, LoadCheckpointRequest, ModelInfoRequest};

use crate::cli::LoadArgs;
use crate::connect::{CliError, Servers, Service};
use crate::output::{self, format_loss, format_time, serving_state_name};

pub async fn info(servers: &Servers, json: bool) -> anyhow::Result<()> {
    let mut client = servers.generator().await?;
    let info = client
        .model_info(ModelInfoRequest {})
        .await
        .map_err(|s| servers.status_error(Service::Generator, s))?
        .into_inner();
    if json {
        output::emit(&json!({
            "live_checkpoint_id": info.live_checkpoint_id,
            "state": serving_state_name(info.state),
            "device": info.device,
            "dtype": info.dtype,
            "n_positions": info.n_positions,
            "vocab_size": info.vocab_size,
            "condition_columns": info.condition_columns,
            "resident": info.resident.iter().map(|r| json!({
                "live": r.live,
                "source": r.source,
                "info": r.info.as_ref().map(output::checkpoint_json),
            })).collect::<Vec<_>>(),
            "refused": info.refused.iter().map(|r| json!({
                "checkpoint_id": r.checkpoint_id, "reason": r.reason, "time": r.time,
            })).collect::<Vec<_>>(),
        }))?;
        return Ok(());
    }
    let live = if info.live_checkpoint_id.is_empty() {
        "none yet"
    } else {
        &info.live_checkpoint_id
    };
    println!("state:      {}", serving_state_name(info.state));
    println!("live:       {}", output::safe(live));
    println!(
        "device:     {} ({})",
        output::safe(&info.device),
        output::safe(&info.dtype)
    );
    println!(
        "context:    {} tokens, vocabulary {}",
        info.n_positions, info.vocab_size
    );
    if !info.condition_columns.is_empty() {
        println!(
            "conditions: {}",
            output::safe(&info.condition_columns.join(", "))
        );
    }
    if !info.resident.is_empty() {
        println!("resident:");
        for r in &info.resident {
            let mark = if r.live { "*" } else { " " };
            match &r.info {
                Some(c) => println!(
                    "  {mark} {}  step {}  validation loss {}  from {}",
                    output::safe_cell(&c.checkpoint_id),
                    c.step,
                    format_loss(c.val_loss),
                    output::safe_cell(&r.source)
                ),
                None => println!("  {mark} ? from {}", output::safe_cell(&r.source)),
            }
        }
    }
    if !info.refused.is_empty() {
        println!("refused:");
        for r in &info.refused {
            println!(
                "    {}  {}  ({})",
                output::safe_cell(&r.checkpoint_id),
                output::safe(&r.reason),
                format_time(r.time)
            );
        }
    }
    Ok(())
}

pub async fn load(servers: &Servers, args: &LoadArgs, json: bool) -> anyhow::Result<()> {
    let source = match (&args.checkpoint, &args.path) {
        (Some(id), _) => load_checkpoint_request::Source::CheckpointId(id.clone()),
        (None, Some(path)) => load_checkpoint_request::Source::Path(path.clone()),
        (None, None) => {
            return Err(CliError::Usage("give a checkpoint id or --path DIR".into()).into())
        }
    };
    let mut client = servers.generator().await?;
    let response = client
        .load_checkpoint(LoadCheckpointRequest {
            source: Some(source),
        })
        .await
        .map_err(|s| servers.status_error(Service::Generator, s))?
        .into_inner();
    match (json, response.info) {
        (true, info) => output::emit(&json!({
            "live": info.as_ref().map(output::checkpoint_json),
        }))?,
        (false, Some(c)) => println!(
            "live: {} (run {}, step {}, validation loss {})",
            output::safe(&c.checkpoint_id),
            if c.run_id.is_empty() {
                "-".to_string()
            } else {
                output::safe(&c.run_id)
            },
            c.step,
            format_loss(c.val_loss)
        ),
        (false, None) => println!("loaded"),
    }
    Ok(())
}
