//! GPT-2 blocks: causal self-attention through libtorch's fused scaled_dot_product_attention,
//! the MLP, and the pre-LayerNorm residual wiring. Weights use HF's Conv1D `[in, out]` layout
//! so they load and save without transposing.

use crate::config::Gpt2Config;
use tch::{nn, Kind, Tensor};

/// A Conv1D in HF's sense: `y = x @ W + b` with `W: [in, out]`.
#[derive(Debug)]
pub(crate) struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv1D {
    fn new(path: nn::Path, d_in: i64, d_out: i64, std: f64) -> Self {
        let weight = path.var(
            "weight",
            &[d_in, d_out],
            nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        let bias = path.var("bias", &[d_out], nn::Init::Const(0.0));
        Conv1D { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let shape = x.size();
        let flat = x.reshape([-1, shape[shape.len() - 1]]);
        let out = self.bias.addmm(&flat, &self.weight);
        let mut out_shape = shape;
        let last = out_shape.len() - 1;
        out_shape[last] = self.weight.size()[1];
        out.reshape(out_shape.as_slice())
    }
}

#[derive(Debug)]
pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: path.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: path.var("bias", &[dim], nn::Init::Const(0.0)),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// How the queries of one forward pass may look at keys.
pub(crate) enum AttentionMask<'a> {
    /// Plain causal attention over the sequence itself (training, full forward).
    Causal,
    /// `[batch, 1, queries, keys]` bool, true = may attend (cached decoding).
    Explicit(&'a Tensor),
}

#[derive(Debug)]
pub(crate) struct Block {
    pub ln_1: LayerNorm,
    pub c_attn: Conv1D,
    pub attn_proj: Conv1D,
    pub ln_2: LayerNorm,
    pub c_fc: Conv1D,
    pub mlp_proj: Conv1D,
    pub n_head: i64,
    pub activation: String,
    attn_pdrop: f64,
    resid_pdrop: f64,
}

impl Block {
    /// Every weight and bias of the block.
    pub fn tensors_mut(&mut self) -> [&mut Tensor; 12] {
        [
            &mut self.ln_1.weight,
            &mut self.ln_1.bias,
            &mut self.c_attn.weight,
            &mut self.c_attn.bias,
            &mut self.attn_proj.weight,
            &mut self.attn_proj.bias,
            &mut self.ln_2.weight,
            &mut self.ln_2.bias,
            &mut self.c_fc.weight,
            &mut self.c_fc.bias,
            &mut self.mlp_proj.weight,
            &mut self.mlp_proj.bias,
        ]
    }

    pub fn new(path: nn::Path, cfg: &Gpt2Config) -> Self {
        let d = cfg.n_embd;
        // GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer).
        let proj_std = 0.02 / ((2 * cfg.n_layer) as f64).sqrt();
        let attn = &path / "attn";
        let mlp = &path / "mlp";
        Block {
            ln_1: LayerNorm::new(&path / "ln_1", d, cfg.layer_norm_epsilon),
            c_attn: Conv1D::new(&attn / "c_attn", d, 3 * d, 0.02),
            attn_proj: Conv1D::new(&attn / "c_proj", d, d, proj_std),
            ln_2: LayerNorm::new(&path / "ln_2", d, cfg.layer_norm_epsilon),
            c_fc: Conv1D::new(&mlp / "c_fc", d, cfg.inner_dim(), 0.02),
            mlp_proj: Conv1D::new(&mlp / "c_proj", cfg.inner_dim(), d, proj_std),
            n_head: cfg.n_head,
            activation: cfg.activation_function.clone(),
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
        }
    }

    /// `cache`: this layer's key/value tensors and the slot where the new keys go.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: AttentionMask<'_>,
        cache: Option<(&Tensor, &Tensor, i64)>,
        train: bool,
    ) -> Tensor {
        let attn = self.attention(&self.ln_1.forward(x), mask, cache, train);
        let x = x + attn.dropout(self.resid_pdrop, train);
        let h = self.c_fc.forward(&self.ln_2.forward(&x));
        let h = self.activate(h);
        let h = self.mlp_proj.forward(&h).dropout(self.resid_pdrop, train);
        x + h
    }

    /// One decoding step for `x` `[B, n_embd]`, one new token per row, the single-token twin
    /// of [`forward`](Self::forward): the activations stay 2-D and the new key and value are
    /// views of the fused projection, so a step issues about a third fewer libtorch calls,
    /// which is most of a step's time on small models. `visible`: `[B, 1, 1, keys]` bool, or
    /// `None` when every slot of every row holds a real token.
    pub fn decode(
        &self,
        x: &Tensor,
        visible: Option<&Tensor>,
        cache: (&Tensor, &Tensor, i64),
    ) -> Tensor {
        let (k_cache, v_cache, start) = cache;
        let (b, d) = x.size2().unwrap_or((0, 0));
        let hd = d / self.n_head;
        let qkv = self
            .c_attn
            .bias
            .addmm(&self.ln_1.forward(x), &self.c_attn.weight);
        // [B, 3·d] is q, k, v one after the other, each heads × head_dim: unbinding a
        // [B, 3, heads, 1, head_dim] view gives the [B, heads, 1, head_dim] tensors attention
        // and the cache want, without copies.
        let parts = qkv.view([b, 3, self.n_head, 1, hd]).unbind(1);
        k_cache.narrow(2, start, 1).copy_(&parts[1]);
        v_cache.narrow(2, start, 1).copy_(&parts[2]);
        let y = Tensor::scaled_dot_product_attention(
            &parts[0],
            &k_cache.narrow(2, 0, start + 1),
            &v_cache.narrow(2, 0, start + 1),
            visible,
            0.0,
            false,
            None,
            false,
        );
        // [B, heads, 1, head_dim] in memory is [B, d] with the heads side by side.
        let y = y.reshape([b, d]);
        let x = x + self.attn_proj.bias.addmm(&y, &self.attn_proj.weight);
        let h = self
            .c_fc
            .bias
            .addmm(&self.ln_2.forward(&x), &self.c_fc.weight);
        let h = self.activate(h);
        x + self.mlp_proj.bias.addmm(&h, &self.mlp_proj.weight)
    }

    fn activate(&self, h: Tensor) -> Tensor {
        match self.activation.as_str() {
            "gelu" => h.gelu("none"),
            "relu" => h.relu(),
            _ => h.gelu("tanh"),
        }
    }

    fn attention(
        &self,
        x: &Tensor,
        mask: AttentionMask<'_>,
        cache: Option<(&Tensor, &Tensor, i64)>,
        train: bool,
    ) -> Tensor {
        let (b, t, d) = x.size3().unwrap_or((0, 0, 0));
        let hd = d / self.n_head;
        let qkv = self.c_attn.forward(x);
        let heads = |m: Tensor| m.view([b, t, self.n_head, hd]).transpose(1, 2);
        let parts = qkv.split(d, 2);
        let (q, k, v) = (
            heads(parts[0].shallow_clone()),
            heads(parts[1].shallow_clone()),
            heads(parts[2].shallow_clone()),
        );
        let dropout = if train { self.attn_pdrop } else { 0.0 };
        let y = match (cache, mask) {
            (Some((k_cache, v_cache, start)), AttentionMask::Explicit(m)) => {
                k_cache.narrow(2, start, t).copy_(&k);
                v_cache.narrow(2, start, t).copy_(&v);
                let keys = k_cache.narrow(2, 0, start + t);
                let values = v_cache.narrow(2, 0, start + t);
                Tensor::scaled_dot_product_attention(
                    &q,
                    &keys,
                    &values,
                    Some(m),
                    dropout,
                    false,
                    None,
                    false,
                )
            }
            (_, AttentionMask::Explicit(m)) => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(m),
                dropout,
                false,
                None,
                false,
            ),
            (_, AttentionMask::Causal) => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                dropout,
                true,
                None,
                false,
            ),
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, d]);
        self.attn_proj.forward(&y)
    }
}

/// The float kind activations run in for weights of `kind`.
pub(crate) fn compute_kind(kind: Kind) -> Kind {
    match kind {
        Kind::BFloat16 | Kind::Half => kind,
        _ => Kind::Float,
    }
}
