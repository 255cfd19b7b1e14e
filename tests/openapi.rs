//! `GET /openapi.json` against the live server: it names every route and each one answers; a
//! job's events match it, on the success path and the failure path; and schemathesis, from the
//! pinned venv, finds no server error and no response that the document does not describe.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::harness::{git, repo_with};
use support::python::python;
use support::serve::serve;

const APP: &str = "def greet(name):\n    return \"Hello \" + name\n";
const PROMPT: &str = "Replace \"Hello \" with \"Hi, \" in app.py";

async fn document(addr: &str) -> Value {
    let response = reqwest::get(format!("http://{addr}/openapi.json"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn the_document_names_every_route_and_each_one_answers() {
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[("WORKSPACE_DIR", workspaces.path().to_str().unwrap())]);
    let doc = document(&addr).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let routes: BTreeSet<&str> = [
        "/",
        "/assets/{name}",
        "/jobs/{id}/events-token",
        "/code",
        "/healthz",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/events",
        "/jobs/{id}/patch",
        "/metrics",
        "/openapi.json",
    ]
    .into();
    assert_eq!(paths, routes);
    // Each documented operation is routed: never the fallback's "no such route", never 405.
    let client = reqwest::Client::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let url = format!("http://{addr}{}", path.replace("{id}", "no-such-job"));
            let request = match method.as_str() {
                "get" => client.get(&url),
                "post" => client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body("{}"),
                "delete" => client.delete(&url),
                other => panic!("undocumented method {other}"),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path}");
            assert!(
                !body.contains("no such route"),
                "{method} {path} is documented but not routed"
            );
            let documented = item[method]["responses"]
                .as_object()
                .unwrap()
                .contains_key(&status.to_string());
            assert!(
                documented,
                "{method} {path} answered {status}, undocumented"
            );
        }
    }
    server.kill().unwrap();
}

/// The frames of a finished job's event stream.
async fn frames(addr: &str, id: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: Value = reqwest::get(format!("http://{addr}/jobs/{id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = reqwest::get(format!("http://{addr}/jobs/{id}/events"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap()
                    .to_owned()
            };
            json!({"id": field("id"), "data": field("data")})
        })
        .collect()
}

#[tokio::test]
async fn a_jobs_events_match_the_document() {
    let repo = repo_with(&[("app.py", APP)]);
    let empty = tempfile::tempdir().unwrap();
    git(empty.path(), &["init", "-q"]);
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", workspaces.path().to_str().unwrap()),
    ]);
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    for repo in [repo.path(), empty.path()] {
        let created: Value = client
            .post(format!("http://{addr}/jobs"))
            .json(&json!({"repoUrl": repo.to_str().unwrap(), "prompt": PROMPT}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all.extend(frames(&addr, created["job_id"].as_str().unwrap()).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("openapi.json");
    let frames_path = dir.path().join("frames.json");
    std::fs::write(&doc_path, document(&addr).await.to_string()).unwrap();
    std::fs::write(&frames_path, Value::Array(all).to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/openapi_events.py"
    );
    let out = std::process::Command::new(python())
        .args([
            script,
            doc_path.to_str().unwrap(),
            frames_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both paths were exercised: a Diff and a PR-less success, an Error and a failed Done.
    for kind in ["Job Started", "Status", "Diff", "Error", "Done"] {
        assert!(
            report.contains(kind),
            "no {kind} event was checked: {report}"
        );
    }
    server.kill().unwrap();
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_nothing_undocumented() {
    let workspaces = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(&[("WORKSPACE_DIR", workspaces.path().to_str().unwrap())]);
    let schemathesis = python().parent().unwrap().join("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run scripts/setup-python.sh",
        schemathesis.display()
    );
    // Its example database and reports go to a scratch directory, not the checkout.
    let scratch = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(schemathesis)
            .current_dir(scratch.path())
            .args([
                "run",
                &format!("http://{addr}/openapi.json"),
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
                "--max-examples",
                "25",
                "--seed",
                "7",
                "--request-timeout",
                "10",
            ])
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    server.kill().unwrap();
}
