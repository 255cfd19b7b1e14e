#!/usr/bin/env bash
# Creates .venv with the official SDKs (e2b, anthropic, openai, PyGithub) pinned in
# tests/conformance/requirements.txt. The conformance tests run them against our fake servers.
set -euo pipefail
cd "$(dirname "$0")/.."
req=tests/conformance/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --require-virtualenv -r "$req"
echo "$want" > "$stamp"
echo "python SDKs installed in .venv"
