//! The HTTP contract (API.md §1–2), in-process with `oneshot`, plus real-socket SSE tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use support::harness::{Harness, HarnessOptions, Scripted, Step, repo_with};
use tiny_backspace::http::{AppState, router};
use tiny_backspace::job::Limits;
use tiny_backspace::repo::RepoPolicy;
use tower::ServiceExt;

struct Api {
    harness: Harness,
    app: axum::Router,
}

async fn api(options: HarnessOptions, api_keys: Vec<String>, allow_local: bool) -> Api {
    let harness = Harness::new(options).await;
    let state = Arc::new(AppState {
        registry: harness.registry.clone(),
        repo_policy: RepoPolicy {
            allow_local,
            ..RepoPolicy::default()
        },
        api_keys,
        admin_api_keys: vec![],
        allowed_hosts: vec![],
        cors_origins: vec![],
        metrics: Default::default(),
    });
    Api {
        app: router(state),
        harness,
    }
}

async fn send(
    app: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "error without message: {v}");
    v["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_input_rule_is_a_specific_4xx_and_creates_no_job() {
    let api = api(HarnessOptions::default(), vec![], false).await;
    let big_prompt = "x".repeat(20_001);
    let huge_body = format!(
        r#"{{"repoUrl":"https://github.com/a/b","prompt":"{}"}}"#,
        "y".repeat(70 * 1024)
    );
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("not json".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("[1,2]".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        (
            json!({"prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "missing_field",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b"}).to_string(),
            StatusCode::BAD_REQUEST,
            "missing_field",
        ),
        (
            json!({"repoUrl": 5, "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b", "prompt": "   "}).to_string(),
            StatusCode::BAD_REQUEST,
            "empty_prompt",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b", "prompt": big_prompt}).to_string(),
            StatusCode::BAD_REQUEST,
            "prompt_too_long",
        ),
        (
            json!({"repoUrl": "http://github.com/a/b", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_repo_url",
        ),
        (
            json!({"repoUrl": "https://u:p@github.com/a/b", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_repo_url",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b?x=1", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_repo_url",
        ),
        (
            json!({"repoUrl": "https://github.com/a/..", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_repo_url",
        ),
        (
            json!({"repoUrl": "https://169.254.169.254/a/b", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_repo_url",
        ),
        (
            json!({"repoUrl": "https://gitlab.com/a/b", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "repo_host_not_allowed",
        ),
        (
            json!({"repoUrl": "/etc", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "local_repos_disabled",
        ),
        (
            json!({"repoUrl": "file:///etc", "prompt": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "local_repos_disabled",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b", "prompt": "x", "draft": "yes"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b", "prompt": "x", "branch": "a..b"})
                .to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_branch",
        ),
        (
            json!({"repoUrl": "https://github.com/a/b", "prompt": "x", "baseBranch": "-x"})
                .to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_branch",
        ),
        (huge_body, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
    ];
    for route in ["/code", "/jobs"] {
        for (body, status, code) in &cases {
            let (got, _, bytes) = send(&api.app, post(route, body.clone())).await;
            assert_eq!(
                (got, error_code(&bytes)),
                (*status, code.to_string()),
                "{route} {}",
                &body[..body.len().min(80)]
            );
        }
    }
    assert_eq!(api.harness.registry.active().await, 0);
    assert_eq!(api.harness.live_workspaces(), 0);
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_a_job_is_created() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let api = api(HarnessOptions::default(), vec![], true).await;
    let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt", "extra": {"x": 1}});
    let (status, headers, bytes) = send(&api.app, post("/jobs", body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let id = v["job_id"].as_str().unwrap();
    assert_eq!(headers["x-job-id"], id);
    assert_eq!(v["events_url"], format!("/jobs/{id}/events"));
    assert_eq!(v["status_url"], format!("/jobs/{id}"));
    let job = api.harness.registry.handle(id).await.unwrap().unwrap();
    support::harness::events_of(&job).await;
    let (status, _, bytes) = send(
        &api.app,
        Request::get(format!("/jobs/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let view: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(view["state"], "succeeded");
    assert_eq!(
        view["files"],
        json!([{"path": "a.txt", "status": "modified", "additions": 1, "deletions": 0}])
    );
    assert!(
        view["branch"]
            .as_str()
            .unwrap()
            .starts_with("tiny-backspace/append-b-to-a-txt-")
    );
    let (status, headers, patch) = send(
        &api.app,
        Request::get(format!("/jobs/{id}/patch"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/x-diff")
    );
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("diff --git a/a.txt b/a.txt") && patch.contains("+b"),
        "{patch}"
    );
}

#[tokio::test]
async fn api_keys_are_required_on_every_route_but_healthz() {
    let api = api(
        HarnessOptions::default(),
        vec!["key-one-123456".into(), "key-two-654321".into()],
        false,
    )
    .await;
    let (status, _, body) = send(
        &api.app,
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut health = serde_json::from_slice::<Value>(&body).unwrap();
    // The level and the limits' enforcement are this host's; the rest is fixed.
    let isolation = health["isolation"].take();
    assert!(
        ["namespaces", "landlock"].contains(&isolation.as_str().unwrap()),
        "{isolation}"
    );
    let limits = health["limits"].take();
    assert!(
        ["cgroup2", "cgroup1", "rlimits"].contains(&limits.as_str().unwrap()),
        "{limits}"
    );
    assert_eq!(
        health,
        json!({"status": "ok", "store": "sqlite", "sandbox": "local", "isolation": null, "limits": null, "agents": ["dummy"], "forge": "none", "cleanup_pending": 0, "auth": true})
    );
    let body = json!({"repoUrl": "https://github.com/a/b", "prompt": "x"}).to_string();
    for request in [
        post("/code", body.clone()),
        post("/jobs", body.clone()),
        Request::get("/jobs/x").body(Body::empty()).unwrap(),
        Request::get("/jobs").body(Body::empty()).unwrap(),
        Request::get("/jobs/x/events").body(Body::empty()).unwrap(),
        Request::get("/jobs/x/patch").body(Body::empty()).unwrap(),
        Request::delete("/jobs/x").body(Body::empty()).unwrap(),
        post("/jobs/x/events-token", "{}"),
        Request::get("/jobs/x")
            .header("authorization", "Bearer wrong-key-000")
            .body(Body::empty())
            .unwrap(),
    ] {
        let (status, headers, bytes) = send(&api.app, request).await;
        assert_eq!(
            (status, error_code(&bytes)),
            (StatusCode::UNAUTHORIZED, "unauthorized".to_string())
        );
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    for (name, value) in [
        ("authorization", "Bearer key-two-654321"),
        ("x-api-key", "key-one-123456"),
    ] {
        let request = Request::get("/jobs/nope")
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        let (status, _, bytes) = send(&api.app, request).await;
        assert_eq!(
            (status, error_code(&bytes)),
            (StatusCode::NOT_FOUND, "not_found".to_string())
        );
    }
    assert_eq!(api.harness.registry.active().await, 0);
}

#[tokio::test]
async fn a_full_service_answers_429_with_retry_after() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let hang = Scripted::new("hang", vec![Step::Hang, Step::Hang]);
    let api = api(
        HarnessOptions {
            agents: vec![hang],
            limits: Limits {
                max_concurrent: 1,
                max_queued: 1,
                ..Limits::default()
            },
            ..HarnessOptions::default()
        },
        vec![],
        true,
    )
    .await;
    let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "x"}).to_string();
    let (first, _, _) = send(&api.app, post("/jobs", body.clone())).await;
    let (second, _, second_body) = send(&api.app, post("/jobs", body.clone())).await;
    assert_eq!(
        (first, second),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    let (third, headers, bytes) = send(&api.app, post("/jobs", body.clone())).await;
    assert_eq!(
        (third, error_code(&bytes)),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs".to_string())
    );
    assert!(
        headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    // The queued job waits its turn.
    let queued_id = serde_json::from_slice::<Value>(&second_body).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, _, view) = send(
        &api.app,
        Request::get(format!("/jobs/{queued_id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&view).unwrap()["state"],
        "queued"
    );
    // What `/metrics` shows as `tb_jobs_running` and `tb_jobs_queued`: one of each, once the
    // first job has been claimed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let load = api.harness.registry.load().await;
        if (load.running, load.queued) == (1, 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{load:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.harness.registry.shutdown(Duration::from_secs(30)).await;
    let left: Vec<_> = std::fs::read_dir(api.harness.workspaces.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(api.harness.live_workspaces(), 0, "{left:?}");
}

#[tokio::test]
async fn unknown_routes_jobs_and_methods_get_json_errors() {
    let api = api(HarnessOptions::default(), vec![], false).await;
    let cases = [
        (
            Request::get("/nope").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::get("/jobs/unknown").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::get("/jobs/unknown/events")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::delete("/jobs/unknown")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::get("/code").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        // A repeated query parameter is the API's JSON error too, not axum's plain text.
        (
            Request::get("/jobs?state=queued&state=failed")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Request::get("/jobs/unknown/events?after=1&after=2")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ];
    for (request, status, code) in cases {
        let (got, _, bytes) = send(&api.app, request).await;
        assert_eq!((got, error_code(&bytes)), (status, code.to_string()));
    }
}

/// Reads raw SSE bytes from a real socket until `Done`.
async fn raw_sse(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains("\"type\":\"Done\"") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("stream ended in time");
    String::from_utf8(out).unwrap()
}

/// Removes HTTP/1.1 chunked framing from a response body.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            out.push_str(&tail[..tail.len().min(size)]);
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::test]
async fn sse_framing_is_exact_and_replay_starts_after_last_event_id() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let api = api(HarnessOptions::default(), vec![], true).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = api.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let body =
        json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"})
            .to_string();
    let raw = raw_sse(
        addr,
        &format!("POST /code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    )
    .await;
    let (head, chunked) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let job_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-job-id: "))
        .expect("X-Job-Id")
        .trim()
        .to_owned();
    let stream = dechunk(chunked);
    let job = api.harness.registry.handle(&job_id).await.unwrap().unwrap();
    let log: Vec<_> = futures::StreamExt::collect(job.log().follow(0)).await;
    // The stream is exactly the log, one `id:` + one `data:` line per event, no `event:` line.
    let expected: String = log.iter().map(tiny_backspace::http::sse_frame).collect();
    assert_eq!(stream, expected);
    let first: Value = serde_json::from_str(
        stream
            .lines()
            .nth(1)
            .unwrap()
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["type"], "Job Started");
    assert_eq!(first["job_id"], job_id.as_str());
    assert!(first["timestamp"].as_u64().unwrap() > 1_700_000_000_000);

    // Reconnect with Last-Event-ID: 3 → starts at id 4.
    let replay = dechunk(
        raw_sse(addr, &format!("GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 3\r\nConnection: close\r\n\r\n"))
            .await
            .split_once("\r\n\r\n")
            .unwrap()
            .1,
    );
    let expected: String = log
        .iter()
        .skip(3)
        .map(tiny_backspace::http::sse_frame)
        .collect();
    assert!(replay.starts_with("id: 4\n"), "{replay}");
    assert_eq!(replay, expected);
    // ?after=N does the same for clients that cannot set headers.
    let after = dechunk(
        raw_sse(
            addr,
            &format!(
                "GET /jobs/{job_id}/events?after=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            ),
        )
        .await
        .split_once("\r\n\r\n")
        .unwrap()
        .1,
    );
    assert!(after.starts_with("id: 6\n"), "{after}");
}

#[tokio::test]
async fn a_disconnected_client_does_not_cancel_and_delete_does() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let slow = Scripted::new("slow", vec![Step::Hang]);
    let api = api(
        HarnessOptions {
            agents: vec![slow],
            ..HarnessOptions::default()
        },
        vec![],
        true,
    )
    .await;
    let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "x"}).to_string();
    // Start streaming, then drop the response (the client goes away).
    let response = api.app.clone().oneshot(post("/code", body)).await.unwrap();
    let id = response.headers()["x-job-id"].to_str().unwrap().to_owned();
    drop(response);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = api.harness.registry.handle(&id).await.unwrap().unwrap();
    assert!(
        !job.record().await.unwrap().is_finished(),
        "the job must keep running without its client"
    );
    let (status, _, bytes) = send(
        &api.app,
        Request::delete(format!("/jobs/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let events = support::harness::events_of(&job).await;
    let done = support::harness::done(&events);
    assert_eq!(done["status"], "cancelled");
    assert_eq!(
        api.harness.live_workspaces(),
        0,
        "the sandbox was cleaned up"
    );
    let (status, _, bytes) = send(
        &api.app,
        Request::delete(format!("/jobs/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::CONFLICT, "job_finished".to_string())
    );
    let (status, _, bytes) = send(
        &api.app,
        Request::get(format!("/jobs/{id}/events"))
            .header("last-event-id", "x")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::BAD_REQUEST, "invalid_last_event_id".to_string())
    );
}

/// A browser's EventSource reconnects after the server ends the stream, sending the `Done`
/// event's id: a finished job with nothing more to send answers 204 at once (which stops the
/// reconnecting), instead of an endless keep-alive stream.
#[tokio::test]
async fn a_finished_job_with_nothing_after_the_resume_point_answers_204() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let api = api(HarnessOptions::default(), vec![], true).await;
    let job = api
        .harness
        .submit(repo.path(), "append \"b\" to a.txt")
        .await;
    let id = job.id().to_owned();
    let last = support::harness::events_of(&job).await.len() as u64;
    let events_request = |header: Option<u64>, query: Option<u64>| {
        let uri = match query {
            Some(n) => format!("/jobs/{id}/events?after={n}"),
            None => format!("/jobs/{id}/events"),
        };
        let mut request = Request::get(uri);
        if let Some(n) = header {
            request = request.header("last-event-id", n.to_string());
        }
        request.body(Body::empty()).unwrap()
    };
    for (header, query) in [
        (Some(last), None),
        (None, Some(last)),
        (None, Some(last + 10)),
        (Some(last + 1), None),
    ] {
        let (status, headers, body) = send(&api.app, events_request(header, query)).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{header:?} {query:?}");
        assert_eq!(headers["x-job-id"], id.as_str());
        assert!(body.is_empty());
    }
    // One event short of the end still replays that last event, then ends.
    let (status, _, body) = send(&api.app, events_request(Some(last - 1), None)).await;
    assert_eq!(status, StatusCode::OK);
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with(&format!("id: {last}\n")), "{body}");
    assert!(body.contains(r#""type":"Done""#), "{body}");
}

fn state_with(
    harness: &Harness,
    api_keys: Vec<String>,
    admin_api_keys: Vec<String>,
    allowed_hosts: Vec<String>,
) -> axum::Router {
    router(Arc::new(AppState {
        registry: harness.registry.clone(),
        repo_policy: RepoPolicy {
            allow_local: true,
            ..RepoPolicy::default()
        },
        api_keys,
        admin_api_keys,
        allowed_hosts,
        cors_origins: vec!["https://app.example.com".into()],
        metrics: Default::default(),
    }))
}

/// What a page on another site can send without a preflight (`text/plain`, a form) is refused, as
/// is a request whose `Host` is not this service (DNS rebinding) or whose `Origin` is foreign.
#[tokio::test]
async fn cross_site_requests_are_refused() {
    let harness = Harness::new(HarnessOptions::default()).await;
    let app = state_with(&harness, vec![], vec![], vec!["localhost".into()]);
    let body = json!({"repoUrl": "https://github.com/a/b", "prompt": "x"}).to_string();
    let with = |method: &str, uri: &str, headers: &[(&str, &str)], body: &str| {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    };
    let cases = [
        (
            with(
                "POST",
                "/jobs",
                &[("host", "localhost:8000"), ("content-type", "text/plain")],
                &body,
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            with(
                "POST",
                "/jobs",
                &[
                    ("host", "localhost:8000"),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                "repoUrl=x&prompt=y",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            with("POST", "/jobs", &[("host", "localhost:8000")], &body),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            with(
                "GET",
                "/jobs/x",
                &[("host", "rebound.attacker.example:8000")],
                "",
            ),
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
        ),
        (
            with(
                "POST",
                "/jobs",
                &[
                    ("host", "localhost:8000"),
                    ("content-type", "application/json"),
                    ("origin", "https://evil.example"),
                ],
                &body,
            ),
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
        (
            with(
                "DELETE",
                "/jobs/x",
                &[("host", "localhost:8000"), ("origin", "null")],
                "",
            ),
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
    ];
    for (request, status, code) in cases {
        let (got, _, bytes) = send(&app, request).await;
        assert_eq!((got, error_code(&bytes)), (status, code.to_owned()));
    }
    assert_eq!(harness.registry.active().await, 0);
    // The service's own origin, a configured origin and an allowed Host pass.
    for origin in ["http://localhost:8000", "https://app.example.com"] {
        let request = with(
            "POST",
            "/jobs",
            &[
                ("host", "localhost:8000"),
                ("content-type", "application/json; charset=utf-8"),
                ("origin", origin),
            ],
            &json!({"repoUrl": "https://github.com/a/b", "prompt": "x"}).to_string(),
        );
        let (status, _, bytes) = send(&app, request).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{origin}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

/// With keys, a job belongs to the key that created it: another key gets 404 for it on every
/// route; an admin key sees and cancels it. The scheme is case-insensitive and so is the id.
#[tokio::test]
async fn each_key_sees_only_its_own_jobs() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let harness = Harness::new(HarnessOptions::default()).await;
    let app = state_with(
        &harness,
        vec![
            "key-a-111111".into(),
            "key-b-222222".into(),
            "admin-333333".into(),
        ],
        vec!["admin-333333".into()],
        vec![],
    );
    let request = Request::post("/jobs")
        .header("authorization", "BEARER key-a-111111")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"})
                .to_string(),
        ))
        .unwrap();
    let (status, _, bytes) = send(&app, request).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let id = serde_json::from_slice::<Value>(&bytes).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = harness.registry.handle(&id).await.unwrap().unwrap();
    support::harness::events_of(&job).await;
    let as_key = |key: &str, method: &str, path: String| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap()
    };
    for path in [
        format!("/jobs/{id}"),
        format!("/jobs/{id}/events"),
        format!("/jobs/{id}/patch"),
    ] {
        let (status, _, bytes) = send(&app, as_key("key-b-222222", "GET", path.clone())).await;
        assert_eq!(
            (status, error_code(&bytes)),
            (StatusCode::NOT_FOUND, "not_found".into()),
            "{path}"
        );
        let (status, _, _) = send(&app, as_key("key-a-111111", "GET", path.clone())).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let (status, _, _) = send(&app, as_key("admin-333333", "GET", path)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(
        &app,
        as_key("key-b-222222", "DELETE", format!("/jobs/{id}")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Ids are UUIDs: their case does not matter.
    let (status, _, _) = send(
        &app,
        as_key(
            "key-a-111111",
            "GET",
            format!("/jobs/{}", id.to_ascii_uppercase()),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// A control character in the prompt is refused up front; a configured key pasted into the prompt
/// never shows in `GET /jobs/{id}` (nor reaches the model).
#[tokio::test]
async fn prompts_are_checked_and_scrubbed_of_keys() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let harness = Harness::new(HarnessOptions {
        secrets: vec!["key-a-111111".into()],
        ..HarnessOptions::default()
    })
    .await;
    let app = state_with(&harness, vec!["key-a-111111".into()], vec![], vec![]);
    let submit = |prompt: &str| {
        Request::post("/jobs")
            .header("x-api-key", "key-a-111111")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"repoUrl": repo.path().display().to_string(), "prompt": prompt}).to_string(),
            ))
            .unwrap()
    };
    let (status, _, bytes) = send(&app, submit("append \"b\u{0}\" to a.txt")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::BAD_REQUEST, "invalid_prompt".into())
    );
    // Relative local paths would resolve against the server's directory: refused.
    for relative in [".", "./repo", "file://repo", "src"] {
        let request = Request::post("/jobs")
            .header("x-api-key", "key-a-111111")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"repoUrl": relative, "prompt": "x"}).to_string(),
            ))
            .unwrap();
        let (status, _, bytes) = send(&app, request).await;
        assert_eq!(
            (status, error_code(&bytes)),
            (StatusCode::BAD_REQUEST, "invalid_repo_url".into()),
            "{relative}"
        );
    }
    let (status, _, bytes) = send(
        &app,
        submit("append \"b\" to a.txt; my key is key-a-111111"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = serde_json::from_slice::<Value>(&bytes).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, _, bytes) = send(
        &app,
        Request::get(format!("/jobs/{id}"))
            .header("x-api-key", "key-a-111111")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let view: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        view["prompt"],
        "append \"b\" to a.txt; my key is [REDACTED]"
    );
}

/// Serves `app` with `limits` on a real socket; the returned sender shuts it down and the handle
/// ends when `serve` has returned.
async fn edge_server(
    app: axum::Router,
    limits: tiny_backspace::http::EdgeLimits,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tiny_backspace::http::serve(listener, app, limits, async {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server)
}

/// Reads until the server closes the connection; returns what it sent and how long that took.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was not closed"),
        }
    }
    (
        String::from_utf8_lossy(&seen).into_owned(),
        started.elapsed(),
    )
}

/// A client that never finishes its headers, or that goes quiet after a request, loses its
/// connection at the configured timeouts; beyond the connection limit a new connection is closed
/// at once and the service keeps answering the others.
#[tokio::test]
async fn slow_quiet_and_excess_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let api = api(HarnessOptions::default(), vec![], false).await;
    let limits = tiny_backspace::http::EdgeLimits {
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        max_connections: 3,
        shutdown_grace: Duration::from_secs(1),
    };
    let (addr, stop, server) = edge_server(api.app.clone(), limits).await;

    // Headers trickled a byte at a time (so the connection is never idle) still end at the
    // header timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        let started = std::time::Instant::now();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X").await.is_err() {
                break;
            }
        }
        started.elapsed()
    });
    let took = trickle.await.unwrap();
    assert!(
        took < Duration::from_secs(4),
        "slow header held for {took:?}"
    );

    // So does a body trickled a byte at a time: the request is refused once the time is up.
    let mut trickled = tokio::net::TcpStream::connect(addr).await.unwrap();
    trickled
        .write_all(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = trickled.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // Read the whole JSON error (it ends with `}}`), or until the connection ends.
    while !String::from_utf8_lossy(&answer).ends_with("}}") {
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut reader, &mut buf),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    trickle.abort();

    // A keep-alive connection that sends no next request is closed too.
    let mut quiet = tokio::net::TcpStream::connect(addr).await.unwrap();
    quiet
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut quiet).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_secs(4),
        "quiet connection closed after {took:?}"
    );

    // Idle connections (connected, nothing sent) far beyond the limit cannot lock the service
    // out: each new arrival closes the quietest one, and a health check is answered at once.
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let mut health = tokio::net::TcpStream::connect(addr).await.unwrap();
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut health).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // All but the newest `max_connections - 1` idle ones were closed to make room.
    let mut closed = 0;
    for mut s in idle {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert!(closed >= 28, "{closed} of 30 idle connections closed");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns")
        .unwrap();
}

/// Shutdown always ends: a partial-header connection and an event stream whose job never ends
/// are dropped after the grace, and `serve` returns.
#[tokio::test]
async fn shutdown_ends_within_the_grace_whatever_is_open() {
    use tokio::io::AsyncWriteExt;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let model = Scripted::new("model", vec![Step::Hang]);
    let api = api(
        HarnessOptions {
            agents: vec![model],
            ..HarnessOptions::default()
        },
        vec![],
        true,
    )
    .await;
    let limits = tiny_backspace::http::EdgeLimits {
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        max_connections: 16,
        shutdown_grace: Duration::from_secs(1),
    };
    let (addr, stop, server) = edge_server(api.app.clone(), limits).await;
    let job = api.harness.submit(repo.path(), "anything").await;
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET /jobs/{}/events HTTP/1.1\r\nHost: x\r\n\r\n", job.id()).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns within the grace")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (_, took) = read_until_closed(&mut stream).await;
    assert!(took < Duration::from_secs(2));
    job.cancel().await.unwrap();
}

/// One key cannot fill the queue for everyone: over its job limit or its rate it gets 429 with a
/// `Retry-After`, while another key is still served.
#[tokio::test]
async fn a_key_over_its_limits_gets_429_while_others_are_served() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let model = Scripted::new("model", vec![Step::Hang, Step::Hang, Step::Hang]);
    let harness = Harness::new(HarnessOptions {
        agents: vec![model],
        limits: Limits {
            max_jobs_per_key: Some(1),
            key_rate_per_min: Some(2),
            ..Limits::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let app = state_with(
        &harness,
        vec!["key-a-111111".into(), "key-b-222222".into()],
        vec![],
        vec![],
    );
    let submit = |key: &str| {
        Request::post("/jobs")
            .header("x-api-key", key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"repoUrl": repo.path().display().to_string(), "prompt": "x"}).to_string(),
            ))
            .unwrap()
    };
    let accepted = |bytes: Vec<u8>| {
        let id = serde_json::from_slice::<Value>(&bytes).unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let registry = harness.registry.clone();
        async move { registry.handle(&id).await.unwrap().unwrap() }
    };
    let (status, _, bytes) = send(&app, submit("key-a-111111")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let first = accepted(bytes).await;
    // A second job while the first runs: over MAX_JOBS_PER_KEY.
    let (status, headers, bytes) = send(&app, submit("key-a-111111")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::TOO_MANY_REQUESTS, "key_limit_reached".into())
    );
    assert!(headers.contains_key(header::RETRY_AFTER));
    // Another key is served meanwhile.
    let (status, _, _) = send(&app, submit("key-b-222222")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Once the first job ends, key A may submit again, until its rate (2 accepted a minute)
    // runs out.
    first.cancel().await.unwrap();
    support::harness::events_of(&first).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, bytes) = send(&app, submit("key-a-111111")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let second = accepted(bytes).await;
    second.cancel().await.unwrap();
    support::harness::events_of(&second).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        harness.registry.active().await,
        1,
        "only key B's job is left"
    );
    let (status, headers, bytes) = send(&app, submit("key-a-111111")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::TOO_MANY_REQUESTS, "key_limit_reached".into())
    );
    assert!(String::from_utf8_lossy(&bytes).contains("KEY_RATE_PER_MIN"));
    let wait: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&wait), "{wait}");
    harness.registry.shutdown(Duration::from_secs(30)).await;
}

/// The HTTP layer's own refusals (too many or too large headers, a too long URI) have the JSON
/// error shape too.
#[tokio::test]
async fn oversized_request_heads_get_json_errors() {
    use tokio::io::AsyncWriteExt;
    let api = api(HarnessOptions::default(), vec![], false).await;
    let (addr, stop, _server) =
        edge_server(api.app.clone(), tiny_backspace::http::EdgeLimits::default()).await;
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let large = format!("X-Large: {}\r\n", "v".repeat(40 * 1024));
    let long_uri = format!("/jobs/{}", "a".repeat(10 * 1024));
    for (request, status, code) in [
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"),
            "431",
            "headers_too_large",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{large}Connection: close\r\n\r\n"),
            "431",
            "headers_too_large",
        ),
        (
            format!("GET {long_uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            "414",
            "uri_too_long",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let (answer, _) = read_until_closed(&mut stream).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(error_code(body.as_bytes()), code);
    }
    let _ = stop.send(());
}

/// `EventSource` cannot send a key: `POST /jobs/{id}/events-token` (with the key) answers a
/// short-lived token that opens that one job's event stream, and no other route or job.
#[tokio::test]
async fn an_events_token_opens_one_jobs_events_and_nothing_else() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let harness = Harness::new(HarnessOptions::default()).await;
    let app = state_with(
        &harness,
        vec!["key-a-111111".into(), "key-b-222222".into()],
        vec![],
        vec![],
    );
    let start = |key: &'static str| {
        let app = app.clone();
        let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"});
        async move {
            let request = Request::post("/jobs")
                .header("x-api-key", key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let (status, _, bytes) = send(&app, request).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            serde_json::from_slice::<Value>(&bytes).unwrap()["job_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let (mine, other, theirs) = (
        start("key-a-111111").await,
        start("key-a-111111").await,
        start("key-b-222222").await,
    );
    for id in [&mine, &other, &theirs] {
        support::harness::events_of(&harness.registry.handle(id).await.unwrap().unwrap()).await;
    }
    let mint = |key: Option<&str>, id: &str| {
        let mut request = Request::post(format!("/jobs/{id}/events-token"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        request.body(Body::from("{}")).unwrap()
    };
    let (status, _, bytes) = send(&app, mint(Some("key-a-111111"), &mine)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let grant: Value = serde_json::from_slice(&bytes).unwrap();
    let token = grant["token"].as_str().unwrap().to_owned();
    assert!(!token.contains("key-a"), "{token}");
    assert_eq!(grant["expires_in"], 300);
    assert_eq!(
        grant["events_url"],
        format!("/jobs/{mine}/events?token={token}")
    );

    // The token alone opens the job's stream, from the start or after an id.
    let get = |uri: String| Request::get(uri).body(Body::empty()).unwrap();
    let (status, headers, bytes) =
        send(&app, get(format!("/jobs/{mine}/events?token={token}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let stream = String::from_utf8(bytes).unwrap();
    assert!(stream.starts_with("id: 1\n"), "{stream}");
    assert!(stream.contains(r#""type":"Done""#), "{stream}");
    let (status, _, bytes) = send(
        &app,
        Request::get(format!(
            "/jobs/{}/events?token={token}",
            mine.to_ascii_uppercase()
        ))
        .header("last-event-id", "2")
        .body(Body::empty())
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8(bytes).unwrap().starts_with("id: 3\n"));

    // Not another job's stream, not another route, not an altered token, not without one.
    for uri in [
        format!("/jobs/{other}/events?token={token}"),
        format!("/jobs/{theirs}/events?token={token}"),
        format!("/jobs/{mine}?token={token}"),
        format!("/jobs/{mine}/patch?token={token}"),
        format!("/jobs/{mine}/events?token={token}A"),
        format!("/jobs/{mine}/events?token="),
        format!("/jobs/{mine}/events"),
    ] {
        let (status, _, bytes) = send(&app, get(uri.clone())).await;
        assert_eq!(
            (status, error_code(&bytes)),
            (StatusCode::UNAUTHORIZED, "unauthorized".to_owned()),
            "{uri}"
        );
    }
    let (status, _, _) = send(
        &app,
        Request::delete(format!("/jobs/{mine}?token={token}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Minting needs the key, a job the key may see, and a JSON request like every POST.
    let (status, _, _) = send(&app, mint(None, &mine)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, bytes) = send(&app, mint(Some("key-b-222222"), &mine)).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::NOT_FOUND, "not_found".to_owned())
    );
    let (status, _, bytes) = send(
        &app,
        Request::post(format!("/jobs/{mine}/events-token"))
            .header("x-api-key", "key-a-111111")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error_code(&bytes)),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type".to_owned()
        )
    );
    // Key b's own token opens key b's job.
    let (_, _, bytes) = send(&app, mint(Some("key-b-222222"), &theirs)).await;
    let theirs_url = serde_json::from_slice::<Value>(&bytes).unwrap()["events_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, _) = send(&app, get(theirs_url)).await;
    assert_eq!(status, StatusCode::OK);
}

/// `GET /` is the web page: served without a key even when keys are required (it asks for one),
/// under a strict Content-Security-Policy, from files embedded in the binary, and only to the
/// `Host` names the service answers.
#[tokio::test]
async fn the_web_page_needs_no_key_and_is_served_under_a_strict_policy() {
    let harness = Harness::new(HarnessOptions::default()).await;
    let app = state_with(&harness, vec!["key-a-111111".into()], vec![], vec![]);
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    let (status, headers, bytes) = send(&app, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self';",
        "style-src 'self';",
        "connect-src 'self';",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    let html = String::from_utf8(bytes).unwrap();
    assert!(html.contains(r#"<script type="module" src="/assets/app.js"></script>"#));
    assert!(html.contains(r#"<label for="api-key">API key</label>"#));
    for (path, kind) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/stream.js", "text/javascript; charset=utf-8"),
        ("/assets/style.css", "text/css; charset=utf-8"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let (status, headers, bytes) = send(&app, get(path)).await;
        assert_eq!(
            (status, &headers[header::CONTENT_TYPE]),
            (StatusCode::OK, &kind.parse().unwrap()),
            "{path}"
        );
        assert!(!bytes.is_empty());
        assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));
    }
    let (status, _, bytes) = send(&app, get("/assets/missing.js")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (StatusCode::NOT_FOUND, "not_found".to_owned())
    );
    let (status, _, bytes) = send(&app, post("/", "{}")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed".to_owned()
        )
    );

    // With no key configured, the page meets the Host rule like every route, and /healthz says
    // no key is needed.
    let open = state_with(&harness, vec![], vec![], vec!["localhost".into()]);
    let with_host = |host: &str| {
        Request::get("/")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, bytes) = send(&open, with_host("rebound.example")).await;
    assert_eq!(
        (status, error_code(&bytes)),
        (
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed".to_owned()
        )
    );
    let (status, _, _) = send(&open, with_host("localhost:8000")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, bytes) = send(&open, get("/healthz")).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).unwrap()["auth"],
        false
    );
}
