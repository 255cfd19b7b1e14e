//! Command output kept up to a cap while it streams in: the head and the tail, with a marker for
//! what was dropped in between. Both sandbox backends collect output through it, so a command's
//! output has the same shape whichever ran it. (Text already in memory is shortened by
//! [`crate::text::truncate_middle`] instead, which also respects UTF-8 boundaries.)
//!
//! The head and the tail matter most: how a command started, and how it ended (the error, the
//! summary line); memory stays bounded by the cap however much a command prints.

use std::collections::VecDeque;

/// Up to `cap / 2` bytes of head and `cap / 2` bytes of tail, plus how many were dropped.
#[derive(Debug)]
pub struct CappedBuf {
    half: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: usize,
}

impl CappedBuf {
    pub fn new(cap: usize) -> Self {
        Self {
            half: cap / 2,
            head: Vec::new(),
            tail: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Appends a chunk; once the head is full, only the latest `cap / 2` bytes are kept.
    pub fn push(&mut self, mut chunk: &[u8]) {
        if self.head.len() < self.half {
            let take = (self.half - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        self.tail.extend(chunk.iter().copied());
        let excess = self.tail.len().saturating_sub(self.half);
        if excess > 0 {
            self.tail.drain(..excess);
            self.dropped += excess;
        }
    }

    /// Some output was dropped.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// Head, marker (when anything was dropped) and tail.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = self.head;
        if self.dropped > 0 {
            out.extend_from_slice(
                format!("\n[... {} bytes truncated ...]\n", self.dropped).as_bytes(),
            );
        }
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut buf = CappedBuf::new(10);
        buf.push(b"abc");
        buf.push(b"de");
        assert!(!buf.truncated());
        assert_eq!(buf.into_bytes(), b"abcde");
    }

    #[test]
    fn keeps_head_and_tail_over_the_cap() {
        let mut buf = CappedBuf::new(4);
        for chunk in [b"ab".as_slice(), b"cdef", b"gh"] {
            buf.push(chunk);
        }
        assert!(buf.truncated());
        assert_eq!(
            String::from_utf8(buf.into_bytes()).unwrap(),
            "ab\n[... 4 bytes truncated ...]\ngh"
        );
    }

    #[test]
    fn the_result_does_not_depend_on_how_output_was_chunked() {
        let output: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = CappedBuf::new(1000);
        whole.push(&output);
        let whole = whole.into_bytes();
        for size in [1, 7, 499, 500, 501, 4096] {
            let mut chunked = CappedBuf::new(1000);
            for chunk in output.chunks(size) {
                chunked.push(chunk);
            }
            assert_eq!(chunked.into_bytes(), whole, "chunks of {size}");
        }
        let marker = b"\n[... 9000 bytes truncated ...]\n";
        assert_eq!(&whole[..500], &output[..500]);
        assert_eq!(&whole[500..500 + marker.len()], marker);
        assert_eq!(&whole[500 + marker.len()..], &output[9500..]);
    }
}
