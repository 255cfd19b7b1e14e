#!/usr/bin/env bash
# Installs what the web page's browser test (tests/web_page.rs) needs: playwright-core, pinned in
# tests/e2e/package-lock.json, into tests/e2e/node_modules. It drives the system Chromium
# (Debian's `chromium` package; .ci/run installs it), so no browser is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "the browser test needs Node.js 20+ and npm (apt-get install nodejs npm)" >&2
  exit 1
fi
lock=tests/e2e/package-lock.json
stamp=tests/e2e/node_modules/.package-lock.sha256
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ -f tests/e2e/node_modules/playwright-core/package.json ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/e2e --ignore-scripts --no-audit --no-fund --loglevel=error
echo "$want" > "$stamp"
echo "playwright-core installed in tests/e2e/node_modules"
