//! Repository-relative paths that cannot escape the repository or touch `.git`.
//!
//! Every path a model or a forge hands us passes through [`RepoPath::parse`]; backends then resolve
//! it under the repository root without following symlinks out of it (see `local.rs`).

use std::fmt;

/// A normalised path relative to the repository root: no leading `/`, no `.` or `..` components,
/// no `.git` component, `/`-separated. The empty path is the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoPath(String);

impl RepoPath {
    pub fn root() -> Self {
        RepoPath(String::new())
    }

    /// Parses a path given relative to the repository root. A leading `./` and repeated or trailing
    /// slashes are tolerated; absolute paths, `..`, `.git` and NUL bytes are refused.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.contains('\0') {
            return Err("path contains a NUL byte".into());
        }
        if raw.starts_with('/') || raw.starts_with('~') {
            return Err(format!(
                "`{raw}` is absolute; give a path relative to the repository root"
            ));
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => continue,
                ".." => {
                    return Err(format!(
                        "`{raw}` leaves the repository (`..` is not allowed)"
                    ));
                }
                p if p.eq_ignore_ascii_case(".git") => {
                    return Err(format!("`{raw}` is inside `.git`, which is off limits"));
                }
                p => parts.push(p),
            }
        }
        Ok(RepoPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path's components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|p| !p.is_empty())
    }

    pub fn join(&self, child: &str) -> Result<RepoPath, String> {
        if self.is_root() {
            RepoPath::parse(child)
        } else {
            RepoPath::parse(&format!("{}/{child}", self.0))
        }
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_harmless_forms() {
        assert_eq!(
            RepoPath::parse("./src//main.rs/").unwrap().as_str(),
            "src/main.rs"
        );
        assert_eq!(RepoPath::parse(".").unwrap(), RepoPath::root());
        assert_eq!(RepoPath::parse("").unwrap(), RepoPath::root());
    }

    #[test]
    fn refuses_escapes_and_git() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a/.git/config",
            ".git",
            ".GIT/HEAD",
            "~/x",
            "a\0b",
        ] {
            assert!(RepoPath::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn allows_gitignore_and_dotfiles() {
        assert!(RepoPath::parse(".gitignore").is_ok());
        assert!(RepoPath::parse(".github/workflows/ci.yml").is_ok());
    }
}
