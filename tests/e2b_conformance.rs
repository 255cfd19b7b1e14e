#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The official `e2b` Python SDK (pinned in `tests/conformance/requirements.txt`) runs
//! `tests/conformance/e2b_sdk.py` against the fake E2B: create, `commands.run` (stdout, stderr,
//! a non-zero exit), `files.write`/`read`/`list`, `kill`. A missing venv fails the test (see
//! `support::python`), so the fake cannot drift into something only our client accepts.

mod support;

use support::fake_e2b::FakeE2b;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdk_accepts_the_fake() {
    let fake = FakeE2b::start().await;
    let out = support::python::run_script("e2b_sdk.py", fake.env()).await;
    support::python::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    assert_eq!(
        fake.live_sandboxes(),
        0,
        "the SDK's kill must leave no sandbox"
    );

    let requests = fake.requests();
    // The SDK used the v2 create and the one port for both planes, routed by header.
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v2/sandboxes");
    let start = requests
        .iter()
        .find(|r| r.path == "/process.Process/Start")
        .expect("a command ran");
    assert!(start.sandbox_id.is_some());
    assert_eq!(start.headers["e2b-sandbox-port"], "49983");
    assert_eq!(start.headers["connect-protocol-version"], "1");
    assert!(start.headers.contains_key("x-access-token"));
    assert!(
        start
            .command
            .as_deref()
            .unwrap()
            .starts_with("/bin/bash -l -c echo hi")
    );
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.path.starts_with("/sandboxes/"))
    );
}
