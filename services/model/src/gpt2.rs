//! The GPT-2 language model: learned token and position embeddings, pre-LayerNorm blocks and a
//! LM head tied to the token embedding. Its `VarStore` names are exactly Hugging Face's
//! (`transformer.h.0.attn.c_attn.weight`, …), which is what makes checkpoints interchangeable.

use crate::attention::{compute_kind, AttentionMask, Block, LayerNorm};
use crate::config::Gpt2Config;
use crate::cpu_decode;
use crate::device::WeightDtype;
use crate::error::{ModelError, Result};
use crate::hf_weights;
use crate::kv_cache::KvCache;
use crate::weight_arena::Arena;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub struct Gpt2 {
    vs: nn::VarStore,
    config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    dtype: WeightDtype,
    /// `[n_embd, vocab]` contiguous view of the tied head for decoding: a GEMV over this
    /// layout reads memory ~1.5× faster on CPU than `linear(x, wte)` (see docs/performance.md).
    decode_head: Option<Tensor>,
}

impl std::fmt::Debug for Gpt2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Gpt2 {
    /// A freshly initialised model (GPT-2's init: N(0, 0.02), scaled residual projections).
    pub fn new(config: &Gpt2Config, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "transformer";
        let emb_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let wte = (&root / "wte").var("weight", &[config.vocab_size, config.n_embd], emb_init);
        let wpe = (&root / "wpe").var("weight", &[config.n_positions, config.n_embd], emb_init);
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(&root / "h" / i, config))
            .collect();
        let ln_f = LayerNorm::new(&root / "ln_f", config.n_embd, config.layer_norm_epsilon);
        Gpt2 {
            vs,
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            dtype: WeightDtype::F32,
            decode_head: None,
        }
    }

    /// Builds the model for `config` and fills it from an HF `model.safetensors`.
    pub fn load(
        config: &Gpt2Config,
        weights: &Path,
        device: Device,
        dtype: WeightDtype,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|m| ModelError::Invalid(format!("config: {m}")))?;
        let mut model = Gpt2::new(config, device);
        hf_weights::load_into(&model.vs, weights)?;
        model.set_dtype(dtype);
        release_freed_memory();
        Ok(model)
    }

    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        hf_weights::save(&self.vs, path)
    }

    pub fn set_dtype(&mut self, dtype: WeightDtype) {
        if dtype != self.dtype {
            self.vs.set_kind(dtype.kind());
            self.dtype = dtype;
            if self.decode_head.is_some() {
                self.enable_decode_head();
            }
        }
    }

    /// Re-lays the tied embedding out as `[n_embd, vocab]` in memory (`wte` becomes a
    /// transposed view of it) so single-token decoding runs its GEMV over the fast layout.
    /// The embedding is stored once, not twice: a second copy would cost `vocab × n_embd`
    /// (154 MB for GPT-2 small) for nothing. Lookups gather strided rows, which costs
    /// nothing measurable. On CPU in f32, every weight the fused step reads moves, with the
    /// head, into one arena backed by huge pages (see `weight_arena`). Call it only on serving
    /// models that are not trained.
    pub fn enable_decode_head(&mut self) {
        tch::no_grad(|| {
            if self.device() != Device::Cpu || self.wte.kind() != Kind::Float {
                let head = self.wte.transpose(0, 1).contiguous();
                self.wte.set_data(&head.transpose(0, 1));
                self.decode_head = Some(head);
                return;
            }
            let mut streamed: Vec<&mut Tensor> = vec![&mut self.wpe];
            streamed.extend(self.blocks.iter_mut().flat_map(Block::tensors_mut));
            streamed.extend([&mut self.ln_f.weight, &mut self.ln_f.bias]);
            let sizes = streamed.iter().map(|t| t.numel() as i64);
            let mut arena = Arena::for_elements(sizes.chain([self.wte.numel() as i64]));
            let head = arena.place(&self.wte.transpose(0, 1));
            self.wte.set_data(&head.transpose(0, 1));
            self.decode_head = Some(head);
            for tensor in streamed {
                let packed = arena.place(tensor);
                tensor.set_data(&packed);
            }
            arena.settle();
        });
        release_freed_memory();
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Full causal forward over `[batch, time]` token ids from position 0; logits `[B, T, V]`.
    pub fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let x = self.embed(input_ids, &positions, train);
        let x = self.blocks.iter().fold(x, |x, block| {
            block.forward(&x, AttentionMask::Causal, None, train)
        });
        self.head(&self.ln_f.forward(&x))
    }

    /// Mean next-token cross-entropy; targets of -100 are ignored.
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        let logits = self.forward(input_ids, train);
        let vocab = logits.size()[2];
        logits
            .view([-1, vocab])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &targets.view([-1]),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
    }

    /// An empty cache for `batch` rows with room for `capacity` slots (it grows if needed).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let cfg = &self.config;
        KvCache::new(
            cfg.n_layer,
            batch,
            cfg.n_head,
            capacity,
            cfg.head_dim(),
            compute_kind(self.dtype.kind()),
            self.device(),
        )
    }

    /// Appends `[B, T]` tokens to the cache and returns their logits `[B, T, V]` in f32.
    /// `mask` `[B, T]` marks real tokens; masked slots are padding (never attended, no
    /// position advance).
    pub fn forward_cached(&self, input_ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Tensor {
        let hidden = self.forward_cached_hidden(input_ids, mask, cache);
        self.head(&hidden).to_kind(Kind::Float)
    }

    /// Like [`forward_cached`](Self::forward_cached) but only the logits of the last slot of
    /// each row, `[B, V]`: all a decode step or a left-padded prefill needs.
    pub fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let hidden = self.forward_cached_hidden(input_ids, mask, cache);
        self.next_token_logits(&hidden.select(1, -1))
    }

    /// One decoding step: appends one real token per row (`input_ids` `[B]`) to the cache and
    /// returns the next-token logits `[B, V]` in f32, the same as
    /// [`forward_cached_last`](Self::forward_cached_last) with a `[B, 1]` all-true mask. It
    /// skips what that general path builds for prompts: every row's position is its count of
    /// real tokens, the query sees every valid slot, and a cache without padding needs no mask.
    ///
    /// On CPU in f32, once [`enable_decode_head`](Self::enable_decode_head) has run, a step of
    /// up to [`fused_decode_rows`](Self::fused_decode_rows) rows is
    /// [`decode_step_fused`](Self::decode_step_fused).
    pub fn decode_step(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        match self.decode_step_fused(input_ids, cache) {
            Some(logits) => logits,
            None => self.decode_step_libtorch(input_ids, cache),
        }
    }

    /// [`decode_step`](Self::decode_step) as one fused pass over the weights, shared by a
    /// small thread team (see `cpu_decode`), when it applies: CPU, f32, the decode head
    /// enabled, at most [`fused_decode_rows`](Self::fused_decode_rows) rows and a tanh-GELU or
    /// ReLU activation. `None` otherwise, with the cache unchanged.
    pub fn decode_step_fused(&self, input_ids: &Tensor, cache: &mut KvCache) -> Option<Tensor> {
        let head = self.decode_head.as_ref()?;
        if self.dtype != WeightDtype::F32 {
            return None;
        }
        let view = cpu_decode::ModelView {
            blocks: &self.blocks,
            wpe: &self.wpe,
            ln_f: &self.ln_f,
            head,
            n_positions: self.config.n_positions,
        };
        cpu_decode::decode_step(&view, input_ids, cache)
    }

    /// Most rows [`decode_step_fused`](Self::decode_step_fused) takes on this CPU: 16 with AVX2
    /// and FMA, whose register-blocked products beat libtorch's up to there, else 4.
    pub fn fused_decode_rows() -> usize {
        crate::cpu_kernels::max_rows()
    }

    /// [`decode_step`](Self::decode_step) through libtorch's operations on any device, dtype
    /// and batch size; the fused CPU pass must agree with it.
    pub fn decode_step_libtorch(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let b = input_ids.size1().unwrap_or(0);
        cache.reserve(1);
        let start = cache.len;
        let _ = cache.valid.narrow(1, start, 1).fill_(1);
        let positions = cache.positions.clamp_max(self.config.n_positions - 1);
        let x = self.embed(input_ids, &positions, false);
        let visible = (!cache.dense).then(|| {
            cache
                .valid
                .narrow(1, 0, start + 1)
                .view([b, 1, 1, start + 1])
        });
        let x = self.blocks.iter().enumerate().fold(x, |x, (i, block)| {
            block.decode(
                &x,
                visible.as_ref(),
                (&cache.keys[i], &cache.values[i], start),
            )
        });
        let _ = cache.positions.g_add_scalar_(1);
        cache.len = start + 1;
        self.next_token_logits(&self.ln_f.forward(&x))
    }

    /// f32 logits `[B, V]` of final hidden states `[B, n_embd]`, over the decode head's layout
    /// when the model has one.
    fn next_token_logits(&self, last: &Tensor) -> Tensor {
        match &self.decode_head {
            Some(head) => last.matmul(head).to_kind(Kind::Float),
            None => self.head(last).to_kind(Kind::Float),
        }
    }

    fn forward_cached_hidden(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let (b, t) = input_ids.size2().unwrap_or((0, 0));
        let device = input_ids.device();
        let mask = mask.to_kind(Kind::Bool).to_device(device);
        cache.reserve(t);
        let start = cache.len;
        // Position id of each new token = real tokens before it in its row.
        let counts = mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
        let positions = (cache.positions.unsqueeze(1) + counts - 1).clamp_min(0);
        let positions = positions.clamp_max(self.config.n_positions - 1);
        cache.valid.narrow(1, start, t).copy_(&mask);
        let total = start + t;
        let key_slots = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        let query_slots = (Tensor::arange(t, (Kind::Int64, device)) + start).unsqueeze(1);
        let causal = key_slots.le_tensor(&query_slots); // [T, total]
        let valid = cache.valid.narrow(1, 0, total).unsqueeze(1); // [B, 1, total]
                                                                  // A padding query may have nothing valid to look at; letting every query see its own
                                                                  // slot keeps softmax finite, and padding outputs are never used.
        let own = key_slots.eq_tensor(&query_slots);
        let allowed = (causal.unsqueeze(0).logical_and(&valid)).logical_or(&own.unsqueeze(0));
        let allowed = allowed.unsqueeze(1).expand([b, 1, t, total], false);
        let x = self.embed(input_ids, &positions, false);
        let x = self.blocks.iter().enumerate().fold(x, |x, (i, block)| {
            block.forward(
                &x,
                AttentionMask::Explicit(&allowed),
                Some((&cache.keys[i], &cache.values[i], start)),
                false,
            )
        });
        cache.positions += mask
            .to_kind(Kind::Int64)
            .sum_dim_intlist(1, false, Kind::Int64);
        cache.len = total;
        // Whether every slot now holds a real token decides if decoding needs a mask; a prompt
        // is read back once, which a step never does.
        cache.dense = cache.dense && mask.all().int64_value(&[]) != 0;
        self.ln_f.forward(&x)
    }

    fn embed(&self, input_ids: &Tensor, positions: &Tensor, train: bool) -> Tensor {
        let tok = self.wte.embedding_like(input_ids);
        let pos = self.wpe.embedding_like(positions);
        (tok + pos).dropout(self.config.embd_pdrop, train)
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.wte.transpose(0, 1))
    }
}

trait EmbeddingLike {
    fn embedding_like(&self, ids: &Tensor) -> Tensor;
}

impl EmbeddingLike for Tensor {
    fn embedding_like(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(self, ids, -1, false, false)
    }
}

/// Hands the heap glibc kept after loading back to the system: a dtype conversion frees
/// buffers of a few MB each, which glibc's adaptive mmap threshold leaves on the heap, where a
/// serving process would carry them as resident memory for its whole life.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
