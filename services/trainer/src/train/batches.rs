//! Training batches without padding: documents (each ending in `<|endoftext|>`) are laid end
//! to end and cut into windows of `seq_len + 1` tokens that overlap by one (inputs are the
//! first `seq_len`, targets the last `seq_len`). The original project padded every synopsis to
//! 256 tokens, and about 35% of its compute went into padding; packed, every position trains.
//!
//! The document order is reshuffled each epoch by a ChaCha RNG seeded from (seed, epoch), so
//! the data order is a pure function of two numbers a checkpoint stores: a resumed run sees
//! exactly the batches an uninterrupted one would.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// One epoch's (or the validation set's) token stream, cut into windows.
#[derive(Debug, Clone)]
pub struct Packed {
    stream: Vec<i64>,
    seq_len: usize,
}

/// Inputs `[B, T]`, targets `[B, T]` and the number of target tokens.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub tokens: usize,
}

/// Total tokens of a set of documents.
pub fn token_count(docs: &[Vec<u32>]) -> usize {
    docs.iter().map(Vec::len).sum()
}

/// Full training windows an epoch of `docs` yields (the same every epoch: only the order of
/// documents changes, not their total length).
pub fn windows_per_epoch(docs: &[Vec<u32>], seq_len: usize) -> usize {
    token_count(docs).saturating_sub(1) / seq_len
}

/// The order of documents in `epoch` (0-based).
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    // Mixing the epoch into the high bits keeps (seed, epoch) pairs from colliding.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(epoch) << 40) ^ 0x005e_ed0f_da7a);
    order.shuffle(&mut rng);
    order
}

impl Packed {
    /// `docs` in `order`, end to end.
    pub fn new(docs: &[Vec<u32>], order: &[usize], seq_len: usize) -> Self {
        let mut stream = Vec::with_capacity(token_count(docs));
        for &i in order {
            stream.extend(docs[i].iter().map(|&t| i64::from(t)));
        }
        Packed { stream, seq_len }
    }

    /// The training stream of `epoch`.
    pub fn epoch(docs: &[Vec<u32>], seq_len: usize, seed: u64, epoch: u32) -> Self {
        Packed::new(docs, &epoch_order(docs.len(), seed, epoch), seq_len)
    }

    /// Full windows (a trailing remainder shorter than a window is not trained on this
    /// epoch; with a new order next epoch, other tokens fall in it).
    pub fn windows(&self) -> usize {
        self.stream.len().saturating_sub(1) / self.seq_len
    }

    /// Windows `first .. first + count` as one batch.
    pub fn batch(
        &self,
        first: usize,
        count: usize,
        device: Device,
    ) -> Result<Batch, tch::TchError> {
        let t = self.seq_len;
        let count = count.min(self.windows().saturating_sub(first));
        let mut inputs = Vec::with_capacity(count * t);
        let mut targets = Vec::with_capacity(count * t);
        for w in first..first + count {
            let start = w * t;
            inputs.extend_from_slice(&self.stream[start..start + t]);
            targets.extend_from_slice(&self.stream[start + 1..start + t + 1]);
        }
        Ok(Batch {
            inputs: to_tensor(&inputs, count, t, device)?,
            targets: to_tensor(&targets, count, t, device)?,
            tokens: count * t,
        })
    }

    /// Every token of the stream as batches of up to `batch_size` full windows, then one
    /// shorter window with the remainder: validation loses nothing.
    pub fn all_batches(
        &self,
        batch_size: usize,
        device: Device,
    ) -> Result<Vec<Batch>, tch::TchError> {
        let full = self.windows();
        let mut batches = Vec::new();
        let mut first = 0;
        while first < full {
            let count = batch_size.min(full - first);
            batches.push(self.batch(first, count, device)?);
            first += count;
        }
        let start = full * self.seq_len;
        let rest = self.stream.len().saturating_sub(start + 1);
        if rest > 0 {
            let inputs = &self.stream[start..start + rest];
            let targets = &self.stream[start + 1..start + rest + 1];
            batches.push(Batch {
                inputs: to_tensor(inputs, 1, rest, device)?,
                targets: to_tensor(targets, 1, rest, device)?,
                tokens: rest,
            });
        }
        Ok(batches)
    }
}

fn to_tensor(
    values: &[i64],
    rows: usize,
    cols: usize,
    device: Device,
) -> Result<Tensor, tch::TchError> {
    Tensor::from_slice(values)
        .f_reshape([rows as i64, cols as i64])?
        .f_to_kind(Kind::Int64)?
        .f_to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<Vec<u32>> {
        // Each document ends with the end-of-text id 0.
        vec![vec![1, 2, 3, 0], vec![4, 5, 0], vec![6, 7, 8, 9, 0]]
    }

    #[test]
    fn windows_overlap_by_one_and_waste_nothing() {
        let p = Packed::new(&docs(), &[0, 1, 2], 4);
        assert_eq!(p.windows(), 2); // 12 tokens: windows [0..5) and [4..9)
        let b = p.batch(0, 2, Device::Cpu).unwrap();
        let inputs: Vec<i64> = b.inputs.flatten(0, -1).try_into().unwrap();
        let targets: Vec<i64> = b.targets.flatten(0, -1).try_into().unwrap();
        assert_eq!(inputs, vec![1, 2, 3, 0, 4, 5, 0, 6]);
        assert_eq!(targets, vec![2, 3, 0, 4, 5, 0, 6, 7]);
        assert_eq!(b.tokens, 8);
    }

    #[test]
    fn all_batches_cover_every_target_once() {
        let p = Packed::new(&docs(), &[0, 1, 2], 4);
        let batches = p.all_batches(1, Device::Cpu).unwrap();
        let total: usize = batches.iter().map(|b| b.tokens).sum();
        assert_eq!(total, 11); // every token but the first is a target
        let last: Vec<i64> = batches[2].targets.flatten(0, -1).try_into().unwrap();
        assert_eq!(last, vec![8, 9, 0]);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 7, 1);
        assert_eq!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 7, 2));
        assert_ne!(a, epoch_order(50, 8, 1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(
            windows_per_epoch(&docs(), 4),
            Packed::epoch(&docs(), 4, 3, 5).windows()
        );
    }
}
