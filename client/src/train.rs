//! `synopsis train` and `synopsis watch`: upload a CSV, start a run and follow its events until
//! it finishes. Ctrl-C only detaches: the run goes on on the trainer, and the command to pick
//! it up again is printed.

use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use synopsis_proto::v1::{
    train_event, train_request, DatasetChunk, DatasetInfo, HyperParams, ModelSpec, RunState,
    TrainEvent, TrainRequest, WatchRunRequest,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::cli::{TrainArgs, WatchArgs};
use crate::connect::{CliError, Servers, Service, TrainerApi};
use crate::output;
use crate::progress::RunView;

/// Upload chunk size: well under gRPC's default 4 MiB message limit.
const CHUNK: usize = 1 << 20;

pub async fn train(servers: &Servers, args: &TrainArgs, json: bool) -> anyhow::Result<()> {
    let mut client = servers.trainer().await?;
    let data = match (&args.data, &args.data_path) {
        (Some(path), _) => {
            let info = upload(servers, &mut client, path, json).await?;
            train_request::Data::DatasetId(info.dataset_id)
        }
        (None, Some(rel)) => train_request::Data::DataPath(rel.clone()),
        (None, None) => {
            return Err(CliError::Usage("give --data FILE or --data-path REL".into()).into())
        }
    };
    let mut stream = client
        .train(request(args, data))
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner();
    if args.detach {
        let first = stream
            .message()
            .await
            .map_err(|s| servers.status_error(Service::Trainer, s))?
            .ok_or_else(|| CliError::ConnectionLost {
                service: Service::Trainer,
                url: servers.trainer_url.clone(),
                detail: "the trainer ended the stream before naming the run".into(),
            })?;
        if json {
            output::emit(&json!({ "event": "detached", "run_id": first.run_id, "next_seq": 0 }))?;
        } else {
            println!("{}", first.run_id);
            eprintln!("follow it with `{}`", reattach(servers, &first.run_id, 0));
        }
        return Ok(());
    }
    follow(servers, stream, json, 0).await
}

pub async fn watch(servers: &Servers, args: &WatchArgs, json: bool) -> anyhow::Result<()> {
    let mut client = servers.trainer().await?;
    let stream = client
        .watch_run(WatchRunRequest {
            run_id: args.run.clone(),
            from_seq: args.from,
        })
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner();
    follow(servers, stream, json, args.from).await
}

/// Shows events until the run finishes, the stream breaks, or Ctrl-C detaches.
async fn follow(
    servers: &Servers,
    mut stream: Streaming<TrainEvent>,
    json: bool,
    from_seq: u64,
) -> anyhow::Result<()> {
    let mut view = RunView::new(json, from_seq);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let message = tokio::select! {
            _ = &mut ctrl_c => {
                view.clear();
                return detached(servers, &view, json);
            }
            message = stream.message() => message,
        };
        match message {
            Ok(Some(event)) => {
                view.show(&event)?;
                if let Some(train_event::Event::Finished(f)) = &event.event {
                    view.clear();
                    if f.state == RunState::Failed as i32 {
                        return Err(CliError::RunFailed {
                            run_id: event.run_id.clone(),
                            message: f.message.clone(),
                        }
                        .into());
                    }
                    return Ok(());
                }
            }
            Ok(None) => {
                view.clear();
                let again = match view.run_id() {
                    Some(run) => format!(
                        "; re-attach with `{}`",
                        reattach(servers, run, view.next_seq())
                    ),
                    None => String::new(),
                };
                return Err(CliError::ConnectionLost {
                    service: Service::Trainer,
                    url: servers.trainer_url.clone(),
                    detail: format!("the event stream ended before the run finished{again}"),
                }
                .into());
            }
            Err(status) => {
                view.clear();
                return Err(servers.status_error(Service::Trainer, status).into());
            }
        }
    }
}

fn detached(servers: &Servers, view: &RunView, json: bool) -> anyhow::Result<()> {
    let Some(run) = view.run_id() else {
        eprintln!("detached before the trainer named the run; `synopsis runs` lists it");
        return Ok(());
    };
    if json {
        output::emit(&json!({ "event": "detached", "run_id": run, "next_seq": view.next_seq() }))?;
    }
    eprintln!(
        "detached; run {run} goes on on the trainer. Re-attach with:\n  {}",
        reattach(servers, run, view.next_seq())
    );
    Ok(())
}

/// The command that resumes following `run` where this one stopped.
fn reattach(servers: &Servers, run: &str, from: u64) -> String {
    let mut cmd = String::from("synopsis");
    if servers.trainer_url != "http://127.0.0.1:50051" {
        cmd.push_str(&format!(" --trainer {}", servers.trainer_url));
    }
    cmd.push_str(&format!(" watch {run} --from {from}"));
    cmd
}

fn request(args: &TrainArgs, data: train_request::Data) -> TrainRequest {
    TrainRequest {
        data: Some(data),
        text_column: args.text_column.clone().unwrap_or_default(),
        condition_columns: args
            .condition
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
        base_model: args.base_model.clone().unwrap_or_default(),
        tokenizer: args.tokenizer.clone().unwrap_or_default(),
        model: Some(ModelSpec {
            preset: args.preset.clone().unwrap_or_default(),
            ..Default::default()
        }),
        hyper: Some(HyperParams {
            epochs: args.epochs.unwrap_or(0),
            max_steps: args.max_steps.unwrap_or(0),
            batch_size: args.batch_size.unwrap_or(0),
            learning_rate: args.lr.unwrap_or(0.0),
            warmup_steps: args.warmup_steps.unwrap_or(0),
            max_chars: args.max_chars.unwrap_or(0),
            min_chars: args.min_chars.unwrap_or(0),
            grad_accum: args.grad_accum.unwrap_or(0),
            seed: args.seed.unwrap_or(0),
            eval_fraction: args.eval_fraction.unwrap_or(0.0),
            seq_len: args.seq_len.unwrap_or(0),
            ..Default::default()
        }),
        resume_from: args.resume.clone().unwrap_or_default(),
        run_name: args.run_name.clone().unwrap_or_default(),
        sample_prompts: args.sample_prompts.clone(),
    }
}

/// Streams the CSV to the trainer in 1 MiB chunks and reports what it found in it.
async fn upload(
    servers: &Servers,
    client: &mut TrainerApi,
    path: &Path,
    json: bool,
) -> anyhow::Result<DatasetInfo> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data.csv".to_string());
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    if let Ok(style) =
        ProgressStyle::with_template("uploading {msg} [{bar:30}] {bytes}/{total_bytes}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(filename.clone());
    let (tx, rx) = mpsc::channel(4);
    let reader = read_chunks(file, filename.clone(), tx, bar.clone());
    let call = async {
        client
            .upload_dataset(ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| anyhow::Error::from(servers.status_error(Service::Trainer, s)))
    };
    // A read error drops the call unfinished, so the trainer never keeps a truncated file.
    let ((), info) = tokio::try_join!(reader, call)?;
    bar.finish_and_clear();
    if json {
        output::emit(&json!({
            "event": "uploaded",
            "file": filename,
            "dataset_id": info.dataset_id,
            "bytes": info.bytes,
            "rows": info.rows,
            "columns": info.columns,
            "detected_text_column": info.detected_text_column,
        }))?;
    } else {
        println!(
            "uploaded {filename}: {} rows, {}, columns {} (text column `{}`), dataset {}",
            info.rows,
            output::format_bytes(info.bytes),
            output::safe_cell(&info.columns.join(", ")),
            output::safe_cell(&info.detected_text_column),
            info.dataset_id
        );
    }
    Ok(info)
}

async fn read_chunks(
    mut file: tokio::fs::File,
    filename: String,
    tx: mpsc::Sender<DatasetChunk>,
    bar: ProgressBar,
) -> anyhow::Result<()> {
    let mut first = true;
    loop {
        let mut data = Vec::with_capacity(CHUNK);
        (&mut file)
            .take(CHUNK as u64)
            .read_to_end(&mut data)
            .await
            .with_context(|| format!("cannot read {filename}"))?;
        // An empty file still sends one chunk, so the trainer learns the name and can say why
        // it refuses it.
        if data.is_empty() && !first {
            return Ok(());
        }
        let last = data.len() < CHUNK;
        bar.inc(data.len() as u64);
        let chunk = DatasetChunk {
            filename: if first {
                filename.clone()
            } else {
                String::new()
            },
            data,
        };
        first = false;
        if tx.send(chunk).await.is_err() {
            // The call ended early; its own result says why.
            return Ok(());
        }
        if last {
            return Ok(());
        }
    }
}
