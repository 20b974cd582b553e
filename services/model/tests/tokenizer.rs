//! The GPT-2 tokenizer gives Hugging Face's ids, round-trips any text, streams valid UTF-8 token
//! by token, and a BPE trained on a corpus behaves the same way.

use synopsis_model::{IncrementalDecoder, ModelError, Tokenizer};

const GPT2_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/gpt2_tokenizer/tokenizer.json"
);

const JAPANESE: &str = "東京は日本の首都です。アニメ「進撃の巨人」";
const EMOJI: &str = "I ❤️ 🦀 and 👨‍👩‍👧 — 🎉🎉!";
const ACCENTED: &str = "Ça a été très déjà-vu: naïve façade, Zoë und Müßiggang.";

fn gpt2() -> Tokenizer {
    Tokenizer::from_file(GPT2_TOKENIZER).expect("GPT-2 tokenizer fixture")
}

#[test]
fn gpt2_ids_match_hugging_face() {
    let tok = gpt2();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(
        tok.encode(" The quick brown fox jumps over the lazy dog.")
            .unwrap(),
        vec![383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    );
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![50256]);
    assert_eq!(tok.eos_id(), 50256);
    assert_eq!(tok.vocab_size(), 50257);
}

#[test]
fn token_bytes_are_the_raw_bytes() {
    let tok = gpt2();
    assert_eq!(tok.token_bytes(15496), b"Hello");
    assert_eq!(tok.token_bytes(995), b" world");
    assert_eq!(tok.token_bytes(198), b"\n");
    assert_eq!(tok.token_bytes(50256), b"<|endoftext|>");
    assert!(tok.token_bytes(60_000).is_empty());
}

#[test]
fn unicode_round_trips() {
    let tok = gpt2();
    for text in [JAPANESE, EMOJI, ACCENTED, "", "  two  spaces\nand\ttabs "] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

/// Streams `text` token by token; returns the deltas.
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut decoder = IncrementalDecoder::new();
    let mut deltas: Vec<String> = ids.iter().map(|&id| decoder.push(tok, id)).collect();
    deltas.push(decoder.finish());
    deltas
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let tok = gpt2();
    for text in [JAPANESE, EMOJI, ACCENTED] {
        let ids = tok.encode(text).unwrap();
        // The point of the test: some tokens of these texts are not UTF-8 on their own.
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(&tok.token_bytes(id)).is_err()),
            "{text}: no token splits a character"
        );
        let deltas = stream(&tok, &ids);
        assert!(
            deltas[..ids.len()].iter().any(String::is_empty),
            "{text}: no token was held back"
        );
        assert_eq!(deltas.concat(), tok.decode(&ids).unwrap());
        assert_eq!(deltas.concat(), text);
        assert_eq!(deltas.last().map(String::as_str), Some(""));
    }
}

#[test]
fn incremental_decoding_matches_decode_on_broken_sequences() {
    let tok = gpt2();
    // The first byte-piece of an emoji followed by plain words: not UTF-8, so both must agree on
    // where U+FFFD goes. Also a sequence that stops in the middle of a character.
    let emoji = tok.encode("🦀").unwrap();
    assert!(emoji.len() > 1);
    let words = tok.encode(" crab").unwrap();
    let broken: Vec<u32> = [&emoji[..1], &words[..], &emoji[..1]].concat();
    let deltas = stream(&tok, &broken);
    assert_eq!(deltas.concat(), tok.decode(&broken).unwrap());
    assert!(deltas.concat().contains('\u{FFFD}'));
}

#[test]
fn missing_file_is_reported_as_such() {
    let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
}

fn corpus() -> Vec<String> {
    let subjects = [
        "A young pilot",
        "The last samurai",
        "Two sisters",
        "A cursed sword",
        "The student council",
    ];
    let verbs = [
        "discovers",
        "protects",
        "fights for",
        "searches for",
        "remembers",
    ];
    let objects = [
        "a hidden village",
        "the fallen kingdom",
        "their lost memories",
        "a giant robot",
        "the school festival",
    ];
    let mut lines = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        for (j, v) in verbs.iter().enumerate() {
            for o in &objects {
                lines.push(format!(
                    "{s} {v} {o} in episode {}. Tokyo, 東京, café.",
                    i * 5 + j
                ));
            }
        }
    }
    lines
}

#[test]
fn trained_bpe_has_the_requested_size_and_round_trips() {
    let lines = corpus();
    let tok = Tokenizer::train_bpe(lines.iter().map(String::as_str), 320).unwrap();
    // 256 byte symbols + <|endoftext|> + 63 merges: the corpus has more than enough pairs.
    assert_eq!(tok.vocab_size(), 320);
    assert_eq!(tok.eos_id(), 0);
    assert_eq!(tok.token_bytes(0), b"<|endoftext|>");
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![0]);

    // Merges were learned: a frequent phrase takes far fewer tokens than bytes.
    let phrase = " in episode";
    assert!(tok.encode(phrase).unwrap().len() < phrase.len() / 2);

    // Every byte has a symbol, so text the corpus never showed still round-trips.
    for text in [lines[0].as_str(), JAPANESE, EMOJI, ACCENTED] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(stream(&tok, &ids).concat(), text);
    }

    // Saved and reloaded, it encodes identically.
    let dir = tempfile::tempdir().unwrap();
    tok.save_pretrained(dir.path()).unwrap();
    let reloaded = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(reloaded.vocab_size(), 320);
    assert_eq!(reloaded.eos_id(), 0);
    assert_eq!(
        reloaded.encode(ACCENTED).unwrap(),
        tok.encode(ACCENTED).unwrap()
    );
}

#[test]
fn too_small_vocab_is_refused() {
    let err = Tokenizer::train_bpe(["some text"].into_iter(), 100).unwrap_err();
    assert!(matches!(err, ModelError::Invalid(_)), "{err}");
}
