//! Checks every field of a `GenerateRequest` before it reaches the engine, so a bad request is
//! answered with INVALID_ARGUMENT naming the field instead of failing somewhere inside a batch.
//!
//! Rules (zero means "the default" wherever proto3 cannot tell unset from zero):
//! - `sampling` absent is the same as all its fields at zero (greedy decoding).
//! - `sampling.temperature`: finite and >= 0; 0 is greedy.
//! - `sampling.top_p`: finite and in [0, 1]; 0 means 1 (off).
//! - `sampling.top_k`: any value; 0 is off, larger than the vocabulary means the vocabulary.
//! - `sampling.repetition_penalty`: finite and >= 0; 0 means 1 (off). Values in (0, 1) favour
//!   tokens already present, values above 1 penalise them.
//! - `sampling.seed`: unset picks a random seed, echoed in `started`.
//! - `max_new_tokens`: at most the server's cap; 0 is the server's default.
//! - `n`: at most the server's limit; 0 is 1.
//! - `stop`: at most the server's count, each non-empty and at most the length limit.
//! - `prompt`: at most the character limit. A prompt whose tokens plus `max_new_tokens` do not
//!   fit the model's context is refused by the engine, again naming `prompt`.
//! - `conditions`: values within the prompt limit (whitespace, line breaks included, is
//!   collapsed as in training); keys are checked against the checkpoint's condition columns
//!   once the checkpoint is known (see `conditioning`).

use std::collections::BTreeMap;

use synopsis_model::sampling::SamplingParams;
use synopsis_proto::v1 as pb;

/// Request limits set by the server's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_new_tokens_cap: u32,
    pub default_max_new_tokens: u32,
    pub max_n: u32,
    pub max_stop: u32,
    pub max_stop_len: u32,
    pub max_prompt_chars: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_new_tokens_cap: 512,
            default_max_new_tokens: 128,
            max_n: 8,
            max_stop: 8,
            max_stop_len: 64,
            max_prompt_chars: 8000,
        }
    }
}

/// A field that failed validation; `message` starts with the field's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rest: impl std::fmt::Display) -> Self {
        let field = field.into();
        FieldError {
            message: format!("{field} {rest}"),
            field,
        }
    }
}

/// A request whose fields are all within limits, with every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    pub prompt: String,
    pub max_new_tokens: u32,
    pub n: u32,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub stop: Vec<String>,
    /// The resident checkpoint the client pinned, if any.
    pub checkpoint_id: Option<String>,
    pub conditions: BTreeMap<String, String>,
}

/// Validates every field that does not depend on the checkpoint; `random_seed` is called only
/// when the request has no seed.
pub fn validate(
    req: pb::GenerateRequest,
    limits: &Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<ValidRequest, FieldError> {
    let prompt_chars = req.prompt.chars().count();
    if prompt_chars > limits.max_prompt_chars as usize {
        return Err(FieldError::new(
            "prompt",
            format!(
                "is {prompt_chars} characters, the limit is {}",
                limits.max_prompt_chars
            ),
        ));
    }

    let max_new_tokens = match req.max_new_tokens {
        0 => limits.default_max_new_tokens,
        m if m > limits.max_new_tokens_cap => {
            return Err(FieldError::new(
                "max_new_tokens",
                format!("must be at most {}, got {m}", limits.max_new_tokens_cap),
            ))
        }
        m => m,
    };

    let n = match req.n {
        0 => 1,
        n if n > limits.max_n => {
            return Err(FieldError::new(
                "n",
                format!("must be at most {}, got {n}", limits.max_n),
            ))
        }
        n => n,
    };

    // Without `sampling` decoding is greedy: n > 1 would stream n identical sequences, so it
    // is refused instead of silently duplicated (the proto documents this).
    if req.sampling.is_none() && n > 1 {
        return Err(FieldError::new(
            "n",
            format!(
                "is {n} but sampling is not set: greedy decoding would give {n} identical \
                 sequences; set sampling (e.g. temperature 0.8) or n = 1"
            ),
        ));
    }
    let raw = req.sampling.unwrap_or_default();
    let (sampling, seed) = validate_sampling(&raw)?;
    let seed = seed.unwrap_or_else(random_seed);

    if req.stop.len() > limits.max_stop as usize {
        return Err(FieldError::new(
            "stop",
            format!(
                "has {} strings, the limit is {}",
                req.stop.len(),
                limits.max_stop
            ),
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        let len = s.chars().count();
        if len == 0 {
            return Err(FieldError::new(format!("stop[{i}]"), "must not be empty"));
        }
        if len > limits.max_stop_len as usize {
            return Err(FieldError::new(
                format!("stop[{i}]"),
                format!("is {len} characters, the limit is {}", limits.max_stop_len),
            ));
        }
    }

    let mut conditions = BTreeMap::new();
    for (key, value) in req.conditions {
        let field = format!("conditions.{key}");
        if key.trim().is_empty() {
            return Err(FieldError::new(field, "has an empty column name"));
        }
        let len = value.chars().count();
        if len > limits.max_prompt_chars as usize {
            return Err(FieldError::new(
                field,
                format!(
                    "is {len} characters, the limit is {}",
                    limits.max_prompt_chars
                ),
            ));
        }
        conditions.insert(key, value);
    }

    let checkpoint_id = Some(req.checkpoint_id.trim().to_string()).filter(|c| !c.is_empty());

    Ok(ValidRequest {
        prompt: req.prompt,
        max_new_tokens,
        n,
        sampling,
        seed,
        stop: req.stop,
        checkpoint_id,
        conditions,
    })
}

fn validate_sampling(
    raw: &pb::SamplingParams,
) -> Result<(SamplingParams, Option<u64>), FieldError> {
    let t = raw.temperature;
    if !t.is_finite() || t < 0.0 {
        return Err(FieldError::new(
            "sampling.temperature",
            format!("must be finite and >= 0, got {t}"),
        ));
    }
    let p = raw.top_p;
    if !p.is_finite() || !(0.0..=1.0).contains(&p) {
        return Err(FieldError::new(
            "sampling.top_p",
            format!("must be finite and in [0, 1], got {p}"),
        ));
    }
    let r = raw.repetition_penalty;
    // Below 1 would reward repetition: the proto allows 0 (off) or at least 1.
    if !r.is_finite() || (r != 0.0 && r < 1.0) {
        return Err(FieldError::new(
            "sampling.repetition_penalty",
            format!("must be 0 (off) or finite and >= 1, got {r}"),
        ));
    }
    let params = SamplingParams {
        temperature: t,
        top_k: raw.top_k as usize,
        top_p: if p == 0.0 { 1.0 } else { p },
        repetition_penalty: if r == 0.0 { 1.0 } else { r },
    };
    Ok((params, raw.seed))
}

/// Caps `top_k` at the vocabulary: asking for more tokens than exist means "all of them".
pub fn cap_top_k(params: &mut SamplingParams, vocab_size: u32) {
    params.top_k = params.top_k.min(vocab_size as usize);
}

/// Parses the `grpc-timeout` header value ("<up to 8 digits><H|M|S|m|u|n>") into a duration.
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if value.len() < 2 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(v * 3600),
        "M" => Duration::from_secs(v * 60),
        "S" => Duration::from_secs(v),
        "m" => Duration::from_millis(v),
        "u" => Duration::from_micros(v),
        "n" => Duration::from_nanos(v),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(req: pb::GenerateRequest) -> ValidRequest {
        validate(req, &Limits::default(), || 7).unwrap()
    }

    fn err(req: pb::GenerateRequest) -> FieldError {
        validate(req, &Limits::default(), || 7).unwrap_err()
    }

    fn sampling(f: impl FnOnce(&mut pb::SamplingParams)) -> pb::GenerateRequest {
        let mut s = pb::SamplingParams::default();
        f(&mut s);
        pb::GenerateRequest {
            prompt: "A boy".into(),
            sampling: Some(s),
            ..Default::default()
        }
    }

    #[test]
    fn zeros_mean_defaults() {
        let v = ok(pb::GenerateRequest::default());
        assert_eq!(v.max_new_tokens, 128);
        assert_eq!(v.n, 1);
        assert_eq!(v.seed, 7);
        assert_eq!(v.sampling.temperature, 0.0);
        assert_eq!(v.sampling.top_p, 1.0);
        assert_eq!(v.sampling.repetition_penalty, 1.0);
        assert_eq!(v.checkpoint_id, None);
    }

    #[test]
    fn given_seed_is_kept() {
        let v = ok(sampling(|s| s.seed = Some(42)));
        assert_eq!(v.seed, 42);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (
                sampling(|s| s.temperature = f32::NAN),
                "sampling.temperature",
            ),
            (sampling(|s| s.temperature = -0.5), "sampling.temperature"),
            (
                sampling(|s| s.temperature = f32::INFINITY),
                "sampling.temperature",
            ),
            (sampling(|s| s.top_p = 1.5), "sampling.top_p"),
            (sampling(|s| s.top_p = -0.1), "sampling.top_p"),
            (sampling(|s| s.top_p = f32::NAN), "sampling.top_p"),
            (
                sampling(|s| s.repetition_penalty = -1.0),
                "sampling.repetition_penalty",
            ),
            (
                sampling(|s| s.repetition_penalty = f32::NAN),
                "sampling.repetition_penalty",
            ),
            (
                pb::GenerateRequest {
                    max_new_tokens: 513,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                pb::GenerateRequest {
                    n: 9,
                    ..Default::default()
                },
                "n",
            ),
            (
                pb::GenerateRequest {
                    stop: vec!["x".into(); 9],
                    ..Default::default()
                },
                "stop",
            ),
            (
                pb::GenerateRequest {
                    stop: vec!["ok".into(), String::new()],
                    ..Default::default()
                },
                "stop[1]",
            ),
            (
                pb::GenerateRequest {
                    stop: vec!["y".repeat(65)],
                    ..Default::default()
                },
                "stop[0]",
            ),
            (
                pb::GenerateRequest {
                    prompt: "あ".repeat(8001),
                    ..Default::default()
                },
                "prompt",
            ),
            (
                pb::GenerateRequest {
                    conditions: [("Genres".to_string(), "a".repeat(8001))].into(),
                    ..Default::default()
                },
                "conditions.Genres",
            ),
        ];
        for (req, field) in cases {
            let e = err(req);
            assert_eq!(e.field, field);
            assert!(e.message.starts_with(field), "{}", e.message);
        }
    }

    #[test]
    fn nan_is_reported_as_nan() {
        let e = err(sampling(|s| s.temperature = f32::NAN));
        assert_eq!(
            e.message,
            "sampling.temperature must be finite and >= 0, got NaN"
        );
    }

    #[test]
    fn limits_are_inclusive() {
        let v = ok(pb::GenerateRequest {
            prompt: "あ".repeat(8000),
            max_new_tokens: 512,
            n: 8,
            stop: vec!["z".repeat(64); 8],
            sampling: Some(pb::SamplingParams {
                temperature: 0.8,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!((v.max_new_tokens, v.n, v.stop.len()), (512, 8, 8));
    }

    #[test]
    fn top_k_is_capped_at_the_vocabulary() {
        let mut v = ok(sampling(|s| s.top_k = u32::MAX));
        cap_top_k(&mut v.sampling, 50257);
        assert_eq!(v.sampling.top_k, 50257);
    }

    #[test]
    fn grpc_timeout_units() {
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("999999999S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("-5S"), None);
    }
}
