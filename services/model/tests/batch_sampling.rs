//! The batch sampler (tensor operations, for logits that live on a GPU) against the host
//! sampler, on the CPU: for the same seed both pick the same token with the same logprob, for
//! every rule and their combinations, row by row in one batch, step after step.

use synopsis_model::batch_sampling::{sample_rows, RowRequest};
use synopsis_model::{Sampled, Sampler, SamplingParams};
use tch::{Kind, Tensor};

const VOCAB: usize = 2_000;

/// Varied logits with ties, a few impossible ids, NaN and +inf, like a real row at its worst.
fn row(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut logits: Vec<f32> = (0..VOCAB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state % 10_000) as f32 / 10_000.0 - 0.5) * 12.0
        })
        .collect();
    logits[3] = logits[7]; // a tie
    logits[11] = f32::NEG_INFINITY;
    logits[12] = f32::NAN;
    if seed.is_multiple_of(5) {
        logits[40] = f32::INFINITY;
    }
    logits
}

fn params_table() -> Vec<SamplingParams> {
    let p = |temperature, top_k, top_p, repetition_penalty| SamplingParams {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
    };
    vec![
        SamplingParams::greedy(),
        p(0.0, 0, 1.0, 1.3),
        p(1.0, 0, 1.0, 1.0),
        p(0.7, 0, 1.0, 1.2),
        p(1.0, 40, 1.0, 1.0),
        p(0.8, 1, 1.0, 1.0),
        p(1.3, 0, 0.9, 1.0),
        p(0.9, 50, 0.8, 1.1),
        p(0.5, 0, 0.05, 1.0),
        p(1.0, VOCAB + 5, 1.0, 1.0),
    ]
}

fn close(host: Sampled, batch: Sampled) -> bool {
    host.token == batch.token
        && ((host.logprob == batch.logprob)
            || (host.logprob - batch.logprob).abs() <= 1e-4 * host.logprob.abs().max(1.0))
}

#[test]
fn one_batch_of_every_rule_matches_the_host_sampler_step_after_step() {
    let table = params_table();
    let mut host: Vec<Sampler> = Vec::new();
    let mut batch: Vec<Sampler> = Vec::new();
    let mut history: Vec<Vec<u32>> = Vec::new();
    for (i, params) in table.iter().enumerate() {
        for seed in [1u64, 77] {
            host.push(Sampler::new(params.clone(), seed + i as u64));
            batch.push(Sampler::new(params.clone(), seed + i as u64));
            history.push(vec![5, 7, 7, 40, 1_999, 12]);
        }
    }
    let mut compared = 0;
    for step in 0..24u64 {
        // Rows of logits, fewer than sequences: sequences 2j and 2j+1 share row j (n > 1).
        let rows: Vec<Vec<f32>> = (0..host.len() / 2)
            .map(|j| row(step * 100 + j as u64))
            .collect();
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let logits = Tensor::from_slice(&flat).view([rows.len() as i64, VOCAB as i64]);

        let expected: Vec<Sampled> = host
            .iter_mut()
            .enumerate()
            .map(|(s, sampler)| sampler.sample(&rows[s / 2], &history[s]))
            .collect();
        let requests: Vec<RowRequest<'_>> = batch
            .iter_mut()
            .zip(&history)
            .enumerate()
            .map(|(s, (sampler, previous))| RowRequest::draw(sampler, s / 2, previous))
            .collect();
        let got = sample_rows(&logits, &requests, VOCAB).unwrap();
        assert_eq!(got.len(), expected.len());
        for (s, (e, g)) in expected.iter().zip(&got).enumerate() {
            assert!(
                close(*e, *g),
                "step {step}, sequence {s} ({:?}): host {e:?}, batch {g:?}",
                table[s / 2]
            );
            compared += 1;
        }
        for (h, e) in history.iter_mut().zip(&expected) {
            h.push(e.token);
        }
    }
    assert_eq!(compared, 24 * 2 * table.len());
    // The draws were not all the same token: the comparison covered real sampling.
    let distinct: std::collections::BTreeSet<u32> = history.iter().flatten().copied().collect();
    assert!(distinct.len() > 50, "{}", distinct.len());
}

#[test]
fn reads_only_the_usable_ids_and_any_float_kind() {
    // Ids past the tokenizer's vocabulary (a padded embedding table) are never chosen, even
    // with the largest logits; bf16 logits are read as the host reads them after conversion.
    let mut logits = row(3);
    logits.extend([100.0f32; 48]);
    let usable = VOCAB;
    let tensor = Tensor::from_slice(&logits)
        .view([1, (VOCAB + 48) as i64])
        .to_kind(Kind::BFloat16);
    let host_view: Vec<f32> =
        Vec::<f32>::try_from(&tensor.to_kind(Kind::Float).view([-1])).unwrap();
    for params in params_table() {
        let mut host = Sampler::new(params.clone(), 9);
        let mut batch = Sampler::new(params.clone(), 9);
        let expected = host.sample(&host_view[..usable], &[]);
        let got = sample_rows(&tensor, &[RowRequest::draw(&mut batch, 0, &[])], usable).unwrap();
        assert!((got[0].token as usize) < usable, "{params:?}: {got:?}");
        assert!(
            close(expected, got[0]),
            "{params:?}: host {expected:?}, batch {got:?}"
        );
    }
}

#[test]
fn a_row_with_no_possible_token_gives_token_zero_at_minus_infinity_on_both_paths() {
    let logits = vec![f32::NEG_INFINITY; 64];
    let tensor = Tensor::from_slice(&logits).view([1, 64]);
    for params in params_table() {
        let mut host = Sampler::new(params.clone(), 4);
        let mut batch = Sampler::new(params.clone(), 4);
        let expected = host.sample(&logits, &[]);
        let got = sample_rows(&tensor, &[RowRequest::draw(&mut batch, 0, &[])], 64).unwrap();
        assert_eq!(expected.token, 0, "{params:?}");
        assert_eq!(got[0].token, 0, "{params:?}");
        assert_eq!(got[0].logprob, f32::NEG_INFINITY, "{params:?}");
        assert_eq!(expected.logprob, f32::NEG_INFINITY, "{params:?}");
    }
}
