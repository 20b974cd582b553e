//! Sampling rules, each checked so that a wrong rule fails: seeds reproduce, greedy is argmax,
//! top-k and top-p never leave their set, the repetition penalty follows Hugging Face.

use std::collections::BTreeSet;

use synopsis_model::{Sampler, SamplingParams};

/// Logits for `probs` (softmax gives them back).
fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

/// A GPT-2-sized row of varied logits, deterministic.
fn vocab_logits(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 8.0)
        .collect()
}

fn draw(params: &SamplingParams, seed: u64, logits: &[f32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(params.clone(), seed);
    (0..n).map(|_| sampler.sample(logits, &[]).token).collect()
}

fn distinct(tokens: &[u32]) -> BTreeSet<u32> {
    tokens.iter().copied().collect()
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let logits = vocab_logits(50_257);
    let params = SamplingParams::default();
    let a = draw(&params, 42, &logits, 64);
    assert_eq!(a, draw(&params, 42, &logits, 64));
    assert_ne!(a, draw(&params, 43, &logits, 64));
    // Not a constant stream either.
    assert!(distinct(&a).len() > 10);
}

#[test]
fn temperature_zero_is_argmax_with_lowest_id_on_ties() {
    let mut sampler = Sampler::new(SamplingParams::greedy(), 1);
    let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
    for _ in 0..10 {
        let s = sampler.sample(&logits, &[]);
        assert_eq!(s.token, 1);
        // log-softmax of the chosen logit.
        let norm: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!(
            (s.logprob - (3.0f32.exp() / norm).ln()).abs() < 1e-5,
            "{}",
            s.logprob
        );
    }
    let big = vocab_logits(50_257);
    let best = (0..big.len()).fold(0, |b, i| if big[i] > big[b] { i } else { b });
    assert_eq!(sampler.sample(&big, &[]).token as usize, best);
}

#[test]
fn top_k_never_leaves_the_k_best() {
    // Nearly flat: without top-k every token shows up.
    let logits = [1.0, 1.2, 0.9, 1.1, 1.15, 0.95];
    let unrestricted = distinct(&draw(&SamplingParams::default(), 3, &logits, 2000));
    assert_eq!(unrestricted.len(), logits.len());

    let params = SamplingParams {
        top_k: 2,
        ..SamplingParams::default()
    };
    let tokens = draw(&params, 3, &logits, 2000);
    assert_eq!(distinct(&tokens), BTreeSet::from([1, 4]));

    // Same on a full vocabulary (the partial-selection path).
    let big = vocab_logits(50_257);
    let mut order: Vec<u32> = (0..big.len() as u32).collect();
    order.sort_by(|a, b| big[*b as usize].total_cmp(&big[*a as usize]));
    let tokens = draw(
        &SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        },
        9,
        &big,
        500,
    );
    assert_eq!(distinct(&tokens), BTreeSet::from([order[0], order[1]]));
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let params = SamplingParams {
        top_p: 0.7,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, 11);
    let mut seen = BTreeSet::new();
    let mut zeros = 0;
    for _ in 0..4000 {
        let s = sampler.sample(&logits, &[]);
        seen.insert(s.token);
        if s.token == 0 {
            zeros += 1;
            // Renormalised over the nucleus: 0.5 / 0.8.
            assert!(
                (s.logprob - (0.5f32 / 0.8).ln()).abs() < 1e-5,
                "{}",
                s.logprob
            );
        }
    }
    assert_eq!(seen, BTreeSet::from([0, 1]));
    // 0.625 expected; a loose bound that still catches a wrong renormalisation.
    let share = zeros as f64 / 4000.0;
    assert!((share - 0.625).abs() < 0.04, "{share}");

    // A p below the top probability keeps exactly one token.
    let tiny = SamplingParams {
        top_p: 0.1,
        ..SamplingParams::default()
    };
    assert_eq!(distinct(&draw(&tiny, 5, &logits, 200)), BTreeSet::from([0]));
}

/// The nucleus computed the obvious way: sort everything, keep the prefix reaching p.
fn brute_force_nucleus(logits: &[f32], p: f64) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, f64::from(x - max).exp()))
        .collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut mass = 0.0;
    let keep = probs
        .iter()
        .position(|x| {
            mass += x.1;
            mass >= p * total
        })
        .map_or(probs.len(), |i| i + 1);
    probs.truncate(keep);
    let kept: f64 = probs.iter().map(|x| x.1).sum();
    probs.into_iter().map(|(i, w)| (i, w / kept)).collect()
}

#[test]
fn top_p_on_a_full_vocabulary_matches_the_brute_force_nucleus() {
    // Flat: the nucleus holds thousands of tokens. Peaked: a handful.
    let flat = vocab_logits(50_257);
    let mut peaked = vec![-12.0f32; 50_257];
    for (i, id) in [17usize, 4_000, 50_000, 123, 9].iter().enumerate() {
        peaked[*id] = 6.0 - i as f32 * 0.5;
    }
    let cases = [
        (&flat, 0.9, 1000..50_000),
        (&peaked, 0.8, 2..5),
        (&peaked, 0.999, 5..6),
    ];
    for (logits, p, expected_size) in cases {
        let nucleus = brute_force_nucleus(logits, p);
        assert!(expected_size.contains(&nucleus.len()), "{}", nucleus.len());
        let params = SamplingParams {
            top_p: p as f32,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, 21);
        for _ in 0..60 {
            let s = sampler.sample(logits, &[]);
            let Some(&(_, prob)) = nucleus.iter().find(|x| x.0 == s.token) else {
                panic!(
                    "token {} outside the nucleus of {} tokens",
                    s.token,
                    nucleus.len()
                );
            };
            assert!(
                (f64::from(s.logprob) - prob.ln()).abs() < 1e-4,
                "{} vs {}",
                s.logprob,
                prob.ln()
            );
        }
    }
}

#[test]
fn logprob_is_under_the_tempered_distribution() {
    let probs = [0.6f32, 0.3, 0.1];
    let logits = logits_of(&probs);
    // Temperature 2 flattens: p_i ∝ sqrt(p_i).
    let params = SamplingParams {
        temperature: 2.0,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, 8);
    let norm: f32 = probs.iter().map(|p| p.sqrt()).sum();
    for _ in 0..50 {
        let s = sampler.sample(&logits, &[]);
        let expected = (probs[s.token as usize].sqrt() / norm).ln();
        assert!(
            (s.logprob - expected).abs() < 1e-5,
            "{} vs {expected}",
            s.logprob
        );
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let greedy = |penalty: f32| SamplingParams {
        repetition_penalty: penalty,
        ..SamplingParams::greedy()
    };
    // Positive logit of a seen token is divided: 2.0 / 1.5 = 1.33 < 1.8.
    let mut s = Sampler::new(greedy(1.0), 0);
    assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[0]).token, 0);
    let mut s = Sampler::new(greedy(1.5), 0);
    assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[0]).token, 1);

    // Negative logit is multiplied: -1.0 * 1.5 = -1.5 < -1.2 (dividing would keep it on top).
    assert_eq!(s.sample(&[-1.0, -1.2, -3.0], &[0]).token, 1);

    // Each distinct token once, however often it was seen: 2.0 / 1.5 still beats 1.0.
    assert_eq!(s.sample(&[2.0, 1.0], &[0, 0, 0]).token, 0);

    // The logprob is taken after the penalty: log-softmax of [1.333.., 1.8].
    let out = s.sample(&[2.0, 1.8], &[0]);
    let (a, b) = (2.0f32 / 1.5, 1.8f32);
    let expected = b - (a.exp() + b.exp()).ln();
    assert!((out.logprob - expected).abs() < 1e-5);

    // Ids outside the logits are ignored rather than panicking.
    assert_eq!(s.sample(&[2.0, 1.8], &[7, 1_000_000]).token, 0);
}

#[test]
fn nan_and_empty_logits_do_not_panic() {
    let mut s = Sampler::new(SamplingParams::default(), 1);
    assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN], &[]).token, 1);
    assert_eq!(s.sample(&[], &[]).logprob, f32::NEG_INFINITY);
    let mut g = Sampler::new(SamplingParams::greedy(), 1);
    assert_eq!(g.sample(&[f32::NAN, 0.0, 1.0], &[]).token, 2);
}

#[test]
fn invalid_parameters_are_named() {
    let bad = [
        (
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            "repetition_penalty",
        ),
    ];
    for (params, field) in bad {
        let err = params.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    assert!(SamplingParams::default().validate().is_ok());
    assert!(SamplingParams::greedy().validate().is_ok());
}
