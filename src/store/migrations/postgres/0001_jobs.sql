-- Jobs, their append-only event logs, patches, transcripts and external resources.
-- Times are milliseconds since the Unix epoch.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    owner TEXT,
    state TEXT NOT NULL,
    repo_url TEXT NOT NULL,
    prompt TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    pr_url TEXT,
    branch TEXT,
    summary TEXT,
    files TEXT,
    usage TEXT,
    error TEXT,
    last_seq BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    instance TEXT,
    lease_until BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_scope TEXT,
    idempotency_key TEXT,
    fingerprint TEXT
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_scope, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_newest ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_queue ON jobs (state, instance, created_at);
CREATE INDEX jobs_owner ON jobs (owner, created_at);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE patches (
    job_id TEXT PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    patch BYTEA NOT NULL,
    truncated BOOLEAN NOT NULL
);

CREATE TABLE transcripts (
    job_id TEXT PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    transcript TEXT NOT NULL
);

CREATE TABLE resources (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    external_id TEXT NOT NULL,
    released BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (job_id, kind, external_id)
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY NOT NULL,
    started_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    max_concurrent BIGINT NOT NULL
);
