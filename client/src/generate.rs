//! `synopsis generate`: streams synopses to the terminal token by token as the generator writes
//! them, and can keep them in a text file shaped like the original project's
//! "Generated Examples.txt" (a header per prompt, numbered samples).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use synopsis_proto::v1::{generate_response, GenerateRequest, GenerateResponse, SamplingParams};
use tonic::Streaming;

use crate::cli::GenerateArgs;
use crate::connect::{CliError, Servers, Service};
use crate::output::{self, finish_reason_name};

/// The openings the original project generated from when given no prompt.
pub const DEFAULT_PROMPTS: [&str; 4] = [
    "In the year 2199,",
    "A young man, who has lost his mother",
    "The story follows a girl named",
    "In a world where",
];

/// What one prompt produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptResult {
    pub prompt: String,
    pub checkpoint_id: String,
    pub seed: u64,
    /// Generated text of each sample (without the prompt), in index order.
    pub samples: Vec<String>,
}

pub async fn generate(servers: &Servers, args: &GenerateArgs, json: bool) -> anyhow::Result<()> {
    let prompts: Vec<String> = if args.prompt.is_empty() {
        DEFAULT_PROMPTS.iter().map(|p| p.to_string()).collect()
    } else {
        vec![args.prompt.join(" ")]
    };
    let mut client = servers.generator().await?;
    let mut results = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        if i > 0 && !json {
            println!();
        }
        let stream = client
            .generate(request(args, prompt))
            .await
            .map_err(|s| servers.status_error(Service::Generator, s))?
            .into_inner();
        results.push(follow(servers, stream, prompt, args.n.max(1), json).await?);
    }
    if let Some(path) = &args.out {
        write_examples(path, &results, args)?;
        if !json {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn request(args: &GenerateArgs, prompt: &str) -> GenerateRequest {
    let mut conditions: HashMap<String, String> = args.condition.iter().cloned().collect();
    if let Some(genres) = &args.genres {
        conditions.insert("Genres".into(), genres.clone());
    }
    if let Some(title) = &args.title {
        conditions.insert("Name".into(), title.clone());
    }
    GenerateRequest {
        prompt: prompt.to_string(),
        max_new_tokens: args.max_new_tokens,
        sampling: Some(SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        }),
        stop: args.stop.clone(),
        n: args.n,
        checkpoint_id: args.checkpoint.clone().unwrap_or_default(),
        conditions,
    }
}

/// Prints one request's stream. Samples are shown one after another: the first streams live
/// while later ones are buffered, and each buffered one is shown (then streams on) as soon as
/// the one before it is finished.
async fn follow(
    servers: &Servers,
    mut stream: Streaming<GenerateResponse>,
    prompt: &str,
    n: u32,
    json: bool,
) -> anyhow::Result<PromptResult> {
    let n = n as usize;
    let mut result = PromptResult {
        prompt: prompt.to_string(),
        samples: vec![String::new(); n],
        ..Default::default()
    };
    let mut stats: Vec<Option<String>> = vec![None; n];
    let mut current = 0usize;
    let mut out = std::io::stdout();
    if !json {
        sample_header(&mut out, 0, n, prompt)?;
    }
    loop {
        let response = stream
            .message()
            .await
            .map_err(|s| servers.status_error(Service::Generator, s))?;
        let Some(event) = response.and_then(|r| r.event) else {
            break;
        };
        match event {
            generate_response::Event::Started(s) => {
                result.checkpoint_id = s.checkpoint_id.clone();
                result.seed = s.seed;
                if json {
                    output::emit(&json!({
                        "event": "started", "prompt": prompt, "request_id": s.request_id,
                        "checkpoint_id": s.checkpoint_id, "prompt_tokens": s.prompt_tokens,
                        "seed": s.seed, "model_input": s.model_input,
                    }))?;
                }
            }
            generate_response::Event::Token(t) => {
                let i = t.index as usize;
                if json {
                    output::emit(&json!({
                        "event": "token", "index": t.index, "id": t.id, "text": t.text,
                        "logprob": t.logprob,
                    }))?;
                }
                if let Some(text) = result.samples.get_mut(i) {
                    text.push_str(&t.text);
                    if !json && i == current {
                        out.write_all(output::safe_text(&t.text).as_bytes())?;
                        out.flush()?;
                    }
                }
            }
            generate_response::Event::Finished(f) => {
                let i = f.index as usize;
                if json {
                    output::emit(&json!({
                        "event": "finished", "index": f.index, "reason": finish_reason_name(f.reason),
                        "text": f.text, "generated_tokens": f.generated_tokens,
                        "time_to_first_token_ms": f.time_to_first_token_ms,
                        "tokens_per_second": f.tokens_per_second,
                    }))?;
                }
                if i < n {
                    stats[i] = Some(format!(
                        "[{} tokens, {}, {:.1} tokens/s, first token after {:.0} ms, seed {}]",
                        f.generated_tokens,
                        finish_reason_name(f.reason),
                        f.tokens_per_second,
                        f.time_to_first_token_ms,
                        result.seed.wrapping_add(i as u64)
                    ));
                    // The server's text is authoritative (e.g. a held-back stop prefix).
                    result.samples[i] = f.text;
                }
                while !json && current < n {
                    let Some(line) = &stats[current] else { break };
                    // Statistics go to stderr, so stdout holds only the text.
                    writeln!(out)?;
                    out.flush()?;
                    eprintln!("{line}");
                    current += 1;
                    if current < n {
                        sample_header(&mut out, current, n, prompt)?;
                        out.write_all(output::safe_text(&result.samples[current]).as_bytes())?;
                        out.flush()?;
                    }
                }
            }
        }
    }
    if let Some(missing) = stats.iter().position(Option::is_none) {
        return Err(CliError::ConnectionLost {
            service: Service::Generator,
            url: servers.generator_url.clone(),
            detail: format!(
                "the stream ended before sample {} was finished",
                missing + 1
            ),
        }
        .into());
    }
    Ok(result)
}

fn sample_header(out: &mut impl Write, i: usize, n: usize, prompt: &str) -> std::io::Result<()> {
    if n > 1 {
        writeln!(out, "── sample {}/{} ──", i + 1, n)?;
    }
    write!(out, "{prompt}")?;
    out.flush()
}

/// The results as the original project kept them: a header per prompt, numbered samples.
pub fn format_examples(results: &[PromptResult], settings: &str) -> String {
    let mut text = String::new();
    for result in results {
        text.push_str(&format!("Prompt: {}\n", result.prompt));
        if !result.checkpoint_id.is_empty() {
            text.push_str(&format!("Checkpoint: {}\n", result.checkpoint_id));
        }
        text.push_str(&format!("Settings: {settings}, seed {}\n", result.seed));
        text.push_str(&"=".repeat(72));
        text.push_str("\n\n");
        for (i, sample) in result.samples.iter().enumerate() {
            text.push_str(&format!(
                "{}. {}{}\n\n",
                i + 1,
                result.prompt,
                sample.trim_end()
            ));
        }
        text.push('\n');
    }
    text
}

fn write_examples(
    path: &Path,
    results: &[PromptResult],
    args: &GenerateArgs,
) -> anyhow::Result<()> {
    let settings = format!(
        "temperature {}, top-k {}, top-p {}, repetition penalty {}",
        args.temperature, args.top_k, args.top_p, args.repetition_penalty
    );
    std::fs::write(path, format_examples(results, &settings))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_file_has_a_header_per_prompt_and_numbered_samples() {
        let results = vec![PromptResult {
            prompt: "In a world where".into(),
            checkpoint_id: "r/step-1".into(),
            seed: 7,
            samples: vec![" robots dream.".into(), " cats rule.\n".into()],
        }];
        let text = format_examples(&results, "temperature 1");
        assert!(text.starts_with("Prompt: In a world where\nCheckpoint: r/step-1\n"));
        assert!(
            text.contains("1. In a world where robots dream.\n\n2. In a world where cats rule.\n")
        );
    }
}
