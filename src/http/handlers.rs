//! Route handlers. Every request the client got wrong is refused here, before any sandbox, model
//! or GitHub call.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::events_token::{self, EventTokens};
use super::{ApiError, AppState, QueryParams, sse};
use crate::job::state::{JobState, JobView};
use crate::job::{CancelOutcome, JobHandle, JobRequest, SubmitError};
use crate::store::{JobRecord, ListQuery, StoreError, decode_cursor, encode_cursor};

/// Longest prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 20_000;

/// The service's health: 200 when it can take jobs, 503 when its database is unreachable. Never
/// needs a key.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses(
        (status = 200, description = "The service is up", body = super::openapi::Health),
        (status = 503, description = "The job store is unreachable (`store_error` says why)", body = super::openapi::Health)
    )
)]
pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let backends = state.registry.backends();
    let store = state.registry.store();
    let reachable = tokio::time::timeout(std::time::Duration::from_secs(5), store.health()).await;
    let problem = match reachable {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(_) => Some("the database did not answer within 5 s".to_owned()),
    };
    let mut body = json!({
        "status": if problem.is_some() { "unavailable" } else { "ok" },
        "store": store.backend(),
        "sandbox": backends.sandbox.name(),
        "isolation": backends.sandbox.isolation(),
        "limits": backends.sandbox.limits(),
        "agents": backends.agent_names(),
        "forge": backends.forges.remote_name(),
        "cleanup_pending": state.registry.cleanup_pending(),
        // Whether the other routes need an API key: the web page asks for one only then.
        "auth": !state.api_keys.is_empty(),
    });
    match problem {
        None => Json(body).into_response(),
        Some(problem) => {
            body["store_error"] = Value::String(problem);
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Who is calling: the jobs a caller may see follow from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// An id derived from the key (a digest prefix, never the key); `None` when the API is open.
    pub key_id: Option<String>,
    /// Sees and cancels every job: an admin key, or anyone when no key is configured.
    pub admin: bool,
}

impl Caller {
    fn may_see(&self, owner: Option<&str>) -> bool {
        self.admin || owner.is_none() || owner == self.key_id.as_deref()
    }
}

/// `Authorization: Bearer <key>` (the scheme in any case) or `X-API-Key: <key>` when `API_KEYS` is
/// set; on `GET /jobs/{id}/events` alone, a valid `?token=` from `POST /jobs/{id}/events-token`
/// instead (for `EventSource`, which cannot send headers). Passes the [`Caller`] on to the
/// handlers.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.api_keys.is_empty() {
        request.extensions_mut().insert(Caller {
            key_id: None,
            admin: true,
        });
        return next.run(request).await;
    }
    let presented = presented_key(request.headers());
    let token = match presented {
        Some(_) => None,
        None => events_token_of(&request),
    };
    let caller = match (presented, &token) {
        (Some(key), _) => key_matches(&state.api_keys, key).then(|| Caller {
            key_id: Some(key_id(key)),
            admin: key_matches(&state.admin_api_keys, key),
        }),
        (None, Some((tokens, job_id, token))) => {
            tokens.verify(token, job_id, std::time::SystemTime::now())
        }
        (None, None) => None,
    };
    if let Some(caller) = caller {
        request.extensions_mut().insert(caller);
        next.run(request).await
    } else {
        unauthorized(if token.is_some() {
            "the events token is not valid for this job or has expired; POST /jobs/{id}/events-token makes a new one"
        } else {
            "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)"
        })
    }
}

/// The key a request presents: `Authorization: Bearer <key>` (any case) or `X-API-Key`.
pub(super) fn presented_key(headers: &header::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// `401` with the JSON error shape and a `WWW-Authenticate` challenge.
pub(super) fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The `?token=` of a `GET /jobs/{id}/events` request, with the job id it must be bound to and
/// the signer that checks it. Any other route ignores a token.
fn events_token_of(request: &Request) -> Option<(Arc<EventTokens>, String, String)> {
    let route = request.extensions().get::<MatchedPath>()?;
    if route.as_str() != super::EVENTS_ROUTE {
        return None;
    }
    let tokens = request.extensions().get::<Arc<EventTokens>>()?.clone();
    let job_id = request
        .uri()
        .path()
        .strip_prefix("/jobs/")?
        .strip_suffix("/events")?
        .to_owned();
    let token = url::form_urlencoded::parse(request.uri().query()?.as_bytes())
        .find(|(name, _)| name == "token")?
        .1
        .into_owned();
    Some((tokens, job_id, token))
}

/// The id a key's jobs are recorded under: enough of its SHA-256 to tell keys apart, too little
/// to matter if it leaks.
fn key_id(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `presented` is one of `keys`, in time that depends on neither the keys' lengths nor
/// which key matched: SHA-256 digests (all 32 bytes) are compared, every key is compared, and
/// the comparison has no early exit.
pub(super) fn key_matches(keys: &[String], presented: &str) -> bool {
    use sha2::{Digest, Sha256};
    let presented = Sha256::digest(presented.as_bytes());
    keys.iter().fold(false, |found, key| {
        let key = Sha256::digest(key.as_bytes());
        let diff = key
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        found | (diff == 0)
    })
}

/// Parses and validates a job request body.
/// The body of `POST /code` and `POST /jobs`: what [`parse_request`] reads, field by field, so
/// that each mistake gets its own error.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobBody {
    /// `https://github.com/OWNER/REPO` (a host in `ALLOWED_REPO_HOSTS`), or an absolute local path
    /// or `file://` URL where `ALLOW_LOCAL_REPOS` allows it.
    #[schema(example = "https://github.com/octo/hello")]
    pub repo_url: String,
    /// What to change, in plain language (up to 20,000 characters; tabs and line breaks only).
    #[schema(example = "Add a --version flag")]
    pub prompt: String,
    /// The branch to start from and open the pull request against (default: the repository's).
    #[serde(default)]
    pub base_branch: Option<String>,
    /// Open the pull request as a draft.
    #[serde(default)]
    pub draft: bool,
    /// The head branch to create (default: generated, unique per job); must not exist yet.
    #[serde(default)]
    pub branch: Option<String>,
}

fn parse_request(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<JobRequest, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than {} KiB",
                    super::MAX_BODY_BYTES / 1024
                ),
            )
        } else {
            ApiError::bad_request(
                "invalid_body",
                format!("the request body could not be read: {rejection}"),
            )
        }
    })?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let string = |name: &str, required: bool| -> Result<Option<String>, ApiError> {
        match fields.get(name) {
            None | Some(Value::Null) if required => Err(ApiError::bad_request(
                "missing_field",
                format!("`{name}` is required"),
            )),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad_request(
                "invalid_field",
                format!("`{name}` must be a string"),
            )),
        }
    };
    let repo_url = string("repoUrl", true)?.unwrap_or_default();
    let prompt = string("prompt", true)?.unwrap_or_default();
    let base_branch = string("baseBranch", false)?;
    let branch = string("branch", false)?;
    let draft = match fields.get("draft") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "`draft` must be true or false",
            ));
        }
    };
    validate(
        state,
        JobBody {
            repo_url,
            prompt,
            base_branch,
            draft,
            branch,
        },
    )
}

/// The rules a well-formed body must also follow, turned into the job to run.
fn validate(state: &AppState, body: JobBody) -> Result<JobRequest, ApiError> {
    let JobBody {
        repo_url,
        prompt,
        base_branch,
        draft,
        branch,
    } = body;
    let prompt = prompt.trim().to_owned();
    if prompt.is_empty() {
        return Err(ApiError::bad_request("empty_prompt", "`prompt` is empty"));
    }
    if let Some(c) = prompt
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::bad_request(
            "invalid_prompt",
            format!(
                "`prompt` holds a control character (U+{:04X}); only tabs and line breaks are allowed",
                c as u32
            ),
        ));
    }
    let chars = prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::bad_request(
            "prompt_too_long",
            format!("`prompt` has {chars} characters; the limit is {MAX_PROMPT_CHARS}"),
        ));
    }
    for (name, value) in [("baseBranch", &base_branch), ("branch", &branch)] {
        if let Some(v) = value
            && !valid_branch(v)
        {
            return Err(ApiError::bad_request(
                "invalid_branch",
                format!("`{name}` is not a valid git branch name"),
            ));
        }
    }
    // A relative path would resolve against the server's working directory, which is nothing the
    // client knows about: only absolute local paths are accepted over HTTP.
    if state.repo_policy.allow_local {
        let trimmed = repo_url.trim();
        let path = trimmed.strip_prefix("file://").unwrap_or(trimmed);
        let relative = !path.contains("://") && !path.starts_with('/');
        if relative
            && (trimmed.starts_with("file://")
                || path.starts_with('.')
                || std::path::Path::new(path).exists())
        {
            return Err(ApiError::bad_request(
                "invalid_repo_url",
                "a local repository must be given as an absolute path",
            ));
        }
    }
    let repo = state
        .repo_policy
        .parse(&repo_url)
        .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    Ok(JobRequest {
        repo,
        prompt,
        base_branch,
        draft,
        branch,
    })
}

/// git's branch name rules (`git check-ref-format --branch`), restricted to a safe alphabet.
pub fn valid_branch(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("/.")
        && name != "HEAD"
}

/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or("").trim();
    if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

fn store_error(err: &StoreError) -> ApiError {
    tracing::error!(error = %err, "the job store failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the job store is unavailable; try again shortly",
    )
}

async fn submit(
    state: &Arc<AppState>,
    caller: &Caller,
    request: JobRequest,
    headers: &HeaderMap,
) -> Result<JobHandle, ApiError> {
    let key = idempotency_key(headers)?;
    let owner = caller.key_id.clone();
    state
        .registry
        .submit_as(request, owner, key)
        .await
        .map_err(|err| match err {
            SubmitError::Busy { retry_after, .. } => ApiError {
                retry_after: Some(retry_after.as_secs()),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_jobs",
                    err.to_string(),
                )
            },
            SubmitError::KeyBusy { retry_after, .. } | SubmitError::KeyRate { retry_after, .. } => {
                ApiError {
                    retry_after: Some(retry_after.as_secs().max(1)),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "key_limit_reached",
                        err.to_string(),
                    )
                }
            }
            SubmitError::IdempotencyConflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                err.to_string(),
            ),
            SubmitError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                err.to_string(),
            ),
            SubmitError::Store(err) => store_error(&err),
        })
}

fn job_id_header(id: &str) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::HeaderName::from_static("x-job-id"),
        HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("")),
    )]
}

/// Marks the answer to a repeated `Idempotency-Key`.
fn replayed_header(job: &JobHandle) -> Option<[(header::HeaderName, HeaderValue); 1]> {
    job.replayed().then(|| {
        [(
            header::HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        )]
    })
}

/// Starts a job and streams its events (Server-Sent Events: one `id:` and one `data:` line per
/// event, each an `Event`) until `Done`.
#[utoipa::path(
    post,
    path = "/code",
    tag = "jobs",
    request_body = JobBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeating a request with the same key (and body) returns the job it started instead of a second one")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The job's events, from `Job Started` to `Done`", content_type = "text/event-stream", body = super::openapi::EventFrame,
            headers(("X-Job-Id" = String, description = "The job's id"), ("Idempotent-Replayed" = String, description = "`true` when an earlier request with this `Idempotency-Key` started the job"))),
        (status = 400, description = "A bad request: invalid JSON, a missing or invalid field, a repository that is not allowed", body = super::openapi::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = super::openapi::ErrorBody),
        (status = 413, description = "The body is too large", body = super::openapi::ErrorBody),
        (status = 415, description = "The body is not application/json", body = super::openapi::ErrorBody),
        (status = 429, description = "Too many jobs: the service's or this key's limit", body = super::openapi::ErrorBody),
        (status = 409, description = "This `Idempotency-Key` was used with a different body", body = super::openapi::ErrorBody),
        (status = 503, description = "The service is shutting down, or the job store is unavailable", body = super::openapi::ErrorBody)
    )
)]
pub async fn code(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = parse_request(&state, body)?;
    let job = submit(&state, &caller, request, &headers).await?;
    // The stream only reads the log: a client that goes away does not cancel the job.
    Ok((
        job_id_header(job.id()),
        replayed_header(&job),
        sse::stream(job.log(), 0, state.registry.stopped()),
    )
        .into_response())
}

/// Starts a job without streaming; follow it at `events_url`.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    request_body = JobBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeating a request with the same key (and body) returns the job it started instead of a second one")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 202, description = "The job was accepted", body = super::openapi::JobCreated,
            headers(("X-Job-Id" = String, description = "The job's id"), ("Idempotent-Replayed" = String, description = "`true` when an earlier request with this `Idempotency-Key` started the job"))),
        (status = 400, description = "A bad request: invalid JSON, a missing or invalid field, a repository that is not allowed", body = super::openapi::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = super::openapi::ErrorBody),
        (status = 413, description = "The body is too large", body = super::openapi::ErrorBody),
        (status = 415, description = "The body is not application/json", body = super::openapi::ErrorBody),
        (status = 429, description = "Too many jobs: the service's or this key's limit", body = super::openapi::ErrorBody),
        (status = 409, description = "This `Idempotency-Key` was used with a different body", body = super::openapi::ErrorBody),
        (status = 503, description = "The service is shutting down, or the job store is unavailable", body = super::openapi::ErrorBody)
    )
)]
pub async fn create_job(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = parse_request(&state, body)?;
    let job = submit(&state, &caller, request, &headers).await?;
    let id = job.id();
    Ok((
        StatusCode::ACCEPTED,
        job_id_header(id),
        replayed_header(&job),
        Json(json!({
            "job_id": id,
            "events_url": format!("/jobs/{id}/events"),
            "status_url": format!("/jobs/{id}"),
        })),
    )
        .into_response())
}

/// The job `id` names, if `caller` may see it: another key's job is as missing as one that never
/// existed. Ids are UUIDs, so their case does not matter.
async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    let not_found = || {
        ApiError::not_found(format!(
            "no job `{}`",
            id.chars().take(64).collect::<String>()
        ))
    };
    if id.len() > 64 {
        return Err(not_found());
    }
    state
        .registry
        .job(&id.to_ascii_lowercase())
        .await
        .map_err(|e| store_error(&e))?
        .filter(|job| caller.may_see(job.owner.as_deref()))
        .ok_or_else(not_found)
}

/// The job's state, folded from its events.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The job", body = crate::job::state::JobView)
    )
)]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::of(&find(&state, &caller, &id).await?)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only jobs in this state: `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[param(value_type = Option<JobState>)]
    state: Option<String>,
    /// Jobs per page, from 1 to 200 (50 by default).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// Jobs per page of `GET /jobs` unless `?limit=` says otherwise, and the most it may say.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 200;

/// Jobs newest first: the caller's own (every job for an admin key, or when the API is open).
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    params(ListParams),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "One page of jobs", body = super::openapi::JobList),
        (status = 400, description = "A bad `state`, `limit` or `cursor`", body = super::openapi::ErrorBody)
    )
)]
pub async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let job_state = match params.state.as_deref() {
        None | Some("") => None,
        Some(text) => Some(JobState::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_state",
                "`state` must be queued, running, succeeded, failed or cancelled",
            )
        })?),
    };
    let limit = match params.limit.as_deref() {
        None | Some("") => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("`limit` must be a whole number from 1 to {MAX_PAGE}"),
                )
            })?,
    };
    let before = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(decode_cursor(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "`cursor` must be a `next_cursor` from an earlier page",
            )
        })?),
    };
    let query = ListQuery {
        visible_to: if caller.admin {
            None
        } else {
            caller.key_id.clone()
        },
        state: job_state,
        before,
        limit: limit + 1,
    };
    let mut jobs = state
        .registry
        .list(&query)
        .await
        .map_err(|e| store_error(&e))?;
    let next_cursor = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| encode_cursor(j.created_at, &j.id))
    } else {
        None
    };
    let views: Vec<JobView> = jobs.iter().map(JobView::of).collect();
    Ok(Json(json!({"jobs": views, "next_cursor": next_cursor})))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this event id (as `Last-Event-ID`, for clients that cannot send headers).
    after: Option<String>,
}

/// The job's events from the resume point (`Last-Event-ID` or `after`), then live until `Done`.
#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
        ("token" = Option<String>, Query, description = "An events token from `POST /jobs/{id}/events-token`, in place of an API key (for `EventSource`)"),
        EventsQuery
    ),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The events after the resume point, then live ones until `Done`", content_type = "text/event-stream", body = super::openapi::EventFrame),
        (status = 204, description = "The job is over and nothing is left after the resume point"),
        (status = 400, description = "The resume point is not an event id", body = super::openapi::ErrorBody)
    )
)]
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller, &id).await?;
    let header_value = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").trim().to_owned());
    let after = match header_value.or(query.after) {
        None => 0,
        Some(raw) if raw.is_empty() => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID / after must be a non-negative integer event id",
            )
        })?,
    };
    // A finished job with nothing after the resume point answers at once; 204 is also what tells a
    // browser's EventSource to stop reconnecting after the stream it had ended with `Done`.
    if job.is_finished() && after >= job.last_seq {
        return Ok((StatusCode::NO_CONTENT, job_id_header(&job.id)).into_response());
    }
    let log = state.registry.log(&job.id);
    Ok((
        job_id_header(&job.id),
        sse::stream(&log, after, state.registry.stopped()),
    )
        .into_response())
}

/// `POST /jobs/{id}/events-token`: a short-lived token that lets `EventSource` (which cannot send
/// the key in a header) follow this one job's events (see `events_token`).
#[utoipa::path(
    post,
    path = "/jobs/{id}/events-token",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "A token for this job's events, valid for a few minutes", body = super::openapi::EventsToken),
        (status = 415, description = "The body is not application/json", body = super::openapi::ErrorBody)
    )
)]
pub async fn create_events_token(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(tokens): Extension<Arc<EventTokens>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller, &id).await?;
    let (token, expires_at) = tokens.mint(&job.id, &caller, std::time::SystemTime::now());
    Ok(Json(json!({
        "token": token,
        "expires_at": expires_at,
        "expires_in": events_token::TTL.as_secs(),
        "events_url": format!("/jobs/{}/events?token={token}", job.id),
    })))
}

/// The change as a unified diff (with binary patches), once the agent has finished.
#[utoipa::path(
    get,
    path = "/jobs/{id}/patch",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "The patch", content_type = "text/x-diff", body = String,
            headers(("X-Patch-Truncated" = Option<String>, description = "`true` when the patch was cut at 8 MiB"))),
        (status = 409, description = "The agent has not finished yet", body = super::openapi::ErrorBody)
    )
)]
pub async fn job_patch(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller, &id).await?;
    let patch = state
        .registry
        .patch(&job.id)
        .await
        .map_err(|e| store_error(&e))?;
    match patch {
        Some((patch, truncated)) => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/x-diff; charset=utf-8"),
                )],
                patch,
            )
                .into_response();
            if truncated {
                response
                    .headers_mut()
                    .insert("x-patch-truncated", HeaderValue::from_static("true"));
            }
            Ok(response)
        }
        None if job.is_finished() => Err(ApiError::not_found("this job produced no patch")),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "patch_not_ready",
            "the agent has not finished yet; the patch is available once the Diff event is sent",
        )),
    }
}

/// Cancels a running job: it stops at its next await point, cleans up its sandbox, and ends with
/// `Done{status:"cancelled"}`.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    security((), ("bearer" = []), ("api_key" = [])),
    responses(
        (status = 202, description = "The job is being cancelled", body = super::openapi::Cancelling),
        (status = 409, description = "The job has already finished", body = super::openapi::ErrorBody)
    )
)]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller, &id).await?;
    let finished = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            "the job has already finished",
        )
    };
    if job.is_finished() {
        return Err(finished());
    }
    match state.registry.cancel(&job.id).await {
        Ok(CancelOutcome::Cancelling) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"job_id": job.id, "state": "cancelling"})),
        )
            .into_response()),
        Ok(CancelOutcome::AlreadyFinished) => Err(finished()),
        Ok(CancelOutcome::NotFound) => Err(ApiError::not_found("no such job")),
        Err(err) => Err(store_error(&err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_match_by_digest() {
        let keys = vec!["svc-key-123456".to_owned(), "other".to_owned()];
        assert!(key_matches(&keys, "svc-key-123456"));
        assert!(key_matches(&keys, "other"));
        assert!(!key_matches(&keys, "svc-key-12345"));
        assert!(!key_matches(&keys, "svc-key-1234567"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "other"));
    }

    #[test]
    fn branch_rules() {
        for ok in ["main", "feature/x-1", "release-2.0", "tiny-backspace/a-b"] {
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in [
            "", "-x", "a..b", "a/", "x.lock", "a b", "a~1", "a:b", "/a", ".a", "a//b", "HEAD",
            "a/.b",
        ] {
            assert!(!valid_branch(bad), "{bad}");
        }
    }
}
