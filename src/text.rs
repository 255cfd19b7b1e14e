//! Text helpers shared by everything that shows output to a model or a user.

/// Keeps the head and the tail of `text` when it is longer than `max` bytes, with a marker in
/// between saying how much was left out. Cuts only on UTF-8 character boundaries.
pub fn truncate_middle(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let keep = max.saturating_sub(64);
    let head_len = floor_char_boundary(text, keep / 2);
    let tail_start = ceil_char_boundary(text, text.len() - (keep - keep / 2));
    let omitted = tail_start - head_len;
    let out = format!(
        "{}\n[... {omitted} bytes truncated ...]\n{}",
        &text[..head_len],
        &text[tail_start..]
    );
    (out, true)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Decodes bytes as UTF-8, replacing invalid sequences.
pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_untouched() {
        assert_eq!(truncate_middle("hello", 10), ("hello".to_owned(), false));
    }

    #[test]
    fn long_text_keeps_head_and_tail_with_marker() {
        let text = format!("{}{}", "a".repeat(500), "z".repeat(500));
        let (out, cut) = truncate_middle(&text, 200);
        assert!(cut);
        assert!(out.starts_with("aaaa"));
        assert!(out.ends_with("zzzz"));
        assert!(out.contains("bytes truncated"));
        assert!(out.len() <= 200 + 40);
    }

    #[test]
    fn cuts_on_char_boundaries() {
        let text = "é".repeat(300);
        let (out, cut) = truncate_middle(&text, 101);
        assert!(cut);
        assert!(out.starts_with('é') && out.ends_with('é'));
    }
}
