//! The fused CPU decoding step agrees with libtorch's step: same logits, same cache, from one
//! row up to the most it takes, with and without padding, while the cache grows and rows
//! leave; and it steps aside where it does not apply.

mod support;

use support::{max_diff, two_layer_config};
use synopsis_model::{Gpt2, KvCache, WeightDtype};
use tch::{Device, Kind, Tensor};

fn serving_model(activation: &str) -> Gpt2 {
    let mut config = two_layer_config();
    config.activation_function = activation.to_string();
    tch::manual_seed(23);
    let mut model = Gpt2::new(&config, Device::Cpu);
    // Zero biases would hide a bias added twice or not at all.
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            if name.ends_with(".bias") {
                let _ = t.normal_(0.0, 0.1);
            }
        }
    });
    model.enable_decode_head();
    model
}

fn prefill(model: &Gpt2, ids: &[i64], capacity: i64) -> KvCache {
    let mut cache = model.new_cache(1, capacity);
    let t = ids.len() as i64;
    let mask = Tensor::ones([1, t], (Kind::Bool, Device::Cpu));
    let _ = model.forward_cached_last(&Tensor::from_slice(ids).unsqueeze(0), &mask, &mut cache);
    cache
}

/// Twin caches, one stepped by the fused pass and one by libtorch, compared every step.
fn assert_twins_agree(model: &Gpt2, prompts: &[Vec<i64>], steps: i64, leave_at: Option<i64>) {
    tch::no_grad(|| {
        // Small capacities on purpose: the caches must grow while decoding.
        let build = || {
            prompts
                .iter()
                .map(|p| prefill(model, p, 2))
                .reduce(|a, b| KvCache::merge(&a, &b))
                .unwrap()
        };
        let (mut fused, mut general) = (build(), build());
        let mut sums: Vec<i64> = prompts.iter().map(|p| p.iter().sum()).collect();
        for step in 0..steps {
            let next: Vec<i64> = sums.iter().map(|s| (s * 7 + step) % 300).collect();
            let ids = Tensor::from_slice(&next);
            let a = model
                .decode_step_fused(&ids, &mut fused)
                .unwrap_or_else(|| panic!("the fused pass declined {} rows", next.len()));
            let b = model.decode_step_libtorch(&ids, &mut general);
            let diff = max_diff(&a, &b);
            assert!(diff < 1e-4, "step {step}: logits differ by {diff}");
            assert_eq!(fused.positions(), general.positions(), "step {step}");
            assert_eq!(fused.len(), general.len(), "step {step}");
            for (s, n) in sums.iter_mut().zip(&next) {
                *s += n;
            }
            if leave_at == Some(step) {
                fused = fused.select_rows(&[1]);
                general = general.select_rows(&[1]);
                sums.remove(0);
                sums.truncate(1);
            }
        }
    });
}

#[test]
fn one_row_matches_libtorch_for_sixty_steps() {
    assert_twins_agree(&serving_model("gelu_new"), &[vec![3, 4, 5]], 60, None);
}

#[test]
fn padded_rows_of_different_lengths_match_libtorch_and_can_leave() {
    let prompts = [vec![3, 4, 5], vec![50, 60, 70, 80, 90], vec![7]];
    assert_twins_agree(&serving_model("gelu_new"), &prompts, 40, Some(25));
}

#[test]
fn four_rows_and_the_relu_activation_match_libtorch() {
    let prompts = [vec![1, 2], vec![9, 8, 7], vec![100], vec![42, 43, 44, 45]];
    assert_twins_agree(&serving_model("relu"), &prompts, 30, None);
}

#[test]
fn the_most_padded_rows_the_fused_pass_takes_match_libtorch() {
    // 16 rows with AVX2: past four, the products go through the register-blocked kernels.
    let prompts: Vec<Vec<i64>> = (0..Gpt2::fused_decode_rows() as i64)
        .map(|i| (0..1 + i % 5).map(|j| 10 * i + j + 1).collect())
        .collect();
    assert_twins_agree(&serving_model("gelu_new"), &prompts, 20, Some(12));
}

/// The step's work is cut into fixed chunks whose partial sums are added in a fixed order, so
/// the logits are bit for bit the same whoever took which chunk and however many threads share
/// the step: a seeded request gives the same text on any machine size and under any load.
#[test]
fn the_logits_do_not_depend_on_how_many_threads_share_the_step() {
    // Tensors cannot cross threads: each thread loads the same saved weights.
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    let saved = serving_model("gelu_new");
    saved.save_safetensors(&weights).unwrap();
    let config = saved.config().clone();
    let decode = |threads: i32| -> Vec<Vec<f32>> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // The step's team is sized from this thread's libtorch thread count.
                tch::set_num_threads(threads);
                let mut model =
                    Gpt2::load(&config, &weights, Device::Cpu, WeightDtype::F32).unwrap();
                model.enable_decode_head();
                tch::no_grad(|| {
                    let mut all = Vec::new();
                    // Three padded rows (the single-sweep kernels), then nine (the
                    // register-blocked ones where the CPU has them).
                    for rows in [3i64, 9] {
                        let mut cache = (0..rows)
                            .map(|i| {
                                prefill(
                                    &model,
                                    &(0..1 + i % 4).map(|j| 11 * i + j).collect::<Vec<_>>(),
                                    4,
                                )
                            })
                            .reduce(|a, b| KvCache::merge(&a, &b))
                            .unwrap();
                        for step in 0..12 {
                            let ids = Tensor::from_slice(
                                &(0..rows).map(|i| (i * 31 + step) % 300).collect::<Vec<_>>(),
                            );
                            let logits = model
                                .decode_step_fused(&ids, &mut cache)
                                .expect("the fused pass applies");
                            all.push(Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap());
                        }
                    }
                    all
                })
            })
            .join()
            .unwrap()
        })
    };
    let alone = decode(1);
    let shared = decode(2);
    assert_eq!(alone.len(), shared.len());
    for (step, (a, b)) in alone.iter().zip(&shared).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "step {step}: one thread and two disagree");
    }
}

#[test]
fn the_fused_pass_declines_one_row_too_many_exact_gelu_and_models_without_the_decode_head() {
    tch::no_grad(|| {
        let model = serving_model("gelu_new");
        let rows = Gpt2::fused_decode_rows() as i64 + 1;
        let many: Vec<KvCache> = (0..rows)
            .map(|i| prefill(&model, &[i + 1, i + 2], 8))
            .collect();
        let mut cache = many
            .into_iter()
            .reduce(|a, b| KvCache::merge(&a, &b))
            .unwrap();
        let before = (cache.len(), cache.positions());
        let ids = Tensor::from_slice(&(1..=rows).collect::<Vec<i64>>());
        assert!(model.decode_step_fused(&ids, &mut cache).is_none());
        assert_eq!(
            (cache.len(), cache.positions()),
            before,
            "a declined step changes nothing"
        );
        // decode_step still serves it, through libtorch.
        assert_eq!(model.decode_step(&ids, &mut cache).size(), vec![rows, 300]);

        let exact = serving_model("gelu");
        let mut cache = prefill(&exact, &[1, 2, 3], 8);
        assert!(exact
            .decode_step_fused(&Tensor::from_slice(&[4i64]), &mut cache)
            .is_none());

        let mut training = Gpt2::new(model.config(), Device::Cpu);
        training.var_store_mut().copy(model.var_store()).unwrap();
        let mut cache = prefill(&training, &[1, 2, 3], 8);
        assert!(training
            .decode_step_fused(&Tensor::from_slice(&[4i64]), &mut cache)
            .is_none());
    });
}

#[test]
fn fused_greedy_decoding_matches_a_full_forward_at_every_step() {
    tch::no_grad(|| {
        let model = serving_model("gelu_pytorch_tanh");
        let mut seq = vec![11i64, 12, 13, 14];
        let mut cache = prefill(&model, &seq, 4);
        let mut next = 15i64;
        for step in 0..30 {
            seq.push(next);
            let logits = model
                .decode_step_fused(&Tensor::from_slice(&[next]), &mut cache)
                .expect("one row on CPU is the fused pass's");
            let full = model.forward(&Tensor::from_slice(&seq).unsqueeze(0), false);
            let expected = full.select(1, -1).squeeze_dim(0);
            let diff = max_diff(&logits.get(0), &expected);
            assert!(
                diff < 1e-4,
                "step {step}: diff {diff} against a full forward"
            );
            next = logits.get(0).argmax(-1, false).int64_value(&[]);
        }
    });
}
