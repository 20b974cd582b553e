//! Cached decoding agrees with a full forward pass, for batches whose rows differ in length.

mod support;

use support::{max_diff, two_layer_config};
use synopsis_model::{Gpt2, KvCache};
use tch::{Device, Kind, Tensor};

fn small_model() -> Gpt2 {
    tch::manual_seed(11);
    Gpt2::new(&two_layer_config(), Device::Cpu)
}

fn full_last_logits(model: &Gpt2, ids: &[i64]) -> Tensor {
    let logits = model.forward(&Tensor::from_slice(ids).unsqueeze(0), false);
    logits.select(1, -1).squeeze_dim(0)
}

#[test]
fn decoding_64_tokens_with_left_padded_batch_matches_full_forward() {
    tch::no_grad(|| {
        let model = small_model();
        let prompts: Vec<Vec<i64>> = vec![vec![5, 17, 42], vec![7, 8, 9, 10, 11, 12, 13], vec![99]];
        let width = prompts.iter().map(Vec::len).max().unwrap();
        // Left padding: pad slots first, so every row's last slot is its last prompt token.
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for p in &prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
        }
        let b = prompts.len() as i64;
        let ids_t = Tensor::from_slice(&ids).view([b, width as i64]);
        let mask_t = Tensor::from_slice(&mask).view([b, width as i64]);
        let mut cache = model.new_cache(b, 8); // small on purpose: it must grow
        let mut logits = model.forward_cached_last(&ids_t, &mask_t, &mut cache);
        let mut seqs = prompts.clone();
        for step in 0..64 {
            for (row, seq) in seqs.iter_mut().enumerate() {
                let expected = full_last_logits(&model, seq);
                let got = logits.get(row as i64);
                let diff = max_diff(&got, &expected);
                assert!(diff < 1e-4, "step {step} row {row}: diff {diff}");
                seq.push(got.argmax(-1, false).int64_value(&[]));
            }
            let next: Vec<i64> = seqs.iter().map(|s| *s.last().unwrap()).collect();
            let next = Tensor::from_slice(&next).view([b, 1]);
            let ones = Tensor::ones([b, 1], (Kind::Bool, Device::Cpu));
            logits = model.forward_cached_last(&next, &ones, &mut cache);
        }
        assert_eq!(
            cache.positions(),
            seqs.iter().map(|s| s.len() as i64).collect::<Vec<_>>()
        );
    });
}

#[test]
fn rows_can_join_and_leave_a_running_batch() {
    tch::no_grad(|| {
        let model = small_model();
        let ones = |b: i64, t: i64| Tensor::ones([b, t], (Kind::Bool, Device::Cpu));
        // Row A decodes alone for a while.
        let mut a = vec![3i64, 4, 5, 6, 7, 8];
        let mut cache_a = model.new_cache(1, 4);
        let mut la = model.forward_cached_last(
            &Tensor::from_slice(&a).unsqueeze(0),
            &ones(1, 6),
            &mut cache_a,
        );
        for _ in 0..5 {
            a.push(la.get(0).argmax(-1, false).int64_value(&[]));
            la = model.forward_cached_last(
                &Tensor::from_slice(&a[a.len() - 1..]).unsqueeze(0),
                &ones(1, 1),
                &mut cache_a,
            );
        }
        // Row B is prefilled on its own, then merged in.
        let mut b = vec![50i64, 60];
        let mut cache_b = model.new_cache(1, 2);
        let lb = model.forward_cached_last(
            &Tensor::from_slice(&b).unsqueeze(0),
            &ones(1, 2),
            &mut cache_b,
        );
        let mut cache = KvCache::merge(&cache_a, &cache_b);
        let mut logits = Tensor::cat(&[la, lb], 0);
        for step in 0..10 {
            for (row, seq) in [&mut a, &mut b].into_iter().enumerate() {
                let expected = full_last_logits(&model, seq);
                let diff = max_diff(&logits.get(row as i64), &expected);
                assert!(diff < 1e-4, "merged step {step} row {row}: diff {diff}");
                seq.push(logits.get(row as i64).argmax(-1, false).int64_value(&[]));
            }
            let next = Tensor::from_slice(&[*a.last().unwrap(), *b.last().unwrap()]).view([2, 1]);
            logits = model.forward_cached_last(&next, &ones(2, 1), &mut cache);
        }
        // A leaves; B keeps decoding correctly in the trimmed cache.
        let mut cache = cache.select_rows(&[1]);
        let mut lb = logits.get(1).unsqueeze(0);
        for step in 0..10 {
            let expected = full_last_logits(&model, &b);
            let diff = max_diff(&lb.get(0), &expected);
            assert!(diff < 1e-4, "after leave step {step}: diff {diff}");
            b.push(lb.get(0).argmax(-1, false).int64_value(&[]));
            lb = model.forward_cached_last(
                &Tensor::from_slice(&b[b.len() - 1..]).unsqueeze(0),
                &ones(1, 1),
                &mut cache,
            );
        }
        assert_eq!(
            cache.len(),
            b.len() as i64,
            "leading padding of the departed row was trimmed"
        );
    });
}

#[test]
fn decode_head_layout_changes_no_logits_and_keeps_one_copy_of_the_embedding() {
    tch::no_grad(|| {
        let plain = small_model();
        // Other tests draw from the global RNG concurrently: copy the weights, not the seed.
        let mut serving = small_model();
        serving.var_store_mut().copy(plain.var_store()).unwrap();
        serving.enable_decode_head();
        let ids = Tensor::from_slice(&[5i64, 17, 42, 7]).unsqueeze(0);
        let ones = Tensor::ones([1, 4], (Kind::Bool, Device::Cpu));
        let mut cache_plain = plain.new_cache(1, 8);
        let mut cache_serving = serving.new_cache(1, 8);
        let a = plain.forward_cached_last(&ids, &ones, &mut cache_plain);
        let b = serving.forward_cached_last(&ids, &ones, &mut cache_serving);
        assert!(max_diff(&a, &b) < 1e-5, "prefill diff {}", max_diff(&a, &b));
        let next = Tensor::from_slice(&[9i64]).view([1, 1]);
        let one = Tensor::ones([1, 1], (Kind::Bool, Device::Cpu));
        let a = plain.forward_cached_last(&next, &one, &mut cache_plain);
        let b = serving.forward_cached_last(&next, &one, &mut cache_serving);
        assert!(max_diff(&a, &b) < 1e-5, "decode diff {}", max_diff(&a, &b));
        let full = serving.forward(&ids, false);
        let expected = plain.forward(&ids, false);
        assert!(max_diff(&full, &expected) < 1e-5);
        // The embedding variable is now the transposed view of the decode head's storage.
        let wte = serving
            .var_store()
            .variables()
            .remove("transformer.wte.weight")
            .expect("wte");
        assert_eq!(wte.size(), vec![300, 64]);
        assert_eq!(wte.stride(), vec![1, 300]);
        // Every weight moved into one block of memory, after the head, unchanged.
        let plain_vars = plain.var_store().variables();
        let serving_vars = serving.var_store().variables();
        let head_at = wte.data_ptr() as usize;
        let bytes: usize = serving_vars.values().map(|t| t.numel() * 4 + 64).sum();
        for (name, t) in &serving_vars {
            assert!(t.equal(&plain_vars[name]), "{name} changed when packed");
            let at = t.data_ptr() as usize;
            assert!(
                (head_at..head_at + bytes).contains(&at),
                "{name} is not in the block that holds the head"
            );
        }
    });
}

/// `decode_step` is the fast twin of a `[B, 1]` all-true `forward_cached_last`: on a cache
/// without padding (no mask) and on a merged one with padding (mask from the valid slots), for
/// many steps, including growth of the cache and rows leaving.
#[test]
fn decode_step_matches_the_general_cached_forward_with_and_without_padding() {
    tch::no_grad(|| {
        let model = small_model();
        let ones = |b: i64, t: i64| Tensor::ones([b, t], (Kind::Bool, Device::Cpu));
        let prefill = |ids: &[i64], cap: i64| {
            let mut cache = model.new_cache(1, cap);
            let t = ids.len() as i64;
            let logits = model.forward_cached_last(
                &Tensor::from_slice(ids).unsqueeze(0),
                &ones(1, t),
                &mut cache,
            );
            (cache, logits)
        };
        // Twins: one cache driven by decode_step, the other by the general path.
        let (mut fast, _) = prefill(&[3, 4, 5], 2);
        let (mut general, _) = prefill(&[3, 4, 5], 2);
        assert!(
            fast.is_dense(),
            "a prompt without padding leaves the cache dense"
        );
        let (other_fast, _) = prefill(&[50, 60, 70, 80, 90], 4);
        let (other_general, _) = prefill(&[50, 60, 70, 80, 90], 4);
        fast = KvCache::merge(&fast, &other_fast);
        general = KvCache::merge(&general, &other_general);
        assert!(!fast.is_dense(), "rows of different lengths are padded");
        let mut seqs = vec![vec![3i64, 4, 5], vec![50, 60, 70, 80, 90]];
        for step in 0..40 {
            let next: Vec<i64> = seqs
                .iter()
                .map(|s| (s.iter().sum::<i64>() * 7 + step) % 300)
                .collect();
            let rows = next.len() as i64;
            let a = model.decode_step(&Tensor::from_slice(&next), &mut fast);
            let b = model.forward_cached_last(
                &Tensor::from_slice(&next).view([rows, 1]),
                &ones(rows, 1),
                &mut general,
            );
            assert!(
                max_diff(&a, &b) < 1e-5,
                "step {step}: diff {}",
                max_diff(&a, &b)
            );
            for (row, seq) in seqs.iter_mut().enumerate() {
                seq.push(next[row]);
                let expected = full_last_logits(&model, seq);
                let diff = max_diff(&a.get(row as i64), &expected);
                assert!(
                    diff < 1e-4,
                    "step {step} row {row}: diff {diff} against a full forward"
                );
            }
            assert_eq!(fast.positions(), general.positions());
            if step == 20 {
                // The short row leaves: what remains has no padding left, so no mask either.
                fast = fast.select_rows(&[1]);
                general = general.select_rows(&[1]);
                seqs.remove(0);
                assert!(
                    fast.is_dense(),
                    "trimming the departed row's padding makes it dense"
                );
            }
        }
    });
}
