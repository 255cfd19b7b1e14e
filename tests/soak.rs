#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fault soak, small enough for the suite: 100 jobs with a fixed seed through a real `serve`
//! whose E2B, Anthropic, OpenAI and GitHub are fakes failing at random at issue 12's rates
//! (`support::soak`). Any broken guarantee fails the test. Longer runs: `scripts/soak`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::faults::{Draw, FaultPlan, Injected};
use support::soak::{self, SoakConfig};

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
