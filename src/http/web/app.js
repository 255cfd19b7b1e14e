// The page: start a job, follow it live, see its diff and result, cancel it, and list recent
// jobs. The job being followed is in the URL (`#job=<id>`), so a reload comes back to it.

import * as api from './api.js';
import { followJob } from './stream.js';
import { Trajectory } from './trajectory.js';
import { h, shortId } from './dom.js';

const $ = (id) => document.getElementById(id);
const JOB_HASH = /^#job=([0-9a-fA-F-]{36})$/;
const SESSION_KEY = 'tiny-backspace.jobs';
const FINAL = new Set(['succeeded', 'failed', 'cancelled']);

const page = {
  auth: false,
  jobId: null,
  /** Whether the server lists jobs (`GET /jobs`); undefined until asked. */
  serverList: undefined,
  stream: null,
  trajectory: null,
};

function announce(text) {
  $('announce').textContent = text;
}

// --- Jobs started in this tab (the page's list when the server keeps none) -------------------

function sessionJobs() {
  try {
    const list = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? '[]');
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function rememberJob(entry) {
  const list = sessionJobs().filter((job) => job.job_id !== entry.job_id);
  const previous = sessionJobs().find((job) => job.job_id === entry.job_id) ?? {};
  list.unshift({ ...previous, ...entry });
  try {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(list.slice(0, 20)));
  } catch {
    // Storage full or disabled: the list is a convenience.
  }
}

async function renderRecent() {
  const list = $('recent-list');
  let jobs = null;
  let source = 'Jobs started in this tab.';
  if (page.serverList !== false && (!page.auth || api.hasKey())) {
    try {
      jobs = await api.listJobs();
      // Asked once per page: a server without a list does not grow one while the page is open.
      page.serverList = jobs !== null;
      if (jobs) source = 'Recent jobs on this server.';
    } catch {
      jobs = null;
    }
  }
  if (!jobs) {
    jobs = sessionJobs();
    // Bring states up to date where the server can be asked.
    if (!page.auth || api.hasKey()) {
      await Promise.all(jobs.filter((job) => !FINAL.has(job.state)).map(async (job) => {
        try {
          const view = await api.getJob(job.job_id);
          rememberJob({ job_id: job.job_id, state: view.state });
          job.state = view.state;
        } catch (error) {
          if (error instanceof api.ApiError && error.status === 404) job.state = 'unknown';
        }
      }));
    }
  }
  $('recent-source').textContent = source;
  if (!jobs.length) {
    list.replaceChildren(h('li', { class: 'muted' }, 'No jobs yet.'));
    return;
  }
  list.replaceChildren(...jobs.map((job) => {
    const prompt = String(job.prompt ?? '').trim();
    const label = prompt.length > 80 ? `${prompt.slice(0, 79)}…` : prompt || shortId(job.job_id);
    const state = job.state ?? 'queued';
    return h('li', { dataset: { job: job.job_id } },
      h('a', { href: `#job=${job.job_id}`, 'aria-current': job.job_id === page.jobId ? 'true' : null }, label),
      h('div', { class: 'recent-meta' },
        h('span', { class: 'badge', dataset: { state } }, state),
        ' ', h('span', { class: 'muted' }, job.repo_url ?? '')));
  }));
}

// --- Following one job -----------------------------------------------------------------------

function setConnection(state, info = {}) {
  const el = $('connection');
  el.dataset.state = state;
  el.dataset.reconnects = String(info.reconnects ?? 0);
  el.textContent = {
    connecting: 'connecting…',
    live: 'live',
    reconnecting: 'connection lost, reconnecting…',
    ended: '',
    'needs-key': 'waiting for the API key',
    gone: '',
    idle: '',
  }[state] ?? state;
}

function notice(text) {
  const el = $('job-notice');
  el.textContent = text ?? '';
  el.hidden = !text;
}

function setJobState(state) {
  const badge = $('job-state');
  badge.dataset.state = state;
  badge.textContent = state;
  const cancel = $('cancel');
  const over = FINAL.has(state) || state === 'unknown';
  // The button goes away with the job: keep keyboard focus on the job rather than lose it.
  if (over && document.activeElement === cancel) $('job-title').focus();
  cancel.hidden = over;
  document.title = `${state} · ${shortId(page.jobId)} · Tiny Backspace`;
}

function openJob(jobId, { focus = false } = {}) {
  if (page.stream) page.stream.close();
  page.stream = null;
  page.jobId = jobId;
  page.trajectory.reset(jobId);
  $('job').hidden = false;
  $('job-title').textContent = `Job ${shortId(jobId)}`;
  $('job-meta').replaceChildren();
  notice(null);
  setJobState('queued');
  $('cancel').disabled = false;
  if (focus) $('job-title').focus();
  for (const link of document.querySelectorAll('#recent-list a')) {
    if (link.getAttribute('href') === `#job=${jobId}`) link.setAttribute('aria-current', 'true');
    else link.removeAttribute('aria-current');
  }
  page.stream = followJob(jobId, {
    auth: page.auth,
    onEvent(seq, event) {
      page.trajectory.apply(seq, event);
      if (event.type === 'Job Started') {
        $('job-meta').replaceChildren(h('code', {}, event.repo_url ?? ''), ' — ', event.prompt ?? '');
        rememberJob({ job_id: jobId, repo_url: event.repo_url, prompt: event.prompt });
      }
      const state = page.trajectory.state;
      if ($('job-state').dataset.state !== state) {
        setJobState(state);
        if (FINAL.has(state)) {
          announce(`Job ${shortId(jobId)} ${state}.`);
          notice(null);
          rememberJob({ job_id: jobId, state });
          renderRecent();
        }
      }
    },
    onConnection(state, info) {
      setConnection(state, info);
      if (state === 'needs-key') {
        notice('Enter the API key above to follow this job.');
        $('api-key').focus();
      } else if (state === 'gone') {
        notice('The server does not know this job (it may have restarted, or the job has expired).');
        setJobState('unknown');
      } else if (state === 'live' && $('job-notice').textContent.startsWith('Enter the API key')) {
        notice(null);
      }
    },
  });
}

function jobFromHash() {
  const match = JOB_HASH.exec(location.hash);
  return match ? match[1].toLowerCase() : null;
}

function onHashChange() {
  const jobId = jobFromHash();
  if (jobId && jobId !== page.jobId) openJob(jobId, { focus: true });
}

// --- Forms -----------------------------------------------------------------------------------

function formError(text) {
  const el = $('form-error');
  el.textContent = text ?? '';
  el.hidden = !text;
}

async function onSubmit(event) {
  event.preventDefault();
  formError(null);
  const form = $('job-form');
  if (!form.reportValidity()) return;
  if (page.auth && !api.hasKey()) {
    formError('This server needs an API key: enter it above first.');
    $('api-key').focus();
    return;
  }
  const request = {
    repoUrl: $('repo-url').value.trim(),
    prompt: $('prompt').value,
    draft: $('draft').checked,
  };
  const base = $('base-branch').value.trim();
  if (base) request.baseBranch = base;
  const button = $('submit');
  button.disabled = true;
  button.textContent = 'Starting…';
  try {
    const started = await api.startJob(request);
    rememberJob({
      job_id: started.job_id,
      repo_url: request.repoUrl,
      prompt: request.prompt,
      state: 'queued',
      created_at: Date.now(),
    });
    location.hash = `#job=${started.job_id}`;
    renderRecent();
  } catch (error) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : '';
    formError(`${error.message}${wait}${error.code ? ` (${error.code})` : ''}`);
  } finally {
    button.disabled = false;
    button.textContent = 'Start job';
  }
}

function onKey(event) {
  event.preventDefault();
  const value = $('api-key').value;
  if (!value.trim()) return;
  api.setKey(value);
  $('key-status').textContent = 'Key set for this page.';
  formError(null);
  if (page.stream) page.stream.resume();
  renderRecent();
}

async function onCancel() {
  if (!page.jobId) return;
  const button = $('cancel');
  button.disabled = true;
  try {
    await api.cancelJob(page.jobId);
    notice('Cancelling: the job stops and cleans up its sandbox.');
  } catch (error) {
    if (!(error instanceof api.ApiError && error.code === 'job_finished')) {
      notice(`Could not cancel: ${error.message}`);
      button.disabled = false;
    }
  }
}

async function onLoadPatch() {
  try {
    const patch = await api.getPatch(page.jobId);
    page.trajectory.showFullPatch(patch.text);
  } catch (error) {
    notice(`Could not load the patch: ${error.message}`);
  }
}

// --- Start-up --------------------------------------------------------------------------------

async function start() {
  page.trajectory = new Trajectory({
    steps: $('steps'),
    timeline: $('timeline'),
    result: $('result'),
    facts: $('result-facts'),
    usage: $('usage'),
    changes: $('changes'),
    diff: $('diff'),
  }, { onPatchRequest: onLoadPatch });
  $('job-form').addEventListener('submit', onSubmit);
  $('key-form').addEventListener('submit', onKey);
  $('cancel').addEventListener('click', onCancel);
  window.addEventListener('hashchange', onHashChange);
  try {
    const health = await api.health();
    page.auth = health.auth === true;
    $('backends').textContent = [
      `sandbox ${health.sandbox}${health.isolation ? ` (${health.isolation})` : ''}`,
      `agents ${(health.agents ?? []).join(' → ')}`,
      `forge ${health.forge}`,
    ].join(' · ');
  } catch (error) {
    $('backends').textContent = `The server could not be reached: ${error.message}`;
  }
  $('key-form').hidden = !page.auth;
  document.body.dataset.ready = 'true';
  const jobId = jobFromHash();
  if (jobId) openJob(jobId);
  renderRecent();
}

start();
