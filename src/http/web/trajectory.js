// One job's trajectory, drawn from its events (API.md §2): the steps with their states and
// durations, a timeline of what the model said and did, the result and the diff.
//
// Every timeline node for an event carries `data-seq` (its id), so the page shows each event
// once: `apply` ignores an id it has already drawn.

import { formatDuration, formatUsd, h, safeHref } from './dom.js';
import { renderEdit, renderPatch } from './diff.js';

/** Pipeline steps in the order they run; a step the server adds later goes last. */
const STEP_ORDER = ['queue', 'sandbox', 'clone', 'setup', 'agent', 'verify', 'commit', 'pr', 'cleanup'];
const STEP_NAMES = {
  queue: 'Queue',
  sandbox: 'Sandbox',
  clone: 'Clone',
  setup: 'Setup',
  agent: 'Agent',
  verify: 'Checks',
  commit: 'Commit',
  pr: 'Pull request',
  cleanup: 'Cleanup',
};
const FINAL = new Set(['succeeded', 'failed', 'cancelled']);

export class Trajectory {
  /** `els`: the page's containers (steps, timeline, result, facts, usage, changes, diff). */
  constructor(els, { onPatchRequest } = {}) {
    this.els = els;
    this.onPatchRequest = onPatchRequest;
    this.tick = null;
    this.reset(null);
  }

  reset(jobId) {
    this.jobId = jobId;
    this.last = 0;
    this.startedAt = null;
    this.state = 'queued';
    this.steps = new Map();
    this.lastAi = null;
    this.files = new Map();
    this.done = null;
    this.pr = null;
    for (const el of [this.els.steps, this.els.timeline, this.els.facts, this.els.usage, this.els.diff]) {
      el.replaceChildren();
    }
    this.els.result.hidden = true;
    this.els.changes.hidden = true;
    clearInterval(this.tick);
    this.tick = setInterval(() => this.renderSteps(), 1000);
  }

  /** Draws event `seq`; returns false for one already drawn. */
  apply(seq, event) {
    if (seq <= this.last) return false;
    this.last = seq;
    if (this.startedAt === null) this.startedAt = event.timestamp;
    const item = this.timelineItem(seq, event);
    if (item) {
      this.els.timeline.append(item);
    }
    switch (event.type) {
      case 'Status':
        this.applyStatus(event);
        break;
      case 'Diff':
        this.showDiff(event);
        break;
      case 'PR Created':
        this.pr = event;
        this.showResult();
        break;
      case 'Done':
        this.done = event;
        this.state = event.status;
        this.showResult();
        clearInterval(this.tick);
        break;
      default:
        break;
    }
    this.renderSteps();
    return true;
  }

  applyStatus(event) {
    const step = this.steps.get(event.step) ?? { started: null, ended: null };
    if (event.state === 'started') {
      step.started = event.timestamp;
      step.ended = null;
    } else {
      step.ended = event.timestamp;
    }
    step.state = event.state === 'started' ? 'running' : event.state;
    step.message = event.message;
    if (typeof event.elapsed_ms === 'number') step.elapsed = event.elapsed_ms;
    this.steps.set(event.step, step);
    if (event.step === 'queue' && event.state === 'succeeded') this.state = 'running';
  }

  renderSteps() {
    const order = (name) => {
      const i = STEP_ORDER.indexOf(name);
      return i === -1 ? STEP_ORDER.length : i;
    };
    const names = [...this.steps.keys()].sort((a, b) => order(a) - order(b));
    const items = names.map((name) => {
      const step = this.steps.get(name);
      let state = step.state;
      // A step still "running" when the job ended was cut short by it.
      if (state === 'running' && this.done) state = 'stopped';
      let ms = step.elapsed;
      if (ms === undefined && step.started !== null) {
        const end = step.ended ?? (this.done ? this.done.timestamp : Date.now());
        ms = Math.max(0, end - step.started);
      }
      return h('li', { class: 'step', dataset: { step: name, state } },
        h('span', { class: 'step-name' }, STEP_NAMES[name] ?? name),
        h('span', { class: 'badge', dataset: { state } }, state),
        h('span', { class: 'step-time' }, formatDuration(ms)),
        h('span', { class: 'step-message' }, step.message ?? ''));
    });
    this.els.steps.replaceChildren(...items);
  }

  /** The timeline node for one event, or null when it joins the model message before it. */
  timelineItem(seq, event) {
    const at = this.startedAt !== null && typeof event.timestamp === 'number'
      ? `+${formatDuration(event.timestamp - this.startedAt) || '0 ms'}`
      : '';
    // `kinds`: space-separated, each becomes an `event-…` class.
    const item = (kinds, ...body) => {
      this.lastAi = null;
      const classes = kinds.split(' ').map((kind) => `event-${kind}`).join(' ');
      return h('li', { class: `event ${classes}`, dataset: { seq, type: event.type } },
        h('span', { class: 'event-time' }, at),
        h('div', { class: 'event-body' }, ...body));
    };
    switch (event.type) {
      case 'Job Started':
        return item('start',
          h('strong', {}, 'Job started'), ' on ', h('code', {}, event.repo_url ?? ''),
          h('div', { class: 'muted' },
            `sandbox ${event.sandbox} · agents ${(event.agents ?? []).join(' → ')} · forge ${event.forge}`));
      case 'Status':
        return item(`status status-${event.state}`,
          h('span', { class: 'badge', dataset: { state: event.state === 'started' ? 'running' : event.state } },
            `${STEP_NAMES[event.step] ?? event.step} ${event.state}`),
          ' ', event.message ?? '',
          typeof event.elapsed_ms === 'number' ? h('span', { class: 'muted' }, ` (${formatDuration(event.elapsed_ms)})`) : null);
      case 'AI Message': {
        const fragment = h('span', { dataset: { seq } }, event.message ?? '');
        // Messages arrive a line or a turn at a time: consecutive ones from one provider are one text.
        if (this.lastAi && this.lastAi.provider === event.provider) {
          this.lastAi.text.append(fragment);
          return null;
        }
        const text = h('div', { class: 'ai-text' }, fragment);
        const li = h('li', { class: 'event event-ai', dataset: { type: event.type } },
          h('span', { class: 'event-time' }, at),
          h('div', { class: 'event-body' }, h('span', { class: 'who' }, event.provider ?? 'model'), text));
        this.lastAi = { provider: event.provider, text };
        return li;
      }
      case 'Tool: Read': {
        const range = event.start_line
          ? ` lines ${event.start_line}–${event.end_line ?? '…'}`
          : '';
        return item('tool', h('span', { class: 'tool' }, 'Read'), ' ', h('code', {}, event.filepath), range);
      }
      case 'Tool: Edit':
        return item('tool',
          h('span', { class: 'tool' }, event.old_str === '' ? 'Write' : 'Edit'), ' ', h('code', {}, event.filepath),
          renderEdit(event.old_str ?? '', event.new_str ?? ''));
      case 'Tool: Bash': {
        const ok = event.exit_code === 0;
        return item('tool',
          h('details', { class: 'bash' },
            h('summary', {},
              h('span', { class: 'tool' }, 'Run'), ' ', h('code', {}, event.command),
              ' ', h('span', { class: 'badge', dataset: { state: ok ? 'succeeded' : 'failed' } }, `exit ${event.exit_code}`)),
            h('pre', { class: 'output' }, event.output === '' ? '(no output)' : event.output)));
      }
      case 'Tool: Search':
        return item('tool', h('span', { class: 'tool' }, 'Search'), ' ', h('code', {}, event.pattern),
          ' in ', h('code', {}, event.path || '.'), ` — ${event.matches} match${event.matches === 1 ? '' : 'es'}`);
      case 'Agent Fallback':
        return item('fallback', h('strong', {}, `Fallback: ${event.from} → ${event.to}`), ' ', event.reason ?? '');
      case 'Diff': {
        const adds = (event.files ?? []).reduce((n, f) => n + (f.additions ?? 0), 0);
        const dels = (event.files ?? []).reduce((n, f) => n + (f.deletions ?? 0), 0);
        const count = (event.files ?? []).length;
        return item('diff', h('strong', {}, 'Diff'),
          ` ${count} file${count === 1 ? '' : 's'} changed, `,
          h('span', { class: 'count-add' }, `+${adds}`), ' ', h('span', { class: 'count-del' }, `−${dels}`),
          ' ', h('a', { href: '#changes' }, 'see the changes'));
      }
      case 'Verify':
        return item(event.passed ? 'verify' : 'verify verify-failed',
          h('span', { class: 'tool' }, 'Check'), ' ', h('code', {}, event.command), ' ',
          h('span', { class: 'badge', dataset: { state: event.passed ? 'succeeded' : 'failed' } },
            event.passed ? 'passed' : `failed (exit ${event.exit_code})`));
      case 'PR Created': {
        const href = safeHref(event.pr_url);
        return item('pr', h('strong', {}, `Pull request #${event.number}${event.draft ? ' (draft)' : ''}`), ' ',
          href ? h('a', { href, target: '_blank', rel: 'noopener noreferrer' }, event.title || event.pr_url) : event.pr_url);
      }
      case 'Error':
        return item('error', h('strong', {}, `Error ${event.code}`),
          event.step ? ` in ${STEP_NAMES[event.step] ?? event.step}` : '', ': ', event.message ?? '',
          event.retryable ? h('span', { class: 'muted' }, ' (retryable)') : null);
      case 'Done':
        return item(`done done-${event.status}`,
          h('strong', {}, `Done: ${event.status}`), ` in ${formatDuration(event.duration_ms)}`,
          event.summary ? h('div', {}, event.summary) : null);
      default:
        // A type this page does not know yet: shown as it came.
        return item('other', h('strong', {}, event.type ?? 'Event'), ' ',
          h('code', { class: 'raw' }, JSON.stringify(event)));
    }
  }

  showDiff(event) {
    const statuses = new Map((event.files ?? []).map((f) => [f.path, f.status]));
    this.diffStatuses = statuses;
    const parts = [renderPatch(event.patch ?? '', statuses)];
    if (event.patch_truncated) {
      parts.unshift(h('p', { class: 'notice' },
        'This diff was shortened in the event stream. ',
        h('button', { type: 'button', class: 'link', onclick: () => this.onPatchRequest?.() }, 'Load the whole patch')));
    }
    this.els.diff.replaceChildren(...parts);
    this.els.changes.hidden = false;
  }

  /** Replaces the diff with the full patch from `GET /jobs/{id}/patch`. */
  showFullPatch(text) {
    this.els.diff.replaceChildren(renderPatch(text, this.diffStatuses ?? new Map()));
  }

  showResult() {
    const done = this.done;
    const facts = [];
    const fact = (name, ...value) => facts.push(h('dt', {}, name), h('dd', {}, ...value));
    if (done) fact('Outcome', h('span', { class: 'badge', dataset: { state: done.status } }, done.status));
    const prUrl = done?.pr_url ?? this.pr?.pr_url;
    const href = prUrl ? safeHref(prUrl) : null;
    if (prUrl) {
      fact('Pull request', href
        ? h('a', { href, target: '_blank', rel: 'noopener noreferrer', class: 'pr-link' }, prUrl)
        : prUrl);
    }
    const branch = done?.branch ?? this.pr?.branch;
    if (branch) fact('Branch', h('code', {}, branch));
    if (done) {
      if (done.summary) fact('Summary', done.summary);
      fact('Files changed', String(done.files_changed ?? 0));
      fact('Duration', formatDuration(done.duration_ms));
      if (done.error) fact('Error', h('code', {}, done.error.code), ' ', done.error.message ?? '');
      const cost = formatUsd(done.cost_usd);
      if (cost) fact('Cost', cost);
    }
    this.els.facts.replaceChildren(...facts);
    this.renderUsage(done?.usage ?? []);
    this.els.result.hidden = false;
  }

  renderUsage(usage) {
    if (!usage.length) {
      this.els.usage.replaceChildren();
      return;
    }
    const withCost = usage.some((u) => typeof u.cost_usd === 'number');
    const head = h('tr', {},
      h('th', { scope: 'col' }, 'Provider'), h('th', { scope: 'col' }, 'Model'),
      h('th', { scope: 'col' }, 'Input tokens'), h('th', { scope: 'col' }, 'Output tokens'),
      withCost ? h('th', { scope: 'col' }, 'Cost') : null);
    const rows = usage.map((u) => h('tr', {},
      h('td', {}, u.provider), h('td', {}, u.model),
      h('td', { class: 'num' }, (u.input_tokens ?? 0).toLocaleString()),
      h('td', { class: 'num' }, (u.output_tokens ?? 0).toLocaleString()),
      withCost ? h('td', { class: 'num' }, formatUsd(u.cost_usd) ?? 'unknown') : null));
    this.els.usage.replaceChildren(
      h('caption', {}, 'Model usage'), h('thead', {}, head), h('tbody', {}, rows));
  }

  isFinished() {
    return FINAL.has(this.state);
  }
}
