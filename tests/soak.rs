#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fault soak, small enough for the suite: 100 jobs with a fixed seed through a real `serve`
//! whose E2B, Anthropic, OpenAI and GitHub are fakes failing at random at issue 12's rates
//! (`support::soak`). Any broken guarantee fails the test. Longer runs: `scripts/soak`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;
use support::faults::{Draw, FaultPlan, Injected};
use support::soak::{self, Fakes, Server, SoakConfig};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tiny-backspace"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_jobs_under_random_faults_keep_every_guarantee() {
    let mut config = SoakConfig::new(binary());
    config.jobs = 100;
    config.concurrency = 16;
    config.seed = 20_260_512;
    let report = soak::run(&config).await;
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.succeeded + report.failed, 100, "{report}");
    // The plan did inject faults, of every kind the run depends on.
    for kind in [
        "e2b.create 503",
        "e2b.kill 502",
        "anthropic.messages 529",
        "github.pull 502-after",
        "github.ref 502-after",
    ] {
        assert!(
            report.injected.get(kind).copied().unwrap_or(0) > 0,
            "no `{kind}` fault was injected: {report}"
        );
    }
}

#[test]
fn fault_draws_depend_on_the_seed_the_route_and_the_ordinal_only() {
    let plan = || {
        FaultPlan::new(42)
            .rule("a", 0.3, Injected::Status(503))
            .rule("b", 0.5, Injected::CutStream)
            .latency(Duration::from_millis(1), Duration::from_millis(9))
    };
    let (one, two) = (plan(), plan());
    let a: Vec<Draw> = (0..200).map(|_| one.draw("a")).collect();
    // Requests on another route, interleaved, do not change route `a`'s draws.
    let b: Vec<Draw> = (0..200)
        .map(|_| {
            two.draw("b");
            two.draw("a")
        })
        .collect();
    assert_eq!(a, b);
    let hits = a.iter().filter(|d| d.fault.is_some()).count();
    assert!((40..=80).contains(&hits), "{hits}");
    assert_eq!(one.injected()["a 503"], hits as u64);
    assert!(
        a.iter()
            .all(|d| d.delay >= Duration::from_millis(1) && d.delay <= Duration::from_millis(9))
    );
    // Another seed, other faults.
    let other = FaultPlan::new(43).rule("a", 0.3, Injected::Status(503));
    let other: Vec<_> = (0..200).map(|_| other.draw("a").fault).collect();
    assert_ne!(a.iter().map(|d| d.fault).collect::<Vec<_>>(), other);
    // Scaling multiplies every probability, capped at 1.
    let scaled = FaultPlan::new(1)
        .rule("a", 0.4, Injected::CloseAfter)
        .scaled(3.0);
    assert_eq!(scaled.rules()[0].probability, 1.0);
    assert!((0..20).all(|_| scaled.draw("a").fault == Some(Injected::CloseAfter)));
}

/// SIGTERM while jobs run under faults: every running job ends with exactly one `Done`
/// (cancelled, or finished), and every sandbox is killed before the process exits; none is left
/// to expire. Jobs still queued stay queued in the store: the restarted server runs them, and
/// their streams, resumed with `Last-Event-ID`, go on from where they stopped to one `Done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_in_the_middle_of_a_soak_ends_every_job_and_kills_every_sandbox() {
    let seed = 7;
    // Slow fakes (each request waits up to 150 ms), so jobs are mid-way when the signal comes.
    let fakes = Fakes::start(soak::issue_plan(seed, 1.0, Duration::from_millis(150))).await;
    let mut server = Server::start(&binary(), &fakes.env(6));
    let client = reqwest::Client::new();
    let url = server.url("");
    let jobs =
        join_all((0..12).map(|i| soak::run_job(&client, &url, i, seed, Duration::from_secs(120))));
    // The signal comes once the first jobs have opened their pull requests while others hold
    // sandboxes at earlier steps.
    let signal = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let publishing = || fakes.github.pulls().len() >= 2;
        while !(publishing() && fakes.e2b.live_sandboxes() >= 3) {
            assert!(
                std::time::Instant::now() < deadline,
                "the jobs never got that far"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.sigterm();
    };
    let (mut runs, ()) = tokio::join!(jobs, signal);
    let status = server.wait_exit(Duration::from_secs(90));
    // The moment the process is gone: nothing alive at E2B, and nothing left to its lifetime.
    let live = fakes.e2b.live_sandboxes();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(live, 0, "sandboxes alive after the process exited");
    assert_eq!(fakes.e2b.expired_sandboxes(), 0);
    assert_eq!(
        fakes.e2b.killed_sandboxes(),
        fakes.e2b.created_sandboxes(),
        "every sandbox was killed by the service"
    );
    // Every job that had started ended here; the others never left the queue.
    let mut waiting = 0;
    for run in runs.iter().filter(|r| r.done().is_none()) {
        let steps: Vec<&Value> = run.events.iter().map(|e| &e.data["step"]).collect();
        assert!(
            steps.iter().all(|s| *s == "queue" || s.is_null()),
            "job {} stopped mid-way without a Done: {steps:?}",
            run.index
        );
        waiting += 1;
    }
    assert!(waiting >= 1, "some jobs were still queued at the signal");
    assert!(server.leaks.lock().unwrap().is_empty());
    // The restart runs the queued jobs; their streams resume after the last event they showed.
    let restarted = Server::start_in(&binary(), &fakes.env(6), server.data());
    let url = restarted.url("");
    join_all(
        runs.iter_mut()
            .filter(|r| r.done().is_none())
            .map(|run| soak::resume_job(&client, &url, run, Duration::from_secs(120))),
    )
    .await;
    let violations: Vec<String> = runs
        .iter()
        .flat_map(|run| soak::job_violations(run, true))
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(
        fakes.e2b.killed_sandboxes(),
        fakes.e2b.created_sandboxes(),
        "every sandbox of the restarted server's jobs was killed too"
    );
    assert!(restarted.leaks.lock().unwrap().is_empty());
    let cancelled = runs
        .iter()
        .filter(|r| r.done().is_some_and(|d| d["status"] == "cancelled"))
        .count();
    assert!(cancelled >= 3, "{cancelled} jobs were cancelled");
    assert!(
        runs.iter()
            .any(|r| r.done().is_some_and(|d| d["status"] == "succeeded")),
        "some jobs finished before the signal"
    );
}
