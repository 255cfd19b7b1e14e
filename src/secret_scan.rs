//! The secret scan: a change that carries a secret is refused before anything shows or publishes
//! it (no `Diff` event, no stored patch, no forge call).
//!
//! Why: the agent is untrusted (a repository, an issue or a page it reads can instruct it), and
//! whatever it manages to read it can write into a file that we would commit, push, show and
//! serve. Isolation keeps the server's secrets out of its reach; this is the check at the exit.
//!
//! What is searched for:
//! - **Every configured secret** (the values the [`crate::redact::Redactor`] holds: the GitHub
//!   token, model and E2B keys, the service's API keys) as is, and in the encodings that take one
//!   line of shell to produce: hex (lower and upper case); percent-encoding (only the bytes URL
//!   syntax needs, and every byte; upper and lower case digits); base64 (standard and URL-safe
//!   alphabets) at each of the three alignments a secret can have inside a longer base64 stream.
//!   For base64 only the characters that depend on the secret alone are searched for, so a
//!   secret in the middle of an encoded file is found whatever surrounds it.
//! - **Well-known credential shapes**, for secrets nobody told us about; [`Shape`] says why each
//!   pattern is what it is. They are kept tight (a prefix, a minimum length, the character mix of
//!   random keys, a boundary before the prefix) so that ordinary text (`sk-learn`, `task-…`,
//!   placeholders like `ghp_xxxx…`, AWS's documented example key) does not stop a job.
//!
//! Where: the path and the new content of every added or modified file (binary content too: an
//! encoding of a secret can hide anywhere), and the diff shown to users. What the base already
//! had (the lines a diff removes, the paths of deleted files) is searched for configured secrets
//! only: a token-shaped string the change deletes is not a leak, and deleting one is a normal
//! task. A modified file that already held a token shape elsewhere is refused, though: telling
//! old from new would mean trusting the base's content as the sandbox (which the agent controls)
//! reports it.
//!
//! Cost: one Aho-Corasick automaton holds every needle (each form of each secret and the shapes'
//! prefixes), so each byte is looked at once whatever the number of secrets; a shape candidate is
//! checked in bounded time, and a candidate inside another's body is rejected by its boundary
//! at once, so the scan stays linear in the size of the change (`benches/secret_scan.rs`: about
//! 150 ms for the largest change, 64 MiB of files and an 8 MiB diff).
//!
//! Not covered, knowingly: encodings of encodings, base64 wrapped across lines, a secret split,
//! reversed or encrypted. An agent set on smuggling a secret out can always do that; the scan
//! stops mistakes and the obvious attacks, and isolation is what stops the rest.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// Configured values shorter than this (trimmed) are not searched for: the redactor's rule too,
/// so that a short value cannot match ordinary text.
pub const MIN_SECRET_LEN: usize = 8;

/// How far a shape's body is read (the longest real keys are under 200 characters).
const MAX_BODY: usize = 256;

/// How a configured secret was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Plain,
    Base64,
    Hex,
    /// Percent-encoding (`%XX`), as in URLs and form bodies.
    Percent,
}

/// Credential shapes found without being configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` (classic, OAuth, user-to-server, server-to-server
    /// and refresh tokens) followed by at least 36 letters and digits, the length GitHub issues;
    /// or `github_pat_` (fine-grained tokens, 82 characters of letters, digits and `_`) followed
    /// by at least 50. The body must mix upper and lower case (and, for `github_pat_`, hold a
    /// digit): random base62 of that length lacks a case with odds of about 1 in 10^8, while
    /// placeholders (`ghp_xxxx…`, `ghp_XXXX…`) and identifiers (`github_pat_from_env_…`) do.
    GithubToken,
    /// `sk-ant-` followed by at least 32 characters of `[A-Za-z0-9_-]` mixing upper and lower
    /// case. Real keys (`sk-ant-api03-…`) are about 100 characters of that alphabet.
    AnthropicKey,
    /// `sk-` followed by at least 32 characters of `[A-Za-z0-9_-]` holding upper case, lower case
    /// and a digit (legacy keys are 48 base62 characters, `sk-proj-…` keys much longer). The
    /// length keeps `sk-learn` and other words out; the mix keeps long kebab-case names out.
    OpenAiKey,
    /// `AKIA` and exactly 16 upper-case letters and digits, not inside a longer word: an AWS
    /// access key id. AWS's documented example (`AKIAIOSFODNN7EXAMPLE`, and any id ending in
    /// `EXAMPLE`) is not one.
    AwsAccessKeyId,
    /// A PEM header `-----BEGIN … PRIVATE KEY-----` (RSA, EC, DSA, OPENSSH, ENCRYPTED, PGP …
    /// BLOCK) followed within 256 bytes by at least 40 base64 characters: a key, not a parser's
    /// constant naming the header.
    PrivateKey,
}

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Configured(Encoding),
    Shape(Shape),
}

impl Kind {
    /// Which of two findings in one place is reported: the server's own secret first.
    fn rank(self) -> u8 {
        match self {
            Kind::Configured(Encoding::Plain) => 0,
            Kind::Configured(Encoding::Base64 | Encoding::Hex | Encoding::Percent) => 1,
            Kind::Shape(_) => 2,
        }
    }
}

/// Names the finding without ever quoting it.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Configured(Encoding::Plain) => "a configured secret",
            Kind::Configured(Encoding::Base64) => "a configured secret, base64-encoded",
            Kind::Configured(Encoding::Hex) => "a configured secret, hex-encoded",
            Kind::Configured(Encoding::Percent) => "a configured secret, URL-encoded",
            Kind::Shape(Shape::GithubToken) => "a GitHub token shape",
            Kind::Shape(Shape::AnthropicKey) => "an Anthropic API key shape",
            Kind::Shape(Shape::OpenAiKey) => "an OpenAI-style API key shape",
            Kind::Shape(Shape::AwsAccessKeyId) => "an AWS access key id shape",
            Kind::Shape(Shape::PrivateKey) => "a private key",
        })
    }
}

/// One finding in one text: what, and where (byte offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub kind: Kind,
    pub range: Range<usize>,
}

/// One changed file as the scan sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChangedText<'a> {
    pub path: &'a str,
    /// The new content (a symlink's target for a symlink); `None` for a deleted file.
    pub content: Option<&'a [u8]>,
}

/// Where a finding is. File names are shown with whatever the scan found in them masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Path(String),
    Content(String),
    /// The diff, in the part about this file when it could be told.
    Diff(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub place: Place,
    pub kind: Kind,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Place::Content(file) => write!(f, "`{file}` contains {}", self.kind),
            Place::Path(file) => write!(f, "the path `{file}` contains {}", self.kind),
            Place::Diff(Some(file)) => write!(f, "the diff of `{file}` contains {}", self.kind),
            Place::Diff(None) => write!(f, "the diff contains {}", self.kind),
        }
    }
}

/// The sentence a refused change is reported with: the places and kinds, never the secret.
pub fn describe(findings: &[Finding]) -> String {
    const LISTED: usize = 5;
    let listed: Vec<String> = findings
        .iter()
        .take(LISTED)
        .map(ToString::to_string)
        .collect();
    let more = match findings.len().saturating_sub(LISTED) {
        0 => String::new(),
        1 => "; and 1 more finding".to_owned(),
        n => format!("; and {n} more findings"),
    };
    format!(
        "nothing was published: {}{more}",
        if listed.is_empty() {
            "the change contains a secret".to_owned()
        } else {
            listed.join("; ")
        }
    )
}

#[derive(Debug, thiserror::Error)]
#[error("the secret scan could not be built: {0}")]
pub struct BuildError(#[from] aho_corasick::BuildError);

/// What an automaton match means.
#[derive(Debug, Clone, Copy)]
enum Needle {
    Secret(Encoding),
    Prefix(Prefix),
}

/// The fixed start of a shape; the rest is checked by [`shape_at`].
#[derive(Debug, Clone, Copy)]
enum Prefix {
    Github,
    GithubPat,
    Sk,
    Akia,
    PemBegin,
}

const PREFIXES: &[(&str, Prefix)] = &[
    ("ghp_", Prefix::Github),
    ("gho_", Prefix::Github),
    ("ghu_", Prefix::Github),
    ("ghs_", Prefix::Github),
    ("ghr_", Prefix::Github),
    ("github_pat_", Prefix::GithubPat),
    ("sk-", Prefix::Sk),
    ("AKIA", Prefix::Akia),
    ("-----BEGIN ", Prefix::PemBegin),
];

/// Every needle in one automaton. Build one per scan of a change (a few milliseconds); it holds
/// encodings of the secrets, so its `Debug` shows only how many needles it has.
pub struct SecretScanner {
    automaton: AhoCorasick,
    needles: Vec<Needle>,
}

impl fmt::Debug for SecretScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretScanner")
            .field("needles", &self.needles.len())
            .finish_non_exhaustive()
    }
}

impl SecretScanner {
    pub fn new<I, S>(secrets: I) -> Result<Self, BuildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut needles = Vec::new();
        let mut seen = HashSet::new();
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.trim().len() < MIN_SECRET_LEN {
                continue;
            }
            // The plain form comes first, so a form equal to it (percent-encoding of a token
            // with no reserved character) is reported as plain.
            for (encoding, form) in forms_of(secret.as_bytes()) {
                if seen.insert(form.clone()) {
                    patterns.push(form);
                    needles.push(Needle::Secret(encoding));
                }
            }
        }
        for (prefix, kind) in PREFIXES {
            patterns.push(prefix.as_bytes().to_vec());
            needles.push(Needle::Prefix(*kind));
        }
        // The default (standard) match kind, which overlapping search needs: a shape's prefix
        // that turns out not to be a shape must not hide a secret that overlaps it.
        let automaton = AhoCorasick::new(&patterns)?;
        Ok(Self { automaton, needles })
    }

    /// Every finding in `text`; shapes only when `shapes`.
    fn hits<'a>(&'a self, text: &'a [u8], shapes: bool) -> impl Iterator<Item = Hit> + 'a {
        // Panics only for a non-standard match kind, which `new` never builds.
        self.automaton
            .find_overlapping_iter(text)
            .filter_map(move |m| match *self.needles.get(m.pattern().as_usize())? {
                Needle::Secret(encoding) => Some(Hit {
                    kind: Kind::Configured(encoding),
                    range: m.range(),
                }),
                Needle::Prefix(prefix) if shapes => {
                    shape_at(prefix, text, m.start(), m.end()).map(|(shape, end)| Hit {
                        kind: Kind::Shape(shape),
                        range: m.start()..end,
                    })
                }
                Needle::Prefix(_) => None,
            })
    }

    /// The most serious finding in `text` (a configured secret over a shape), if any.
    pub fn scan(&self, text: &[u8]) -> Option<Hit> {
        self.most_serious(text, true)
    }

    fn most_serious(&self, text: &[u8], shapes: bool) -> Option<Hit> {
        let mut best: Option<Hit> = None;
        for hit in self.hits(text, shapes) {
            if best
                .as_ref()
                .is_none_or(|b| hit.kind.rank() < b.kind.rank())
            {
                let done = hit.kind.rank() == 0;
                best = Some(hit);
                if done {
                    break;
                }
            }
        }
        best
    }

    /// Every finding in a changed file's path, its content and the diff, at most one per place.
    pub fn scan_change(&self, files: &[ChangedText<'_>], diff: &str) -> Vec<Finding> {
        let mut findings = Vec::new();
        // Diff section header → the file's name as it may be shown, and whether that file was
        // already reported.
        let mut sections: HashMap<String, (String, bool)> = HashMap::new();
        for file in files {
            let deleted = file.content.is_none();
            let path_hits: Vec<Hit> = self.hits(file.path.as_bytes(), !deleted).collect();
            let shown = mask(file.path.as_bytes(), &path_hits);
            if let Some(hit) = path_hits.iter().min_by_key(|h| h.kind.rank()) {
                findings.push(Finding {
                    place: Place::Path(shown.clone()),
                    kind: hit.kind,
                });
            }
            let content_hit = file.content.and_then(|content| self.scan(content));
            if let Some(hit) = &content_hit {
                findings.push(Finding {
                    place: Place::Content(shown.clone()),
                    kind: hit.kind,
                });
            }
            let reported = !path_hits.is_empty() || content_hit.is_some();
            sections.insert(
                format!("diff --git a/{0} b/{0}", file.path),
                (shown, reported),
            );
        }
        findings.extend(self.scan_diff(diff, &sections));
        findings
    }

    /// The diff line by line: at most one finding per file's section, none for a file already
    /// reported. Removed lines (`-`) are the base's and are searched for configured secrets only.
    fn scan_diff(&self, diff: &str, sections: &HashMap<String, (String, bool)>) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut current: Option<&(String, bool)> = None;
        let mut done = false;
        for line in diff.split('\n') {
            if line.starts_with("diff --git ") {
                current = sections.get(line);
                done = current.is_some_and(|(_, reported)| *reported);
                continue;
            }
            if done {
                continue;
            }
            if let Some(hit) = self.most_serious(line.as_bytes(), !line.starts_with('-')) {
                findings.push(Finding {
                    place: Place::Diff(current.map(|(shown, _)| shown.clone())),
                    kind: hit.kind,
                });
                done = true;
            }
        }
        findings
    }
}

/// `text` with every hit replaced by the redaction marker.
fn mask(text: &[u8], hits: &[Hit]) -> String {
    let mut ranges: Vec<Range<usize>> = hits.iter().map(|h| h.range.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for range in ranges {
        if range.end <= at {
            continue;
        }
        if range.start > at {
            out.extend_from_slice(&text[at..range.start]);
        }
        if range.start >= at {
            out.extend_from_slice(crate::redact::MARKER.as_bytes());
        }
        at = range.end;
    }
    out.extend_from_slice(text.get(at..).unwrap_or_default());
    String::from_utf8_lossy(&out).into_owned()
}

/// The forms of one secret that are searched for, plain first.
fn forms_of(secret: &[u8]) -> Vec<(Encoding, Vec<u8>)> {
    let mut forms = vec![(Encoding::Plain, secret.to_vec())];
    for upper in [false, true] {
        forms.push((Encoding::Hex, hex(secret, upper)));
    }
    for every_byte in [false, true] {
        for upper in [true, false] {
            forms.push((Encoding::Percent, percent(secret, every_byte, upper)));
        }
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for offset in 0..3 {
            forms.extend(base64_core(engine, secret, offset).map(|core| (Encoding::Base64, core)));
        }
    }
    forms
}

/// The base64 characters that depend only on `secret` when it starts `offset` bytes into a
/// 3-byte group of a longer stream. Character `i` carries bits `6i..6i+6`; the secret holds bits
/// `8·offset..8·(offset+len)`, so the characters from `ceil(4·offset/3)` to
/// `floor(4·(offset+len)/3)` are the secret's alone, whatever comes before or after it.
fn base64_core(
    engine: &base64::engine::GeneralPurpose,
    secret: &[u8],
    offset: usize,
) -> Option<Vec<u8>> {
    let mut shifted = vec![0u8; offset];
    shifted.extend_from_slice(secret);
    let encoded = engine.encode(&shifted);
    let start = (4 * offset).div_ceil(3);
    let end = 4 * (offset + secret.len()) / 3;
    encoded
        .as_bytes()
        .get(start..end)
        .filter(|core| !core.is_empty())
        .map(<[u8]>::to_vec)
}

fn hex(bytes: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    bytes
        .iter()
        .flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// Percent-encoding: every byte, or only those outside RFC 3986's unreserved set.
fn percent(bytes: &[u8], every_byte: bool, upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 3);
    for &b in bytes {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if unreserved && !every_byte {
            out.push(b);
        } else {
            out.push(b'%');
            out.extend(hex(&[b], upper));
        }
    }
    out
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
}

/// Nothing of the body's own alphabet right before the prefix. This keeps `task-…` from being
/// read as `sk-…`, and makes every candidate inside an accepted or rejected body fail here at
/// once, which keeps the scan linear.
fn boundary_before(text: &[u8], start: usize, class: fn(u8) -> bool) -> bool {
    start == 0 || text.get(start - 1).is_none_or(|b| !class(*b))
}

/// The run of `class` characters from `from`, at most [`MAX_BODY`] long.
fn run(text: &[u8], from: usize, class: fn(u8) -> bool) -> &[u8] {
    let rest = text.get(from..).unwrap_or_default();
    let len = rest
        .iter()
        .take(MAX_BODY)
        .take_while(|b| class(**b))
        .count();
    &rest[..len]
}

fn mixed_case(body: &[u8]) -> bool {
    body.iter().any(u8::is_ascii_uppercase) && body.iter().any(u8::is_ascii_lowercase)
}

fn has_digit(body: &[u8]) -> bool {
    body.iter().any(u8::is_ascii_digit)
}

/// Whether the prefix matched at `start..end` begins a shape; the shape and where it ends.
fn shape_at(prefix: Prefix, text: &[u8], start: usize, end: usize) -> Option<(Shape, usize)> {
    let accept =
        |shape: Shape, body: &[u8], from: usize, ok: bool| ok.then_some((shape, from + body.len()));
    match prefix {
        Prefix::Github => {
            if !boundary_before(text, start, is_alnum) {
                return None;
            }
            let body = run(text, end, is_alnum);
            accept(
                Shape::GithubToken,
                body,
                end,
                body.len() >= 36 && mixed_case(body),
            )
        }
        Prefix::GithubPat => {
            if !boundary_before(text, start, is_word) {
                return None;
            }
            let body = run(text, end, is_word);
            let ok = body.len() >= 50 && mixed_case(body) && has_digit(body);
            accept(Shape::GithubToken, body, end, ok)
        }
        Prefix::Sk => {
            if !boundary_before(text, start, is_key_char) {
                return None;
            }
            let rest = text.get(end..).unwrap_or_default();
            if rest.starts_with(b"ant-") {
                let body = run(text, end + 4, is_key_char);
                accept(
                    Shape::AnthropicKey,
                    body,
                    end + 4,
                    body.len() >= 32 && mixed_case(body),
                )
            } else {
                let body = run(text, end, is_key_char);
                let ok = body.len() >= 32 && mixed_case(body) && has_digit(body);
                accept(Shape::OpenAiKey, body, end, ok)
            }
        }
        Prefix::Akia => {
            if !boundary_before(text, start, is_alnum) {
                return None;
            }
            let body = text.get(end..end + 16)?;
            let ok = body
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                && text.get(end + 16).is_none_or(|b| !is_alnum(*b))
                && !body.ends_with(b"EXAMPLE");
            accept(Shape::AwsAccessKeyId, body, end, ok)
        }
        Prefix::PemBegin => {
            let label = run(text, end, |b| {
                b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '
            });
            let after = end + label.len();
            let label = label.trim_ascii_end();
            let is_private =
                label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK");
            if !is_private || !text.get(after..).unwrap_or_default().starts_with(b"-----") {
                return None;
            }
            let header_end = after + 5;
            let window = text
                .get(header_end..text.len().min(header_end + 256))
                .unwrap_or_default();
            let longest = window
                .split(|b| !is_base64_char(*b))
                .map(<[u8]>::len)
                .max()
                .unwrap_or(0);
            (longest >= 40).then_some((Shape::PrivateKey, header_end))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// A configured secret with bytes that encode differently in the two base64 alphabets and
    /// need percent-encoding.
    const SECRET: &str = "tb-canary/Key?>>~~0123456789";

    fn scanner() -> SecretScanner {
        SecretScanner::new([SECRET, "short", "  padded  "]).unwrap()
    }

    fn kind_in(text: &[u8]) -> Option<Kind> {
        scanner().scan(text).map(|h| h.kind)
    }

    #[test]
    fn the_plain_secret_is_found_anywhere() {
        for text in [
            SECRET.to_owned(),
            format!("token = \"{SECRET}\"\n"),
            format!("prefix{SECRET}suffix"),
        ] {
            assert_eq!(
                kind_in(text.as_bytes()),
                Some(Kind::Configured(Encoding::Plain)),
                "{text}"
            );
        }
        let mut binary = vec![0u8, 255, 1, 2];
        binary.extend_from_slice(SECRET.as_bytes());
        binary.extend_from_slice(&[0, 0, 7]);
        assert_eq!(kind_in(&binary), Some(Kind::Configured(Encoding::Plain)));
    }

    #[test]
    fn base64_is_found_at_every_alignment_in_both_alphabets() {
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE,
        ];
        // The alphabets differ on this secret, so each is really tested.
        assert_ne!(
            engines[0].encode(SECRET.as_bytes()),
            engines[1].encode(SECRET.as_bytes())
        );
        for engine in engines {
            for before in 0..6 {
                for after in 0..4 {
                    let mut bytes: Vec<u8> = (0..before).map(|i| b'a' + i as u8).collect();
                    bytes.extend_from_slice(SECRET.as_bytes());
                    bytes.extend((0..after).map(|i| 200 + i as u8));
                    let encoded = format!("data: {}\n", engine.encode(&bytes));
                    assert_eq!(
                        kind_in(encoded.as_bytes()),
                        Some(Kind::Configured(Encoding::Base64)),
                        "{before} bytes before, {after} after: {encoded}"
                    );
                }
            }
        }
    }

    #[test]
    fn hex_and_percent_forms_are_found() {
        let lower: String = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
        let upper = lower.to_uppercase();
        for text in [&lower, &upper] {
            assert_eq!(
                kind_in(format!("x={text};").as_bytes()),
                Some(Kind::Configured(Encoding::Hex))
            );
        }
        let every_upper: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let every_lower: String = SECRET.bytes().map(|b| format!("%{b:02x}")).collect();
        // Only what URL syntax needs (`/`, `?`, `>`; `~` is unreserved), in both cases.
        let reserved_upper = "tb-canary%2FKey%3F%3E%3E~~0123456789".to_owned();
        let reserved_lower = "tb-canary%2fKey%3f%3e%3e~~0123456789".to_owned();
        for text in [every_upper, every_lower, reserved_upper, reserved_lower] {
            assert_eq!(
                kind_in(format!("https://x.test/?t={text}&a=1").as_bytes()),
                Some(Kind::Configured(Encoding::Percent)),
                "{text}"
            );
        }
    }

    #[test]
    fn near_misses_of_a_configured_secret_do_not_match() {
        let almost = &SECRET[..SECRET.len() - 1];
        let mut changed = SECRET.as_bytes().to_vec();
        changed[5] ^= 1;
        let engine = &base64::engine::general_purpose::STANDARD;
        for text in [
            almost.as_bytes().to_vec(),
            changed.clone(),
            engine.encode(almost).into_bytes(),
            engine.encode(&changed).into_bytes(),
            almost
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
            // Values under eight characters are not searched for.
            b"short and padded".to_vec(),
        ] {
            assert_eq!(kind_in(&text), None, "{}", String::from_utf8_lossy(&text));
        }
    }

    fn shape_in(text: &str) -> Option<Kind> {
        SecretScanner::new::<[&str; 0], &str>([])
            .unwrap()
            .scan(text.as_bytes())
            .map(|h| h.kind)
    }

    #[test]
    fn each_shape_is_found() {
        let github = Some(Kind::Shape(Shape::GithubToken));
        let cases = [
            (
                "GITHUB_TOKEN=ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A",
                github,
            ),
            ("gho_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A", github),
            ("\"ghu_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A\"", github),
            ("ghs_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A", github),
            ("x ghr_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A", github),
            (
                "github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg",
                github,
            ),
            (
                "key: sk-ant-api03-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A-_x",
                Some(Kind::Shape(Shape::AnthropicKey)),
            ),
            (
                "OPENAI_API_KEY=sk-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5AbC7d",
                Some(Kind::Shape(Shape::OpenAiKey)),
            ),
            (
                "sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A_-b",
                Some(Kind::Shape(Shape::OpenAiKey)),
            ),
            (
                "aws_access_key_id = AKIA2E3F4G5H6J7K8L9M\n",
                Some(Kind::Shape(Shape::AwsAccessKeyId)),
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n",
                Some(Kind::Shape(Shape::PrivateKey)),
            ),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n",
                Some(Kind::Shape(Shape::PrivateKey)),
            ),
            (
                "\"key\": \"-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\"",
                Some(Kind::Shape(Shape::PrivateKey)),
            ),
            (
                "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789abcdefghij\n",
                Some(Kind::Shape(Shape::PrivateKey)),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(shape_in(text), expected, "{text}");
        }
    }

    #[test]
    fn near_miss_shapes_do_not_match() {
        for text in [
            // Words and names.
            "pip install scikit-learn; import sk-learn",
            "sk-learn sk-image sk-this-is-a-very-long-kebab-case-css-class-name",
            "task-0123456789ABCDEFabcdef0123456789abcdef",
            "--sk-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5AbC7d",
            "sk-ant-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "sk-ant-api03-short",
            // Placeholders and identifiers.
            "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1",
            "myghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A",
            "github_pat_from_the_environment_is_read_by_the_setup_script_below_0",
            "let github_pat_ = env(\"GITHUB_PAT\");",
            // AWS: the documented example, too short, too long, lower case, inside a word.
            "AKIAIOSFODNN7EXAMPLE",
            "AKIA2E3F4G5H6J7K8L9",
            "AKIA2E3F4G5H6J7K8L9MN",
            "AKIA2e3f4g5h6j7k8l9m",
            "XAKIA2E3F4G5H6J7K8L9M",
            // PEM: public keys, certificates, a parser's constants.
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n",
            "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBaMQswCQYDVQQGEwJJ\n",
            "const HEADER: &str = \"-----BEGIN PRIVATE KEY-----\";\nconst FOOTER: &str = \"-----END PRIVATE KEY-----\";",
            "if line.starts_with(\"-----BEGIN RSA PRIVATE KEY-----\") { return parse(line) }",
        ] {
            assert_eq!(shape_in(text), None, "{text}");
        }
    }

    #[test]
    fn a_configured_secret_is_reported_over_a_shape() {
        let token = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";
        let scanner = SecretScanner::new([token]).unwrap();
        let hit = scanner.scan(format!("t={token}").as_bytes()).unwrap();
        assert_eq!(hit.kind, Kind::Configured(Encoding::Plain));
        assert_eq!(hit.range, 2..2 + token.len());
    }

    #[test]
    fn repeated_prefixes_are_rejected_without_rereading() {
        // Every candidate after the first sits inside the body of the one before.
        let text = "sk-".repeat(100_000) + &"ghp_".repeat(100_000) + &"AKIA".repeat(100_000);
        assert_eq!(shape_in(&text), None);
    }

    #[test]
    fn a_change_is_scanned_in_paths_contents_and_the_diff_and_the_report_never_quotes_a_secret() {
        let token = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let token_path = format!("keys/{token}.txt");
        let files = [
            ChangedText {
                path: "README.md",
                content: Some(b"nothing to see"),
            },
            ChangedText {
                path: "notes/encoded.txt",
                content: Some(b64.as_bytes()),
            },
            ChangedText {
                path: &token_path,
                content: Some(b"clean"),
            },
            // Deleted: the base's path and content are not the change's.
            ChangedText {
                path: "old/AKIA2E3F4G5H6J7K8L9M.txt",
                content: None,
            },
        ];
        let diff = format!(
            "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-{token}\n+nothing to see\n\
             diff --git a/faked.txt b/faked.txt\n+{SECRET}\n"
        );
        let findings = scanner().scan_change(&files, &diff);
        assert_eq!(
            findings,
            vec![
                Finding {
                    place: Place::Content("notes/encoded.txt".into()),
                    kind: Kind::Configured(Encoding::Base64),
                },
                Finding {
                    place: Place::Path("keys/[REDACTED].txt".into()),
                    kind: Kind::Shape(Shape::GithubToken),
                },
                Finding {
                    place: Place::Diff(None),
                    kind: Kind::Configured(Encoding::Plain),
                },
            ]
        );
        let message = describe(&findings);
        assert_eq!(
            message,
            "nothing was published: `notes/encoded.txt` contains a configured secret, base64-encoded; \
             the path `keys/[REDACTED].txt` contains a GitHub token shape; the diff contains a configured secret"
        );
        assert!(!message.contains(token) && !message.contains(SECRET) && !message.contains(&b64));
    }

    #[test]
    fn a_removed_line_with_a_configured_secret_is_still_found() {
        let diff = format!("diff --git a/a.txt b/a.txt\n@@ -1 +1 @@\n-{SECRET}\n+clean\n");
        let files = [ChangedText {
            path: "a.txt",
            content: Some(b"clean\n"),
        }];
        assert_eq!(
            scanner().scan_change(&files, &diff),
            vec![Finding {
                place: Place::Diff(Some("a.txt".into())),
                kind: Kind::Configured(Encoding::Plain),
            }]
        );
    }

    #[test]
    fn long_reports_are_cut() {
        let findings: Vec<Finding> = (0..8)
            .map(|i| Finding {
                place: Place::Content(format!("f{i}")),
                kind: Kind::Shape(Shape::AwsAccessKeyId),
            })
            .collect();
        let message = describe(&findings);
        assert!(
            message.ends_with("`f4` contains an AWS access key id shape; and 3 more findings"),
            "{message}"
        );
    }
}
