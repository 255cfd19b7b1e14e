//! Parsing and canonicalising `repoUrl` (API.md §1): the only repositories a job may touch.
//!
//! Remote repositories must be `https://HOST/OWNER/REPO` on an allowed host, which keeps the
//! service from being pointed at internal addresses (SSRF). Local paths are a separate, opt-in kind.

use std::path::{Path, PathBuf};

/// A repository a job works on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RepoRef {
    /// A repository on GitHub or a GitHub Enterprise Server host.
    Remote {
        host: String,
        owner: String,
        name: String,
    },
    /// A git repository on this machine (absolute, canonical path to its top level).
    Local { path: PathBuf },
}

impl RepoRef {
    /// The canonical form shown in events and `GET /jobs/{id}`.
    pub fn canonical(&self) -> String {
        match self {
            RepoRef::Remote { host, owner, name } => format!("https://{host}/{owner}/{name}"),
            RepoRef::Local { path } => path.display().to_string(),
        }
    }

    /// A credential-free URL git can clone from.
    pub fn clone_url(&self) -> String {
        match self {
            RepoRef::Remote { host, owner, name } => format!("https://{host}/{owner}/{name}.git"),
            RepoRef::Local { path } => format!("file://{}", path.display()),
        }
    }

    /// A short name for branch slugs and logs.
    pub fn short_name(&self) -> String {
        match self {
            RepoRef::Remote { name, .. } => name.clone(),
            RepoRef::Local { path } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "repo".into()),
        }
    }
}

/// Why a `repoUrl` was refused. Each has its own error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoUrlError {
    #[error("{0}")]
    Invalid(String),
    #[error("host `{0}` is not allowed; allowed hosts: {1}")]
    HostNotAllowed(String, String),
    #[error(
        "local repositories are disabled on this server (set ALLOW_LOCAL_REPOS=true to enable them)"
    )]
    LocalDisabled,
    #[error("{0}")]
    LocalNotFound(String),
}

impl RepoUrlError {
    pub fn code(&self) -> &'static str {
        match self {
            RepoUrlError::Invalid(_) => "invalid_repo_url",
            RepoUrlError::HostNotAllowed(..) => "repo_host_not_allowed",
            RepoUrlError::LocalDisabled => "local_repos_disabled",
            RepoUrlError::LocalNotFound(_) => "local_repo_not_found",
        }
    }
}

/// The rules a `repoUrl` is checked against.
#[derive(Debug, Clone)]
pub struct RepoPolicy {
    pub allowed_hosts: Vec<String>,
    pub allow_local: bool,
}

impl Default for RepoPolicy {
    fn default() -> Self {
        Self {
            allowed_hosts: vec!["github.com".into()],
            allow_local: false,
        }
    }
}

impl RepoPolicy {
    pub fn parse(&self, raw: &str) -> Result<RepoRef, RepoUrlError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(RepoUrlError::Invalid("repoUrl is empty".into()));
        }
        if raw.len() > 2048 {
            return Err(RepoUrlError::Invalid(
                "repoUrl is longer than 2048 characters".into(),
            ));
        }
        if let Some(rest) = raw.strip_prefix("file://") {
            return self.local(Path::new(rest));
        }
        if raw.starts_with('/') || raw.starts_with("./") || raw.starts_with("../") || raw == "." {
            return self.local(Path::new(raw));
        }
        if !raw.contains("://") {
            // A relative path (`my-repo`, `target/sample`) where local repositories are allowed.
            if self.allow_local && Path::new(raw).exists() {
                return self.local(Path::new(raw));
            }
            return Err(RepoUrlError::Invalid(
                "repoUrl must be an https URL like https://github.com/OWNER/REPO".into(),
            ));
        }
        self.remote(raw)
    }

    fn local(&self, path: &Path) -> Result<RepoRef, RepoUrlError> {
        if !self.allow_local {
            return Err(RepoUrlError::LocalDisabled);
        }
        let canonical = path.canonicalize().map_err(|e| {
            RepoUrlError::LocalNotFound(format!("local repository `{}`: {e}", path.display()))
        })?;
        if !canonical.join(".git").exists() {
            return Err(RepoUrlError::LocalNotFound(format!(
                "`{}` is not the top level of a git repository",
                canonical.display()
            )));
        }
        Ok(RepoRef::Local { path: canonical })
    }

    fn remote(&self, raw: &str) -> Result<RepoRef, RepoUrlError> {
        let url = url::Url::parse(raw)
            .map_err(|e| RepoUrlError::Invalid(format!("repoUrl is not a URL: {e}")))?;
        if url.scheme() != "https" {
            return Err(RepoUrlError::Invalid(format!(
                "repoUrl must use https, not `{}`",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(RepoUrlError::Invalid(
                "repoUrl must not carry credentials (user:password@)".into(),
            ));
        }
        if url.query().is_some()
            || url.fragment().is_some()
            || raw.contains('?')
            || raw.contains('#')
        {
            return Err(RepoUrlError::Invalid(
                "repoUrl must not have a query or fragment".into(),
            ));
        }
        if url.port().is_some() {
            return Err(RepoUrlError::Invalid("repoUrl must not name a port".into()));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => {
                return Err(RepoUrlError::Invalid(
                    "repoUrl must name a host, not an IP address".into(),
                ));
            }
            None => return Err(RepoUrlError::Invalid("repoUrl has no host".into())),
        };
        if !self
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host))
        {
            return Err(RepoUrlError::HostNotAllowed(
                host,
                self.allowed_hosts.join(", "),
            ));
        }
        let path = url.path().strip_suffix('/').unwrap_or(url.path());
        let mut segments = path.trim_start_matches('/').split('/');
        let (Some(owner), Some(repo), None) = (segments.next(), segments.next(), segments.next())
        else {
            return Err(RepoUrlError::Invalid(
                "repoUrl must look like https://HOST/OWNER/REPO".into(),
            ));
        };
        let repo = repo.strip_suffix(".git").unwrap_or(repo);
        check_owner(owner)?;
        check_repo_name(repo)?;
        Ok(RepoRef::Remote {
            host,
            owner: owner.to_owned(),
            name: repo.to_owned(),
        })
    }
}

/// GitHub user and organisation names: alphanumerics and single hyphens, not at either end, at
/// most 39 characters.
fn check_owner(owner: &str) -> Result<(), RepoUrlError> {
    let ok = !owner.is_empty()
        && owner.len() <= 39
        && owner.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !owner.starts_with('-')
        && !owner.ends_with('-')
        && !owner.contains("--");
    if ok {
        Ok(())
    } else {
        Err(RepoUrlError::Invalid(format!(
            "`{owner}` is not a valid GitHub owner name"
        )))
    }
}

/// GitHub repository names: ASCII letters, digits, `.`, `-`, `_`, at most 100, not `.` or `..`.
fn check_repo_name(name: &str) -> Result<(), RepoUrlError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(RepoUrlError::Invalid(format!(
            "`{name}` is not a valid repository name"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RepoPolicy {
        RepoPolicy::default()
    }

    #[test]
    fn accepts_and_canonicalises_github_urls() {
        for raw in [
            "https://github.com/octo/hello",
            "https://github.com/octo/hello.git",
            "https://github.com/octo/hello/",
            "https://GitHub.com/octo/hello",
        ] {
            let repo = policy().parse(raw).unwrap();
            assert_eq!(repo.canonical(), "https://github.com/octo/hello", "{raw}");
        }
    }

    #[test]
    fn refuses_bad_urls_with_specific_codes() {
        let cases = [
            ("http://github.com/a/b", "invalid_repo_url"),
            ("https://user:pw@github.com/a/b", "invalid_repo_url"),
            ("https://github.com/a/b?x=1", "invalid_repo_url"),
            ("https://github.com/a/b#frag", "invalid_repo_url"),
            ("https://github.com/a", "invalid_repo_url"),
            ("https://github.com/a/b/c", "invalid_repo_url"),
            ("https://github.com/a/..", "invalid_repo_url"),
            ("https://github.com/-a/b", "invalid_repo_url"),
            ("https://github.com/a/b c", "invalid_repo_url"),
            ("https://github.com:8443/a/b", "invalid_repo_url"),
            ("https://127.0.0.1/a/b", "invalid_repo_url"),
            ("https://evil.example/a/b", "repo_host_not_allowed"),
            ("/tmp", "local_repos_disabled"),
            ("file:///tmp", "local_repos_disabled"),
            ("", "invalid_repo_url"),
            ("github.com/a/b", "invalid_repo_url"),
        ];
        for (raw, code) in cases {
            let err = policy().parse(raw).unwrap_err();
            assert_eq!(err.code(), code, "{raw}: {err}");
        }
    }

    #[test]
    fn local_repositories_need_the_flag_and_a_git_dir() {
        let dir = tempfile::tempdir().unwrap();
        let policy = RepoPolicy {
            allow_local: true,
            ..RepoPolicy::default()
        };
        assert_eq!(
            policy
                .parse(dir.path().to_str().unwrap())
                .unwrap_err()
                .code(),
            "local_repo_not_found"
        );
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let repo = policy
            .parse(&format!("file://{}", dir.path().display()))
            .unwrap();
        assert!(matches!(repo, RepoRef::Local { .. }));
    }
}
