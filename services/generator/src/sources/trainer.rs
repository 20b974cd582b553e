//! Follows a trainer: WatchCheckpoints gives the newest checkpoint and then each new one; each
//! is downloaded with FetchCheckpoint into the cache, verified and installed. When the trainer
//! is away the generator keeps serving and reconnects with exponential backoff.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use synopsis_common::{BearerInterceptor, ClientSecurityArgs};
use synopsis_proto::v1 as pb;
use synopsis_proto::v1::trainer_client::TrainerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::cache::{Cache, CacheHold};
use super::download::{self, DownloadError};
use crate::state::State;
use crate::swap;

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The connection to the followed trainer, shared by the follower and LoadCheckpoint.
pub struct TrainerLink {
    pub url: String,
    channel: Channel,
    interceptor: BearerInterceptor,
    /// Where downloads land; pruned after every swap (see [`Cache`]).
    pub cache: Arc<Cache>,
}

impl TrainerLink {
    /// Prepares the link; nothing is dialled until the first call, so a trainer that is not up
    /// yet does not stop the generator from starting.
    pub fn new(
        url: &str,
        security: &ClientSecurityArgs,
        cache_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let endpoint = security
            .endpoint(url)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let interceptor = security.interceptor().context("trainer credentials")?;
        Ok(TrainerLink {
            url: url.to_string(),
            channel: endpoint.connect_lazy(),
            interceptor,
            cache: Cache::new(cache_dir),
        })
    }

    fn client(&self) -> TrainerClient<InterceptedService<Channel, BearerInterceptor>> {
        TrainerClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// Downloads a checkpoint (without its optimizer state) into the cache. The directory stays
    /// on disk while the returned hold lives, whatever pruning happens meanwhile.
    pub async fn download(
        &self,
        checkpoint_id: &str,
    ) -> Result<(PathBuf, CacheHold), DownloadError> {
        let hold = self.cache.hold(checkpoint_id);
        let request = pb::FetchCheckpointRequest {
            checkpoint_id: checkpoint_id.to_string(),
            skip_optimizer: true,
        };
        let chunks = self.client().fetch_checkpoint(request).await?.into_inner();
        let dir = download::receive(chunks, self.cache.dir(), checkpoint_id).await?;
        Ok((dir, hold))
    }
}

/// Downloads `checkpoint_id` from the trainer and makes it live, recording a refusal on any
/// failure.
pub async fn fetch_and_install(
    state: &Arc<State>,
    link: &TrainerLink,
    checkpoint_id: &str,
) -> Result<pb::CheckpointInfo, swap::SwapError> {
    info!(checkpoint_id, trainer = %link.url, "downloading checkpoint");
    let (dir, _loading) = match link.download(checkpoint_id).await {
        Ok(downloaded) => downloaded,
        Err(DownloadError::Trainer(status)) if is_transient(status.code()) => {
            return Err(swap::SwapError::Unreachable(format!(
                "trainer {} is unreachable: {}",
                link.url,
                status.message()
            )));
        }
        Err(DownloadError::Trainer(status)) if status.code() == tonic::Code::NotFound => {
            return Err(swap::SwapError::NotFound(status.message().to_string()));
        }
        Err(e) => {
            let reason = format!("download failed: {e}");
            swap::refuse(state, checkpoint_id, &reason);
            return Err(swap::SwapError::Download(reason));
        }
    };
    let source = format!("trainer:{}", link.url);
    swap::install_dir(state, &dir, &source, true).await
}

/// Follows the trainer until the task is dropped.
pub async fn follow(state: Arc<State>, link: Arc<TrainerLink>) {
    info!(trainer = %link.url, "following the trainer's checkpoints");
    let mut tried: HashSet<String> = HashSet::new();
    let mut backoff = BACKOFF_START;
    loop {
        let request = pb::WatchCheckpointsRequest::default();
        match link.client().watch_checkpoints(request).await {
            Ok(response) => {
                info!(trainer = %link.url, "connected to the trainer");
                backoff = BACKOFF_START;
                let mut feed = response.into_inner();
                loop {
                    match feed.message().await {
                        Ok(Some(info)) => offered(&state, &link, &mut tried, info).await,
                        Ok(None) => {
                            warn!(trainer = %link.url, "the trainer closed the checkpoint feed");
                            break;
                        }
                        Err(status) => {
                            warn!(trainer = %link.url, %status, "lost the checkpoint feed");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                warn!(trainer = %link.url, %status, retry_in = ?backoff, "trainer unreachable");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn offered(
    state: &Arc<State>,
    link: &TrainerLink,
    tried: &mut HashSet<String>,
    info: pb::CheckpointInfo,
) {
    let id = info.checkpoint_id.clone();
    if id.is_empty() || tried.contains(&id) {
        return;
    }
    // Already here with the same bytes (e.g. loaded by hand): nothing to fetch.
    if state
        .resident(&id)
        .is_some_and(|r| r.info.sha256 == info.sha256)
    {
        tried.insert(id);
        return;
    }
    tried.insert(id.clone());
    // Failures are recorded (refused list, metrics, log) by the pipeline itself; a download
    // cut short by the trainer going away is tried again when it offers the checkpoint again.
    if let Err(swap::SwapError::Unreachable(reason)) = fetch_and_install(state, link, &id).await {
        warn!(checkpoint_id = %id, %reason, "download interrupted; will retry");
        tried.remove(&id);
    }
}

/// Codes that say "the trainer is away", not "this checkpoint is bad".
fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
    )
}
