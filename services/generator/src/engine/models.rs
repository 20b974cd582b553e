//! The models resident on the engine's device, each with its own running batch, and which one
//! is live. Swapping the live pointer never touches a batch, so requests finish on the model
//! they started with; idle old models stay for rollback until there are too many.

use std::sync::{Arc, RwLock};

use synopsis_model::gpt2::Gpt2;
use tch::{Device, Kind, Tensor};

use super::api::{ModelSummary, ResidentModel};
use super::batch::Batch;

pub(crate) struct Resident {
    pub model: ResidentModel,
    pub batch: Batch,
}

/// What `EngineHandle::live`/`resident` read without a round trip to the engine thread.
pub(crate) type Snapshot = Arc<RwLock<Vec<ModelSummary>>>;

pub(crate) struct Models {
    /// Oldest first.
    list: Vec<Resident>,
    live: Option<String>,
    max_resident: usize,
    snapshot: Snapshot,
}

impl Models {
    pub fn new(max_resident: usize, snapshot: Snapshot) -> Self {
        Self {
            list: Vec::new(),
            live: None,
            max_resident: max_resident.max(1),
            snapshot,
        }
    }

    pub fn live_id(&self) -> Option<&str> {
        self.live.as_deref()
    }

    pub fn get(&self, id: &str) -> Option<&Resident> {
        self.list.iter().find(|r| r.model.checkpoint_id == id)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Resident> {
        self.list.iter_mut()
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Resident> {
        self.list.iter_mut().find(|r| r.model.checkpoint_id == id)
    }

    pub fn active_sequences(&self) -> usize {
        self.list.iter().map(|r| r.batch.len()).sum()
    }

    /// Adds a model that passed the smoke test. A model already resident under the same id is
    /// kept (its batch may be running) and the new copy dropped.
    pub fn install(&mut self, model: ResidentModel, make_live: bool) {
        let id = model.checkpoint_id.clone();
        if self.get(&id).is_none() {
            self.list.push(Resident {
                model,
                batch: Batch::default(),
            });
        }
        if make_live || self.live.is_none() {
            self.live = Some(id);
        }
        self.publish();
    }

    pub fn set_live(&mut self, id: &str) -> Result<(), String> {
        if self.get(id).is_none() {
            return Err(format!("checkpoint {id} is not resident"));
        }
        self.live = Some(id.to_owned());
        self.publish();
        Ok(())
    }

    /// Evicts the oldest models that are neither live, decoding, nor awaited by a queued
    /// request, until at most `max_resident` remain.
    pub fn evict_excess(&mut self, is_awaited: impl Fn(&str) -> bool) {
        let mut evicted = false;
        while self.list.len() > self.max_resident {
            let victim = self.list.iter().position(|r| {
                let id = r.model.checkpoint_id.as_str();
                Some(id) != self.live.as_deref() && r.batch.is_empty() && !is_awaited(id)
            });
            let Some(victim) = victim else { break };
            let gone = self.list.remove(victim);
            tracing::info!(checkpoint_id = %gone.model.checkpoint_id, "evicted idle resident model");
            evicted = true;
        }
        if evicted {
            self.publish();
        }
    }

    fn publish(&self) {
        let summaries = self
            .list
            .iter()
            .map(|r| {
                summary(
                    &r.model,
                    Some(r.model.checkpoint_id.as_str()) == self.live.as_deref(),
                )
            })
            .collect();
        match self.snapshot.write() {
            Ok(mut guard) => *guard = summaries,
            Err(poisoned) => *poisoned.into_inner() = summaries,
        }
    }
}

fn summary(model: &ResidentModel, live: bool) -> ModelSummary {
    let gpt2 = &model.loaded.model;
    let config = gpt2.config();
    ModelSummary {
        info: model.info.clone(),
        live,
        source: model.source.clone(),
        dtype: gpt2.dtype().name().to_owned(),
        n_positions: u32::try_from(config.n_positions).unwrap_or(u32::MAX),
        vocab_size: u32::try_from(config.vocab_size).unwrap_or(u32::MAX),
        condition_columns: model.info.condition_columns.clone(),
    }
}

/// Checks a model before it may serve: it must sit on the engine's device, know every id its
/// tokenizer can produce, and give finite logits for a probe prompt.
pub(crate) fn smoke_test(model: &ResidentModel, device: Device) -> Result<(), String> {
    let gpt2: &Gpt2 = &model.loaded.model;
    if gpt2.device() != device {
        return Err(format!(
            "model is on {} but the engine runs on {}",
            synopsis_model::device_name(gpt2.device()),
            synopsis_model::device_name(device)
        ));
    }
    let tok = &model.loaded.tokenizer;
    let vocab = gpt2.config().vocab_size;
    if tok.vocab_size() as i64 > vocab {
        return Err(format!(
            "the tokenizer has {} ids but the model only {vocab}",
            tok.vocab_size()
        ));
    }
    let mut probe: Vec<i64> = tok
        .encode("The")
        .unwrap_or_default()
        .into_iter()
        .map(i64::from)
        .collect();
    if probe.is_empty() {
        probe.push(i64::from(tok.eos_id()));
    }
    let ids = Tensor::from_slice(&probe).view([1, -1]).to_device(device);
    // The cached path is the one that serves, so it is the one probed.
    let finite = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mask = ids.ones_like().to_kind(Kind::Bool);
        let mut cache = gpt2.new_cache(1, probe.len() as i64);
        let logits = gpt2.forward_cached_last(&ids, &mask, &mut cache);
        logits.isfinite().all().int64_value(&[]) != 0
    }))
    .map_err(|_| "smoke test failed: the forward pass failed".to_owned())?;
    if finite {
        Ok(())
    } else {
        Err("smoke test failed: non-finite logits".to_owned())
    }
}
