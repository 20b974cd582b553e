//! Client input echoed in an error stays short and inert: gRPC carries a status message in
//! HTTP/2 metadata, where a long one is refused by the peer (the client then gets a transport
//! error instead of the status), and control characters from a message reach terminals.

/// Characters of client input an error message quotes.
pub const QUOTE_CHARS: usize = 120;

/// Longest status message a server sends, in characters (well under every client's
/// metadata limit once percent-encoded).
pub const MAX_STATUS_CHARS: usize = 400;

/// Escapes control characters (`\n`, `\u{1b}`, …) so text prints on one line and cannot
/// drive a terminal.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}') {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

/// `text` as an error message quotes it: in double quotes, control characters escaped, at
/// most [`QUOTE_CHARS`] characters of it followed by its full length when it is longer.
pub fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    let mut chars = text.chars();
    for c in chars.by_ref().take(QUOTE_CHARS) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        push_escaped(&mut out, c);
    }
    out.push('"');
    if chars.next().is_some() {
        out.push_str(&format!("… ({} characters)", text.chars().count()));
    }
    out
}

/// A status message as it may go to a client: control characters escaped and at most
/// [`MAX_STATUS_CHARS`] characters, cut with a note of how much was left out. Every error a
/// server answers passes through this, whatever built it.
pub fn bounded_message(message: &str) -> String {
    let escaped = escape_control(message);
    let total = escaped.chars().count();
    if total <= MAX_STATUS_CHARS {
        return escaped;
    }
    let mut out: String = escaped.chars().take(MAX_STATUS_CHARS - 40).collect();
    out.push_str(&format!(
        "… ({} more characters)",
        total - (MAX_STATUS_CHARS - 40)
    ));
    out
}

/// The status a server answers with: `message` bounded as [`bounded_message`] says.
pub fn bounded_status(code: tonic::Code, message: &str) -> tonic::Status {
    tonic::Status::new(code, bounded_message(message))
}

/// The message of an INTERNAL status: a fresh id the log line also carries, never the
/// failure itself (libtorch's messages carry C++ backtraces and host paths). Logs `detail`.
pub fn internal_message(detail: &dyn std::fmt::Display) -> String {
    let id = format!("{:016x}", rand_id());
    tracing::error!(error_id = %id, error = %detail, "internal error");
    format!("internal error (error id {id}; the server's log has the details)")
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A random-enough id without another dependency: the std hasher is randomly keyed.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short_and_escaped() {
        let long = "x".repeat(65_536);
        let q = quote(&long);
        assert!(q.chars().count() < QUOTE_CHARS + 40, "{q}");
        assert!(q.contains("65536 characters"), "{q}");
        assert_eq!(quote("a\nb\u{1b}[31m\"c"), r#""a\nb\u{1b}[31m\"c""#);
        assert_eq!(quote("short"), "\"short\"");
    }

    #[test]
    fn bounded_messages_fit_metadata() {
        let m = bounded_message(&format!("field: {}", "é\r".repeat(50_000)));
        assert!(m.chars().count() <= MAX_STATUS_CHARS, "{}", m.len());
        assert!(!m.chars().any(char::is_control));
        assert_eq!(bounded_message("plain"), "plain");
    }

    #[test]
    fn internal_messages_hide_the_detail() {
        let m = internal_message(&"libtorch: CUDA out of memory\nframe #0: c10::Error");
        assert!(m.contains("error id"), "{m}");
        assert!(!m.contains("c10"), "{m}");
    }
}
