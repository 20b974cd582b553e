//! Samples the next token of every row of a batch with tensor operations where the logits
//! are, so on a GPU nothing but the chosen ids and their logprobs (16 bytes a row) comes to the
//! host: copying 64 rows × 50,257 f32 logits to pageable host memory and sampling them one by
//! one on one CPU thread costs more than the GPU's whole decoding step.
//!
//! The result is the host [`Sampler`]'s: the same repetition penalty, temperature, top-k and
//! top-p rules, the candidates in the same order (most likely first, ties by id; the whole
//! vocabulary in id order when neither top-k nor top-p cuts it), and each row's uniform drawn
//! from its own request's ChaCha stream ([`Sampler::draw_uniform`]), so a seed gives the same
//! token on either path up to the rounding of the weights' sums.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::sampling::{Sampled, Sampler, SamplingParams};

/// One sequence of the batch: which row of the logits it reads and how it samples.
#[derive(Debug)]
pub struct RowRequest<'a> {
    /// Row of the `[rows, vocab]` logits (several sequences may read one row: `n > 1`).
    pub logits_row: usize,
    pub params: &'a SamplingParams,
    /// From [`Sampler::draw_uniform`]; `None` for a greedy row.
    pub uniform: Option<f64>,
    /// The sequence so far (prompt and generated), for the repetition penalty.
    pub previous: &'a [u32],
}

impl<'a> RowRequest<'a> {
    /// The row's request from its sampler, drawing the uniform it will use.
    pub fn draw(sampler: &'a mut Sampler, logits_row: usize, previous: &'a [u32]) -> Self {
        let uniform = sampler.draw_uniform();
        RowRequest {
            logits_row,
            params: sampler.params(),
            uniform,
            previous,
        }
    }
}

/// Samples one token for each of `rows` from `logits` (`[n, vocab]`, any float kind, any
/// device), reading only the first `usable` ids of each row (the ids the tokenizer knows).
/// Synchronises with the device once, to bring the `rows.len()` results to the host.
pub fn sample_rows(
    logits: &Tensor,
    rows: &[RowRequest<'_>],
    usable: usize,
) -> Result<Vec<Sampled>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let (_, vocab) = logits.size2()?;
    let width = (usable as i64).min(vocab);
    if width <= 0 {
        return Ok(rows.iter().map(|_| impossible()).collect());
    }
    let n = rows.len() as i64;
    let on = |t: Tensor| t.to_device(device);
    let row_index = on(Tensor::from_slice(
        &rows.iter().map(|r| r.logits_row as i64).collect::<Vec<_>>(),
    ));
    // f32 as on the host: NaN is impossible, +inf the largest finite logit. A copy, since the
    // penalty writes into it.
    let x32 = logits
        .f_narrow(1, 0, width)?
        .f_index_select(0, &row_index)?
        .f_to_kind(Kind::Float)?
        .f_nan_to_num(f64::NEG_INFINITY, f64::from(f32::MAX), f64::NEG_INFINITY)?;
    apply_repetition_penalty(&x32, rows, width, device)?;
    let x = x32.f_to_kind(Kind::Double)?;

    // Only the kinds of rows the batch holds are computed: sampling sorts the whole batch,
    // which a greedy batch does not need.
    let greedy_rows: Vec<bool> = rows.iter().map(|r| r.uniform.is_none()).collect();
    let chosen = if greedy_rows.iter().all(|&g| g) {
        greedy_choice(&x)?
    } else if !greedy_rows.iter().any(|&g| g) {
        sampled_choice(&x, rows, width, device)?
    } else {
        let is_greedy = on(Tensor::from_slice(&greedy_rows)).f_view([n, 1])?;
        let sampled = sampled_choice(&x, rows, width, device)?;
        greedy_choice(&x)?.f_where_self(&is_greedy, &sampled)?
    }
    .f_to_device(Device::Cpu)?;
    let values = Vec::<f64>::try_from(&chosen.f_view([-1])?)?;
    Ok(values
        .chunks_exact(2)
        .map(|pair| Sampled {
            token: pair[0] as u32,
            logprob: pair[1] as f32,
        })
        .collect())
}

fn impossible() -> Sampled {
    Sampled {
        token: 0,
        logprob: f32::NEG_INFINITY,
    }
}

/// Hugging Face's rule, applied once per distinct id a row has seen: a positive logit is
/// divided by the penalty, a negative one multiplied. One gather and one scatter for the batch.
fn apply_repetition_penalty(
    x32: &Tensor,
    rows: &[RowRequest<'_>],
    width: i64,
    device: Device,
) -> Result<()> {
    let mut flat_ids = Vec::new();
    let mut penalties = Vec::new();
    let mut seen: Vec<u32> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let penalty = row.params.repetition_penalty;
        if penalty == 1.0 || !penalty.is_finite() || penalty <= 0.0 {
            continue;
        }
        seen.clear();
        seen.extend(row.previous.iter().filter(|&&id| i64::from(id) < width));
        seen.sort_unstable();
        seen.dedup();
        for &id in &seen {
            flat_ids.push(r as i64 * width + i64::from(id));
            penalties.push(penalty);
        }
    }
    if flat_ids.is_empty() {
        return Ok(());
    }
    let mut flat = x32.f_view([-1])?;
    let index = Tensor::from_slice(&flat_ids).to_device(device);
    let penalty = Tensor::from_slice(&penalties).to_device(device);
    let logit = flat.f_index_select(0, &index)?;
    let penalised = logit
        .f_div(&penalty)?
        .f_where_self(&logit.f_gt(0.0)?, &logit.f_mul(&penalty)?)?;
    _ = flat.f_index_copy_(0, &index, &penalised)?;
    Ok(())
}

/// `[rows, 2]`: the argmax (first on ties) and its log-softmax; -inf where every logit is.
fn greedy_choice(x: &Tensor) -> Result<Tensor> {
    let token = x.f_argmax(1, true)?;
    let logprob = x
        .f_log_softmax(1, Kind::Double)?
        .f_gather(1, &token, false)?;
    let possible = x.f_amax(1, true)?.f_gt(f64::NEG_INFINITY)?;
    let logprob = logprob.f_where_self(&possible, &logprob.f_full_like(f64::NEG_INFINITY)?)?;
    Ok(Tensor::f_cat(
        &[token.f_to_kind(Kind::Double)?, logprob],
        1,
    )?)
}

/// `[rows, 2]`: the token each row's uniform picks from its filtered distribution, and the log
/// of its probability there. Greedy rows get a value too, which the caller discards.
fn sampled_choice(
    x: &Tensor,
    rows: &[RowRequest<'_>],
    width: i64,
    device: Device,
) -> Result<Tensor> {
    let n = rows.len() as i64;
    let column = |values: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_slice(&values)
            .to_device(device)
            .f_view([n, 1])?)
    };
    let filtered: Vec<bool> = rows
        .iter()
        .map(|r| {
            let k = r.params.top_k;
            (k > 0 && (k as i64) < width) || r.params.top_p < 1.0
        })
        .collect();
    let top_k = column(
        rows.iter()
            .map(|r| match r.params.top_k {
                0 => width as f64,
                k => (k as i64).min(width) as f64,
            })
            .collect(),
    )?;
    let top_p = column(rows.iter().map(|r| f64::from(r.params.top_p)).collect())?;
    let inv_temperature = column(
        rows.iter()
            .map(|r| match r.params.temperature {
                t if t.is_finite() && t > 0.0 => 1.0 / f64::from(t),
                _ => 1.0,
            })
            .collect(),
    )?;
    let uniform = column(rows.iter().map(|r| r.uniform.unwrap_or(0.0)).collect())?;

    // The draw order: most likely first (stable, so ties by id) where a filter cuts the
    // distribution, id order where it does not (the host draws over the whole vocabulary then).
    // A batch with no filtered row skips the sort.
    let ids = Tensor::f_arange(width, (Kind::Int64, device))?.f_view([1, width])?;
    let in_id_order = ids.f_expand([n, width], false)?;
    let order = if filtered.iter().any(|&f| f) {
        let (_, by_likelihood) = x.f_sort_stable(true, 1, true)?;
        let filtered = Tensor::from_slice(&filtered)
            .to_device(device)
            .f_view([n, 1])?;
        by_likelihood.f_where_self(&filtered, &in_id_order)?
    } else {
        in_id_order
    };
    let ordered = x.f_gather(1, &order, false)?;
    let max = x.f_amax(1, true)?;
    let weights = ordered
        .f_sub(&max)?
        .f_mul(&inv_temperature)?
        .f_exp()?
        .f_nan_to_num(0.0, None, None)?;
    // Top-k: the first k of the order (the order is by likelihood wherever k cuts).
    let position = ids.f_to_kind(Kind::Double)?;
    let weights = weights.f_mul(&position.f_lt_tensor(&top_k)?)?;
    // Top-p: the smallest prefix whose mass reaches p of the top-k mass; the first token stays.
    let cumulative = weights.f_cumsum(1, Kind::Double)?;
    let before = cumulative.f_sub(&weights)?;
    let threshold = top_p.f_mul(&weights.f_sum_dim_intlist(1, true, Kind::Double)?)?;
    let nucleus = top_p.f_lt(1.0)?;
    let keep = before
        .f_lt_tensor(&threshold)?
        .f_logical_or(&nucleus.f_logical_not()?)?;
    let weights = weights.f_mul(&keep)?;
    let cumulative = weights.f_cumsum(1, Kind::Double)?;
    let mass = weights.f_sum_dim_intlist(1, true, Kind::Double)?;
    // The first position whose running mass passes u · mass; rounding that leaves the target at
    // the very end picks the last position with weight, as the host does.
    let target = uniform.f_mul(&mass)?;
    let passed = cumulative
        .f_le_tensor(&target)?
        .f_sum_dim_intlist(1, true, Kind::Int64)?;
    let last_weighted = position
        .f_mul(&weights.f_gt(0.0)?)?
        .f_amax(1, true)?
        .f_to_kind(Kind::Int64)?;
    let chosen = passed.f_minimum(&last_weighted)?;
    let token = order.f_gather(1, &chosen, false)?;
    let logprob = weights.f_gather(1, &chosen, false)?.f_div(&mass)?.f_log()?;
    // A row whose every logit is impossible gets token 0 with logprob -inf, as on the host.
    let possible = max.f_gt(f64::NEG_INFINITY)?;
    let token = token.f_mul(&possible)?.f_to_kind(Kind::Double)?;
    let logprob = logprob.f_where_self(&possible, &logprob.f_full_like(f64::NEG_INFINITY)?)?;
    Ok(Tensor::f_cat(&[token, logprob], 1)?)
}
