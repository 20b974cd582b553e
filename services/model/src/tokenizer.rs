//! GPT-2's byte-level BPE tokenizer behind a small API: load the Hugging Face `tokenizer.json`
//! of a base model, or train one on a corpus when training from scratch, and expose the raw bytes
//! of each token so generated text can be streamed without splitting a character.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};

/// The end-of-text token of GPT-2: generation stops on it and training separates documents with it.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The file a tokenizer lives in inside a model directory (Hugging Face's name).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// GPT-2's vocabulary and merges, the tokenizer files `GPT2Tokenizer` (the "slow" one) saves.
pub const VOCAB_FILE: &str = "vocab.json";
pub const MERGES_FILE: &str = "merges.txt";

/// The tokenizer files of a model directory: `tokenizer.json` when present, else
/// `vocab.json` + `merges.txt` when both are, else `tokenizer.json` (reported missing).
pub fn tokenizer_files(dir: &Path) -> &'static [&'static str] {
    if !dir.join(TOKENIZER_FILE).is_file()
        && dir.join(VOCAB_FILE).is_file()
        && dir.join(MERGES_FILE).is_file()
    {
        &[VOCAB_FILE, MERGES_FILE]
    } else {
        &[TOKENIZER_FILE]
    }
}

/// The smallest vocabulary a byte-level BPE can have: the 256 byte symbols plus end-of-text.
pub const MIN_BPE_VOCAB: usize = 257;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    /// Raw bytes of every id, computed once: the incremental decoder asks for them per token.
    bytes: Vec<Vec<u8>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. It must be byte-level (GPT-2 style) and know
    /// `<|endoftext|>`, because streaming and stopping rely on both.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::MissingFile { path: path.into() });
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| tokenizer_error(Some(path), e))?;
        Self::from_inner(inner, Some(path))
    }

    /// Loads `dir/tokenizer.json`, or where there is none GPT-2's `vocab.json` + `merges.txt`
    /// (what `GPT2Tokenizer.save_pretrained` writes).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        match tokenizer_files(dir) {
            [_, _] => Self::from_vocab_merges(&dir.join(VOCAB_FILE), &dir.join(MERGES_FILE)),
            _ => Self::from_file(dir.join(TOKENIZER_FILE)),
        }
    }

    /// GPT-2's byte-level BPE from its `vocab.json` and `merges.txt`, set up as GPT-2's
    /// `tokenizer.json` is (no prefix space, ByteLevel pre-tokenizer, post-processor and
    /// decoder, `<|endoftext|>` special).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        for path in [vocab, merges] {
            if !path.is_file() {
                return Err(ModelError::MissingFile { path: path.into() });
            }
        }
        let (Some(vocab_str), Some(merges_str)) = (vocab.to_str(), merges.to_str()) else {
            return Err(ModelError::Tokenizer {
                path: Some(vocab.into()),
                message: "the path is not valid UTF-8".into(),
            });
        };
        let bpe = BPE::from_file(vocab_str, merges_str)
            .build()
            .map_err(|e| tokenizer_error(Some(vocab), e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(true, false, true)))
            .with_decoder(Some(ByteLevel::new(true, true, true)));
        inner
            .add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
            .map_err(|e| tokenizer_error(Some(vocab), e))?;
        Self::from_inner(inner, Some(vocab))
    }

    /// Parses the contents of a `tokenizer.json` (e.g. received over the network).
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(json).map_err(|e| tokenizer_error(None, e))?;
        Self::from_inner(inner, None)
    }

    /// Trains a byte-level BPE on `texts`, configured like GPT-2's (no prefix space, ByteLevel
    /// pre-tokenizer, decoder and post-processor), with `<|endoftext|>` as special token id 0.
    ///
    /// The vocabulary has exactly `vocab_size` entries when the corpus offers enough merges,
    /// fewer otherwise; `vocab_size` must be at least [`MIN_BPE_VOCAB`].
    pub fn train_bpe<'a>(texts: impl Iterator<Item = &'a str>, vocab_size: usize) -> Result<Self> {
        if vocab_size < MIN_BPE_VOCAB {
            return Err(ModelError::Invalid(format!(
                "vocab_size {vocab_size} is below {MIN_BPE_VOCAB} (256 bytes + {END_OF_TEXT})"
            )));
        }
        let trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            // Every byte gets a symbol even when the corpus lacks it, so any text encodes.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);

        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(true, false, true)))
            .with_decoder(Some(ByteLevel::new(true, true, true)));
        // The trainer fans out over threads, so it needs a Send iterator: borrow into a Vec.
        let texts: Vec<&str> = texts.collect();
        inner
            .train(&mut trainer, texts.into_iter())
            .map_err(|e| tokenizer_error(None, e))?;
        Self::from_inner(inner, None)
    }

    fn from_inner(inner: tokenizers::Tokenizer, path: Option<&Path>) -> Result<Self> {
        if !matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err(ModelError::Tokenizer {
                path: path.map(Path::to_path_buf),
                message: "only byte-level (GPT-2 style) tokenizers are supported".into(),
            });
        }
        let eos_id = inner
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| ModelError::Tokenizer {
                path: path.map(Path::to_path_buf),
                message: format!("no {END_OF_TEXT} token"),
            })?;
        let vocab = inner.get_vocab(true);
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        let decoder = byte_decoder();
        let bytes = (0..=max_id as u32)
            .map(|id| match inner.id_to_token(id) {
                Some(token) => symbol_bytes(&decoder, &token),
                None => Vec::new(),
            })
            .collect();
        Ok(Tokenizer {
            inner,
            eos_id,
            bytes,
        })
    }

    /// Token ids of `text`, without any special tokens added around it. A literal
    /// `<|endoftext|>` in the text still becomes the end-of-text id, as in Hugging Face.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tokenizer_error(None, e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included; unknown ids are skipped and bytes that do not
    /// form UTF-8 become U+FFFD, exactly like Hugging Face's `decode`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tokenizer_error(None, e))
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids, special tokens included (50,257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The raw bytes one token stands for (empty for an unknown id). Concatenating them for a
    /// sequence and decoding as UTF-8 (lossily) gives [`Tokenizer::decode`].
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_bytes_ref(id).to_vec()
    }

    pub(crate) fn token_bytes_ref(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Writes `tokenizer.json` (Hugging Face tokenizers format).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| tokenizer_error(Some(path), e))
    }

    /// Writes `tokenizer.json` plus the `tokenizer_config.json` and `special_tokens_map.json`
    /// that `transformers.AutoTokenizer.from_pretrained(dir)` reads to know the class and the
    /// end-of-text token, even in a directory without `config.json`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.save(dir.join(TOKENIZER_FILE))?;
        let special = serde_json::json!({
            "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
        });
        let mut config = special.clone();
        if let Some(map) = config.as_object_mut() {
            map.insert("tokenizer_class".into(), "GPT2Tokenizer".into());
            map.insert("add_prefix_space".into(), false.into());
            map.insert("clean_up_tokenization_spaces".into(), false.into());
        }
        write_json(&dir.join("tokenizer_config.json"), &config)?;
        write_json(&dir.join("special_tokens_map.json"), &special)
    }

    /// The wrapped Hugging Face tokenizer, for what this API does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::format(path, e))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

fn tokenizer_error(path: Option<&Path>, e: impl fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.map(PathBuf::from),
        message: e.to_string(),
    }
}

/// GPT-2's byte ↔ printable-character table: printable Latin-1 bytes stand for themselves, the
/// rest are shifted to U+0100.. so every byte has a visible, whitespace-free symbol.
fn byte_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER);
            shifted += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

/// Bytes of one token string, as the ByteLevel decoder computes them: through the table when
/// every character is a byte symbol, else (an added token such as `<|endoftext|>` with
/// characters outside the table) the string's own UTF-8.
fn symbol_bytes(decoder: &HashMap<char, u8>, token: &str) -> Vec<u8> {
    token
        .chars()
        .map(|c| decoder.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_matching_gpt2() {
        let table = byte_decoder();
        assert_eq!(table.len(), 256);
        // Known GPT-2 symbols: space is 'Ġ' (U+0120), newline is 'Ċ' (U+010A).
        assert_eq!(table.get(&'Ġ'), Some(&b' '));
        assert_eq!(table.get(&'Ċ'), Some(&b'\n'));
        assert_eq!(table.get(&'A'), Some(&b'A'));
        let mut bytes: Vec<u8> = table.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }
}
