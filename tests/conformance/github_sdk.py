"""PyGithub (the official-grade Python client) runs the whole pull-request flow against the fake
GitHub, so the fake cannot drift into something only octocrab accepts.

Environment: GITHUB_API_URL (the fake's REST root, maybe under /api/v3), FAKE_ROOT (where the
/_fake hooks live), ALICE_TOKEN (owns alice/widgets), BOB_TOKEN (may only read it).
Exits non-zero with a message on the first mismatch.
"""

import base64
import hashlib
import json
import os
import sys
import time
import urllib.request

from github import (
    Auth,
    BadCredentialsException,
    Github,
    GithubException,
    InputGitAuthor,
    InputGitTreeElement,
    RateLimitExceededException,
    UnknownObjectException,
)

API = os.environ["GITHUB_API_URL"]
ROOT = os.environ["FAKE_ROOT"]
ALICE = os.environ["ALICE_TOKEN"]
BOB = os.environ["BOB_TOKEN"]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def client(token, retry=None):
    return Github(
        base_url=API,
        auth=Auth.Token(token),
        seconds_between_requests=0,
        seconds_between_writes=0,
        retry=retry,
        timeout=30,
    )


def fail_next(method, path_contains, status, message, headers=None):
    body = json.dumps(
        {
            "method": method,
            "path_contains": path_contains,
            "status": status,
            "body": {"message": message, "documentation_url": "https://docs.github.com/rest"},
            "headers": [[k, v] for k, v in (headers or {}).items()],
        }
    ).encode()
    req = urllib.request.Request(
        ROOT + "/_fake/fail", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(req, timeout=10).read()


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def same_repo_flow():
    g = client(ALICE)
    check(g.get_user().login == "alice", "GET /user")
    repo = g.get_repo("alice/widgets")
    check(repo.full_name == "alice/widgets" and repo.default_branch == "main", "GET repo")
    check(repo.permissions.push and repo.permissions.pull, "repo permissions for the owner")

    ref = repo.get_git_ref("heads/main")
    base = repo.get_git_commit(ref.object.sha)
    check(ref.ref == "refs/heads/main" and ref.object.type == "commit", "GET git/ref/heads/main")
    check(len(base.tree.sha) == 40 and base.message == "Initial commit\n", "GET git/commits/{sha}")

    binary = bytes([0, 159, 146, 150, 255, 0, 1, 2])
    blob = repo.create_git_blob(base64.b64encode(binary).decode(), "base64")
    check(blob.sha == git_blob_sha(binary), "blob sha is git's own (base64)")
    text_blob = repo.create_git_blob("héllo\n", "utf-8")
    check(text_blob.sha == git_blob_sha("héllo\n".encode()), "blob sha is git's own (utf-8)")
    exec_blob = repo.create_git_blob("#!/bin/sh\necho hi\n", "utf-8")

    tree = repo.create_git_tree(
        [
            InputGitTreeElement("run.sh", "100755", "blob", sha=exec_blob.sha),
            InputGitTreeElement("old.txt", "100644", "blob", sha=None),
            InputGitTreeElement("README.md", "100644", "blob", content="# Widgets\n\nEdited.\n"),
            InputGitTreeElement("docs/link", "120000", "blob", content="../README.md"),
            InputGitTreeElement("assets/logo.bin", "100644", "blob", sha=blob.sha),
            InputGitTreeElement("src/new/deep.txt", "100644", "blob", sha=text_blob.sha),
        ],
        base_tree=base.tree,
    )
    top = {e.path: (e.mode, e.type) for e in tree.tree}
    check("old.txt" not in top, "sha: null deletes a path")
    check(top.get("run.sh") == ("100755", "blob"), "executable mode kept")
    check(top.get("docs") == ("040000", "tree") and top.get("src") == ("040000", "tree"), "nested paths make trees")

    try:
        repo.create_git_tree([InputGitTreeElement("nope.txt", "100644", "blob", sha=None)], base_tree=base.tree)
        check(False, "deleting a missing path fails")
    except GithubException as e:
        check(e.status == 422, "deleting a missing path is a 422")

    author = InputGitAuthor("Tiny Backspace", "tiny-backspace@users.noreply.github.com", "2024-05-01T12:00:00Z")
    commit = repo.create_git_commit("Edit widgets\n", tree, [base], author=author, committer=author)
    check(commit.tree.sha == tree.sha and commit.parents[0].sha == base.sha, "commit links tree and parent")
    check(commit.author.name == "Tiny Backspace" and commit.message == "Edit widgets\n", "commit fields")
    check(commit.author.date.year == 2024, "commit date kept")

    new_ref = repo.create_git_ref("refs/heads/agent/x", commit.sha)
    check(new_ref.object.sha == commit.sha, "POST git/refs")
    try:
        repo.create_git_ref("refs/heads/agent/x", commit.sha)
        check(False, "creating an existing ref fails")
    except GithubException as e:
        check(e.status == 422 and "already exists" in e.data["message"], "existing ref is a 422")

    tree2 = repo.create_git_tree(
        [InputGitTreeElement("README.md", "100644", "blob", content="second\n")], base_tree=tree
    )
    commit2 = repo.create_git_commit("Second\n", tree2, [commit])
    new_ref.edit(commit2.sha, force=False)
    check(repo.get_git_ref("heads/agent/x").object.sha == commit2.sha, "PATCH git/refs fast-forward")
    try:
        new_ref.edit(commit.sha, force=False)
        check(False, "non-fast-forward update fails")
    except GithubException as e:
        check(e.status == 422 and "fast forward" in e.data["message"], "non-fast-forward is a 422")

    pr = repo.create_pull(base="main", head="agent/x", title="Edit widgets", body="Because.", draft=True)
    check(pr.number == 1 and pr.draft and pr.head.ref == "agent/x" and pr.base.ref == "main", "POST pulls")
    check(pr.html_url.endswith("/alice/widgets/pull/1"), "html_url")
    pr.add_to_labels("agent")
    check([l.name for l in repo.get_pull(1).labels] == ["agent"], "labels (bare array body)")
    try:
        repo.create_pull(base="main", head="agent/x", title="again", body="")
        check(False, "duplicate pull request fails")
    except GithubException as e:
        msgs = [err.get("message", "") for err in e.data.get("errors", [])]
        check(e.status == 422 and any("already exists" in m for m in msgs), "duplicate PR is a 422")
    found = list(repo.get_pulls(state="open", head="alice:agent/x"))
    check([p.number for p in found] == [1], "GET pulls?head=owner:branch")


def fork_flow():
    g = client(BOB)
    upstream = g.get_repo("alice/widgets")
    check(not upstream.permissions.push, "a reader cannot push")
    fork = upstream.create_fork()
    check(fork.full_name == "bob/widgets" and fork.fork, "POST forks")
    check(upstream.create_fork().full_name == "bob/widgets", "forking again returns the fork")

    deadline = time.time() + 10
    while True:
        try:
            ref = fork.get_git_ref("heads/main")
            ref.object  # lazy: the GET happens here
            break
        except GithubException as e:
            check(e.status in (404, 409), "a fork not ready yet is 404/409")
            check(time.time() < deadline, "the fork becomes ready")
            time.sleep(0.1)
    base = fork.get_git_commit(ref.object.sha)
    tree = fork.create_git_tree(
        [InputGitTreeElement("FORK.md", "100644", "blob", content="from a fork\n")], base_tree=base.tree
    )
    commit = fork.create_git_commit("From a fork\n", tree, [base])
    fork.create_git_ref("refs/heads/fix", commit.sha)
    pr = upstream.create_pull(
        base="main", head="bob:fix", title="From a fork", body="", maintainer_can_modify=True
    )
    check(pr.head.repo.full_name == "bob/widgets" and pr.head.label == "bob:fix", "PR from forkowner:branch")
    try:
        upstream.create_git_blob("x", "utf-8")
        check(False, "a reader cannot write blobs")
    except GithubException as e:
        check(e.status in (403, 404), "writes without permission are refused")


def errors():
    try:
        client(ALICE).get_repo("alice/nope")
        check(False, "missing repo fails")
    except UnknownObjectException:
        check(True, "missing repo is UnknownObjectException (404)")
    try:
        client("tok-wrong-000000").get_user().login
        check(False, "bad token fails")
    except BadCredentialsException:
        check(True, "bad token is BadCredentialsException (401)")
    fail_next(
        "GET",
        "/repos/alice/widgets",
        403,
        "API rate limit exceeded for user ID 1001.",
        {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 600)},
    )
    try:
        client(ALICE).get_repo("alice/widgets")
        check(False, "rate limit fails")
    except RateLimitExceededException:
        check(True, "primary rate limit is RateLimitExceededException")
    fail_next(
        "GET",
        "/repos/alice/widgets",
        403,
        "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        {"Retry-After": "1"},
    )
    repo = client(ALICE, retry=GithubRetryOnce()).get_repo("alice/widgets")
    check(repo.full_name == "alice/widgets", "secondary rate limit honoured Retry-After and retried")


def GithubRetryOnce():
    from github import GithubRetry

    return GithubRetry(total=2, backoff_factor=0)


same_repo_flow()
fork_flow()
errors()
print("ALL OK")
