//! The key/value cache for incremental decoding, held explicitly by the caller so a batch of
//! sequences of different lengths can decode together and sequences can join or leave it.
//!
//! Every row of the batch owns the same number of *slots*; a slot is either a real token or
//! padding (`valid` false). Padding is never attended to and does not advance a row's position
//! id, so rows that joined at different times, or prompts padded on either side, share one
//! tensor per layer and one batched forward pass.

use tch::{Device, Kind, Tensor};

pub struct KvCache {
    /// Per layer `[batch, heads, capacity, head_dim]`.
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    /// `[batch, capacity]` bool: which slots hold real tokens.
    pub(crate) valid: Tensor,
    /// `[batch]` i64: real tokens seen per row, i.e. the next position id.
    pub(crate) positions: Tensor,
    /// Slots used so far (the same for every row).
    pub(crate) len: i64,
    /// True when every used slot of every row holds a real token, so decoding attends to all
    /// of them without a mask. Kept on the host: asking the tensor would cost a sync per step.
    pub(crate) dense: bool,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("batch", &self.batch_size())
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl KvCache {
    pub(crate) fn new(
        layers: i64,
        batch: i64,
        heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let capacity = capacity.max(1);
        let shape = [batch, heads, capacity, head_dim];
        let alloc = || Tensor::zeros(shape, (kind, device));
        KvCache {
            keys: (0..layers).map(|_| alloc()).collect(),
            values: (0..layers).map(|_| alloc()).collect(),
            valid: Tensor::zeros([batch, capacity], (Kind::Bool, device)),
            positions: Tensor::zeros([batch], (Kind::Int64, device)),
            len: 0,
            dense: true,
        }
    }

    /// Slots used so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> i64 {
        self.valid.size()[0]
    }

    pub fn capacity(&self) -> i64 {
        self.valid.size()[1]
    }

    /// Real tokens per row (each row's next position id).
    pub fn positions(&self) -> Vec<i64> {
        Vec::<i64>::try_from(&self.positions.to_device(Device::Cpu)).unwrap_or_default()
    }

    /// Makes room for `extra` more slots, doubling the capacity so appends stay amortised O(1)
    /// instead of copying the whole cache every token.
    pub(crate) fn reserve(&mut self, extra: i64) {
        let needed = self.len + extra;
        if needed <= self.capacity() {
            return;
        }
        let new_cap = needed.max(self.capacity() * 2);
        let grow = |t: &Tensor, dim: usize| {
            let mut shape = t.size();
            shape[dim] = new_cap;
            let bigger = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
            bigger
                .narrow(dim as i64, 0, self.len)
                .copy_(&t.narrow(dim as i64, 0, self.len));
            bigger
        };
        self.keys = self.keys.iter().map(|t| grow(t, 2)).collect();
        self.values = self.values.iter().map(|t| grow(t, 2)).collect();
        self.valid = grow(&self.valid, 1);
    }

    /// Keeps only the given rows, in that order: how finished or cancelled sequences leave.
    pub fn select_rows(&self, rows: &[i64]) -> KvCache {
        let device = self.valid.device();
        let index = Tensor::from_slice(rows).to_device(device);
        let keep = |t: &Tensor| t.index_select(0, &index);
        let mut cache = KvCache {
            keys: self.keys.iter().map(keep).collect(),
            values: self.values.iter().map(keep).collect(),
            valid: keep(&self.valid),
            positions: keep(&self.positions),
            len: self.len,
            dense: self.dense,
        };
        cache.trim_leading_padding();
        if !cache.dense {
            // The rows that kept padding may be the ones that left.
            cache.dense = cache.all_used_slots_valid();
        }
        cache
    }

    /// Stacks the rows of `b` under those of `a`. The shorter cache is padded on the left with
    /// invalid slots, so the slots of both line up at the end.
    pub fn merge(a: &KvCache, b: &KvCache) -> KvCache {
        let len = a.len.max(b.len);
        let cap = len.max(a.capacity().min(b.capacity())).max(len + 16);
        let pad = |c: &KvCache, t: &Tensor, dim: usize| {
            let mut shape = t.size();
            shape[dim] = cap;
            let out = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
            let offset = len - c.len;
            out.narrow(dim as i64, offset, c.len)
                .copy_(&t.narrow(dim as i64, 0, c.len));
            out
        };
        let cat = |x: Tensor, y: Tensor| Tensor::cat(&[x, y], 0);
        KvCache {
            keys: a
                .keys
                .iter()
                .zip(&b.keys)
                .map(|(x, y)| cat(pad(a, x, 2), pad(b, y, 2)))
                .collect(),
            values: a
                .values
                .iter()
                .zip(&b.values)
                .map(|(x, y)| cat(pad(a, x, 2), pad(b, y, 2)))
                .collect(),
            valid: cat(pad(a, &a.valid, 1), pad(b, &b.valid, 1)),
            positions: Tensor::cat(&[&a.positions, &b.positions], 0),
            len,
            dense: a.dense && b.dense && a.len == b.len,
        }
    }

    /// Whether no used slot of any row is padding.
    fn all_used_slots_valid(&self) -> bool {
        self.len == 0 || self.valid.narrow(1, 0, self.len).all().int64_value(&[]) != 0
    }

    /// True when decoding this cache needs no attention mask (see `dense`).
    pub fn is_dense(&self) -> bool {
        self.dense
    }

    /// Drops slots that are padding in every row (left behind when a long sequence leaves),
    /// so attention does not keep paying for them.
    fn trim_leading_padding(&mut self) {
        if self.len == 0 || self.batch_size() == 0 {
            return;
        }
        let used = self.valid.narrow(1, 0, self.len).any_dim(0, false);
        let first = Vec::<bool>::try_from(&used.to_device(Device::Cpu))
            .unwrap_or_default()
            .iter()
            .position(|&v| v)
            .unwrap_or(self.len as usize) as i64;
        if first == 0 {
            return;
        }
        let keep = self.len - first;
        let shift = |t: &Tensor, dim: i64| {
            let moved = t.narrow(dim, first, keep).copy();
            t.narrow(dim, 0, keep).copy_(&moved);
        };
        for t in self.keys.iter().chain(&self.values) {
            shift(t, 2);
        }
        shift(&self.valid, 1);
        let _ = self.valid.narrow(1, keep, self.len - keep).fill_(0);
        self.len = keep;
    }
}
