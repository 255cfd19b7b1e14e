//! Serving a large patch costs socket buffers, not copies: 200 clients that ask for a multi-MiB
//! patch and never read it leave the process's memory almost where it was. (Its own test binary,
//! so no other test's allocations blur the measurement.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::harness::{Harness, HarnessOptions, Scripted, Step, call, events_of, repo_with};
use tiny_backspace::http::{AppState, EdgeLimits, router, serve};
use tiny_backspace::repo::RepoPolicy;
use tokio::io::AsyncWriteExt;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_that_never_read_a_large_patch_cost_little_memory() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let model = Scripted::new(
        "model",
        vec![
            Step::Turn(vec![call(
                "c1",
                "run_command",
                json!({"command": "head -c 6000000 /dev/zero | tr '\\0' x | fold -w 99 > big.txt"}),
            )]),
            Step::Turn(vec![call(
                "c2",
                "finish",
                json!({"title": "Add big.txt", "summary": "A large file."}),
            )]),
        ],
    );
    let harness = Harness::new(HarnessOptions {
        agents: vec![model],
        ..HarnessOptions::default()
    })
    .await;
    let job = harness.submit(repo.path(), "add a large file").await;
    events_of(&job).await;
    let (patch, _) = job.patch().await.expect("a patch");
    let patch_len = patch.len();
    assert!(patch_len > 5_000_000, "{patch_len}");

    let app = router(Arc::new(AppState {
        registry: harness.registry.clone(),
        repo_policy: RepoPolicy::default(),
        api_keys: vec![],
        admin_api_keys: vec![],
        allowed_hosts: vec![],
        cors_origins: vec![],
        metrics: Default::default(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, EdgeLimits::default(), async {
        let _ = stop_rx.await;
    }));

    let before = rss_bytes();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET /jobs/{}/patch HTTP/1.1\r\nHost: x\r\n\r\n", job.id()).as_bytes(),
            )
            .await
            .unwrap();
        clients.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes();
    let grown = after.saturating_sub(before);
    println!(
        "patch {:.1} MiB; RSS {:.1} → {:.1} MiB with 200 non-reading clients (+{:.1} MiB)",
        patch_len as f64 / 1048576.0,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0
    );
    assert!(grown < 50 * 1024 * 1024, "RSS grew by {grown} bytes");
    drop(clients);
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .unwrap()
        .unwrap();
}
