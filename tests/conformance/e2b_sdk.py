"""The official e2b Python SDK against our fake E2B (tests/support/fake_e2b.rs).

Run by tests/e2b_conformance.rs with E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL pointing at
the fake. Exits non-zero (with a traceback) on the first mismatch.
"""

import sys

from e2b import (
    CommandExitException,
    FileNotFoundException,
    FileType,
    Sandbox,
    SandboxNotRunningException,
    SandboxQuery,
)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    sbx = Sandbox.create(envs={"GREETING": "hello from envVars"})
    print("created", sbx.sandbox_id)

    # stdout, streamed and collected
    seen = []
    result = sbx.commands.run("echo hi; echo $GREETING", on_stdout=seen.append)
    check(result.exit_code == 0, f"exit code {result.exit_code}")
    check(result.stdout == "hi\nhello from envVars\n", f"stdout {result.stdout!r}")
    check("".join(seen) == result.stdout, f"streamed {seen!r}")

    # stderr
    result = sbx.commands.run("echo oops >&2")
    check(result.stderr == "oops\n", f"stderr {result.stderr!r}")
    check(result.stdout == "", f"stdout {result.stdout!r}")

    # a non-zero exit raises, with both streams and the code
    try:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
        raise AssertionError("a non-zero exit did not raise")
    except CommandExitException as e:
        check(e.exit_code == 3, f"exit code {e.exit_code}")
        check(e.stdout == "partial\n", f"stdout {e.stdout!r}")
        check(e.stderr == "bad\n", f"stderr {e.stderr!r}")

    # cwd and envs per command (commands use paths relative to the home directory: the fake
    # runs them on its host, mapping only cwd and file-API paths)
    result = sbx.commands.run("mkdir -p work && echo ok", timeout=10)
    check(result.stdout == "ok\n", f"mkdir {result.stdout!r}")
    result = sbx.commands.run("pwd; echo $X", cwd="/home/user/work", envs={"X": "42"})
    check(result.stdout.splitlines()[-1] == "42", f"envs {result.stdout!r}")
    check(result.stdout.splitlines()[0].endswith("/work"), f"cwd {result.stdout!r}")

    # files: write, read (text and bytes), list, exists
    info = sbx.files.write("/home/user/a.txt", "x")
    check(info.path == "/home/user/a.txt", f"write info {info!r}")
    check(sbx.files.read("/home/user/a.txt") == "x", "read back")
    payload = bytes(range(256)) * 64
    sbx.files.write("/home/user/dir/blob.bin", payload)
    check(sbx.files.read("/home/user/dir/blob.bin", format="bytes") == payload, "binary read")
    result = sbx.commands.run("cat /dev/null; wc -c < dir/blob.bin", cwd="/home/user")
    check(result.stdout.strip() == str(len(payload)), f"size seen by a command {result.stdout!r}")

    entries = {e.name: e for e in sbx.files.list("/home/user")}
    check("a.txt" in entries and "dir" in entries, f"list {sorted(entries)}")
    check(entries["a.txt"].type == FileType.FILE, f"type {entries['a.txt'].type}")
    check(entries["dir"].type == FileType.DIR, f"type {entries['dir'].type}")
    check(entries["a.txt"].size == 1, f"size {entries['a.txt'].size}")
    check(entries["a.txt"].path == "/home/user/a.txt", f"path {entries['a.txt'].path}")
    check(sbx.files.exists("/home/user/a.txt"), "exists")
    check(not sbx.files.exists("/home/user/nope.txt"), "not exists")

    try:
        sbx.files.read("/home/user/nope.txt")
        raise AssertionError("reading a missing file did not raise")
    except FileNotFoundException:
        pass

    # lifetime and info
    sbx.set_timeout(120)
    check(sbx.get_info().sandbox_id == sbx.sandbox_id, "get_info")

    # list filtered by metadata, as the backend looks for sandboxes a lost create answer started
    other = Sandbox.create(metadata={"tiny_backspace_create": "tb-x 1&2", "job": "j"})
    listed = Sandbox.list(query=SandboxQuery(metadata={"tiny_backspace_create": "tb-x 1&2"}))
    ids = [s.sandbox_id for s in listed.next_items()]
    check(ids == [other.sandbox_id], f"metadata filter {ids!r}")
    check(not listed.has_next, "one page")
    both = [s.sandbox_id for s in Sandbox.list().next_items()]
    check(sorted(both) == sorted([sbx.sandbox_id, other.sandbox_id]), f"unfiltered {both!r}")
    info = Sandbox.list(query=SandboxQuery(metadata={"job": "j"})).next_items()[0]
    check(info.metadata == {"tiny_backspace_create": "tb-x 1&2", "job": "j"}, f"metadata {info.metadata!r}")
    check(other.kill() is True, "kill the listed sandbox")

    # kill: True, then False; the sandbox is then unreachable
    check(sbx.kill() is True, "first kill")
    check(Sandbox.kill(sbx.sandbox_id) is False, "second kill")
    try:
        sbx.commands.run("echo after")
        raise AssertionError("a command after kill did not raise")
    except SandboxNotRunningException:
        pass

    print("ok")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
