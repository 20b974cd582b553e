//! Turns a stream of token ids into text deltas that are always valid UTF-8.
//!
//! A byte-level BPE token can end in the middle of a multi-byte character (emoji, CJK), so
//! decoding token by token would emit broken characters. This decoder works on raw token bytes,
//! emits every complete character as soon as it has it and holds back the bytes of an incomplete
//! one. Bytes that can never form UTF-8 become U+FFFD exactly where Hugging Face's `decode` puts
//! them, so the concatenation of all deltas plus [`IncrementalDecoder::finish`] equals
//! [`Tokenizer::decode`] of all the ids.

use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    /// Bytes of a character whose remaining bytes have not arrived yet (at most 3).
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.push_bytes(tok.token_bytes_ref(id))
    }

    /// Adds raw bytes and returns the text they complete (possibly empty).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.drain(false)
    }

    /// Ends the stream: bytes still held back (an incomplete character) become U+FFFD.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    /// True when bytes are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn drain(&mut self, end_of_stream: bool) -> String {
        let mut out = String::new();
        let mut pos = 0;
        while pos < self.pending.len() {
            match std::str::from_utf8(&self.pending[pos..]) {
                Ok(text) => {
                    out.push_str(text);
                    pos = self.pending.len();
                }
                Err(e) => {
                    let valid_end = pos + e.valid_up_to();
                    // Valid by construction; the lossy call just avoids an unwrap.
                    out.push_str(&String::from_utf8_lossy(&self.pending[pos..valid_end]));
                    match e.error_len() {
                        // Bytes that no continuation can repair: one U+FFFD per maximal
                        // invalid prefix, the same rule as `String::from_utf8_lossy`.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos = valid_end + len;
                        }
                        None if end_of_stream => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos = self.pending.len();
                        }
                        // The start of a character whose other bytes may come next.
                        None => {
                            pos = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..pos);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn feed_in_pieces(bytes: &[u8], cuts: &[usize]) -> (String, Vec<String>) {
        let mut dec = IncrementalDecoder::new();
        let mut deltas = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            deltas.push(dec.push_bytes(&bytes[start..cut]));
            start = cut;
        }
        deltas.push(dec.finish());
        (deltas.concat(), deltas)
    }

    #[test]
    fn split_character_is_held_back_until_complete() {
        let smile = "😀".as_bytes(); // 4 bytes
        let mut dec = IncrementalDecoder::new();
        assert_eq!(dec.push_bytes(b"a"), "a");
        assert_eq!(dec.push_bytes(&smile[..1]), "");
        assert_eq!(dec.push_bytes(&smile[1..3]), "");
        assert!(dec.has_pending());
        assert_eq!(dec.push_bytes(&smile[3..]), "😀");
        assert_eq!(dec.finish(), "");
    }

    #[test]
    fn incomplete_tail_becomes_one_replacement_char_at_finish() {
        let mut dec = IncrementalDecoder::new();
        assert_eq!(dec.push_bytes(&"é".as_bytes()[..1]), "");
        assert_eq!(dec.finish(), "\u{FFFD}");
        assert!(!dec.has_pending());
    }

    /// Random byte soup (valid and invalid UTF-8) cut at random places must give exactly what
    /// decoding it in one go gives, and every delta is a `String`, hence valid UTF-8.
    #[test]
    fn any_cutting_matches_lossy_decoding_of_the_whole() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let alphabet: Vec<u8> = ["a", "é", "日", "😀", " "]
            .iter()
            .flat_map(|s| s.bytes())
            .chain([0x80, 0xC3, 0xE6, 0xF0, 0xFF])
            .collect();
        for _ in 0..2000 {
            let len = rng.random_range(0..24);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let mut cuts: Vec<usize> = (0..rng.random_range(0..6))
                .map(|_| rng.random_range(0..=len))
                .collect();
            cuts.sort_unstable();
            let (joined, _) = feed_in_pieces(&bytes, &cuts);
            assert_eq!(
                joined,
                String::from_utf8_lossy(&bytes),
                "bytes {bytes:?} cuts {cuts:?}"
            );
        }
    }
}
