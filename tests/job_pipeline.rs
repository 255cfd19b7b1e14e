//! Whole jobs on the embedded defaults, checked with real git, and the one-`Done` guarantee
//! under injected failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use pretty_assertions::assert_eq;
use serde_json::json;
use support::harness::{
    Fault, Faulty, Harness, HarnessOptions, Scripted, Step, call, done, events_of, git,
    local_sandbox, repo_with, shape,
};
use tiny_backspace::agent::runner::AgentLimits;
use tiny_backspace::agent::{Part, ProviderError};
use tiny_backspace::event::EventKind;

const APP: &str = "def greet(name):\n    return \"Hello \" + name\n";

#[tokio::test]
async fn the_dummy_agent_job_leaves_a_branch_with_exactly_its_change() {
    let repo = repo_with(&[("app.py", APP), ("README.md", "# Demo\n")]);
    let h = Harness::new(HarnessOptions::default()).await;
    let job = h
        .submit(repo.path(), "Replace \"Hello \" with \"Hi, \" in app.py")
        .await;
    let events = events_of(&job).await;
    assert_eq!(
        shape(&events),
        vec![
            "Job Started",
            "Status:queue:started",
            "Status:queue:succeeded",
            "Status:sandbox:started",
            "Status:sandbox:succeeded",
            "Status:clone:started",
            "Tool: Bash",
            "Status:clone:succeeded",
            "Status:agent:started",
            "AI Message",
            "Tool: Read",
            "AI Message",
            "Tool: Edit",
            "AI Message",
            "Status:agent:succeeded",
            "Status:commit:started",
            "Diff",
            "Status:commit:succeeded",
            "Status:pr:started",
            "Status:pr:skipped",
            "Status:cleanup:started",
            "Status:cleanup:succeeded",
            "Done",
        ]
    );
    let seqs: Vec<u64> = futures::StreamExt::collect::<Vec<_>>(job.log().follow(0))
        .await
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let edit = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::ToolEdit { .. }))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&edit.kind).unwrap(),
        json!({"type": "Tool: Edit", "filepath": "app.py", "old_str": "Hello ", "new_str": "Hi, "})
    );
    let done = done(&events);
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["files_changed"], 1);
    let branch = done["branch"].as_str().unwrap();
    assert!(
        branch.starts_with("tiny-backspace/replace-hello-with-hi-in-app-"),
        "{branch}"
    );

    // The branch holds exactly the change, as one commit by Tiny Backspace on main.
    assert_eq!(
        git(repo.path(), &["diff", "--name-status", "main", branch]),
        "M\tapp.py\n"
    );
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:app.py")]),
        "def greet(name):\n    return \"Hi, \" + name\n"
    );
    assert_eq!(
        git(repo.path(), &["rev-parse", &format!("{branch}~1")]),
        git(repo.path(), &["rev-parse", "main"])
    );
    assert_eq!(
        git(repo.path(), &["log", "-1", "--format=%an <%ae>", branch]),
        "Tiny Backspace <tiny-backspace@users.noreply.github.com>\n"
    );
    // The user's checkout is untouched.
    assert_eq!(git(repo.path(), &["status", "--porcelain"]), "");
    assert_eq!(
        git(repo.path(), &["rev-parse", "--abbrev-ref", "HEAD"]),
        "main\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.path().join("app.py")).unwrap(),
        APP
    );
    assert_eq!(h.live_workspaces(), 0);
    // The patch matches the branch.
    let (patch, truncated) = job.patch().await.unwrap();
    assert!(!truncated);
    assert_eq!(
        patch,
        git(repo.path(), &["diff", "--binary", "main", branch])
    );
}

#[tokio::test]
async fn an_unknown_request_is_recorded_in_a_clearly_named_file() {
    let repo = repo_with(&[("README.md", "# Demo\n")]);
    let h = Harness::new(HarnessOptions::default()).await;
    let job = h
        .submit(repo.path(), "Add input validation to all POST endpoints")
        .await;
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "succeeded");
    let branch = done["branch"].as_str().unwrap();
    let recorded = git(
        repo.path(),
        &["show", &format!("{branch}:TINY_BACKSPACE_REQUEST.md")],
    );
    assert!(
        recorded.contains("> Add input validation to all POST endpoints"),
        "{recorded}"
    );
}

#[tokio::test]
async fn deletions_binary_files_modes_and_symlinks_reach_the_branch() {
    let repo = repo_with(&[
        ("old.txt", "old\n"),
        ("run.sh", "echo hi\n"),
        ("keep.txt", "keep\n"),
    ]);
    let model = Scripted::new(
        "model",
        vec![
            Step::Turn(vec![call(
                "1",
                "run_command",
                json!({"command": "rm old.txt && chmod +x run.sh && printf '\\000\\001\\002\\377' > blob.bin && ln -s keep.txt link.txt"}),
            )]),
            Step::Turn(vec![call(
                "2",
                "finish",
                json!({"title": "Shuffle files", "summary": "Deleted, chmodded, added a binary and a link."}),
            )]),
        ],
    );
    let h = Harness::new(HarnessOptions {
        agents: vec![model],
        ..HarnessOptions::default()
    })
    .await;
    let job = h.submit(repo.path(), "shuffle").await;
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "succeeded", "{events:#?}");
    let branch = done["branch"].as_str().unwrap();
    let tree = git(repo.path(), &["ls-tree", branch]);
    let entries: Vec<(String, String)> = tree
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            (meta.split(' ').next().unwrap().to_owned(), path.to_owned())
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("100644".to_owned(), "blob.bin".to_owned()),
            ("100644".to_owned(), "keep.txt".to_owned()),
            ("120000".to_owned(), "link.txt".to_owned()),
            ("100755".to_owned(), "run.sh".to_owned()),
        ]
    );
    let blob = std::process::Command::new("git")
        .args(["show", &format!("{branch}:blob.bin")])
        .current_dir(repo.path())
        .output()
        .unwrap()
        .stdout;
    assert_eq!(blob, vec![0u8, 1, 2, 255]);
    assert_eq!(
        git(
            repo.path(),
            &["cat-file", "-p", &format!("{branch}:link.txt")]
        ),
        "keep.txt"
    );
    let diff = events.iter().find_map(|e| match &e.kind {
        EventKind::Diff { files, .. } => Some(files.clone()),
        _ => None,
    });
    let statuses: Vec<(String, String)> = diff
        .unwrap()
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                serde_json::to_value(f.status)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("blob.bin".into(), "added".into()),
            ("link.txt".into(), "added".into()),
            ("old.txt".into(), "deleted".into()),
            ("run.sh".into(), "modified".into()),
        ]
    );
}

/// Runs a job expected to fail and returns (error code of Done, Error event codes, events).
async fn failing_job(
    options: HarnessOptions,
    prompt: &str,
) -> (
    String,
    Vec<String>,
    Vec<tiny_backspace::event::Event>,
    Harness,
) {
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(options).await;
    let job = h.submit(repo.path(), prompt).await;
    let events = events_of(&job).await;
    let done = done(&events);
    let errors = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Error { code, .. } => Some(code.as_str().to_owned()),
            _ => None,
        })
        .collect();
    let code = done["error"]["code"].as_str().unwrap_or("").to_owned();
    assert_ne!(done["status"], "succeeded");
    // Nothing is left behind, and the repository gained no branch.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.live_workspaces(), 0);
    assert_eq!(git(repo.path(), &["branch", "--list"]).lines().count(), 1);
    (code, errors, events, h)
}

#[tokio::test]
async fn a_failing_clone_ends_with_error_and_one_done() {
    let workspaces = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Faulty {
        inner: local_sandbox(workspaces.path()).await,
        fault: Fault::CloneFails,
    });
    let (code, errors, events, _h) = failing_job(
        HarnessOptions {
            sandbox: Some(sandbox),
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(
        (code.as_str(), errors),
        ("clone_failed", vec!["clone_failed".to_owned()])
    );
    assert!(shape(&events).ends_with(&[
        "Status:clone:failed".into(),
        "Error".into(),
        "Status:cleanup:started".into(),
        "Status:cleanup:succeeded".into(),
        "Done".into()
    ]));
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_sandbox_that_cannot_be_created_ends_with_error_and_one_done() {
    let workspaces = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Faulty {
        inner: local_sandbox(workspaces.path()).await,
        fault: Fault::CreateFails,
    });
    let (code, _, events, _h) = failing_job(
        HarnessOptions {
            sandbox: Some(sandbox),
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(code, "sandbox_create_failed");
    assert!(shape(&events).ends_with(&[
        "Status:sandbox:failed".into(),
        "Error".into(),
        "Status:cleanup:skipped".into(),
        "Done".into()
    ]));
}

#[tokio::test]
async fn a_sandbox_command_that_times_out_ends_with_error_and_one_done() {
    let workspaces = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Faulty {
        inner: local_sandbox(workspaces.path()).await,
        fault: Fault::CollectTimesOut,
    });
    let (code, _, _, _h) = failing_job(
        HarnessOptions {
            sandbox: Some(sandbox),
            ..HarnessOptions::default()
        },
        "Replace \"Hello \" with \"Hi, \" in app.py",
    )
    .await;
    assert_eq!(code, "diff_failed");
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn an_agent_command_that_times_out_goes_back_to_the_model() {
    let repo = repo_with(&[("app.py", APP)]);
    let model = Scripted::new(
        "model",
        vec![
            Step::Turn(vec![call(
                "1",
                "run_command",
                json!({"command": "sleep 60", "timeout_secs": 1}),
            )]),
            Step::Turn(vec![call(
                "2",
                "write_file",
                json!({"path": "NOTE.md", "content": "slow\n"}),
            )]),
            Step::Turn(vec![call(
                "3",
                "finish",
                json!({"title": "Note", "summary": "s"}),
            )]),
        ],
    );
    let h = Harness::new(HarnessOptions {
        agents: vec![model.clone()],
        ..HarnessOptions::default()
    })
    .await;
    let events = events_of(&h.submit(repo.path(), "x").await).await;
    assert_eq!(done(&events)["status"], "succeeded");
    let bash = events.iter().find_map(|e| match &e.kind {
        EventKind::ToolBash {
            command, exit_code, ..
        } if command == "sleep 60" => Some(*exit_code),
        _ => None,
    });
    assert_eq!(bash, Some(124));
    let seen = model.seen.lock().unwrap();
    let result = seen[1]
        .messages
        .last()
        .unwrap()
        .content
        .first()
        .unwrap()
        .clone();
    let Part::ToolResult {
        content, is_error, ..
    } = result
    else {
        panic!("{result:?}")
    };
    assert!(is_error && content.contains("timed out"), "{content}");
}

#[tokio::test]
async fn a_provider_error_ends_with_error_and_one_done() {
    let model = Scripted::new(
        "model",
        vec![Step::Fail(ProviderError::fallback("401 invalid x-api-key"))],
    );
    let (code, errors, _, _h) = failing_job(
        HarnessOptions {
            agents: vec![model],
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(
        (code.as_str(), errors),
        ("agent_failed", vec!["agent_failed".to_owned()])
    );
}

#[tokio::test]
async fn a_failing_provider_falls_back_to_the_next_with_the_same_transcript() {
    let repo = repo_with(&[("app.py", APP)]);
    let first = Scripted::new(
        "first",
        vec![
            Step::Turn(vec![
                Part::Text {
                    text: "Looking.".into(),
                },
                call("1", "read_file", json!({"path": "app.py"})),
            ]),
            Step::Fail(ProviderError::fallback("overloaded")),
        ],
    );
    let second = Scripted::new(
        "second",
        vec![
            Step::Turn(vec![call(
                "2",
                "edit_file",
                json!({"path": "app.py", "old_str": "Hello ", "new_str": "Hey "}),
            )]),
            Step::Turn(vec![call(
                "3",
                "finish",
                json!({"title": "Say hey", "summary": "s"}),
            )]),
        ],
    );
    let h = Harness::new(HarnessOptions {
        agents: vec![first.clone(), second.clone()],
        ..HarnessOptions::default()
    })
    .await;
    let events = events_of(&h.submit(repo.path(), "say hey").await).await;
    assert_eq!(done(&events)["status"], "succeeded");
    let fallback = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::AgentFallback { .. }))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&fallback.kind).unwrap(),
        json!({"type": "Agent Fallback", "from": "first", "to": "second", "reason": "overloaded"})
    );
    // The second provider got the first one's conversation, tool result included.
    let handed_over = second.seen.lock().unwrap()[0].clone();
    assert_eq!(handed_over, first.seen.lock().unwrap()[1]);
    assert_eq!(handed_over.messages.len(), 3);
    let usage = done(&events)["usage"].clone();
    assert_eq!(
        usage,
        json!([
            {"provider": "first", "model": "scripted", "input_tokens": 10, "output_tokens": 5},
            {"provider": "second", "model": "scripted", "input_tokens": 20, "output_tokens": 10}
        ])
    );
}

#[tokio::test]
async fn the_job_timeout_ends_with_timeout_and_cleans_up() {
    let model = Scripted::new("model", vec![Step::Hang]);
    let (code, errors, _, _h) = failing_job(
        HarnessOptions {
            agents: vec![model],
            job_timeout: Duration::from_secs(2),
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(
        (code.as_str(), errors),
        ("timeout", vec!["timeout".to_owned()])
    );
}

#[tokio::test]
async fn cancel_stops_the_job_and_cleans_up() {
    let repo = repo_with(&[("app.py", APP)]);
    let model = Scripted::new("model", vec![Step::Hang]);
    let h = Harness::new(HarnessOptions {
        agents: vec![model],
        ..HarnessOptions::default()
    })
    .await;
    let job = h.submit(repo.path(), "x").await;
    // Wait until the agent is running, then cancel.
    let mut follow = Box::pin(job.log().follow(0));
    use futures::StreamExt;
    while let Some(item) = follow.next().await {
        if matches!(
            item.event.kind,
            EventKind::Status {
                step: tiny_backspace::event::Step::Agent,
                ..
            }
        ) {
            break;
        }
    }
    job.cancel().await.unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "cancelled");
    assert!(shape(&events).ends_with(&[
        "Status:cleanup:started".into(),
        "Status:cleanup:succeeded".into(),
        "Done".into()
    ]));
    assert_eq!(h.live_workspaces(), 0);
}

#[tokio::test]
async fn a_panic_in_the_job_task_still_ends_with_one_done_and_no_sandbox() {
    let model = Scripted::new("model", vec![Step::Panic]);
    let (code, errors, _, _h) = failing_job(
        HarnessOptions {
            agents: vec![model],
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(
        (code.as_str(), errors),
        ("internal", vec!["internal".to_owned()])
    );
}

#[tokio::test]
async fn an_agent_that_changes_nothing_fails_clearly() {
    let model = Scripted::new(
        "model",
        vec![Step::Turn(vec![call(
            "1",
            "finish",
            json!({"title": "Nothing", "summary": "nothing to do"}),
        )])],
    );
    let (code, _, _, _h) = failing_job(
        HarnessOptions {
            agents: vec![model],
            ..HarnessOptions::default()
        },
        "x",
    )
    .await;
    assert_eq!(code, "no_changes");
}

#[tokio::test]
async fn tool_errors_go_back_to_the_model_and_budgets_publish_partial_work() {
    let repo = repo_with(&[("app.py", APP)]);
    let model = Scripted::new(
        "model",
        vec![
            Step::Turn(vec![
                call("1", "no_such_tool", json!({})),
                call(
                    "2",
                    "edit_file",
                    json!({"path": "app.py", "old_str": "return  \"Hello \"", "new_str": "x"}),
                ),
                call("3", "read_file", json!({"path": "../etc/passwd"})),
                Part::ToolCall {
                    id: "4".into(),
                    name: "write_file".into(),
                    arguments: serde_json::Value::Null,
                    raw_arguments: Some("{\"path\": ".into()),
                },
            ]),
            Step::Turn(vec![call(
                "5",
                "write_file",
                json!({"path": "WIP.md", "content": "half done\n"}),
            )]),
            Step::Turn(vec![call("6", "read_file", json!({"path": "WIP.md"}))]),
        ],
    );
    let h = Harness::new(HarnessOptions {
        agents: vec![model.clone()],
        agent_limits: AgentLimits {
            max_turns: 3,
            ..AgentLimits::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let events = events_of(&h.submit(repo.path(), "x").await).await;
    let done = done(&events);
    assert_eq!(done["status"], "succeeded");
    let seen = model.seen.lock().unwrap();
    let answers: Vec<(bool, String)> = seen[1]
        .messages
        .last()
        .unwrap()
        .content
        .iter()
        .map(|p| match p {
            Part::ToolResult {
                is_error, content, ..
            } => (*is_error, content.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answers.len(), 4, "every call of the turn is answered");
    assert!(answers.iter().all(|(is_error, _)| *is_error));
    assert!(answers[0].1.contains("Unknown tool `no_such_tool`"));
    assert!(
        answers[1].1.contains("closest lines")
            && answers[1].1.contains("2\t    return \"Hello \" + name"),
        "{}",
        answers[1].1
    );
    assert!(answers[2].1.contains("leaves the repository"));
    assert!(answers[3].1.contains("not valid JSON"));
    // The turn budget ran out after a file changed: the work is published, marked partial.
    let branch = done["branch"].as_str().unwrap();
    let subject = git(
        h.workspaces.path(),
        &[
            "-C",
            repo.path().to_str().unwrap(),
            "log",
            "-1",
            "--format=%s",
            branch,
        ],
    );
    assert!(subject.starts_with("[partial] "), "{subject}");
}

#[tokio::test]
async fn finished_jobs_are_kept_for_a_bounded_number() {
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        limits: tiny_backspace::job::Limits {
            max_retained: 2,
            ..tiny_backspace::job::Limits::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let job = h
            .submit(
                repo.path(),
                &format!("create a file n{i}.txt with the text \"{i}\""),
            )
            .await;
        events_of(&job).await;
        ids.push(job.id().to_owned());
        // Distinct creation times order the eviction.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Pruning (on a timer, and when a job finishes): the oldest finished jobs beyond the limit
    // are gone.
    h.registry.prune().await.unwrap();
    let mut kept = Vec::new();
    for id in &ids {
        kept.push(h.registry.job(id).await.unwrap().is_some());
    }
    assert_eq!(kept, vec![false, false, true, true]);
}

/// A remote repository with no token: nothing may be pushed.
struct NoToken {
    clone_from: std::path::PathBuf,
}

#[async_trait::async_trait]
impl tiny_backspace::forge::Forge for NoToken {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn prepare(
        &self,
        repo: &tiny_backspace::repo::RepoRef,
        base_branch: Option<&str>,
    ) -> Result<tiny_backspace::forge::RepoInfo, tiny_backspace::forge::ForgeError> {
        Ok(tiny_backspace::forge::RepoInfo {
            repo: repo.clone(),
            clone_url: format!("file://{}", self.clone_from.display()),
            base_branch: base_branch.map(str::to_owned),
            base_commit: None,
            publish: tiny_backspace::forge::PublishMode::Skip(
                "no GitHub token is configured".into(),
            ),
        })
    }
    async fn push_branch(
        &self,
        _: &tiny_backspace::forge::RepoInfo,
        _: &tiny_backspace::forge::ChangeSet,
        _: &str,
        _: &str,
    ) -> Result<tiny_backspace::forge::PushedBranch, tiny_backspace::forge::ForgeError> {
        panic!("nothing may be pushed without a token")
    }
    async fn open_pull_request(
        &self,
        _: &tiny_backspace::forge::RepoInfo,
        _: &tiny_backspace::forge::PushedBranch,
        _: &tiny_backspace::forge::PullRequestDraft,
    ) -> Result<Option<tiny_backspace::forge::PullRequest>, tiny_backspace::forge::ForgeError> {
        panic!("no pull request without a token")
    }
}

#[tokio::test]
async fn without_a_token_the_pr_is_skipped_and_the_patch_stays_available() {
    let upstream = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        remote: Some(Arc::new(NoToken {
            clone_from: upstream.path().to_path_buf(),
        })),
        ..HarnessOptions::default()
    })
    .await;
    let job = h
        .registry
        .submit(tiny_backspace::job::JobRequest {
            repo: tiny_backspace::repo::RepoRef::Remote {
                host: "github.com".into(),
                owner: "octo".into(),
                name: "hello".into(),
            },
            prompt: "Replace \"Hello \" with \"Hi, \" in app.py".into(),
            base_branch: None,
            draft: false,
            branch: None,
        })
        .await
        .unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(
        (
            done["status"].as_str(),
            done["branch"].as_str(),
            done["pr_url"].as_str()
        ),
        (Some("succeeded"), None, None)
    );
    let skipped: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Status {
                step,
                state: tiny_backspace::event::StepState::Skipped,
                message,
                ..
            } => Some((*step, message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(
        skipped[1],
        (
            tiny_backspace::event::Step::Pr,
            "no GitHub token is configured".to_owned()
        )
    );
    let (patch, _) = job.patch().await.unwrap();
    let patch = String::from_utf8_lossy(&patch);
    assert!(
        patch.contains("-    return \"Hello \" + name\n+    return \"Hi, \" + name"),
        "{patch}"
    );
    assert_eq!(
        git(upstream.path(), &["branch", "--list"]).lines().count(),
        1,
        "nothing was pushed"
    );
}

/// A forge for a remote repository that clones from a local one, and whose writes never answer
/// (or whose `prepare` refuses the repository at once).
struct Unanswering {
    clone_from: std::path::PathBuf,
    refuse: Option<tiny_backspace::event::ErrorCode>,
}

#[async_trait::async_trait]
impl tiny_backspace::forge::Forge for Unanswering {
    fn name(&self) -> &'static str {
        "github"
    }
    async fn prepare(
        &self,
        repo: &tiny_backspace::repo::RepoRef,
        base_branch: Option<&str>,
    ) -> Result<tiny_backspace::forge::RepoInfo, tiny_backspace::forge::ForgeError> {
        if let Some(code) = self.refuse {
            return Err(tiny_backspace::forge::ForgeError::new(
                code,
                "octo/hello is private",
            ));
        }
        Ok(tiny_backspace::forge::RepoInfo {
            repo: repo.clone(),
            clone_url: format!("file://{}", self.clone_from.display()),
            base_branch: base_branch.map(str::to_owned),
            base_commit: None,
            publish: tiny_backspace::forge::PublishMode::Push,
        })
    }
    async fn push_branch(
        &self,
        _: &tiny_backspace::forge::RepoInfo,
        _: &tiny_backspace::forge::ChangeSet,
        _: &str,
        _: &str,
    ) -> Result<tiny_backspace::forge::PushedBranch, tiny_backspace::forge::ForgeError> {
        std::future::pending().await
    }
    async fn open_pull_request(
        &self,
        _: &tiny_backspace::forge::RepoInfo,
        _: &tiny_backspace::forge::PushedBranch,
        _: &tiny_backspace::forge::PullRequestDraft,
    ) -> Result<Option<tiny_backspace::forge::PullRequest>, tiny_backspace::forge::ForgeError> {
        std::future::pending().await
    }
}

fn remote_request(prompt: &str) -> tiny_backspace::job::JobRequest {
    tiny_backspace::job::JobRequest {
        repo: tiny_backspace::repo::RepoRef::Remote {
            host: "github.com".into(),
            owner: "octo".into(),
            name: "hello".into(),
        },
        prompt: prompt.into(),
        base_branch: None,
        draft: false,
        branch: None,
    }
}

/// The job timeout is a backstop: when it cuts a hung publish short, the change already collected
/// stays available, `Done` says how many files changed and the open step ends as failed.
#[tokio::test]
async fn the_hard_timeout_keeps_the_collected_change() {
    let upstream = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        remote: Some(Arc::new(Unanswering {
            clone_from: upstream.path().to_path_buf(),
            refuse: None,
        })),
        job_timeout: Duration::from_secs(4),
        ..HarnessOptions::default()
    })
    .await;
    let job = h
        .registry
        .submit(remote_request("Replace \"Hello \" with \"Hi, \" in app.py"))
        .await
        .unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "timeout");
    assert_eq!(done["files_changed"], 1);
    let shape = shape(&events);
    let commit: Vec<&String> = shape
        .iter()
        .filter(|s| s.starts_with("Status:commit"))
        .collect();
    assert_eq!(commit, ["Status:commit:started", "Status:commit:failed"]);
    let (patch, _) = job.patch().await.expect("the patch is kept");
    assert!(String::from_utf8_lossy(&patch).contains("+    return \"Hi, \" + name"));
    assert_eq!(h.live_workspaces(), 0);
}

/// A repository the forge refuses (private, missing, archived) stops the job before anything is
/// cloned, without waiting for the sandbox to be ready; the sandbox is still cleaned up.
#[tokio::test]
async fn a_refused_repository_stops_the_job_before_the_clone() {
    let upstream = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        remote: Some(Arc::new(Unanswering {
            clone_from: upstream.path().to_path_buf(),
            refuse: Some(tiny_backspace::event::ErrorCode::PrivateRepository),
        })),
        ..HarnessOptions::default()
    })
    .await;
    let job = h.registry.submit(remote_request("anything")).await.unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["error"]["code"], "private_repository", "{done}");
    assert_eq!(
        shape(&events)
            .into_iter()
            .filter(|s| s.starts_with("Status:") || s == "Error")
            .collect::<Vec<_>>(),
        [
            "Status:queue:started",
            "Status:queue:succeeded",
            "Status:sandbox:started",
            "Status:sandbox:skipped",
            "Status:clone:started",
            "Status:clone:failed",
            "Error",
            "Status:cleanup:started",
            "Status:cleanup:succeeded",
        ]
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::ToolBash { .. }))
    );
    assert_eq!(h.live_workspaces(), 0);
}

/// Finished jobs are bounded in bytes (events and patches) as well as in number.
#[tokio::test]
async fn finished_jobs_are_bounded_in_bytes() {
    let repo = repo_with(&[("app.py", APP)]);
    let kept_after = |max_retained_bytes: usize| {
        let repo = repo.path().to_path_buf();
        async move {
            let h = Harness::new(HarnessOptions {
                limits: tiny_backspace::job::Limits {
                    max_retained_bytes,
                    ..tiny_backspace::job::Limits::default()
                },
                ..HarnessOptions::default()
            })
            .await;
            let mut jobs = Vec::new();
            for i in 0..3 {
                let job = h
                    .submit(
                        &repo,
                        &format!("create a file n{i}.txt with the text \"{i}\""),
                    )
                    .await;
                events_of(&job).await;
                jobs.push(job);
            }
            let mut sizes = Vec::new();
            for job in &jobs {
                sizes.push(job.record().await.map_or(0, |r| r.bytes as usize));
            }
            h.registry.prune().await.unwrap();
            let mut kept = Vec::new();
            for job in &jobs {
                kept.push(h.registry.job(job.id()).await.unwrap().is_some());
            }
            (sizes, kept)
        }
    };
    let (sizes, kept) = kept_after(usize::MAX).await;
    assert_eq!(kept, vec![true, true, true]);
    assert!(sizes.iter().all(|s| *s > 1000), "{sizes:?}");
    // Room for the two newest jobs only: the oldest goes.
    let (_, kept) = kept_after(sizes[1] + sizes[2] + sizes[2] / 2).await;
    assert_eq!(kept, vec![false, true, true]);
}

/// A change larger than `MAX_CHANGE_MB` is refused before its files are read into memory.
#[tokio::test]
async fn a_change_over_the_size_limit_is_refused_unread() {
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        max_change_bytes: 16,
        ..HarnessOptions::default()
    })
    .await;
    let job = h
        .submit(
            repo.path(),
            "create a file big.txt with the text \"more than sixteen bytes of text\"",
        )
        .await;
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "change_too_large");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("the change is too large"), "{message}");
    assert!(shape(&events).contains(&"Status:commit:failed".to_owned()));
    assert_eq!(
        git(repo.path(), &["branch", "--list", "tiny-backspace/*"]),
        ""
    );
}

/// A head branch the request names that already exists is refused before anything is cloned,
/// instead of after the agent has worked.
#[tokio::test]
async fn an_existing_head_branch_is_refused_before_the_clone() {
    let repo = repo_with(&[("app.py", APP)]);
    git(repo.path(), &["branch", "taken"]);
    let h = Harness::new(HarnessOptions::default()).await;
    let job = h
        .registry
        .submit(tiny_backspace::job::JobRequest {
            branch: Some("taken".into()),
            ..support::harness::request(repo.path(), "create a file n.txt with the text \"n\"")
        })
        .await
        .unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["error"]["code"], "branch_exists", "{done}");
    assert!(shape(&events).contains(&"Status:clone:failed".to_owned()));
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::ToolBash { .. }))
    );
    assert_eq!(h.live_workspaces(), 0);
}

/// A sandbox whose kill fails is not left running: the cleanup step says so, the job still ends,
/// and the kill is retried in the background (visible as `cleanup_pending`) until it succeeds.
#[tokio::test]
async fn a_failed_sandbox_kill_is_retried_until_the_sandbox_is_gone() {
    let repo = repo_with(&[("app.py", APP)]);
    let workspaces = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Faulty {
        inner: local_sandbox(workspaces.path()).await,
        fault: Fault::KillFailsFirst(3),
    });
    let h = Harness::new(HarnessOptions {
        sandbox: Some(sandbox),
        limits: tiny_backspace::job::Limits {
            cleanup_backoff: Duration::from_millis(100),
            ..tiny_backspace::job::Limits::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let job = h
        .submit(repo.path(), "create a file n.txt with the text \"n\"")
        .await;
    let events = events_of(&job).await;
    assert_eq!(done(&events)["status"], "succeeded");
    let cleanup: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Status {
                step: tiny_backspace::event::Step::Cleanup,
                state,
                message,
                ..
            } => Some(format!("{state:?}: {message}")),
            _ => None,
        })
        .collect();
    assert_eq!(cleanup.len(), 2, "{cleanup:?}");
    assert!(
        cleanup[1].starts_with("Failed: Sandbox cleanup failed")
            && cleanup[1].ends_with("retrying in the background"),
        "{cleanup:?}"
    );
    assert_eq!(h.registry.cleanup_pending(), 1);
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 1);
    // Two more failures (100 ms, then 200 ms), then the kill goes through.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.registry.cleanup_pending() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the kill was never retried to the end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn the_checkouts_own_git_configuration_cannot_disguise_the_patch() {
    // The agent controls `.git/config`: a text conversion that rewrites what `git diff` shows,
    // and prefixes that break the patch's shape. The patch the user reviews is still exactly
    // what the branch holds.
    let repo = repo_with(&[("notes.txt", "harmless\n")]);
    let model = Scripted::new(
        "model",
        vec![
            Step::Turn(vec![call(
                "1",
                "run_command",
                json!({"command": "git config diff.hide.textconv 'sed s/evil/fine/' && git config diff.noprefix true && echo '*.txt diff=hide' > .git/info/attributes && echo 'evil payload' > notes.txt"}),
            )]),
            Step::Turn(vec![call(
                "2",
                "finish",
                json!({"title": "Edit notes", "summary": "Changed the notes."}),
            )]),
        ],
    );
    let h = Harness::new(HarnessOptions {
        agents: vec![model],
        ..HarnessOptions::default()
    })
    .await;
    let job = h.submit(repo.path(), "edit the notes").await;
    let events = events_of(&job).await;
    assert_eq!(done(&events)["status"], "succeeded");
    let (patch, _) = job.patch().await.unwrap();
    let patch = String::from_utf8_lossy(&patch);
    assert!(patch.contains("+evil payload"), "{patch}");
    assert!(!patch.contains("fine payload"), "{patch}");
    assert!(
        patch.contains("--- a/notes.txt\n+++ b/notes.txt"),
        "{patch}"
    );
}
