//! Output kept up to a cap: the head and the tail, with a marker for what was dropped in between
//! (the same shape the local backend produces).

use std::collections::VecDeque;

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

    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

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
}
