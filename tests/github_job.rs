#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Whole jobs publishing through the `github` forge to the fake GitHub: local sandbox, the dummy
//! or a scripted agent, the fake's bare repository as the clone source. The branch is checked with
//! real git against the sandbox's own diff, and the token (a canary) appears only in the
//! Authorization header: never in an event, a request body, or the pull request.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pretty_assertions::assert_eq;
use serde_json::json;
use support::fake_github::{FakeGithub, Fault, SeedFile};
use support::harness::{self, Harness, HarnessOptions, Scripted, Step, call};
use tiny_backspace::event::{Event, EventKind};
use tiny_backspace::forge::Forge;
use tiny_backspace::forge::github::{GithubConfig, GithubForge};
use tiny_backspace::job::JobRequest;
use tiny_backspace::repo::RepoRef;
use tiny_backspace::retry::RetryPolicy;

const CANARY: &str = "ghp_JOBCANARY_5a4b3c2d1e0f99887766";

fn git(dir: &Path, args: &[&str]) -> String {
    harness::git(dir, args)
}

async fn fake_with_repo() -> (FakeGithub, String) {
    let fake = FakeGithub::start_at("/api/v3").await;
    fake.add_user(CANARY, "alice");
    let base = fake.create_repo(
        "alice",
        "widgets",
        &[
            SeedFile::text("README.md", "# Widgets\n\nWidgets are great.\n"),
            SeedFile::text("old.txt", "to be deleted\n"),
            SeedFile::text("run.sh", "#!/bin/sh\necho hi\n"),
        ],
    );
    (fake, base)
}

async fn harness(
    fake: &FakeGithub,
    agents: Option<Vec<Arc<dyn tiny_backspace::agent::Provider>>>,
) -> Harness {
    harness_with(fake, agents, HarnessOptions::default().job_timeout).await
}

async fn harness_with(
    fake: &FakeGithub,
    agents: Option<Vec<Arc<dyn tiny_backspace::agent::Provider>>>,
    job_timeout: Duration,
) -> Harness {
    let forge = GithubForge::new(GithubConfig {
        token: CANARY.into(),
        api_url: fake.api_url(),
    })
    .unwrap()
    .with_retry_policy(RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..tiny_backspace::forge::github::default_retry()
    })
    .with_step_deadline(Duration::from_millis(1500));
    let mut options = HarnessOptions {
        remote: Some(Arc::new(forge) as Arc<dyn Forge>),
        // As the real configuration does: the token is a secret the redactor knows.
        secrets: vec![CANARY.into()],
        job_timeout,
        ..HarnessOptions::default()
    };
    if let Some(agents) = agents {
        options.agents = agents;
    }
    Harness::new(options).await
}

/// Runs a job on `h` to its `Done`; its events.
async fn run(h: &Harness, prompt: &str) -> Vec<Event> {
    let job = h.registry.submit(request(prompt)).await.unwrap();
    harness::events_of(&job).await
}

fn request(prompt: &str) -> JobRequest {
    JobRequest {
        repo: RepoRef::Remote {
            host: "github.com".into(),
            owner: "alice".into(),
            name: "widgets".into(),
        },
        prompt: prompt.into(),
        base_branch: None,
        draft: false,
        branch: None,
    }
}

/// The canary is only ever in the Authorization header, and nowhere in the events.
fn assert_no_canary(fake: &FakeGithub, events: &[Event]) {
    for e in events {
        let text = serde_json::to_string(e).unwrap();
        assert!(!text.contains(CANARY), "event leaks the token: {text}");
    }
    let requests = fake.requests();
    assert!(!requests.is_empty());
    for r in requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {CANARY}").as_str())
        );
        for part in [&r.path, &r.query, &r.body] {
            assert!(
                !part.contains(CANARY),
                "{} {} leaks the token",
                r.method,
                r.path
            );
        }
        assert!(!r.other_headers.iter().any(|h| h.contains(CANARY)));
    }
    for p in fake.pulls() {
        assert!(!p.title.contains(CANARY) && !p.body.unwrap_or_default().contains(CANARY));
    }
}

fn diff_event(events: &[Event]) -> (Vec<(String, String)>, String) {
    events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Diff {
                files,
                patch,
                patch_truncated,
            } => {
                assert!(!patch_truncated);
                let v = serde_json::to_value(files).unwrap();
                let files = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        (
                            f["path"].as_str().unwrap().to_owned(),
                            f["status"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect();
                Some((files, patch.clone()))
            }
            _ => None,
        })
        .expect("a Diff event")
}

/// The branch holds exactly the sandbox's change: one commit on the base whose diff is the
/// sandbox's `git diff --binary`.
fn assert_branch_holds(fake: &FakeGithub, base: &str, branch: &str, events: &[Event]) {
    let bare = fake.git_dir("alice/widgets");
    let head = format!("refs/heads/{branch}");
    assert_eq!(
        git(&bare, &["rev-parse", &format!("{head}~1")]).trim(),
        base
    );
    assert_eq!(
        git(&bare, &["log", "-1", "--format=%an <%ae>", &head]).trim(),
        "Tiny Backspace <tiny-backspace@users.noreply.github.com>"
    );
    let (files, patch) = diff_event(events);
    let mut listed: Vec<(String, String)> = git(
        &bare,
        &["diff", "--no-renames", "--name-status", base, &head],
    )
    .lines()
    .map(|l| {
        let (status, path) = l.split_once('\t').unwrap();
        let status = match status {
            "A" => "added",
            "M" | "T" => "modified",
            "D" => "deleted",
            other => panic!("unexpected status {other}"),
        };
        (path.to_owned(), status.to_owned())
    })
    .collect();
    let mut files = files;
    listed.sort();
    files.sort();
    assert_eq!(listed, files);
    let published = git(
        &bare,
        &[
            "-c",
            "core.quotepath=off",
            "diff",
            "--no-renames",
            "--no-ext-diff",
            "--no-color",
            "--binary",
            base,
            &head,
        ],
    );
    assert_eq!(published, patch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dummy_job_opens_a_pull_request_through_the_fake() {
    let (fake, base) = fake_with_repo().await;
    let h = harness(&fake, None).await;
    let events = run(&h, r#"replace "great" with "excellent" in README.md"#).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let branch = done["branch"].as_str().unwrap().to_owned();
    let pr_url = done["pr_url"].as_str().unwrap();
    assert_eq!(pr_url, format!("http://{}/alice/widgets/pull/1", fake.addr));
    let created = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::PrCreated { .. }))
        .map(|e| serde_json::to_value(e).unwrap())
        .expect("PR Created");
    assert_eq!(
        (created["number"].clone(), created["draft"].clone()),
        (json!(1), json!(true)),
        "the dummy agent's PR is a draft"
    );

    assert_branch_holds(&fake, &base, &branch, &events);
    let bare = fake.git_dir("alice/widgets");
    assert_eq!(
        git(&bare, &["show", &format!("{branch}:README.md")]),
        "# Widgets\n\nWidgets are excellent.\n"
    );
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1);
    assert_eq!(
        (pulls[0].head_ref.as_str(), pulls[0].base_ref.as_str()),
        (branch.as_str(), "main")
    );
    assert_no_canary(&fake, &events);
    assert_eq!(h.live_workspaces(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_publishes_deletions_binaries_modes_and_symlinks() {
    let (fake, base) = fake_with_repo().await;
    let agent = Scripted::new(
        "scripted",
        vec![
            Step::Turn(vec![call(
                "c1",
                "run_command",
                json!({"command": "set -e; rm old.txt; chmod +x run.sh; mkdir -p docs assets src/new; \
                    ln -s ../README.md docs/link; printf '\\000\\377\\001binary\\n' > assets/logo.bin; \
                    printf 'deep\\n' > src/new/deep.txt; echo 'More.' >> README.md"}),
            )]),
            Step::Turn(vec![call(
                "c2",
                "finish",
                json!({"title": "Rework the widgets", "summary": "Deleted, moved, linked."}),
            )]),
        ],
    );
    let h = harness(&fake, Some(vec![agent])).await;
    let job = h
        .registry
        .submit(request("rework the widgets"))
        .await
        .unwrap();
    let events = harness::events_of(&job).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let branch = done["branch"].as_str().unwrap().to_owned();
    assert_branch_holds(&fake, &base, &branch, &events);

    let bare = fake.git_dir("alice/widgets");
    let modes: Vec<String> = git(&bare, &["ls-tree", "-r", &branch])
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            format!("{} {path}", meta.split(' ').next().unwrap())
        })
        .collect();
    assert_eq!(
        modes,
        [
            "100644 README.md",
            "100644 assets/logo.bin",
            "120000 docs/link",
            "100755 run.sh",
            "100644 src/new/deep.txt",
        ]
    );
    let pull = &fake.pulls()[0];
    assert_eq!(
        (pull.title.as_str(), pull.draft),
        ("Rework the widgets", false)
    );
    assert!(
        pull.body
            .as_deref()
            .unwrap_or_default()
            .contains("Deleted, moved, linked.")
    );
    assert_no_canary(&fake, &events);
}

/// Statuses the fake answered to requests matching `method` and ending in `path_end`.
fn statuses(fake: &FakeGithub, method: &str, path_end: &str) -> Vec<u16> {
    fake.requests()
        .iter()
        .filter(|r| r.method == method && r.path.ends_with(path_end))
        .map(|r| r.status)
        .collect()
}

/// Every GitHub call counts in `tb_github_requests_total` by operation and outcome, and a
/// retried one in `tb_retries_total{layer="github"}`: a tree upload answered 502 once is retried
/// and the job succeeds. (The recorder is the process's; other tests only add to the counts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_calls_and_their_retries_are_counted() {
    let metrics = tiny_backspace::telemetry::metrics().unwrap();
    let (fake, _base) = fake_with_repo().await;
    fake.fail(Fault::new("POST", "/git/trees", 502, "Server Error"));
    let h = harness(&fake, None).await;
    let events = run(&h, r#"replace "great" with "nice" in README.md"#).await;
    assert_eq!(harness::done(&events)["status"], "succeeded");
    assert_eq!(statuses(&fake, "POST", "/git/trees"), [502, 201]);
    let text = metrics.render();
    let count = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    for series in [
        r#"tb_github_requests_total{operation="create_tree",outcome="5xx"}"#,
        r#"tb_github_requests_total{operation="create_tree",outcome="ok"}"#,
        r#"tb_github_requests_total{operation="create_ref",outcome="ok"}"#,
        r#"tb_github_requests_total{operation="create_pull",outcome="ok"}"#,
        r#"tb_retries_total{layer="github"}"#,
    ] {
        assert!(count(series) >= 1.0, "{series} in:\n{text}");
    }
}

/// A job cancelled while GitHub is opening its pull request (the request went through; its
/// answer had not arrived): the job asks GitHub, and its `Done{cancelled}` names the pull
/// request instead of leaving it unmentioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_its_pull_request_opens_names_it() {
    let (fake, _base) = fake_with_repo().await;
    fake.hold_answer("POST", "/pulls", Duration::from_secs(60));
    let h = harness(&fake, None).await;
    let job = h
        .registry
        .submit(request(r#"replace "great" with "super" in README.md"#))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fake.pulls().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no pull request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    job.cancel().await.unwrap();
    let events = harness::events_of(&job).await;
    let done = harness::done(&events);
    let url = format!("http://{}/alice/widgets/pull/1", fake.addr);
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["pr_url"], url.as_str(), "{done}");
    assert!(done["summary"].as_str().unwrap().contains(&url), "{done}");
    let created: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PrCreated { .. }))
        .collect();
    assert_eq!(created.len(), 1, "{events:?}");
    assert_eq!(fake.pulls().len(), 1);
    assert_no_canary(&fake, &events);
}

/// The job's timeout fires while GitHub is opening its pull request (the request went through):
/// the job finds the pull request, and succeeds with it rather than failing with a pull request
/// open that nobody is told of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_timing_out_while_its_pull_request_opens_succeeds_with_it() {
    let (fake, _base) = fake_with_repo().await;
    fake.hold_answer("POST", "/pulls", Duration::from_secs(60));
    let h = harness_with(&fake, None, Duration::from_secs(4)).await;
    let events = run(&h, r#"replace "great" with "swell" in README.md"#).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["pr_url"],
        format!("http://{}/alice/widgets/pull/1", fake.addr),
        "{done}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Error { .. })),
        "{events:?}"
    );
    assert_eq!(fake.pulls().len(), 1);
}

/// GitHub opens the pull request and the answer is lost (502): the job looks, adopts it, and
/// succeeds with it; no second pull request is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_whose_answer_was_lost_is_the_jobs_pull_request() {
    let (fake, _base) = fake_with_repo().await;
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").after_success());
    let h = harness(&fake, None).await;
    let events = run(&h, r#"replace "great" with "fine" in README.md"#).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1);
    assert_eq!(
        done["pr_url"],
        format!("http://{}/alice/widgets/pull/1", fake.addr)
    );
    assert_eq!(done["branch"], pulls[0].head_ref.as_str());
    assert_eq!(statuses(&fake, "POST", "/pulls"), [502], "not re-sent");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Error { .. }))
    );
    assert_no_canary(&fake, &events);
}

/// GitHub creates the branch and the answer is lost (502): the job reads the branch, sees its
/// commit there, and goes on to open the pull request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_whose_answer_was_lost_is_the_jobs_branch() {
    let (fake, base) = fake_with_repo().await;
    fake.fail(Fault::new("POST", "/git/refs", 502, "Server Error").after_success());
    let h = harness(&fake, None).await;
    let events = run(&h, r#"replace "great" with "grand" in README.md"#).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let branch = done["branch"].as_str().unwrap().to_owned();
    assert_branch_holds(&fake, &base, &branch, &events);
    assert_eq!(statuses(&fake, "POST", "/git/refs"), [502], "not re-sent");
    assert_eq!(fake.pulls().len(), 1);
    assert_eq!(fake.pulls()[0].head_ref, branch);
}

/// Opening the pull request truly fails (every attempt answered 502, none carried out, until the
/// step's deadline): the job fails, and its `Done` names the branch it pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_that_was_never_opened_fails_the_job_naming_its_branch() {
    let (fake, base) = fake_with_repo().await;
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").times(10_000));
    let h = harness(&fake, None).await;
    let events = run(&h, r#"replace "great" with "gone" in README.md"#).await;
    let done = harness::done(&events);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "github_unavailable", "{done}");
    assert_eq!(done["pr_url"], serde_json::Value::Null);
    let branch = done["branch"].as_str().expect("the pushed branch is named");
    assert!(done["summary"].as_str().unwrap().contains(branch), "{done}");
    assert_branch_holds(&fake, &base, branch, &events);
    assert!(fake.pulls().is_empty());
    // Each failed attempt was reconciled (looked up) before it was sent again.
    let posts = statuses(&fake, "POST", "/pulls").len();
    assert!(posts > 1, "retried within the deadline");
    assert_eq!(statuses(&fake, "GET", "/pulls").len(), posts);
    let error = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::Error { .. }))
        .map(|e| serde_json::to_value(e).unwrap())
        .expect("an Error before Done");
    assert_eq!(error["step"], "pr");
    fake.clear_faults();
}
