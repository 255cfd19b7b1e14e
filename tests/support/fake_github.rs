//! An in-process fake of GitHub's REST API for the pull-request flow (axum, port 0).
//!
//! It follows `shared/reference/github.md`: the endpoints of the Git Data API flow, forks and
//! pulls with every field octocrab's strict models require, GitHub's error bodies and messages,
//! and rate-limit headers on every answer. Repositories are real bare git repositories, so every
//! blob, tree and commit id is git's own, and a test can `git clone` the result. Forks are
//! `git clone --shared` copies (one object store per fork network, like GitHub's).
//!
//! Test hooks: [`FakeGithub::fail`] (or `POST /_fake/fail`) injects faults, [`FakeGithub::requests`]
//! (or `GET /_fake/log`) lists every request with its Authorization header and body, and
//! [`FakeGithub::set_fault_plan`] adds seeded random faults (routes `github.read` for every GET,
//! `github.git` for blob, tree and commit writes, `github.ref`, `github.pull`, `github.fork`,
//! `github.other`).
//!
//! The API is served at `/` or under a prefix such as `/api/v3` (GitHub Enterprise Server);
//! every `url` field points back at the fake with that prefix, `html_url` at the web root.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::faults::{FaultPlan, Injected, closed_response};

/// A file in a seeded repository.
#[derive(Debug, Clone)]
pub struct SeedFile {
    pub path: String,
    pub content: Vec<u8>,
    /// `100644`, `100755` or `120000` (content = link target).
    pub mode: &'static str,
}

impl SeedFile {
    pub fn text(path: &str, content: &str) -> Self {
        Self {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            mode: "100644",
        }
    }
    pub fn bytes(path: &str, content: &[u8]) -> Self {
        Self {
            path: path.into(),
            content: content.to_vec(),
            mode: "100644",
        }
    }
    pub fn executable(path: &str, content: &str) -> Self {
        Self {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            mode: "100755",
        }
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        Self {
            path: path.into(),
            content: target.as_bytes().to_vec(),
            mode: "120000",
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub method: String,
    /// The full path, prefix included.
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    /// Every header but Authorization, as `name: value`.
    pub other_headers: Vec<String>,
    pub body: String,
    /// The status answered; 0 when the connection was closed instead.
    pub status: u16,
}

/// A fault: the next `times` requests whose method matches (empty = any) and whose path contains
/// `path_contains` get `status` with `body` and `headers` (which replace the default headers of
/// the same name).
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub method: String,
    pub path_contains: String,
    pub status: u16,
    #[serde(default)]
    pub body: Value,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default = "one")]
    pub times: u32,
    /// Handle the request normally first, then answer with the fault anyway (a lost response:
    /// the write happened, the client saw an error).
    #[serde(default)]
    pub after_success: bool,
}

fn one() -> u32 {
    1
}

impl Fault {
    pub fn new(method: &str, path_contains: &str, status: u16, message: &str) -> Self {
        Self {
            method: method.into(),
            path_contains: path_contains.into(),
            status,
            body: json!({
                "message": message,
                "documentation_url": "https://docs.github.com/rest",
                "status": status.to_string(),
            }),
            headers: Vec::new(),
            times: 1,
            after_success: false,
        }
    }
    pub fn after_success(mut self) -> Self {
        self.after_success = true;
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }
    pub fn body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }
}

/// A pull request as the fake stores it.
#[derive(Debug, Clone)]
pub struct Pull {
    pub id: u64,
    pub number: u64,
    /// `owner/name` of the base repository.
    pub repo: String,
    /// `owner/name` of the head repository.
    pub head_repo: String,
    pub head_ref: String,
    pub head_sha: String,
    pub base_ref: String,
    pub title: String,
    pub body: Option<String>,
    pub draft: bool,
    pub user: String,
    pub maintainer_can_modify: bool,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
struct User {
    token: String,
    login: String,
    id: u64,
    workflow_scope: bool,
}

#[derive(Debug, Clone)]
struct Repo {
    id: u64,
    owner: String,
    name: String,
    dir: PathBuf,
    default_branch: String,
    private: bool,
    archived: bool,
    /// `owner/name` of the repository this is a fork of.
    parent: Option<String>,
    /// login → may push.
    collaborators: BTreeMap<String, bool>,
    ready_at: Instant,
}

impl Repo {
    fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

struct Inner {
    root: PathBuf,
    api: String,
    web: String,
    prefix: String,
    users: Vec<User>,
    repos: BTreeMap<String, Repo>,
    pulls: Vec<Pull>,
    log: Vec<Recorded>,
    faults: Vec<Fault>,
    /// (method, path fragment, delay): the next matching request is carried out and its answer
    /// held back this long.
    holds: Vec<(String, String, Duration)>,
    fork_delay: Duration,
    draft_supported: bool,
    next_id: u64,
    plan: Option<Arc<FaultPlan>>,
    /// Keep every request in the log (off for long runs).
    record: bool,
}

type Shared = Arc<Mutex<Inner>>;

/// The running fake. Dropping it stops the server and removes its repositories.
pub struct FakeGithub {
    pub addr: SocketAddr,
    inner: Shared,
    task: tokio::task::JoinHandle<()>,
    _root: tempfile::TempDir,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A GitHub answer: status, JSON body, extra headers.
struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }
    fn error(status: u16, message: &str) -> Self {
        Self::ok(
            status,
            json!({
                "message": message,
                "documentation_url": "https://docs.github.com/rest",
                "status": status.to_string(),
            }),
        )
    }
    fn validation(errors: Value) -> Self {
        Self::ok(
            422,
            json!({
                "message": "Validation Failed",
                "errors": errors,
                "documentation_url": "https://docs.github.com/rest",
                "status": "422",
            }),
        )
    }
    fn not_found() -> Self {
        Self::error(404, "Not Found")
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Result<T> = std::result::Result<T, Reply>;

impl FakeGithub {
    /// Serves the API at `/`.
    pub async fn start() -> FakeGithub {
        Self::start_at("").await
    }

    /// Serves the API under `prefix` (`/api/v3` for GitHub Enterprise Server).
    pub async fn start_at(prefix: &str) -> FakeGithub {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let root = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let web = format!("http://{addr}");
        let inner = Arc::new(Mutex::new(Inner {
            root: root.path().to_path_buf(),
            api: format!("{web}{prefix}"),
            web,
            prefix,
            users: Vec::new(),
            repos: BTreeMap::new(),
            pulls: Vec::new(),
            log: Vec::new(),
            faults: Vec::new(),
            holds: Vec::new(),
            fork_delay: Duration::from_millis(300),
            draft_supported: true,
            next_id: 1000,
            plan: None,
            record: true,
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGithub {
            addr,
            inner,
            task,
            _root: root,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap())
    }

    /// The REST root to give a client (`GITHUB_API_URL`).
    pub fn api_url(&self) -> String {
        self.with(|i| i.api.clone())
    }

    /// A user authenticated by `token`, with the `workflow` scope.
    pub fn add_user(&self, token: &str, login: &str) {
        self.with(|i| {
            let id = i.id();
            i.users.push(User {
                token: token.into(),
                login: login.into(),
                id,
                workflow_scope: true,
            });
        });
    }

    pub fn set_workflow_scope(&self, login: &str, allowed: bool) {
        self.with(|i| {
            for u in i.users.iter_mut().filter(|u| u.login == login) {
                u.workflow_scope = allowed;
            }
        });
    }

    /// Creates `owner/name` with one commit on `main` holding `files`; returns that commit.
    pub fn create_repo(&self, owner: &str, name: &str, files: &[SeedFile]) -> String {
        self.with(|i| {
            let dir = i.root.join("repos").join(owner).join(format!("{name}.git"));
            std::fs::create_dir_all(&dir).unwrap();
            git(&dir, &["init", "--bare", "-q", "-b", "main"], None, &[]).unwrap();
            let mut entries = BTreeMap::new();
            for f in files {
                let sha = hash_object(&dir, &f.content);
                entries.insert(f.path.clone(), (f.mode.to_owned(), sha));
            }
            let tree = write_tree(&dir, &entries).unwrap();
            let commit = commit_tree(
                &dir,
                &tree,
                &[],
                "Initial commit\n",
                ("Seed", "seed@example.com", "2024-01-01T00:00:00Z"),
                ("Seed", "seed@example.com", "2024-01-01T00:00:00Z"),
            )
            .unwrap();
            git(&dir, &["update-ref", "refs/heads/main", &commit], None, &[]).unwrap();
            let id = i.id();
            i.repos.insert(
                format!("{owner}/{name}"),
                Repo {
                    id,
                    owner: owner.into(),
                    name: name.into(),
                    dir,
                    default_branch: "main".into(),
                    private: false,
                    archived: false,
                    parent: None,
                    collaborators: BTreeMap::new(),
                    ready_at: Instant::now(),
                },
            );
            commit
        })
    }

    /// Lets `login` read (`push: false`) or write (`push: true`) `repo`.
    pub fn grant(&self, repo: &str, login: &str, push: bool) {
        self.with(|i| {
            i.repos
                .get_mut(repo)
                .unwrap()
                .collaborators
                .insert(login.into(), push);
        });
    }

    pub fn set_private(&self, repo: &str, private: bool) {
        self.with(|i| i.repos.get_mut(repo).unwrap().private = private);
    }

    pub fn set_archived(&self, repo: &str, archived: bool) {
        self.with(|i| i.repos.get_mut(repo).unwrap().archived = archived);
    }

    /// How long a new fork answers 409 "Git Repository is empty." (default 300 ms).
    pub fn set_fork_delay(&self, delay: Duration) {
        self.with(|i| i.fork_delay = delay);
    }

    /// Makes `draft: true` fail with GitHub's 422, as on plans without draft pull requests.
    pub fn set_draft_supported(&self, supported: bool) {
        self.with(|i| i.draft_supported = supported);
    }

    pub fn fail(&self, fault: Fault) {
        self.with(|i| i.faults.push(fault));
    }

    /// The next `method` request whose path contains `path_contains` is carried out at once, and
    /// its answer held back for `delay` (a client that gives up meanwhile never learns of it).
    pub fn hold_answer(&self, method: &str, path_contains: &str, delay: Duration) {
        self.with(|i| i.holds.push((method.into(), path_contains.into(), delay)));
    }

    /// Seeded random faults on every later request (see [`FaultPlan`]).
    pub fn set_fault_plan(&self, plan: Arc<FaultPlan>) {
        self.with(|i| i.plan = Some(plan));
    }

    /// Whether requests are kept for [`Self::requests`] (default on; off for long runs).
    pub fn set_recording(&self, record: bool) {
        self.with(|i| i.record = record);
    }

    /// Drops every fault not used yet.
    pub fn clear_faults(&self) {
        self.with(|i| i.faults.clear());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|i| i.log.clone())
    }

    pub fn clear_requests(&self) {
        self.with(|i| i.log.clear());
    }

    pub fn pulls(&self) -> Vec<Pull> {
        self.with(|i| i.pulls.clone())
    }

    pub fn repo_names(&self) -> Vec<String> {
        self.with(|i| i.repos.keys().cloned().collect())
    }

    /// The bare repository behind `owner/name`, for `git clone` / `git -C`.
    pub fn git_dir(&self, repo: &str) -> PathBuf {
        self.with(|i| i.repos.get(repo).unwrap().dir.clone())
    }

    /// Where `refs/heads/{branch}` of `repo` points, if it exists.
    pub fn branch_sha(&self, repo: &str, branch: &str) -> Option<String> {
        let dir = self.git_dir(repo);
        read_ref(&dir, &format!("refs/heads/{branch}"))
    }
}

async fn handle(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let plan = inner.lock().unwrap().plan.clone();
    let random = match plan {
        Some(plan) => {
            let draw = plan.draw(route_name(&method, uri.path()));
            if !draw.delay.is_zero() {
                tokio::time::sleep(draw.delay).await;
            }
            draw.fault
        }
        None => None,
    };
    let (response, hold) = {
        let mut inner = inner.lock().unwrap();
        let response = inner.handle(&method, &uri, &headers, &body, random);
        let held = inner.holds.iter().position(|(m, fragment, _)| {
            m.eq_ignore_ascii_case(method.as_str()) && uri.path().contains(fragment.as_str())
        });
        (response, held.map(|i| inner.holds.remove(i).2))
    };
    if let Some(delay) = hold {
        tokio::time::sleep(delay).await;
    }
    response
}

/// The fault-plan route a request belongs to.
fn route_name(method: &Method, path: &str) -> &'static str {
    if method == Method::GET {
        return "github.read";
    }
    if method != Method::POST {
        return "github.other";
    }
    let ends = |suffix: &str| path.ends_with(suffix);
    if ends("/git/blobs") || ends("/git/trees") || ends("/git/commits") {
        "github.git"
    } else if ends("/git/refs") {
        "github.ref"
    } else if ends("/pulls") {
        "github.pull"
    } else if ends("/forks") {
        "github.fork"
    } else {
        "github.other"
    }
}

impl Inner {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn handle(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        random: Option<Injected>,
    ) -> Response {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or_default().to_owned();
        let mut record = Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            authorization: header("authorization"),
            user_agent: header("user-agent"),
            other_headers: headers
                .iter()
                .filter(|(k, _)| *k != "authorization")
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
            status: 0,
        };

        let mut closed = false;
        let reply = if path == "/_fake/log" {
            Reply::ok(200, serde_json::to_value(&self.log).unwrap())
        } else if path == "/_fake/fail" && method == Method::POST {
            match serde_json::from_slice::<Fault>(body) {
                Ok(f) => {
                    self.faults.push(f);
                    Reply::ok(201, json!({}))
                }
                Err(e) => Reply::error(400, &e.to_string()),
            }
        } else {
            let fault = self.take_fault(method, &path).or_else(|| {
                let (status, after_success) = match random? {
                    Injected::Status(status) => (status, false),
                    Injected::StatusAfter(status) => (status, true),
                    Injected::CloseAfter | Injected::CutStream => {
                        closed = true;
                        return None;
                    }
                };
                Some(Fault::new("", "", status, "Server Error").times(1))
                    .map(|f| Fault { after_success, ..f })
            });
            let reply = match (&fault, path.strip_prefix(self.prefix.as_str())) {
                (Some(f), _) if !f.after_success => None,
                (_, Some(route)) if route.starts_with('/') || route.is_empty() => {
                    let segments: Vec<String> = route
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .map(percent_decode)
                        .collect();
                    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
                    let query: HashMap<String, String> =
                        url::form_urlencoded::parse(query.as_bytes())
                            .into_owned()
                            .collect();
                    Some(
                        self.route(
                            method,
                            &segments,
                            &query,
                            record.authorization.as_deref(),
                            body,
                        )
                        .unwrap_or_else(|e| e),
                    )
                }
                _ => Some(Reply::not_found()),
            };
            match (fault, reply) {
                (Some(f), _) => Reply {
                    status: f.status,
                    body: f.body,
                    headers: f.headers,
                },
                (None, Some(reply)) => reply,
                (None, None) => Reply::not_found(),
            }
        };
        record.status = if closed { 0 } else { reply.status };
        if !path.starts_with("/_fake/") && self.record {
            self.log.push(record);
        }
        if closed {
            return closed_response();
        }
        self.respond(reply)
    }

    fn take_fault(&mut self, method: &Method, path: &str) -> Option<Fault> {
        let idx = self.faults.iter().position(|f| {
            (f.method.is_empty() || f.method.eq_ignore_ascii_case(method.as_str()))
                && path.contains(&f.path_contains)
        })?;
        let fault = self.faults[idx].clone();
        if fault.times <= 1 {
            self.faults.remove(idx);
        } else {
            self.faults[idx].times -= 1;
        }
        Some(fault)
    }

    fn respond(&self, reply: Reply) -> Response {
        let now = unix_now();
        let used = self.log.len() as u64;
        let mut headers: Vec<(String, String)> = vec![
            ("x-ratelimit-limit".into(), "5000".into()),
            (
                "x-ratelimit-remaining".into(),
                (5000u64.saturating_sub(used)).to_string(),
            ),
            ("x-ratelimit-used".into(), used.to_string()),
            ("x-ratelimit-reset".into(), (now + 3600).to_string()),
            ("x-ratelimit-resource".into(), "core".into()),
            ("x-github-api-version-selected".into(), "2022-11-28".into()),
        ];
        // Injected headers replace defaults of the same name: duplicated rate-limit headers
        // crash PyGithub.
        for (name, value) in reply.headers {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            headers.push((name.to_ascii_lowercase(), value));
        }
        let status = StatusCode::from_u16(reply.status).unwrap();
        let mut response = if status == StatusCode::NO_CONTENT {
            status.into_response()
        } else {
            (status, axum::Json(reply.body)).into_response()
        };
        for (name, value) in headers {
            response.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(&value).unwrap(),
            );
        }
        response
    }

    // ----- routing -----

    fn route(
        &mut self,
        method: &Method,
        seg: &[&str],
        query: &HashMap<String, String>,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Result<Reply> {
        let login = self.authenticate(authorization)?;
        let body = || -> Result<Value> {
            if body.is_empty() {
                return Ok(json!({}));
            }
            serde_json::from_slice(body).map_err(|_| Reply::error(400, "Problems parsing JSON"))
        };
        let m = method.as_str();
        match (m, seg) {
            ("GET", ["user"]) => {
                let id = self.user_id(&login);
                Ok(Reply::ok(200, self.user_json(&login, id)))
            }
            ("GET", ["repos", o, r]) => {
                let repo = self.readable(&login, o, r)?;
                Ok(Reply::ok(200, self.repo_json(&repo, Some(&login))))
            }
            ("POST", ["repos", o, r, "forks"]) => self.create_fork(&login, o, r, &body()?),
            ("POST", ["repos", o, r, "merge-upstream"]) => {
                self.merge_upstream(&login, o, r, &body()?)
            }
            ("GET", ["repos", o, r, "git", "ref" | "refs", rest @ ..]) if !rest.is_empty() => {
                let repo = self.git_ready(&login, o, r)?;
                let name = format!("refs/{}", rest.join("/"));
                match read_ref(&repo.dir, &name) {
                    Some(sha) => Ok(Reply::ok(200, self.ref_json(&repo, &name, &sha))),
                    None => Ok(Reply::not_found()),
                }
            }
            ("POST", ["repos", o, r, "git", "refs"]) => self.create_ref(&login, o, r, &body()?),
            ("PATCH", ["repos", o, r, "git", "refs", rest @ ..]) if !rest.is_empty() => {
                self.update_ref(&login, o, r, &format!("refs/{}", rest.join("/")), &body()?)
            }
            ("DELETE", ["repos", o, r, "git", "refs", rest @ ..]) if !rest.is_empty() => {
                let repo = self.writable(&login, o, r)?;
                let name = format!("refs/{}", rest.join("/"));
                if read_ref(&repo.dir, &name).is_none() {
                    return Err(Reply::error(422, "Reference does not exist"));
                }
                git(&repo.dir, &["update-ref", "-d", &name], None, &[])
                    .map_err(|e| Reply::error(500, &e))?;
                Ok(Reply::ok(204, Value::Null))
            }
            ("POST", ["repos", o, r, "git", "blobs"]) => self.create_blob(&login, o, r, &body()?),
            ("GET", ["repos", o, r, "git", "blobs", sha]) => {
                let repo = self.git_ready(&login, o, r)?;
                if object_type(&repo.dir, sha).as_deref() != Some("blob") {
                    return Ok(Reply::not_found());
                }
                let bytes = git(&repo.dir, &["cat-file", "blob", sha], None, &[])
                    .map_err(|e| Reply::error(500, &e))?;
                Ok(Reply::ok(
                    200,
                    json!({
                        "sha": sha,
                        "node_id": format!("B_{sha}"),
                        "size": bytes.len(),
                        "url": format!("{}/git/blobs/{sha}", self.repo_api(&repo)),
                        "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
                        "encoding": "base64",
                    }),
                ))
            }
            ("POST", ["repos", o, r, "git", "trees"]) => self.create_tree(&login, o, r, &body()?),
            ("GET", ["repos", o, r, "git", "trees", sha]) => {
                let repo = self.git_ready(&login, o, r)?;
                if object_type(&repo.dir, sha).as_deref() != Some("tree") {
                    return Ok(Reply::not_found());
                }
                let recursive = query
                    .get("recursive")
                    .is_some_and(|v| !v.is_empty() && v != "0" && v != "false");
                Ok(Reply::ok(200, self.tree_json(&repo, sha, recursive)))
            }
            ("POST", ["repos", o, r, "git", "commits"]) => {
                self.create_commit(&login, o, r, &body()?)
            }
            ("GET", ["repos", o, r, "git", "commits", sha]) => {
                let repo = self.git_ready(&login, o, r)?;
                if object_type(&repo.dir, sha).as_deref() != Some("commit") {
                    return Ok(Reply::not_found());
                }
                Ok(Reply::ok(200, self.commit_json(&repo, sha)))
            }
            ("POST", ["repos", o, r, "pulls"]) => self.create_pull(&login, o, r, &body()?),
            ("GET", ["repos", o, r, "pulls"]) => {
                let repo = self.readable(&login, o, r)?;
                let full = repo.full_name();
                let state = query.get("state").map(String::as_str).unwrap_or("open");
                let items: Vec<Value> = self
                    .pulls
                    .iter()
                    .filter(|p| p.repo == full)
                    .filter(|_| state == "all" || state == "open")
                    .filter(|p| {
                        query.get("head").is_none_or(|h| {
                            let owner = p.head_repo.split('/').next().unwrap_or_default();
                            *h == format!("{owner}:{}", p.head_ref)
                        })
                    })
                    .filter(|p| query.get("base").is_none_or(|b| *b == p.base_ref))
                    .map(|p| self.pull_json(p))
                    .collect();
                Ok(Reply::ok(200, Value::Array(items)))
            }
            ("GET", ["repos", o, r, "pulls", n]) => {
                let repo = self.readable(&login, o, r)?;
                let full = repo.full_name();
                let pull = self
                    .pulls
                    .iter()
                    .find(|p| p.repo == full && n.parse() == Ok(p.number))
                    .ok_or_else(Reply::not_found)?;
                Ok(Reply::ok(200, self.pull_json(pull)))
            }
            ("POST", ["repos", o, r, "issues", n, "labels"]) => {
                let repo = self.readable(&login, o, r)?;
                if !self.can_push(&repo, &login) {
                    return Err(Reply::error(
                        403,
                        "Resource not accessible by personal access token",
                    )
                    .header(
                        "x-accepted-github-permissions",
                        "issues=write; pull_requests=write",
                    ));
                }
                let full = repo.full_name();
                let body = body()?;
                let names: Vec<String> = match body.get("labels").unwrap_or(&body) {
                    Value::Array(a) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    _ => {
                        return Err(Reply::validation(
                            json!([{"resource": "Label", "code": "invalid", "field": "labels"}]),
                        ));
                    }
                };
                let api = self.repo_api(&repo);
                let pull = self
                    .pulls
                    .iter_mut()
                    .find(|p| p.repo == full && n.parse() == Ok(p.number))
                    .ok_or_else(Reply::not_found)?;
                for name in names {
                    if !pull.labels.contains(&name) {
                        pull.labels.push(name);
                    }
                }
                let labels: Vec<Value> = pull.labels.iter().map(|l| label_json(&api, l)).collect();
                Ok(Reply::ok(200, Value::Array(labels)))
            }
            _ => Ok(Reply::not_found()),
        }
    }

    // ----- access -----

    fn authenticate(&self, authorization: Option<&str>) -> Result<String> {
        let Some(value) = authorization else {
            return Err(Reply::error(401, "Requires authentication"));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("token "))
            .unwrap_or_default()
            .trim();
        self.users
            .iter()
            .find(|u| u.token == token)
            .map(|u| u.login.clone())
            .ok_or_else(|| Reply::error(401, "Bad credentials"))
    }

    fn user_id(&self, login: &str) -> u64 {
        self.users
            .iter()
            .find(|u| u.login == login)
            .map(|u| u.id)
            .unwrap_or(1)
    }

    fn can_push(&self, repo: &Repo, login: &str) -> bool {
        repo.owner == login || repo.collaborators.get(login) == Some(&true)
    }

    fn readable(&self, login: &str, owner: &str, name: &str) -> Result<Repo> {
        let repo = self
            .repos
            .get(&format!("{owner}/{name}"))
            .ok_or_else(Reply::not_found)?;
        if repo.private && repo.owner != login && !repo.collaborators.contains_key(login) {
            return Err(Reply::not_found());
        }
        Ok(repo.clone())
    }

    fn git_ready(&self, login: &str, owner: &str, name: &str) -> Result<Repo> {
        let repo = self.readable(login, owner, name)?;
        if Instant::now() < repo.ready_at {
            return Err(Reply::error(409, "Git Repository is empty."));
        }
        Ok(repo)
    }

    fn writable(&self, login: &str, owner: &str, name: &str) -> Result<Repo> {
        let repo = self.git_ready(login, owner, name)?;
        if repo.archived {
            return Err(Reply::error(
                403,
                "Repository was archived so is read-only.",
            ));
        }
        if !self.can_push(&repo, login) {
            return Err(
                Reply::error(403, "Resource not accessible by personal access token")
                    .header("x-accepted-github-permissions", "contents=write"),
            );
        }
        Ok(repo)
    }

    // ----- git data -----

    fn create_blob(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let repo = self.writable(login, o, r)?;
        let content = body.get("content").and_then(Value::as_str).ok_or_else(|| {
            Reply::validation(
                json!([{"resource": "Blob", "field": "content", "code": "missing_field"}]),
            )
        })?;
        let bytes = match body
            .get("encoding")
            .and_then(Value::as_str)
            .unwrap_or("utf-8")
        {
            "utf-8" | "utf8" => content.as_bytes().to_vec(),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(content.replace(['\n', '\r'], ""))
                .map_err(|_| Reply::error(422, "Invalid base64 content"))?,
            other => {
                return Err(Reply::error(
                    422,
                    &format!("encoding {other} is not supported"),
                ));
            }
        };
        let sha = hash_object(&repo.dir, &bytes);
        Ok(Reply::ok(
            201,
            json!({ "sha": sha, "url": format!("{}/git/blobs/{sha}", self.repo_api(&repo)) }),
        ))
    }

    fn create_tree(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let repo = self.writable(login, o, r)?;
        let workflow_scope = self
            .users
            .iter()
            .find(|u| u.login == login)
            .is_some_and(|u| u.workflow_scope);
        let mut entries: BTreeMap<String, (String, String)> = BTreeMap::new();
        if let Some(base) = body.get("base_tree").and_then(Value::as_str) {
            if object_type(&repo.dir, base).as_deref() != Some("tree") {
                return Err(Reply::validation(
                    json!([{"resource": "Tree", "field": "base_tree", "code": "invalid", "message": "base_tree is not a valid tree oid"}]),
                ));
            }
            entries = list_tree(&repo.dir, base);
        }
        let Some(items) = body.get("tree").and_then(Value::as_array) else {
            return Err(Reply::validation(
                json!([{"resource": "Tree", "field": "tree", "code": "missing_field"}]),
            ));
        };
        for item in items {
            let path = item.get("path").and_then(Value::as_str).unwrap_or_default();
            let mode = item.get("mode").and_then(Value::as_str).unwrap_or_default();
            let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
            if path.is_empty()
                || path.starts_with('/')
                || path.ends_with('/')
                || path
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".." || c == ".git")
            {
                return Err(Reply::error(
                    422,
                    &format!("tree.path contains a malformed path component: {path}"),
                ));
            }
            if !matches!(mode, "100644" | "100755" | "040000" | "160000" | "120000") {
                return Err(Reply::error(422, &format!("tree.mode is invalid: {mode}")));
            }
            if !workflow_scope && path.starts_with(".github/workflows/") {
                return Err(Reply::error(
                    422,
                    &format!(
                        "refusing to allow a Personal Access Token to create or update workflow `{path}` without `workflow` scope"
                    ),
                ));
            }
            let content = item.get("content").and_then(Value::as_str);
            let sha = item.get("sha");
            let both = "Must supply either tree.sha or tree.content. Request will be rejected if both are present.";
            match (content, sha) {
                (Some(_), Some(s)) if !s.is_null() => return Err(Reply::error(422, both)),
                (Some(text), _) => {
                    let sha = hash_object(&repo.dir, text.as_bytes());
                    put_entry(&mut entries, path, mode, &sha);
                }
                (None, Some(Value::Null)) => {
                    let prefix = format!("{path}/");
                    let before = entries.len();
                    entries.retain(|p, _| p != path && !p.starts_with(&prefix));
                    if entries.len() == before {
                        return Err(Reply::error(422, "GitRPC::BadObjectState"));
                    }
                }
                (None, Some(Value::String(sha))) => {
                    let actual = object_type(&repo.dir, sha);
                    match (kind, actual.as_deref()) {
                        ("blob", Some("blob")) => put_entry(&mut entries, path, mode, sha),
                        ("tree", Some("tree")) => {
                            let prefix = format!("{path}/");
                            entries.retain(|p, _| p != path && !p.starts_with(&prefix));
                            for (sub, (m, s)) in list_tree(&repo.dir, sha) {
                                put_entry(&mut entries, &format!("{path}/{sub}"), &m, &s);
                            }
                        }
                        ("commit", _) => put_entry(&mut entries, path, mode, sha),
                        _ => {
                            return Err(Reply::validation(
                                json!([{"resource": "Tree", "field": "tree.sha", "code": "invalid", "message": format!("tree.sha {sha} is not a valid {kind}")}]),
                            ));
                        }
                    }
                }
                _ => return Err(Reply::error(422, both)),
            }
        }
        let tree = write_tree(&repo.dir, &entries).map_err(|e| Reply::error(500, &e))?;
        Ok(Reply::ok(201, self.tree_json(&repo, &tree, false)))
    }

    fn create_commit(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let repo = self.writable(login, o, r)?;
        let message = body.get("message").and_then(Value::as_str).ok_or_else(|| {
            Reply::validation(
                json!([{"resource": "Commit", "field": "message", "code": "missing_field"}]),
            )
        })?;
        let tree = body.get("tree").and_then(Value::as_str).unwrap_or_default();
        if object_type(&repo.dir, tree).as_deref() != Some("tree") {
            return Err(Reply::error(422, "Tree SHA does not exist"));
        }
        let parents: Vec<String> = body
            .get("parents")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for p in &parents {
            if object_type(&repo.dir, p).as_deref() != Some("commit") {
                return Err(Reply::error(
                    422,
                    "Parent SHA does not exist or is not a commit object",
                ));
            }
        }
        let now = iso_utc(unix_now());
        let default_email = format!("{login}@users.noreply.github.com");
        let person =
            |v: Option<&Value>, fallback: (String, String, String)| -> (String, String, String) {
                match v {
                    Some(v) if v.is_object() => (
                        v.get("name")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .unwrap_or(fallback.0),
                        v.get("email")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .unwrap_or(fallback.1),
                        v.get("date")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .unwrap_or(fallback.2),
                    ),
                    _ => fallback,
                }
            };
        let author = person(body.get("author"), (login.to_owned(), default_email, now));
        let committer = person(body.get("committer"), author.clone());
        let sha = commit_tree(
            &repo.dir,
            tree,
            &parents,
            message,
            (&author.0, &author.1, &author.2),
            (&committer.0, &committer.1, &committer.2),
        )
        .map_err(|e| Reply::error(422, &e))?;
        Ok(Reply::ok(201, self.commit_json(&repo, &sha)))
    }

    fn create_ref(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let repo = self.writable(login, o, r)?;
        let name = body.get("ref").and_then(Value::as_str).unwrap_or_default();
        let sha = body.get("sha").and_then(Value::as_str).unwrap_or_default();
        if !name.starts_with("refs/") || name.matches('/').count() < 2 {
            return Err(Reply::error(
                422,
                "Reference name must start with 'refs/' and have at least two slashes.",
            ));
        }
        if git(&repo.dir, &["check-ref-format", name], None, &[]).is_err() {
            return Err(Reply::error(422, "Reference name is invalid"));
        }
        if read_ref(&repo.dir, name).is_some() {
            return Err(Reply::error(422, "Reference already exists"));
        }
        if object_type(&repo.dir, sha).is_none() {
            return Err(Reply::error(422, "Object does not exist"));
        }
        git(&repo.dir, &["update-ref", name, sha, ""], None, &[])
            .map_err(|e| Reply::error(500, &e))?;
        Ok(Reply::ok(201, self.ref_json(&repo, name, sha)))
    }

    fn update_ref(
        &mut self,
        login: &str,
        o: &str,
        r: &str,
        name: &str,
        body: &Value,
    ) -> Result<Reply> {
        let repo = self.writable(login, o, r)?;
        let sha = body.get("sha").and_then(Value::as_str).unwrap_or_default();
        let force = body.get("force").and_then(Value::as_bool).unwrap_or(false);
        let Some(old) = read_ref(&repo.dir, name) else {
            return Err(Reply::error(422, "Reference does not exist"));
        };
        if object_type(&repo.dir, sha).as_deref() != Some("commit") {
            return Err(Reply::error(422, "Object does not exist"));
        }
        if !force
            && git(
                &repo.dir,
                &["merge-base", "--is-ancestor", &old, sha],
                None,
                &[],
            )
            .is_err()
        {
            return Err(Reply::error(422, "Update is not a fast forward"));
        }
        git(&repo.dir, &["update-ref", name, sha, &old], None, &[])
            .map_err(|e| Reply::error(500, &e))?;
        Ok(Reply::ok(200, self.ref_json(&repo, name, sha)))
    }

    // ----- forks -----

    fn create_fork(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let upstream = self.git_ready(login, o, r)?;
        let upstream_name = upstream.full_name();
        let owner = body
            .get("organization")
            .and_then(Value::as_str)
            .unwrap_or(login)
            .to_owned();
        if owner == upstream.owner {
            return Err(Reply::error(403, "You cannot fork your own repository."));
        }
        if let Some(existing) = self
            .repos
            .values()
            .find(|x| x.owner == owner && x.parent.as_deref() == Some(upstream_name.as_str()))
        {
            let existing = existing.clone();
            return Ok(Reply::ok(202, self.repo_json(&existing, Some(login))));
        }
        let mut name = body
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(r)
            .to_owned();
        let base_name = name.clone();
        let mut n = 1;
        while self.repos.contains_key(&format!("{owner}/{name}")) {
            name = format!("{base_name}-{n}");
            n += 1;
        }
        let dir = self
            .root
            .join("repos")
            .join(&owner)
            .join(format!("{name}.git"));
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let mut args = vec!["clone", "--bare", "--shared", "-q"];
        let only_default = body
            .get("default_branch_only")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if only_default {
            args.extend([
                "--single-branch",
                "--branch",
                upstream.default_branch.as_str(),
            ]);
        }
        let src = upstream.dir.to_string_lossy().into_owned();
        let dst = dir.to_string_lossy().into_owned();
        args.extend([src.as_str(), dst.as_str()]);
        git(&self.root, &args, None, &[]).map_err(|e| Reply::error(500, &e))?;
        let id = self.id();
        let fork = Repo {
            id,
            owner: owner.clone(),
            name: name.clone(),
            dir,
            default_branch: upstream.default_branch.clone(),
            private: upstream.private,
            archived: false,
            parent: Some(upstream_name),
            collaborators: BTreeMap::new(),
            ready_at: Instant::now() + self.fork_delay,
        };
        self.repos.insert(format!("{owner}/{name}"), fork.clone());
        Ok(Reply::ok(202, self.repo_json(&fork, Some(login))))
    }

    fn merge_upstream(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let fork = self.writable(login, o, r)?;
        let Some(parent) = fork
            .parent
            .as_ref()
            .and_then(|p| self.repos.get(p))
            .cloned()
        else {
            return Err(Reply::error(422, "This repository is not a fork."));
        };
        let branch = body
            .get("branch")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = format!("refs/heads/{branch}");
        let Some(upstream_sha) = read_ref(&parent.dir, &name) else {
            return Err(Reply::not_found());
        };
        let merge_type = match read_ref(&fork.dir, &name) {
            Some(old) if old == upstream_sha => "none",
            Some(old) => {
                if git(
                    &fork.dir,
                    &["merge-base", "--is-ancestor", &old, &upstream_sha],
                    None,
                    &[],
                )
                .is_err()
                {
                    return Err(Reply::error(409, "There are merge conflicts"));
                }
                git(
                    &fork.dir,
                    &["update-ref", &name, &upstream_sha, &old],
                    None,
                    &[],
                )
                .map_err(|e| Reply::error(500, &e))?;
                "fast-forward"
            }
            None => {
                git(
                    &fork.dir,
                    &["update-ref", &name, &upstream_sha, ""],
                    None,
                    &[],
                )
                .map_err(|e| Reply::error(500, &e))?;
                "fast-forward"
            }
        };
        Ok(Reply::ok(
            200,
            json!({
                "message": "Successfully fetched and fast-forwarded from upstream",
                "merge_type": merge_type,
                "base_branch": format!("{}:{branch}", parent.owner),
            }),
        ))
    }

    // ----- pulls -----

    fn create_pull(&mut self, login: &str, o: &str, r: &str, body: &Value) -> Result<Reply> {
        let repo = self.readable(login, o, r)?;
        let full = repo.full_name();
        let title = body.get("title").and_then(Value::as_str);
        let head = body.get("head").and_then(Value::as_str).unwrap_or_default();
        let base = body.get("base").and_then(Value::as_str).unwrap_or_default();
        let Some(title) = title.filter(|t| !t.trim().is_empty()) else {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "field": "title", "code": "missing_field"}]),
            ));
        };
        let draft = body.get("draft").and_then(Value::as_bool).unwrap_or(false);
        if draft && !self.draft_supported {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "custom", "message": "Draft pull requests are not supported in this repository."}]),
            ));
        }
        let Some(base_sha) = read_ref(&repo.dir, &format!("refs/heads/{base}")) else {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "field": "base", "code": "invalid"}]),
            ));
        };
        let (head_owner, head_ref) = match head.split_once(':') {
            Some((owner, branch)) => (owner.to_owned(), branch.to_owned()),
            None => (repo.owner.clone(), head.to_owned()),
        };
        // The head repository: this one, or the head owner's repository in the same network.
        let head_repo = if head_owner == repo.owner {
            Some(repo.clone())
        } else {
            self.repos
                .values()
                .find(|x| x.owner == head_owner && x.parent.as_deref() == Some(full.as_str()))
                .cloned()
        };
        let head_sha = head_repo
            .as_ref()
            .and_then(|h| read_ref(&h.dir, &format!("refs/heads/{head_ref}")));
        let (Some(head_repo), Some(head_sha)) = (head_repo, head_sha) else {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "field": "head", "code": "invalid"}]),
            ));
        };
        let label = format!("{head_owner}:{head_ref}");
        if self.pulls.iter().any(|p| {
            p.repo == full
                && p.head_repo == head_repo.full_name()
                && p.head_ref == head_ref
                && p.base_ref == base
        }) {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "custom", "message": format!("A pull request already exists for {label}.")}]),
            ));
        }
        if git(
            &head_repo.dir,
            &["merge-base", "--is-ancestor", &head_sha, &base_sha],
            None,
            &[],
        )
        .is_ok()
        {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "custom", "message": format!("No commits between {base} and {head_ref}")}]),
            ));
        }
        let number = self.pulls.iter().filter(|p| p.repo == full).count() as u64 + 1;
        let id = self.id();
        let pull = Pull {
            id,
            number,
            repo: full,
            head_repo: head_repo.full_name(),
            head_ref,
            head_sha,
            base_ref: base.to_owned(),
            title: title.to_owned(),
            body: body.get("body").and_then(Value::as_str).map(str::to_owned),
            draft,
            user: login.to_owned(),
            maintainer_can_modify: body
                .get("maintainer_can_modify")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            labels: Vec::new(),
        };
        let json = self.pull_json(&pull);
        self.pulls.push(pull);
        Ok(Reply::ok(201, json))
    }

    // ----- JSON shapes (section 4.3 of the reference, plus the usual extras) -----

    fn repo_api(&self, repo: &Repo) -> String {
        format!("{}/repos/{}/{}", self.api, repo.owner, repo.name)
    }

    fn user_json(&self, login: &str, id: u64) -> Value {
        let api = format!("{}/users/{login}", self.api);
        json!({
            "login": login,
            "id": id,
            "node_id": format!("U_{id}"),
            "avatar_url": format!("{}/avatars/{login}", self.web),
            "gravatar_id": "",
            "url": api,
            "html_url": format!("{}/{login}", self.web),
            "followers_url": format!("{api}/followers"),
            "following_url": format!("{api}/following{{/other_user}}"),
            "gists_url": format!("{api}/gists{{/gist_id}}"),
            "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{api}/subscriptions"),
            "organizations_url": format!("{api}/orgs"),
            "repos_url": format!("{api}/repos"),
            "events_url": format!("{api}/events{{/privacy}}"),
            "received_events_url": format!("{api}/received_events"),
            "type": "User",
            "site_admin": false,
        })
    }

    fn repo_json(&self, repo: &Repo, viewer: Option<&str>) -> Value {
        let api = self.repo_api(repo);
        let owner_id = self.user_id(&repo.owner);
        let mut v = json!({
            "id": repo.id,
            "node_id": format!("R_{}", repo.id),
            "name": repo.name,
            "full_name": repo.full_name(),
            "owner": self.user_json(&repo.owner, owner_id),
            "private": repo.private,
            "visibility": if repo.private { "private" } else { "public" },
            "html_url": format!("{}/{}", self.web, repo.full_name()),
            "description": null,
            "fork": repo.parent.is_some(),
            "url": api,
            "forks_url": format!("{api}/forks"),
            "git_refs_url": format!("{api}/git/refs{{/sha}}"),
            "trees_url": format!("{api}/git/trees{{/sha}}"),
            "pulls_url": format!("{api}/pulls{{/number}}"),
            // Real GitHub answers `https://HOST/OWNER/REPO.git`; the fake's repositories are
            // local, so a sandbox can clone them.
            "clone_url": format!("file://{}", repo.dir.display()),
            "default_branch": repo.default_branch,
            "archived": repo.archived,
            "disabled": false,
            "allow_forking": true,
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "pushed_at": "2024-01-01T00:00:00Z",
        });
        if let Some(login) = viewer {
            let push = self.can_push(repo, login);
            let admin = repo.owner == login;
            v["permissions"] = json!({
                "admin": admin, "maintain": admin, "push": push, "triage": push, "pull": true,
            });
        }
        if let Some(parent) = repo.parent.as_ref().and_then(|p| self.repos.get(p)) {
            let parent_json = self.repo_json(parent, None);
            v["source"] = parent_json.clone();
            v["parent"] = parent_json;
        }
        v
    }

    fn ref_json(&self, repo: &Repo, name: &str, sha: &str) -> Value {
        let api = self.repo_api(repo);
        json!({
            "ref": name,
            "node_id": format!("REF_{sha}"),
            "url": format!("{api}/git/{name}"),
            "object": { "type": "commit", "sha": sha, "url": format!("{api}/git/commits/{sha}") },
        })
    }

    fn tree_json(&self, repo: &Repo, sha: &str, recursive: bool) -> Value {
        let api = self.repo_api(repo);
        let mut args = vec!["ls-tree", "-l", "-z"];
        if recursive {
            args.extend(["-r", "-t"]);
        }
        args.push(sha);
        let out = git(&repo.dir, &args, None, &[]).unwrap_or_default();
        let entries: Vec<Value> = out
            .split(|b| *b == 0)
            .filter(|l| !l.is_empty())
            .filter_map(|line| {
                let line = String::from_utf8_lossy(line);
                let (meta, path) = line.split_once('\t')?;
                let mut parts = meta.split_whitespace();
                let (mode, kind, sha, size) =
                    (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                let url_kind = if kind == "tree" { "trees" } else { "blobs" };
                let mut e = json!({
                    "path": path, "mode": mode, "type": kind, "sha": sha,
                    "url": format!("{api}/git/{url_kind}/{sha}"),
                });
                if let Ok(size) = size.parse::<u64>() {
                    e["size"] = json!(size);
                }
                if kind == "commit" {
                    e.as_object_mut()?.remove("url");
                }
                Some(e)
            })
            .collect();
        json!({ "sha": sha, "url": format!("{api}/git/trees/{sha}"), "tree": entries, "truncated": false })
    }

    fn commit_json(&self, repo: &Repo, sha: &str) -> Value {
        let api = self.repo_api(repo);
        let raw = git(&repo.dir, &["cat-file", "commit", sha], None, &[]).unwrap_or_default();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (headers, message) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
        let mut tree = String::new();
        let mut parents = Vec::new();
        let mut author = json!(null);
        let mut committer = json!(null);
        for line in headers.lines() {
            if let Some(t) = line.strip_prefix("tree ") {
                tree = t.to_owned();
            } else if let Some(p) = line.strip_prefix("parent ") {
                parents.push(json!({
                    "sha": p,
                    "url": format!("{api}/git/commits/{p}"),
                    "html_url": format!("{}/{}/commit/{p}", self.web, repo.full_name()),
                }));
            } else if let Some(a) = line.strip_prefix("author ") {
                author = person_json(a);
            } else if let Some(c) = line.strip_prefix("committer ") {
                committer = person_json(c);
            }
        }
        json!({
            "sha": sha,
            "node_id": format!("C_{sha}"),
            "url": format!("{api}/git/commits/{sha}"),
            "html_url": format!("{}/{}/commit/{sha}", self.web, repo.full_name()),
            "author": author,
            "committer": committer,
            "message": message,
            "tree": { "sha": tree, "url": format!("{api}/git/trees/{tree}") },
            "parents": parents,
            "verification": { "verified": false, "reason": "unsigned", "signature": null, "payload": null, "verified_at": null },
        })
    }

    fn pull_json(&self, p: &Pull) -> Value {
        let repo = &self.repos[&p.repo];
        let head_repo = &self.repos[&p.head_repo];
        let api = self.repo_api(repo);
        let n = p.number;
        let head_sha = read_ref(&head_repo.dir, &format!("refs/heads/{}", p.head_ref))
            .unwrap_or_else(|| p.head_sha.clone());
        let base_sha =
            read_ref(&repo.dir, &format!("refs/heads/{}", p.base_ref)).unwrap_or_default();
        let user_id = self.user_id(&p.user);
        json!({
            "id": p.id,
            "node_id": format!("PR_{}", p.id),
            "number": n,
            "url": format!("{api}/pulls/{n}"),
            "html_url": format!("{}/{}/pull/{n}", self.web, p.repo),
            "diff_url": format!("{}/{}/pull/{n}.diff", self.web, p.repo),
            "patch_url": format!("{}/{}/pull/{n}.patch", self.web, p.repo),
            "issue_url": format!("{api}/issues/{n}"),
            "commits_url": format!("{api}/pulls/{n}/commits"),
            "review_comments_url": format!("{api}/pulls/{n}/comments"),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{api}/issues/{n}/comments"),
            "statuses_url": format!("{api}/statuses/{head_sha}"),
            "state": "open",
            "locked": false,
            "title": p.title,
            "user": self.user_json(&p.user, user_id),
            "body": p.body,
            "labels": p.labels.iter().map(|l| label_json(&api, l)).collect::<Vec<_>>(),
            "draft": p.draft,
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "closed_at": null,
            "merged_at": null,
            "merge_commit_sha": null,
            "maintainer_can_modify": p.maintainer_can_modify,
            "merged": false,
            "head": {
                "label": format!("{}:{}", head_repo.owner, p.head_ref),
                "ref": p.head_ref,
                "sha": head_sha,
                "user": self.user_json(&head_repo.owner, self.user_id(&head_repo.owner)),
                "repo": self.repo_json(head_repo, None),
            },
            "base": {
                "label": format!("{}:{}", repo.owner, p.base_ref),
                "ref": p.base_ref,
                "sha": base_sha,
                "user": self.user_json(&repo.owner, self.user_id(&repo.owner)),
                "repo": self.repo_json(repo, None),
            },
        })
    }
}

fn label_json(repo_api: &str, name: &str) -> Value {
    let id = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 1_000_000;
    json!({
        "id": id, "node_id": format!("LA_{id}"), "url": format!("{repo_api}/labels/{name}"),
        "name": name, "description": null, "color": "ededed", "default": false,
    })
}

/// `Name <email> 1700000000 +0000` → `{name, email, date}`.
fn person_json(line: &str) -> Value {
    let (name, rest) = line.split_once(" <").unwrap_or((line, ""));
    let (email, rest) = rest.split_once("> ").unwrap_or((rest, ""));
    let ts: u64 = rest
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    json!({ "name": name, "email": email, "date": iso_utc(ts) })
}

// ----- git plumbing -----

fn git(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> std::result::Result<Vec<u8>, String> {
    use std::io::Write as _;
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(["-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn hash_object(dir: &Path, bytes: &[u8]) -> String {
    let out = git(dir, &["hash-object", "-w", "--stdin"], Some(bytes), &[]).unwrap();
    String::from_utf8_lossy(&out).trim().to_owned()
}

fn object_type(dir: &Path, sha: &str) -> Option<String> {
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    git(dir, &["cat-file", "-t", sha], None, &[])
        .ok()
        .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
}

fn read_ref(dir: &Path, name: &str) -> Option<String> {
    git(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{name}^{{commit}}"),
        ],
        None,
        &[],
    )
    .ok()
    .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
    .filter(|s| !s.is_empty())
}

/// Every non-tree entry of `tree`, recursively: path → (mode, sha).
fn list_tree(dir: &Path, tree: &str) -> BTreeMap<String, (String, String)> {
    let out = git(
        dir,
        &["ls-tree", "-r", "-z", "--full-tree", tree],
        None,
        &[],
    )
    .unwrap_or_default();
    out.split(|b| *b == 0)
        .filter(|l| !l.is_empty())
        .filter_map(|line| {
            let line = String::from_utf8_lossy(line);
            let (meta, path) = line.split_once('\t')?;
            let mut parts = meta.split(' ');
            let (mode, _kind, sha) = (parts.next()?, parts.next()?, parts.next()?);
            Some((path.to_owned(), (mode.to_owned(), sha.to_owned())))
        })
        .collect()
}

/// Adds `path`, replacing a file where a directory is needed and a directory where the file goes.
fn put_entry(entries: &mut BTreeMap<String, (String, String)>, path: &str, mode: &str, sha: &str) {
    let prefix = format!("{path}/");
    entries.retain(|p, _| !p.starts_with(&prefix) && !path.starts_with(&format!("{p}/")));
    entries.insert(path.to_owned(), (mode.to_owned(), sha.to_owned()));
}

fn write_tree(
    dir: &Path,
    entries: &BTreeMap<String, (String, String)>,
) -> std::result::Result<String, String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let index = scratch.path().join("index");
    let index = index.to_string_lossy().into_owned();
    let env = [("GIT_INDEX_FILE", index.as_str())];
    let mut info = Vec::new();
    for (path, (mode, sha)) in entries {
        info.extend_from_slice(format!("{mode} {sha}\t{path}").as_bytes());
        info.push(0);
    }
    git(
        dir,
        &["update-index", "-z", "--index-info"],
        Some(&info),
        &env,
    )?;
    let out = git(dir, &["write-tree"], None, &env)?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

fn commit_tree(
    dir: &Path,
    tree: &str,
    parents: &[String],
    message: &str,
    author: (&str, &str, &str),
    committer: (&str, &str, &str),
) -> std::result::Result<String, String> {
    let mut args = vec!["commit-tree", tree];
    for p in parents {
        args.extend(["-p", p.as_str()]);
    }
    let env = [
        ("GIT_AUTHOR_NAME", author.0),
        ("GIT_AUTHOR_EMAIL", author.1),
        ("GIT_AUTHOR_DATE", author.2),
        ("GIT_COMMITTER_NAME", committer.0),
        ("GIT_COMMITTER_EMAIL", committer.1),
        ("GIT_COMMITTER_DATE", committer.2),
    ];
    let out = git(dir, &args, Some(message.as_bytes()), &env)?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

// ----- small helpers -----

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso_utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        (secs % 3_600) / 60,
        secs % 60
    )
}
