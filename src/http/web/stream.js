// Following one job's event stream (`GET /jobs/{id}/events`) with the browser's EventSource.
//
// EventSource reconnects by itself after a network drop and sends `Last-Event-ID`, so the
// server resumes right after the last event it delivered. What it cannot do alone is done here:
// - with API keys, it cannot send the key: each connection gets a short-lived token from
//   `POST /jobs/{id}/events-token` (sent with the key in a header) as `?token=`;
// - when the server refuses a reconnect (a token that has expired, a job it no longer knows),
//   EventSource gives up: the job is looked up, and the stream reopened with `?after=<last id>`
//   and a new token, with backoff;
// - every event is handed on exactly once: ids are gap-free sequence numbers, and one at or
//   below the last seen is dropped.

import { ApiError, eventsToken, getJob, hasKey } from './api.js';

const MAX_BACKOFF_MS = 30_000;
const FINAL_STATES = new Set(['succeeded', 'failed', 'cancelled']);

/**
 * Follows job `jobId` from its first event to its `Done`.
 * - `onEvent(seq, event)`: each event, once, in order;
 * - `onConnection(state, {reconnects, last})`: `connecting`, `live`, `reconnecting`, `ended`
 *   (Done arrived), `needs-key` (call `resume()` once a key is set), `gone` (the server does not
 *   know the job).
 * Returns `{close, resume}`.
 */
export function followJob(jobId, { auth, onEvent, onConnection }) {
  let last = 0;
  let source = null;
  let timer = null;
  let stopped = false;
  let opens = 0;
  let failures = 0;

  const report = (state) =>
    onConnection(state, { reconnects: Math.max(0, opens - 1), last });

  function finish(state) {
    stopped = true;
    clearTimeout(timer);
    timer = null;
    if (source) source.close();
    source = null;
    report(state);
  }

  async function open() {
    timer = null;
    if (stopped) return;
    const params = new URLSearchParams();
    if (last > 0) params.set('after', String(last));
    if (auth) {
      if (!hasKey()) {
        report('needs-key');
        return;
      }
      try {
        params.set('token', (await eventsToken(jobId)).token);
      } catch (error) {
        await recover(error);
        return;
      }
      if (stopped) return;
    }
    const query = params.toString();
    const es = new EventSource(
      `/jobs/${encodeURIComponent(jobId)}/events${query ? `?${query}` : ''}`,
    );
    source = es;
    report(opens === 0 ? 'connecting' : 'reconnecting');
    es.onopen = () => {
      opens += 1;
      failures = 0;
      report('live');
    };
    es.onmessage = (message) => {
      const seq = Number(message.lastEventId);
      if (!Number.isSafeInteger(seq) || seq <= last) return;
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      last = seq;
      onEvent(seq, event);
      if (event.type === 'Done') finish('ended');
    };
    es.onerror = () => {
      if (stopped || source !== es) return;
      if (es.readyState === EventSource.CONNECTING) {
        // The browser is reconnecting by itself, with Last-Event-ID.
        report('reconnecting');
        return;
      }
      es.close();
      source = null;
      recover(null);
    };
  }

  /** After a refused connection: decide from the job (or from `error`) what to do next. */
  async function recover(error) {
    if (stopped) return;
    let cause = error;
    let job = null;
    if (!cause) {
      try {
        job = await getJob(jobId);
      } catch (lookup) {
        cause = lookup;
      }
    }
    if (stopped) return;
    if (cause instanceof ApiError && cause.status === 404) {
      finish('gone');
      return;
    }
    if (cause instanceof ApiError && cause.status === 401) {
      report('needs-key');
      return;
    }
    failures += 1;
    // A finished job whose stream keeps answering "nothing after that" (204) is over.
    if (job && FINAL_STATES.has(job.state) && failures > 2) {
      finish('ended');
      return;
    }
    const delay = Math.min(1000 * 2 ** (failures - 1), MAX_BACKOFF_MS);
    report('reconnecting');
    timer = setTimeout(open, delay);
  }

  open();
  return {
    close() {
      stopped = true;
      clearTimeout(timer);
      if (source) source.close();
      source = null;
    },
    /** Tries again now (after a key was entered). */
    resume() {
      if (stopped || source || timer) return;
      open();
    },
  };
}
