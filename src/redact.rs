//! Secret scrubbing: the last line of defence that keeps configured secrets out of events and logs.
//!
//! Secrets should never reach text we show in the first place (the sandbox gets a clean
//! environment, models never see keys); this makes sure that a mistake elsewhere shows
//! `[REDACTED]` instead of a key.

use std::sync::Arc;

pub const MARKER: &str = "[REDACTED]";

/// The configured secret values. Cloning is cheap.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    /// Keeps the non-trivial values (at least 8 characters, so that a short value cannot blank out
    /// ordinary words).
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(Into::into)
            .filter(|s| s.trim().len() >= 8)
            .collect();
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            secrets: Arc::new(secrets),
        }
    }

    /// The configured values, longest first: what the secret scan searches a change for.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every configured secret replaced by [`MARKER`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MARKER);
            }
        }
        out
    }

    /// Redacts every string inside a JSON value in place; says whether anything was replaced.
    pub fn redact_json(&self, value: &mut serde_json::Value) -> bool {
        if self.secrets.is_empty() {
            return false;
        }
        match value {
            serde_json::Value::String(s) => {
                let leaked = self.secrets.iter().any(|k| s.contains(k.as_str()));
                if leaked {
                    *s = self.redact(s);
                }
                leaked
            }
            // `fold`, not `any`: every element must be redacted, not just the first leak.
            serde_json::Value::Array(items) => items
                .iter_mut()
                .fold(false, |leaked, v| self.redact_json(v) | leaked),
            serde_json::Value::Object(map) => map
                .values_mut()
                .fold(false, |leaked, v| self.redact_json(v) | leaked),
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_every_secret() {
        let r = Redactor::new(["ghp_canary_123456", "short"]);
        assert_eq!(
            r.redact("token ghp_canary_123456 and short"),
            "token [REDACTED] and short"
        );
        let mut v =
            serde_json::json!({"a": ["x ghp_canary_123456 y", "ghp_canary_123456"], "b": 1});
        assert!(r.redact_json(&mut v));
        assert_eq!(
            v,
            serde_json::json!({"a": ["x [REDACTED] y", "[REDACTED]"], "b": 1})
        );
        assert!(!r.redact_json(&mut v));
    }
}
