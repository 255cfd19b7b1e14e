//! Configuration: read once from the environment (and `.env`), validated, turned into backends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Provider;
use crate::agent::anthropic::{AnthropicConfig, AnthropicProvider};
use crate::agent::dummy::DummyProvider;
use crate::agent::openai::{OpenAiConfig, OpenAiProvider};
use crate::agent::retry::RetryPolicy;
use crate::agent::runner::AgentLimits;
use crate::forge::github::{GithubConfig, GithubForge};
use crate::forge::local::LocalForge;
use crate::forge::policy::CommitPolicy;
use crate::forge::{Forge, Forges};
use crate::http::EdgeLimits;
use crate::job::Limits;
use crate::job::pipeline::Backends;
use crate::redact::Redactor;
use crate::repo::RepoPolicy;
use crate::sandbox::SandboxProvider;
use crate::sandbox::e2b::{E2bConfig, E2bProvider};
use crate::sandbox::local::isolation::{HostIds, IsolationChoice};
use crate::sandbox::local::limits::{JobLimits, MIB};
use crate::sandbox::local::{LocalConfig, LocalProvider};

/// Which sandbox backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxChoice {
    Auto,
    E2b,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The whole configuration, parsed from a snapshot of the environment.
#[derive(Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    /// `ADMIN_API_KEYS`: keys that see and cancel every job (they are accepted keys too).
    pub admin_api_keys: Vec<String>,
    /// `ALLOWED_HOSTS`: `Host` values accepted when no API key is set.
    pub allowed_hosts: Vec<String>,
    /// `ALLOW_OPEN_SERVER`: allow binding beyond loopback with no API key.
    pub allow_open_server: bool,
    /// The HTTP edge's bounds.
    pub edge: EdgeLimits,
    pub sandbox: SandboxChoice,
    pub agents: Vec<String>,
    pub allowed_repo_hosts: Vec<String>,
    /// `None` means "the command's default" (off for `serve`, on for `run`).
    pub allow_local_repos: Option<bool>,
    pub limits: Limits,
    pub job_timeout: Duration,
    /// `MAX_CHANGE_MB`: the largest change (new file contents) a job may publish.
    pub max_change_bytes: u64,
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    pub allow_workflow_changes: bool,
    pub allow_unconfined_sandbox: bool,
    pub workspace_dir: Option<PathBuf>,
    /// The local sandbox: `SANDBOX_ISOLATION`, the `SANDBOX_MAX_*` limits, `SANDBOX_READ_PATHS`
    /// and the host ids commands run as when the server is root (`SANDBOX_UID`, `SANDBOX_GID`).
    pub sandbox_isolation: IsolationChoice,
    pub sandbox_limits: JobLimits,
    pub sandbox_read_paths: Vec<PathBuf>,
    pub sandbox_ids: HostIds,
    /// `DATABASE_URL`: the job store; unset means the SQLite file under `data_dir`.
    pub database_url: Option<String>,
    /// `DATA_DIR` (else `$XDG_DATA_HOME/tiny-backspace`, else `./data`): where the embedded
    /// database lives.
    pub data_dir: PathBuf,
    /// The variables themselves, for the backends that read their own (E2B, providers, GitHub).
    vars: HashMap<String, String>,
}

impl std::fmt::Debug for Config {
    // Hand-written so that secrets in `vars` can never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("api_keys", &format!("{} key(s)", self.api_keys.len()))
            .field("sandbox", &self.sandbox)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// Variables whose values are secrets.
pub const SECRET_VARS: &[&str] = &[
    "E2B_API_KEY",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GITHUB_TOKEN",
    "GITHUB_PAT",
    "METRICS_TOKEN",
];

fn list(value: Option<&String>) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn boolean(vars: &HashMap<String, String>, name: &str) -> Result<Option<bool>, String> {
    match vars.get(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(Some(true)),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(Some(false)),
        Some(v) => Err(format!("{name} must be true or false, not `{v}`")),
    }
}

/// A whole number that may be left unset (no limit).
fn optional_number(vars: &HashMap<String, String>, name: &str) -> Result<Option<usize>, String> {
    match vars.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<usize>()
            .map(|n| Some(n.max(1)))
            .map_err(|_| format!("{name} must be a whole number, not `{v}`")),
    }
}

fn number<T: std::str::FromStr>(
    vars: &HashMap<String, String>,
    name: &str,
    default: T,
) -> Result<T, String> {
    match vars.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} must be a whole number, not `{v}`")),
    }
}

impl Config {
    /// Reads `.env` (if present) into the process environment, then parses the environment.
    pub fn from_env() -> Result<Self, String> {
        let _ = dotenvy::dotenv();
        Self::from_vars(std::env::vars().collect())
    }

    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| vars.get(k).filter(|v| !v.trim().is_empty());
        let sandbox = match get("SANDBOX")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("auto") => SandboxChoice::Auto,
            Some("e2b") => SandboxChoice::E2b,
            Some("local") => SandboxChoice::Local,
            Some(other) => {
                return Err(format!("SANDBOX must be e2b, local or auto, not `{other}`"));
            }
        };
        let agents = match get("AGENTS") {
            Some(v) => list(Some(v)),
            None => vec!["anthropic".into(), "openai".into(), "dummy".into()],
        };
        for agent in &agents {
            if !matches!(agent.as_str(), "anthropic" | "openai" | "dummy") {
                return Err(format!(
                    "AGENTS: unknown agent `{agent}` (known: anthropic, openai, dummy)"
                ));
            }
        }
        let log_format = match get("LOG_FORMAT")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(format!("LOG_FORMAT must be pretty or json, not `{other}`")),
        };
        let allowed_repo_hosts = match get("ALLOWED_REPO_HOSTS") {
            Some(v) => list(Some(v))
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            None => vec!["github.com".into()],
        };
        let defaults = Limits::default();
        let limits = Limits {
            max_concurrent: optional_number(&vars, "MAX_CONCURRENT_JOBS")?
                .unwrap_or(defaults.max_concurrent),
            max_queued: number(&vars, "MAX_QUEUED_JOBS", 16usize)?,
            retention: Duration::from_secs(
                number(
                    &vars,
                    "JOB_RETENTION_HOURS",
                    defaults.retention.as_secs() / 3600,
                )?
                .saturating_mul(3600),
            ),
            max_retained: number(&vars, "JOB_RETENTION_MAX_JOBS", defaults.max_retained)?,
            max_retained_bytes: number(
                &vars,
                "JOB_RETENTION_MAX_MB",
                defaults.max_retained_bytes / (1024 * 1024),
            )?
            .saturating_mul(1024 * 1024),
            max_jobs_per_key: optional_number(&vars, "MAX_JOBS_PER_KEY")?,
            key_rate_per_min: optional_number(&vars, "KEY_RATE_PER_MIN")?,
            cleanup_backoff: defaults.cleanup_backoff,
            lease: Duration::from_secs(
                number(&vars, "JOB_LEASE_SECS", defaults.lease.as_secs())?.max(1),
            ),
            store_grace: defaults.store_grace,
        };
        let max_change_bytes = number(&vars, "MAX_CHANGE_MB", 64u64)?
            .max(1)
            .saturating_mul(1024 * 1024);
        let job_timeout = Duration::from_secs(number(&vars, "JOB_TIMEOUT_SECS", 1800u64)?.max(1));
        let sandbox_defaults = JobLimits::default();
        let megabytes = |name: &str, default: u64| -> Result<u64, String> {
            Ok(number(&vars, name, default / MIB)?
                .max(1)
                .saturating_mul(MIB))
        };
        let sandbox_limits = JobLimits {
            max_procs: number(&vars, "SANDBOX_MAX_PROCS", sandbox_defaults.max_procs)?.max(8),
            max_memory_bytes: megabytes(
                "SANDBOX_MAX_MEMORY_MB",
                sandbox_defaults.max_memory_bytes,
            )?,
            max_disk_bytes: megabytes("SANDBOX_MAX_DISK_MB", sandbox_defaults.max_disk_bytes)?,
        };
        let sandbox_read_paths: Vec<PathBuf> = list(get("SANDBOX_READ_PATHS"))
            .into_iter()
            .map(PathBuf::from)
            .collect();
        if let Some(relative) = sandbox_read_paths.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "SANDBOX_READ_PATHS must hold absolute paths, not `{}`",
                relative.display()
            ));
        }
        let sandbox_ids = HostIds {
            uid: number(&vars, "SANDBOX_UID", 65534u32)?,
            gid: number(&vars, "SANDBOX_GID", 65534u32)?,
        };
        if sandbox_ids.uid == 0 || sandbox_ids.gid == 0 {
            return Err("SANDBOX_UID and SANDBOX_GID must not be 0 (root)".into());
        }
        let sandbox_isolation = match get("SANDBOX_ISOLATION") {
            Some(value) => IsolationChoice::parse(value.trim())?,
            None => IsolationChoice::Auto,
        };
        // A key variable that is set but names no key (`API_KEYS=","`) must not silently leave
        // the service open: refuse to start.
        let keys = |name: &str| -> Result<Vec<String>, String> {
            match vars.get(name).filter(|v| !v.is_empty()) {
                None => Ok(Vec::new()),
                Some(raw) => {
                    let keys = list(Some(raw));
                    if keys.is_empty() {
                        Err(format!(
                            "{name} is set but names no key; unset it to run without keys"
                        ))
                    } else {
                        Ok(keys)
                    }
                }
            }
        };
        let admin_api_keys = keys("ADMIN_API_KEYS")?;
        let mut api_keys = keys("API_KEYS")?;
        for key in &admin_api_keys {
            if !api_keys.contains(key) {
                api_keys.push(key.clone());
            }
        }
        let host = get("HOST").cloned().unwrap_or_else(|| "127.0.0.1".into());
        let port = number(&vars, "PORT", 8000u16)?;
        let allowed_hosts = match get("ALLOWED_HOSTS") {
            Some(v) => list(Some(v))
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            None => {
                let mut hosts: Vec<String> =
                    vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
                let bound = host.to_ascii_lowercase();
                let bound = if bound.contains(':') && !bound.starts_with('[') {
                    format!("[{bound}]")
                } else {
                    bound
                };
                if !hosts.contains(&bound) {
                    hosts.push(bound);
                }
                hosts
            }
        };
        let concurrency_set = optional_number(&vars, "MAX_CONCURRENT_JOBS")?.is_some();
        let mut config = Self {
            host,
            port,
            api_keys,
            admin_api_keys,
            allowed_hosts,
            allow_open_server: boolean(&vars, "ALLOW_OPEN_SERVER")?.unwrap_or(false),
            edge: {
                let d = EdgeLimits::default();
                let secs = |name: &str, default: Duration| -> Result<Duration, String> {
                    Ok(Duration::from_secs(
                        number(&vars, name, default.as_secs())?.max(1),
                    ))
                };
                EdgeLimits {
                    header_timeout: secs("HEADER_TIMEOUT_SECS", d.header_timeout)?,
                    idle_timeout: secs("IDLE_TIMEOUT_SECS", d.idle_timeout)?,
                    max_connections: number(&vars, "MAX_CONNECTIONS", d.max_connections)?.max(1),
                    shutdown_grace: secs("SHUTDOWN_GRACE_SECS", d.shutdown_grace)?,
                }
            },
            sandbox,
            agents,
            allowed_repo_hosts,
            allow_local_repos: boolean(&vars, "ALLOW_LOCAL_REPOS")?,
            limits,
            job_timeout,
            max_change_bytes,
            cors_origins: list(get("CORS_ALLOWED_ORIGINS")),
            log_format,
            allow_workflow_changes: boolean(&vars, "ALLOW_WORKFLOW_CHANGES")?.unwrap_or(false),
            allow_unconfined_sandbox: boolean(&vars, "ALLOW_UNCONFINED_SANDBOX")?.unwrap_or(false),
            workspace_dir: get("WORKSPACE_DIR").map(PathBuf::from),
            sandbox_isolation,
            sandbox_limits,
            sandbox_read_paths,
            sandbox_ids,
            database_url: get("DATABASE_URL").map(|v| v.trim().to_owned()),
            data_dir: crate::store::default_data_dir(
                get("DATA_DIR").map(|v| v.trim()),
                get("XDG_DATA_HOME").map(|v| v.trim()),
            ),
            vars,
        };
        if !concurrency_set {
            config.limits.max_concurrent = default_concurrency(
                config.sandbox_name(),
                config.sandbox_limits.max_memory_bytes,
                &Host::this(),
            );
        }
        Ok(config)
    }

    /// The job store's URL: `DATABASE_URL`, or the SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_dir.join("tiny-backspace.db").display()
            ),
        }
    }

    /// Opens the job store (creating the data directory for the default SQLite file), with an
    /// error that names the setting to fix.
    pub async fn open_store(&self) -> Result<Arc<dyn crate::store::JobStore>, String> {
        if self.database_url.is_none() {
            std::fs::create_dir_all(&self.data_dir).map_err(|e| {
                format!(
                    "DATA_DIR: cannot create {} for the database ({e}); set DATA_DIR or DATABASE_URL",
                    self.data_dir.display()
                )
            })?;
        }
        crate::store::open(&self.database_url()).await
    }

    /// Refuses to serve beyond loopback with no API key unless `ALLOW_OPEN_SERVER=true`: anyone who
    /// can reach the port could start jobs, read every patch and cancel every job.
    pub fn check_open_server(&self) -> Result<(), String> {
        let loopback = match self
            .host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
        {
            Ok(ip) => ip.is_loopback(),
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        };
        if loopback || !self.api_keys.is_empty() || self.allow_open_server {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {} without API_KEYS: anyone who reaches it could run jobs; set API_KEYS, or ALLOW_OPEN_SERVER=true if something in front of the service authenticates",
            self.host
        ))
    }

    /// A variable's value, when set and not blank.
    pub fn var(&self, name: &str) -> Option<String> {
        self.vars
            .get(name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }

    /// Every configured secret, for the redactor.
    pub fn redactor(&self) -> Redactor {
        let mut secrets: Vec<String> = SECRET_VARS.iter().filter_map(|k| self.var(k)).collect();
        secrets.extend(self.api_keys.iter().cloned());
        Redactor::new(secrets)
    }

    pub fn repo_policy(&self, local_default: bool) -> RepoPolicy {
        RepoPolicy {
            allowed_hosts: self.allowed_repo_hosts.clone(),
            allow_local: self.allow_local_repos.unwrap_or(local_default),
        }
    }

    /// The sandbox backend `SANDBOX` selects.
    pub fn sandbox_name(&self) -> &'static str {
        match self.sandbox {
            SandboxChoice::E2b => "e2b",
            SandboxChoice::Local => "local",
            SandboxChoice::Auto if self.var("E2B_API_KEY").is_some() => "e2b",
            SandboxChoice::Auto => "local",
        }
    }

    /// Builds the backends. `launcher` is the binary providing `__sandbox-exec`.
    pub async fn backends(&self, launcher: PathBuf) -> Result<Backends, String> {
        let lookup = |k: &str| self.var(k);
        let sandbox: Arc<dyn SandboxProvider> = match self.sandbox_name() {
            // No read out of a sandbox may be larger than the largest change a job may publish.
            "e2b" => build_e2b(&lookup, self.max_change_bytes)?,
            _ => {
                let mut local = LocalConfig::new(launcher);
                if let Some(dir) = &self.workspace_dir {
                    local.root = dir.clone();
                }
                local.allow_unconfined = self.allow_unconfined_sandbox;
                local.isolation = self.sandbox_isolation;
                local.limits = self.sandbox_limits;
                local.read_paths = self.sandbox_read_paths.clone();
                local.run_as = self.sandbox_ids;
                local.max_read_bytes = self.max_change_bytes;
                Arc::new(LocalProvider::new(local).await.map_err(|e| e.to_string())?)
            }
        };
        let mut agents: Vec<Arc<dyn Provider>> = Vec::new();
        for name in &self.agents {
            match name.as_str() {
                "dummy" => agents.push(Arc::new(DummyProvider)),
                other => {
                    if let Some(provider) = build_provider(other, &lookup)? {
                        agents.push(provider);
                    }
                }
            }
        }
        if agents.is_empty() {
            return Err("no agent is available: set ANTHROPIC_API_KEY or OPENAI_API_KEY, or include `dummy` in AGENTS".into());
        }
        let forges = Forges {
            local: Arc::new(LocalForge) as Arc<dyn Forge>,
            remote: build_github(&lookup)?,
        };
        Ok(Backends {
            sandbox,
            agents,
            forges,
            commit_policy: CommitPolicy {
                allow_workflow_changes: self.allow_workflow_changes,
            },
            agent_limits: AgentLimits::default(),
            retry: RetryPolicy::default(),
            redactor: self.redactor(),
            job_timeout: self.job_timeout,
            clone_timeout: Duration::from_secs(600),
            max_change_bytes: self.max_change_bytes,
        })
    }
}

/// What this machine offers jobs: its cores and its memory (the container's limit when lower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cores: usize,
    pub memory_bytes: u64,
}

impl Host {
    pub fn this() -> Host {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(u64::MAX, |kb| kb.saturating_mul(1024));
        let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        Host {
            cores,
            memory_bytes: total.min(limit),
        }
    }
}

/// Jobs that run at once on one instance when `MAX_CONCURRENT_JOBS` is unset. A job on E2B with
/// a hosted model spends nearly all its time waiting on the network, so the instance runs tens;
/// a local job runs its commands here, so twice the cores (jobs also wait on the model), and no
/// more than memory holds at the per-job limit.
pub fn default_concurrency(sandbox: &str, job_memory_bytes: u64, host: &Host) -> usize {
    match sandbox {
        "e2b" => 32,
        _ => {
            let by_memory = host.memory_bytes / job_memory_bytes.max(1);
            (host.cores * 2).min(by_memory as usize).max(1)
        }
    }
}

fn build_e2b(
    lookup: &dyn Fn(&str) -> Option<String>,
    max_read_bytes: u64,
) -> Result<Arc<dyn SandboxProvider>, String> {
    let mut config = E2bConfig::from_lookup(lookup).map_err(|e| format!("E2B: {e}"))?;
    config.max_read_bytes = max_read_bytes;
    Ok(Arc::new(E2bProvider::new(config)))
}

/// A model provider by name; `None` when its key is not set (it is then skipped).
fn build_provider(
    name: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    match name {
        "anthropic" => AnthropicConfig::from_lookup(lookup)
            .map(|config| {
                let config = config.map_err(|e| format!("Anthropic: {e}"))?;
                let provider =
                    AnthropicProvider::new(config).map_err(|e| format!("Anthropic: {e}"))?;
                Ok(Arc::new(provider) as Arc<dyn Provider>)
            })
            .transpose(),
        "openai" => OpenAiConfig::from_lookup(lookup)
            .map(|config| {
                let config = config.map_err(|e| format!("OpenAI: {e}"))?;
                let provider = OpenAiProvider::new(config).map_err(|e| format!("OpenAI: {e}"))?;
                Ok(Arc::new(provider) as Arc<dyn Provider>)
            })
            .transpose(),
        other => Err(format!("unknown agent `{other}`")),
    }
}

fn build_github(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Arc<dyn Forge>>, String> {
    GithubConfig::from_lookup(lookup)
        .map(|config| {
            GithubForge::new(config)
                .map(|forge| Arc::new(forge) as Arc<dyn Forge>)
                .map_err(|e| format!("GitHub: {}", e.message))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_vars(HashMap::new()).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8000));
        assert_eq!(c.sandbox_name(), "local");
        assert_eq!(c.agents, vec!["anthropic", "openai", "dummy"]);
        assert_eq!(c.job_timeout, Duration::from_secs(1800));
        assert!(c.repo_policy(false).allowed_hosts == vec!["github.com"]);
    }

    #[test]
    fn concurrency_follows_the_backend_unless_set_and_the_database_defaults_to_the_data_dir() {
        let gib = 1024 * 1024 * 1024;
        let host = |cores, memory_gib| Host {
            cores,
            memory_bytes: memory_gib * gib,
        };
        assert_eq!(default_concurrency("e2b", 4 * gib, &host(2, 4)), 32);
        assert_eq!(default_concurrency("local", 4 * gib, &host(2, 24)), 4);
        assert_eq!(default_concurrency("local", 4 * gib, &host(16, 24)), 6);
        assert_eq!(default_concurrency("local", 4 * gib, &host(8, 2)), 1);
        let e2b = Config::from_vars(vars(&[("E2B_API_KEY", "k")])).unwrap();
        assert_eq!(e2b.limits.max_concurrent, 32);
        let set = Config::from_vars(vars(&[("E2B_API_KEY", "k"), ("MAX_CONCURRENT_JOBS", "3")]));
        assert_eq!(set.unwrap().limits.max_concurrent, 3);
        assert!(Config::from_vars(vars(&[("MAX_CONCURRENT_JOBS", "many")])).is_err());

        let c = Config::from_vars(vars(&[("XDG_DATA_HOME", "/var/lib/x")])).unwrap();
        assert_eq!(
            c.database_url(),
            "sqlite:///var/lib/x/tiny-backspace/tiny-backspace.db"
        );
        let c = Config::from_vars(vars(&[("XDG_DATA_HOME", "/x"), ("DATA_DIR", "/srv/tb")]));
        assert_eq!(
            c.unwrap().database_url(),
            "sqlite:///srv/tb/tiny-backspace.db"
        );
        let c = Config::from_vars(HashMap::new()).unwrap();
        assert_eq!(c.database_url(), "sqlite://data/tiny-backspace.db");
        let c = Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/jobs")])).unwrap();
        assert_eq!(c.database_url(), "postgres://db/jobs");
    }

    #[test]
    fn auto_picks_e2b_with_a_key_and_bad_values_are_refused() {
        let c = Config::from_vars(vars(&[("E2B_API_KEY", "e2b_secret_key")])).unwrap();
        assert_eq!(c.sandbox_name(), "e2b");
        assert!(Config::from_vars(vars(&[("SANDBOX", "docker")])).is_err());
        assert!(Config::from_vars(vars(&[("PORT", "eighty")])).is_err());
        assert!(Config::from_vars(vars(&[("AGENTS", "gpt")])).is_err());
        assert!(Config::from_vars(vars(&[("ALLOW_LOCAL_REPOS", "maybe")])).is_err());
    }

    #[test]
    fn secrets_are_collected_for_redaction_and_hidden_from_debug() {
        let c = Config::from_vars(vars(&[
            ("GITHUB_TOKEN", "ghp_canary_0000000000"),
            ("API_KEYS", "svc-key-123456,other-key-98765"),
        ]))
        .unwrap();
        assert_eq!(c.api_keys, vec!["svc-key-123456", "other-key-98765"]);
        let r = c.redactor();
        assert_eq!(
            r.redact("ghp_canary_0000000000 svc-key-123456"),
            "[REDACTED] [REDACTED]"
        );
        assert!(!format!("{c:?}").contains("ghp_canary"));
    }

    #[test]
    fn api_keys_fail_closed_and_admin_keys_are_keys() {
        for bad in [",", " ", " , ,"] {
            let err = Config::from_vars(vars(&[("API_KEYS", bad)])).unwrap_err();
            assert!(
                err.contains("API_KEYS is set but names no key"),
                "{bad:?}: {err}"
            );
        }
        // An empty value (as in `.env.example`) means unset.
        assert!(
            Config::from_vars(vars(&[("API_KEYS", "")]))
                .unwrap()
                .api_keys
                .is_empty()
        );
        let c =
            Config::from_vars(vars(&[("API_KEYS", "a-key"), ("ADMIN_API_KEYS", "boss")])).unwrap();
        assert_eq!(c.api_keys, vec!["a-key", "boss"]);
        assert_eq!(c.admin_api_keys, vec!["boss"]);
    }

    #[test]
    fn an_open_server_beyond_loopback_is_refused_unless_allowed() {
        let check =
            |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap().check_open_server();
        assert!(check(&[]).is_ok());
        assert!(check(&[("HOST", "::1")]).is_ok());
        assert!(check(&[("HOST", "localhost")]).is_ok());
        let err = check(&[("HOST", "0.0.0.0")]).unwrap_err();
        assert!(err.contains("without API_KEYS"), "{err}");
        assert!(check(&[("HOST", "0.0.0.0"), ("API_KEYS", "k")]).is_ok());
        assert!(check(&[("HOST", "0.0.0.0"), ("ALLOW_OPEN_SERVER", "true")]).is_ok());
    }

    #[test]
    fn allowed_hosts_default_to_loopback_names_and_the_bound_address() {
        let c = Config::from_vars(vars(&[("HOST", "tb-host.lan")])).unwrap();
        assert_eq!(
            c.allowed_hosts,
            vec!["localhost", "127.0.0.1", "[::1]", "tb-host.lan"]
        );
        let c = Config::from_vars(vars(&[("ALLOWED_HOSTS", "Tb.Example.com")])).unwrap();
        assert_eq!(c.allowed_hosts, vec!["tb.example.com"]);
    }
}
