//! What operators see, from the real binary: `/metrics` after jobs have run, who may read it, and
//! the trace of one job as an OTLP collector receives it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use support::harness::repo_with;
use support::serve::serve;

const APP: &str = "def greet(name):\n    return \"Hello \" + name\n";
const PROMPT: &str = "Replace \"Hello \" with \"Hi, \" in app.py";

/// Submits a job and waits for its end; returns its id and final state.
async fn run_job(addr: &str, repo: &str, key: Option<&str>) -> (String, String) {
    let client = reqwest::Client::new();
    let mut request = client
        .post(format!("http://{addr}/jobs"))
        .json(&json!({"repoUrl": repo, "prompt": PROMPT}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let created: Value = request.send().await.unwrap().json().await.unwrap();
    let id = created["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut status = client.get(format!("http://{addr}/jobs/{id}"));
        if let Some(key) = key {
            status = status.bearer_auth(key);
        }
        let job: Value = status.send().await.unwrap().json().await.unwrap();
        let state = job["state"].as_str().unwrap_or_default().to_owned();
        if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
            return (id, state);
        }
        assert!(Instant::now() < deadline, "the job did not end: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample line's value: `name{labels} value`, labels in any order.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let rest = rest.strip_suffix('}')?;
        let have: HashMap<&str, &str> = rest
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k, v.trim_matches('"')))
            })
            .collect();
        (have.len() == labels.len() && labels.iter().all(|(k, v)| have.get(k) == Some(v)))
            .then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn metrics_move_with_a_succeeded_and_a_failed_job() {
    let repo = repo_with(&[("app.py", APP)]);
    // No commit at all: the clone fails, and so does the job.
    let empty = tempfile::tempdir().unwrap();
    support::harness::git(empty.path(), &["init", "-q"]);
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", workspaces.path().to_str().unwrap()),
    ]);
    let ok = run_job(&addr, repo.path().to_str().unwrap(), None).await;
    let failed = run_job(&addr, empty.path().to_str().unwrap(), None).await;
    assert_eq!((ok.1.as_str(), failed.1.as_str()), ("succeeded", "failed"));

    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let expect = |name: &str, labels: &[(&str, &str)], value: f64| {
        assert_eq!(
            sample(&text, name, labels),
            Some(value),
            "{name}{labels:?} in:\n{text}"
        );
    };
    expect("tb_jobs_finished_total", &[("status", "succeeded")], 1.0);
    expect("tb_jobs_finished_total", &[("status", "failed")], 1.0);
    expect("tb_jobs_running", &[], 0.0);
    expect("tb_jobs_queued", &[], 0.0);
    // The empty repository is refused at its clone step; its sandbox step either finished first
    // or was skipped when the refusal came first (the two race by design).
    let sandbox = |state| {
        sample(
            &text,
            "tb_step_duration_seconds_count",
            &[("step", "sandbox"), ("state", state)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(sandbox("succeeded") + sandbox("skipped"), 2.0, "{text}");
    assert!(sandbox("succeeded") >= 1.0, "{text}");
    for (step, state, count) in [
        ("clone", "succeeded", 1.0),
        ("clone", "failed", 1.0),
        ("agent", "succeeded", 1.0),
        ("commit", "succeeded", 1.0),
        ("cleanup", "succeeded", 2.0),
    ] {
        expect(
            "tb_step_duration_seconds_count",
            &[("step", step), ("state", state)],
            count,
        );
    }
    let clone_seconds = sample(
        &text,
        "tb_step_duration_seconds_sum",
        &[("step", "clone"), ("state", "succeeded")],
    )
    .unwrap();
    assert!(clone_seconds > 0.0, "{text}");
    expect(
        "tb_step_duration_seconds_bucket",
        &[("step", "clone"), ("state", "succeeded"), ("le", "+Inf")],
        1.0,
    );
    // Both sandboxes were created and killed.
    expect("tb_sandboxes_live", &[("backend", "local")], 0.0);
    expect("tb_sandboxes_cleanup_pending", &[], 0.0);
    // The HTTP layer counted by route pattern, not by job id.
    expect(
        "tb_http_requests_total",
        &[("route", "/jobs"), ("method", "POST"), ("status", "202")],
        2.0,
    );
    assert!(
        sample(
            &text,
            "tb_http_requests_total",
            &[
                ("route", "/jobs/{id}"),
                ("method", "GET"),
                ("status", "200")
            ]
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );
    assert!(!text.contains(&ok.0), "a job id became a label:\n{text}");
    server.kill().unwrap();
}

#[tokio::test]
async fn metrics_need_the_metrics_token_or_an_api_key() {
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[
        ("WORKSPACE_DIR", workspaces.path().to_str().unwrap()),
        ("API_KEYS", "key-telemetry-0123456789"),
        ("METRICS_TOKEN", "scrape-token-0123456789"),
    ]);
    let client = reqwest::Client::new();
    let status = |token: Option<&'static str>| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            let mut request = client.get(format!("http://{addr}/metrics"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("wrong-token-0123456789")).await, 401);
    assert_eq!(status(Some("scrape-token-0123456789")).await, 200);
    assert_eq!(status(Some("key-telemetry-0123456789")).await, 200);
    // The token opens `/metrics` only.
    let jobs = client
        .get(format!("http://{addr}/jobs/x"))
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), 401);
    server.kill().unwrap();
}

/// Spans as an OTLP/HTTP JSON collector receives them.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

async fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap();
                let mut sink = sink.lock().unwrap();
                for resource in request["resourceSpans"].as_array().unwrap() {
                    for scope in resource["scopeSpans"].as_array().unwrap() {
                        for span in scope["spans"].as_array().unwrap() {
                            let attributes = span["attributes"]
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .map(|kv| {
                                            let value = &kv["value"];
                                            let text = value["stringValue"]
                                                .as_str()
                                                .map(str::to_owned)
                                                .unwrap_or_else(|| value.to_string());
                                            (kv["key"].as_str().unwrap().to_owned(), text)
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            sink.push(Span {
                                name: span["name"].as_str().unwrap().to_owned(),
                                trace: span["traceId"].as_str().unwrap().to_owned(),
                                id: span["spanId"].as_str().unwrap().to_owned(),
                                parent: span["parentSpanId"].as_str().unwrap_or("").to_owned(),
                                attributes,
                            });
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test]
async fn a_job_is_exported_as_one_trace_of_steps_and_calls() {
    let (endpoint, spans) = collector().await;
    let repo = repo_with(&[("app.py", APP)]);
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", workspaces.path().to_str().unwrap()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ]);
    let (job_id, state) = run_job(&addr, repo.path().to_str().unwrap(), None).await;
    assert_eq!(state, "succeeded");
    // A stopping server flushes what it has buffered.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let spans = spans.lock().unwrap().clone();
    let job = spans
        .iter()
        .find(|s| s.name == "job" && s.attributes.get("job_id") == Some(&job_id))
        .unwrap_or_else(|| panic!("no job span for {job_id} in {spans:#?}"));
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace == job.trace).collect();
    let steps: HashMap<&str, &Span> = in_trace
        .iter()
        .filter(|s| s.name == "step")
        .map(|s| (s.attributes["step"].as_str(), *s))
        .collect();
    for step in ["sandbox", "clone", "agent", "commit", "pr", "cleanup"] {
        let span = steps
            .get(step)
            .unwrap_or_else(|| panic!("no {step} step span in {in_trace:#?}"));
        assert_eq!(span.parent, job.id, "the {step} step is not under the job");
    }
    // The change is collected by a command in the sandbox, inside the commit step.
    let commit = steps["commit"];
    assert!(
        in_trace
            .iter()
            .any(|s| s.name == "sandbox.exec" && s.parent == commit.id),
        "no sandbox command under the commit step: {in_trace:#?}"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.trace == job.trace && s.name == "job" && s.id != job.id),
        "two job spans in one trace"
    );
}
