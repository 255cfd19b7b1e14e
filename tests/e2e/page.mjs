// The web page end to end, in headless Chromium driven by playwright-core.
//
//   node tests/e2e/page.mjs <server-url>
//
// Run by tests/web_page.rs against a real `tiny-backspace serve` (local sandbox, a model that
// holds its answer until released, then the dummy agent). The environment says:
//   E2E_API_KEY   the server's API key (the page must ask for it)
//   E2E_REPO      a local repository whose app.py says "Hello "
//   E2E_GATE_URL  the model gate: POST /release lets the held model request go on
//   E2E_OUT       where screenshots go
//   E2E_OPEN_URL  a second server with no API keys (dummy agent only)
//   CHROMIUM      the browser (default /usr/bin/chromium)
// Prints `ok - …` per checked behaviour and `result <name>=<value>` lines for the Rust side;
// exits non-zero on the first failure.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

const server = new URL(process.argv[2] ?? '');
const key = need('E2E_API_KEY');
const repo = need('E2E_REPO');
const gate = need('E2E_GATE_URL');
const out = need('E2E_OUT');
const openServer = need('E2E_OPEN_URL');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT_MS = 20_000;

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
}

// Nothing here may hang the suite.
const watchdog = setTimeout(() => {
  console.error('not ok - the browser test did not finish within 90 s');
  process.exit(1);
}, 90_000);

const started = Date.now();

function ok(what) {
  console.log(`ok - ${what} [${((Date.now() - started) / 1000).toFixed(1)} s]`);
}

/**
 * A TCP relay between the browser and the server. Cutting its connections is a real network
 * drop from the page's point of view; it also records every request head the browser sends.
 */
async function startRelay(target) {
  const sockets = new Set();
  const heads = [];
  const relay = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(client);
    sockets.add(upstream);
    client.on('data', (chunk) => {
      const text = chunk.toString('latin1');
      if (/^[A-Z]+ \S+ HTTP\/1\.1\r\n/.test(text)) heads.push(text.split('\r\n\r\n')[0]);
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', drop);
    upstream.on('error', drop);
    client.on('close', drop);
    upstream.on('close', drop);
  });
  await new Promise((resolve) => relay.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${relay.address().port}`,
    heads,
    cut() {
      for (const socket of sockets) socket.destroy();
      sockets.clear();
    },
    close() {
      this.cut();
      relay.close();
    },
  };
}

/** The event ids the page shows, in page order. */
async function shownIds(page) {
  return page.$$eval('#timeline [data-seq]', (nodes) => nodes.map((n) => Number(n.dataset.seq)));
}

function assertOnceEach(ids, what) {
  const expected = Array.from({ length: ids.length }, (_, i) => i + 1);
  assert.deepEqual(ids, expected, `${what}: every event once, in order`);
}

async function jobIdOf(page) {
  await page.waitForFunction(() => /^#job=[0-9a-f-]{36}$/.test(location.hash), null, { timeout: WAIT_MS });
  return page.evaluate(() => location.hash.slice('#job='.length));
}

async function waitAgentHeld(page) {
  await page.locator('#steps [data-step="agent"][data-state="running"]').waitFor({ timeout: WAIT_MS });
  await page.locator('#connection[data-state="live"]').waitFor({ timeout: WAIT_MS });
}

async function main() {
  mkdirSync(out, { recursive: true });
  rmSync(join(out, 'failure.png'), { force: true });
  const relay = await startRelay(server);
  const profile = mkdtempSync(join(tmpdir(), 'tiny-backspace-e2e-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: browserPath,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  context.setDefaultTimeout(WAIT_MS);
  const page = context.pages()[0] ?? (await context.newPage());
  try {
    const problems = [];
    page.on('console', (message) => {
      if (message.type() !== 'error') return;
      const url = message.location()?.url ?? '';
      const text = message.text();
      // Expected: the probe for a server-side job list (this server has no `GET /jobs` yet),
      // and the event stream the relay cut.
      if (/405/.test(text) && /\/jobs\?limit=/.test(url)) return;
      if (/ERR_INCOMPLETE_CHUNKED_ENCODING|ERR_EMPTY_RESPONSE|ERR_CONNECTION/.test(text) && /\/events\?/.test(url)) return;
      problems.push(`console: ${text} (${url})`);
    });
    page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    const requested = [];
    page.on('request', (request) => requested.push(request.url()));

    // The page, under its strict policy, asks for the key this server needs.
    const response = await page.goto(`${relay.url}/`);
    assert.equal(response.status(), 200);
    const csp = response.headers()['content-security-policy'] ?? '';
    assert.match(csp, /default-src 'self'/);
    assert.match(csp, /script-src 'self'(;|$)/);
    const keyField = page.getByLabel('API key');
    await keyField.waitFor();
    const unlabelled = await page.$$eval('input, textarea, select, button', (controls) =>
      controls
        .filter((c) => (c.labels ? c.labels.length === 0 : true) && !c.getAttribute('aria-label') && !c.textContent.trim())
        .map((c) => c.id || c.outerHTML));
    assert.deepEqual(unlabelled, [], 'every control has a name');
    ok('the page loads under a strict CSP and shows the API key field');

    // Submit: the key, then the form.
    await keyField.fill(key);
    await page.getByRole('button', { name: 'Use key' }).click();
    await page.getByLabel('Repository URL').fill(repo);
    await page.getByLabel('What should change?').fill('Replace "Hello " with "Hello, " in app.py');
    await page.getByRole('button', { name: 'Start job' }).click();
    const jobId = await jobIdOf(page);
    await waitAgentHeld(page);
    for (const step of ['queue', 'sandbox', 'clone']) {
      await page.locator(`#steps [data-step="${step}"][data-state="succeeded"]`).waitFor();
    }
    const beforeDrop = await shownIds(page);
    assertOnceEach(beforeDrop, 'live events');
    ok(`submitting the form starts job ${jobId}; its steps appear live (${beforeDrop.length} events so far)`);

    // A network drop: the browser's connections are cut; the stream resumes after the last id.
    const eventRequests = () => relay.heads.filter((head) => head.includes(`/jobs/${jobId}/events?`));
    const opened = eventRequests().length;
    relay.cut();
    await page.locator('#connection[data-state="live"][data-reconnects="1"]').waitFor();
    const resumed = eventRequests().slice(opened);
    assert.equal(resumed.length, 1, 'one reconnect');
    assert.match(resumed[0], new RegExp(`\\r\\nlast-event-id: ${beforeDrop.length}\\r\\n`, 'i'));
    assertOnceEach(await shownIds(page), 'after the reconnect');
    ok(`after a network drop the stream reconnects with Last-Event-ID: ${beforeDrop.length}`);

    // A reload mid-job comes back to the same job; the key must be given again.
    await page.reload();
    await page.locator('#connection[data-state="needs-key"]').waitFor();
    assert.equal(await page.locator('#job-title').textContent(), `Job ${jobId.slice(0, 8)}`);
    await page.getByLabel('API key').fill(key);
    await page.getByLabel('API key').press('Enter');
    await waitAgentHeld(page);
    await page.waitForFunction((n) => document.querySelectorAll('#timeline [data-seq]').length >= n, beforeDrop.length);
    assertOnceEach(await shownIds(page), 'after the reload');
    ok('a reload mid-job follows the same job again, each event once');

    // The model answers (it refuses, so the dummy agent takes over) and the job finishes.
    const release = await fetch(`${gate}/release`, { method: 'POST' });
    assert.deepEqual(await release.json(), { released: 1 }, 'one model request was held');
    await page.locator('#job-state[data-state="succeeded"]').waitFor();
    const all = await shownIds(page);
    assertOnceEach(all, 'the whole job');
    const lastType = await page.$eval(`#timeline [data-seq="${all.length}"]`, (n) => n.dataset.type);
    assert.equal(lastType, 'Done');
    assert.equal(await page.locator('#timeline [data-type="Done"]').count(), 1);
    await page.locator('#timeline [data-type="Agent Fallback"]').waitFor();
    await page.locator('#timeline [data-type="Tool: Edit"] .mini-diff .diff-add').first().waitFor();
    const file = page.locator('#diff .diff-file[data-path="app.py"]');
    await file.waitFor();
    assert.match(await file.locator('.diff-file-header').textContent(), /app\.py.*\+1.*−1/s);
    const added = await file.locator('.diff-line.diff-add .code').allTextContents();
    const removed = await file.locator('.diff-line.diff-del .code').allTextContents();
    assert.deepEqual(added, ['print("Hello, " + name)']);
    assert.deepEqual(removed, ['print("Hello " + name)']);
    for (const step of ['agent', 'commit', 'cleanup']) {
      await page.locator(`#steps [data-step="${step}"][data-state="succeeded"]`).waitFor();
    }
    const branch = (await page.locator('#result-facts code').first().textContent()).trim();
    assert.match(branch, /^tiny-backspace\//);
    await page.locator('#recent-list [data-job="' + jobId + '"] .badge[data-state="succeeded"]').waitFor();
    ok(`the finished job shows its ${all.length} events, the fallback, the diff, branch ${branch} and its state`);
    console.log(`result job=${jobId}`);
    console.log(`result branch=${branch}`);
    await page.screenshot({ path: join(out, 'finished.png'), fullPage: true });
    // The README's picture: the top of the finished job's page.
    await page.setViewportSize({ width: 1100, height: 1250 });
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: join(out, 'page.png') });

    // At a phone's width nothing overflows sideways.
    await page.setViewportSize({ width: 390, height: 844 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
    await page.screenshot({ path: join(out, 'phone.png'), fullPage: false });
    await page.setViewportSize({ width: 1280, height: 900 });
    ok('at 390 px wide the page fits the screen');

    // A second job, entered with the keyboard, then cancelled from the page. (The reload
    // emptied the form.)
    await page.getByLabel('Repository URL').fill(repo);
    await page.keyboard.press('Tab');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'prompt');
    await page.keyboard.press('ControlOrMeta+A');
    await page.keyboard.type('append "one more line" to app.py');
    const order = [];
    for (let i = 0; i < 3; i += 1) {
      await page.keyboard.press('Tab');
      order.push(await page.evaluate(() => document.activeElement.id));
    }
    assert.deepEqual(order, ['base-branch', 'draft', 'submit'], 'focus order through the form');
    await page.keyboard.press('Enter');
    await page.waitForFunction((first) => location.hash !== `#job=${first}` && /^#job=/.test(location.hash), jobId);
    const second = await jobIdOf(page);
    await waitAgentHeld(page);
    await page.getByRole('button', { name: 'Cancel job' }).focus();
    await page.keyboard.press('Enter');
    await page.locator('#job-state[data-state="cancelled"]').waitFor();
    await page.locator('#timeline [data-type="Done"].event-done-cancelled').waitFor();
    await page.locator('#steps [data-step="cleanup"][data-state="succeeded"]').waitFor();
    assert.equal(await page.getByRole('button', { name: 'Cancel job' }).isVisible(), false);
    assertOnceEach(await shownIds(page), 'the cancelled job');
    ok(`the Cancel button stops job ${second}, which ends cancelled and cleaned up`);
    console.log(`result cancelled=${second}`);
    await page.screenshot({ path: join(out, 'cancelled.png'), fullPage: true });

    // Both jobs are listed; every request stayed on this origin, and no URL held the key.
    for (const id of [jobId, second]) {
      await page.locator(`#recent-list [data-job="${id}"]`).waitFor();
    }
    assert.equal(await page.locator('#recent-source').textContent(), 'Recent jobs on this server.');
    for (const url of requested) {
      assert.ok(url.startsWith(`${relay.url}/`), `a request left the origin: ${url}`);
      assert.ok(!url.includes(key), 'the API key is in a URL');
    }
    const streams = relay.heads.filter((head) => /^GET \/jobs\/[^ /]+\/events[? ]/.test(head));
    assert.ok(streams.length >= 3, 'the event streams went through the relay');
    for (const head of streams) {
      assert.match(head.split('\r\n')[0], /[?&]token=/, 'event streams carry a token');
      assert.ok(!head.includes(key), 'the API key was sent to the events route');
    }
    assert.deepEqual(problems, [], 'no console errors (a CSP violation would be one)');
    ok('all requests stayed on the origin, the key never went into a URL, no console errors');

    // A server with no keys (the default on a laptop): no key field, no tokens, a job to the end.
    const open = await context.newPage();
    const openRequests = [];
    open.on('request', (request) => openRequests.push(request.url()));
    open.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    await open.goto(`${openServer}/`);
    await open.locator('#backends', { hasText: 'agents dummy' }).waitFor();
    assert.equal(await open.locator('#key-form').isVisible(), false);
    await open.getByLabel('Repository URL').fill(repo);
    await open.getByLabel('What should change?').fill('append "Made with Tiny Backspace" to README.md');
    await open.getByLabel('Open the pull request as a draft').check();
    await open.getByRole('button', { name: 'Start job' }).click();
    await jobIdOf(open);
    await open.locator('#job-state[data-state="succeeded"]').waitFor();
    assertOnceEach(await shownIds(open), 'the open server\'s job');
    const readme = open.locator('#diff .diff-file[data-path="README.md"] .diff-line.diff-add .code');
    assert.deepEqual(await readme.allTextContents(), ['Made with Tiny Backspace']);
    const openBranch = (await open.locator('#result-facts code').first().textContent()).trim();
    const openStreams = openRequests.filter((url) => /\/jobs\/[^/]+\/events(\?|$)/.test(url));
    assert.ok(openStreams.length >= 1 && openStreams.every((url) => !url.includes('token=')), 'no token without keys');
    assert.deepEqual(problems, []);
    ok(`with no API keys the page asks for none and runs a job to the end (${openBranch})`);
    console.log(`result open_branch=${openBranch}`);
    const openJob = await jobIdOf(open);
    await open.close();
    // A new tab knows nothing of that job (its session storage is empty): the server's list
    // (`GET /jobs`) shows it, finished.
    const later = await context.newPage();
    later.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    await later.goto(`${openServer}/`);
    await later.locator(`#recent-list [data-job="${openJob}"] .badge[data-state="succeeded"]`).waitFor();
    assert.equal(await later.locator('#recent-source').textContent(), 'Recent jobs on this server.');
    assert.deepEqual(problems, []);
    ok(`a new tab lists job ${openJob} from the server's GET /jobs`);
    await later.close();
  } catch (error) {
    await page.screenshot({ path: join(out, 'failure.png'), fullPage: true }).catch(() => {});
    throw error;
  } finally {
    await context.close();
    relay.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(
  () => {
    clearTimeout(watchdog);
    process.exit(0);
  },
  (error) => {
    console.error(`not ok - ${error.stack ?? error}`);
    process.exit(1);
  },
);
