//! Stop sequences over a decoded text stream: generation ends *before* a stop string and no
//! byte of it is ever streamed, even when the string arrives split across several tokens.
//!
//! The matcher holds back the longest tail of the text that could still grow into a stop
//! string, and releases it as soon as it cannot.

/// What pushing one text delta produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can be streamed now (never contains any byte of a stop string).
    pub released: String,
    /// A stop string was completed: the sequence ends, nothing more is released.
    pub stopped: bool,
}

/// Matches any of several stop strings against text arriving in pieces.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would end every sequence before its first byte.
    pub fn new(stops: &[String]) -> Self {
        let mut stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        stops.sort();
        stops.dedup();
        Self {
            stops,
            held: String::new(),
        }
    }

    /// True when there is nothing to match, so callers can skip the matcher entirely.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Text currently held back because it may be the start of a stop string.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next piece of decoded text.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                released: delta.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(delta);
        // The earliest complete match wins: everything before it is text the user asked for.
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let released = self.held[..at].to_owned();
            self.held.clear();
            return StopOutcome {
                released,
                stopped: true,
            };
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let released = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopOutcome {
            released,
            stopped: false,
        }
    }

    /// The stream ended without a stop: whatever was held back is ordinary text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    /// Such a suffix always starts on a char boundary: a stop string begins with a leading byte,
    /// never with a UTF-8 continuation byte.
    fn longest_partial_suffix(&self) -> usize {
        let held = self.held.as_bytes();
        let mut best = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            let max = (stop.len() - 1).min(held.len());
            for len in (best + 1..=max).rev() {
                if held[held.len() - len..] == stop[..len] {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Pushes every piece, returns (all released text, index of the piece that stopped).
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<usize>) {
        let mut out = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let o = m.push(p);
            out.push_str(&o.released);
            if o.stopped {
                return (out, Some(i));
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = matcher(&[]);
        assert!(m.is_empty());
        assert_eq!(run(&mut m, &["a", "b\n", "c"]), ("ab\nc".to_string(), None));
    }

    #[test]
    fn stop_inside_one_piece_releases_text_before_it() {
        let mut m = matcher(&["\n\n"]);
        let o = m.push("hello\n\nworld");
        assert_eq!(o.released, "hello");
        assert!(o.stopped);
    }

    #[test]
    fn stop_split_across_two_pieces() {
        let mut m = matcher(&["END"]);
        let a = m.push("the EN");
        assert_eq!(a.released, "the ");
        assert!(!a.stopped);
        assert_eq!(m.held(), "EN");
        let b = m.push("D and more");
        assert_eq!(b.released, "");
        assert!(b.stopped);
    }

    #[test]
    fn stop_split_across_three_pieces() {
        let mut m = matcher(&["###"]);
        assert_eq!(
            run(&mut m, &["x #", "#", "# y"]),
            ("x ".to_string(), Some(2))
        );
    }

    #[test]
    fn partial_then_mismatch_releases_held_text() {
        let mut m = matcher(&["END"]);
        let a = m.push("E");
        assert_eq!(a.released, "");
        let b = m.push("N");
        assert_eq!(b.released, "");
        let c = m.push("X");
        assert_eq!(c.released, "ENX");
        assert!(!c.stopped);
        assert_eq!(m.held(), "");
    }

    #[test]
    fn mismatch_keeps_a_new_partial_start() {
        // "EEN" fails at the second E for a match starting at the first, but "EN" may still
        // become "END".
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("EE").released, "E");
        assert_eq!(m.held(), "E");
        assert_eq!(run(&mut m, &["N", "D"]), (String::new(), Some(1)));
    }

    #[test]
    fn multiple_stop_strings_earliest_wins() {
        let mut m = matcher(&["world", "lo"]);
        let o = m.push("hello world");
        assert_eq!(o.released, "hel");
        assert!(o.stopped);

        // "abc" starts before "b" does, although "b" alone would already match.
        let mut m = matcher(&["abc", "b"]);
        assert_eq!(run(&mut m, &["xa", "bc"]), ("x".to_string(), Some(1)));
    }

    #[test]
    fn holds_the_longest_prefix_among_several_stops() {
        let mut m = matcher(&["ab", "xyz"]);
        assert_eq!(m.push("1xy").released, "1");
        assert_eq!(m.held(), "xy");
        assert_eq!(m.push("a").released, "xy");
        assert_eq!(m.held(), "a");
        assert_eq!(run(&mut m, &["b"]), (String::new(), Some(0)));
    }

    #[test]
    fn stop_at_start_emits_nothing() {
        let mut m = matcher(&["The"]);
        let o = m.push("The cat");
        assert_eq!(o.released, "");
        assert!(o.stopped);
        let mut m = matcher(&["The"]);
        assert_eq!(run(&mut m, &["T", "he"]), (String::new(), Some(1)));
    }

    #[test]
    fn finish_releases_an_unfinished_prefix() {
        let mut m = matcher(&["END"]);
        assert_eq!(run(&mut m, &["a", "EN"]), ("aEN".to_string(), None));
    }

    #[test]
    fn multibyte_stop_strings() {
        let mut m = matcher(&["日本"]);
        assert_eq!(
            run(&mut m, &["こ", "日", "本語"]),
            ("こ".to_string(), Some(2))
        );
        let mut m = matcher(&["日本"]);
        assert_eq!(run(&mut m, &["日", "曜日"]), ("日曜日".to_string(), None));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = matcher(&["", "Z"]);
        assert_eq!(run(&mut m, &["ab", "cZ"]), ("abc".to_string(), Some(1)));
    }

    #[test]
    fn released_text_never_contains_a_stop_byte_sequence() {
        // Every way to split a text into pieces gives the same result as matching the whole.
        let text = "one two ENDthree";
        let stops = ["END", "two E"];
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let mut m = matcher(&stops);
                let pieces = [&text[..a], &text[a..b], &text[b..]];
                let (out, stopped) = run(&mut m, &pieces);
                assert_eq!(out, "one ", "split at {a},{b}");
                assert!(stopped.is_some());
            }
        }
    }
}
