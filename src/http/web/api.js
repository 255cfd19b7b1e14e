// The service's HTTP API as the page uses it (API.md §1).
//
// The API key, when the server needs one, lives in this module's memory only: it is sent in the
// Authorization header, never stored, and never put in a URL. Reloading the page forgets it.

let apiKey = null;

export function setKey(key) {
  apiKey = key ? String(key).trim() || null : null;
}

export function hasKey() {
  return apiKey !== null;
}

/** A refusal from the server, with its `{"error": {"code", "message"}}` when it sent one. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(method, path, body) {
  const headers = {};
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const init = { method, headers, cache: 'no-store', credentials: 'same-origin' };
  if (body !== undefined) {
    // POST bodies must be JSON (the server refuses anything else with 415).
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'network', 'The server could not be reached.');
  }
  if (response.ok) return response;
  let code = `http_${response.status}`;
  let message = `The server answered ${response.status} ${response.statusText}`.trim();
  try {
    const parsed = await response.json();
    if (parsed && parsed.error) {
      code = parsed.error.code ?? code;
      message = parsed.error.message ?? message;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  const error = new ApiError(response.status, code, message);
  error.retryAfter = response.headers.get('Retry-After');
  throw error;
}

const jobPath = (id) => `/jobs/${encodeURIComponent(id)}`;

/** `{status, sandbox, agents, forge, auth, …}`; needs no key. */
export async function health() {
  return (await call('GET', '/healthz')).json();
}

/** Starts a job: `{job_id, events_url, status_url}`. */
export async function startJob(request) {
  return (await call('POST', '/jobs', request)).json();
}

export async function getJob(id) {
  return (await call('GET', jobPath(id))).json();
}

export async function cancelJob(id) {
  return (await call('DELETE', jobPath(id))).json();
}

/** The job's unified diff: `{text, truncated}`. */
export async function getPatch(id) {
  const response = await call('GET', `${jobPath(id)}/patch`);
  return {
    text: await response.text(),
    truncated: response.headers.get('X-Patch-Truncated') === 'true',
  };
}

/** A short-lived token for `GET /jobs/{id}/events?token=…` (EventSource cannot send headers). */
export async function eventsToken(id) {
  return (await call('POST', `${jobPath(id)}/events-token`, {})).json();
}

/**
 * Recent jobs from the server, newest first, or null when this server keeps no list
 * (`GET /jobs` is not there: the page then lists the jobs started in this tab).
 */
export async function listJobs(limit = 20) {
  try {
    const response = await call('GET', `/jobs?limit=${limit}`);
    const body = await response.json();
    return Array.isArray(body?.jobs) ? body.jobs : null;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) return null;
    throw error;
  }
}
