//! The job store: every job, its append-only event log, its patch, its agent transcript and the
//! external resources it holds (an E2B sandbox, a pushed branch), behind one trait with two
//! backends built on real engines: SQLite (one instance, the embedded default) and PostgreSQL
//! (any number of instances sharing one database).
//!
//! The store knows nothing of the pipeline: it keeps rows, decides admission atomically (counts
//! and the insert in one transaction), hands queued jobs to the instance that claims them, and
//! fences every write with the claiming instance's id, so an instance that lost a job (its lease
//! expired and another instance ended it) can no longer write to it. Events are stored as the JSON
//! text the wire carries.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Where a job is in its life, as `GET /jobs` and `GET /jobs/{id}` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        match self {
            JobState::Queued | JobState::Running => false,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => true,
        }
    }
}

/// A new job: its row, written together with its first events.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    /// The id of the API key that created it; `None` when the API is open.
    pub owner: Option<String>,
    pub repo_url: String,
    pub prompt: String,
    /// The validated request, as JSON, so any instance can run it.
    pub request: String,
    pub created_at: u64,
    pub idempotency: Option<Idempotency>,
}

/// An `Idempotency-Key` and what it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    /// A digest of the request, to tell a retry from a different request under the same key.
    pub fingerprint: String,
}

/// What admission looks at, counted inside the transaction that inserts the job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// Jobs not finished yet (queued or running), on every instance.
    pub active: usize,
    /// Jobs the live instances may run at once, together (their `MAX_CONCURRENT_JOBS` summed).
    pub capacity: usize,
    /// Queued jobs created before this one that have not been claimed.
    pub ahead: usize,
    /// The submitting key's unfinished jobs.
    pub key_active: usize,
    /// When the submitting key's jobs of the last minute were created, oldest first.
    pub key_recent: Vec<u64>,
}

/// Jobs not finished yet, on every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unfinished {
    pub running: usize,
    pub queued: usize,
}

impl Unfinished {
    /// From `(state, count)` rows of unfinished jobs.
    fn from_counts(rows: impl IntoIterator<Item = (String, usize)>) -> Self {
        let mut load = Unfinished::default();
        for (state, n) in rows {
            match state.as_str() {
                "running" => load.running = n,
                _ => load.queued = n,
            }
        }
        load
    }

    pub fn total(&self) -> usize {
        self.running + self.queued
    }
}

/// Limits a submission must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub max_queued: usize,
    pub max_jobs_per_key: Option<usize>,
    pub key_rate_per_min: Option<usize>,
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Busy { running: usize, queued: usize },
    KeyBusy { active: usize },
    KeyRate { count: usize, retry_after: Duration },
}

/// How `create_job` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New,
    /// The same `Idempotency-Key` was used before (by the same API key).
    Existing {
        id: String,
        same_request: bool,
    },
}

/// Builds the job's first events once admission has counted (the queue position goes into them).
pub type FirstEvents = Box<dyn FnOnce(&Counts) -> Vec<NewEvent> + Send>;

/// One event to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub seq: u64,
    /// The event as the wire carries it.
    pub json: String,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: String,
}

/// What the events have said about the job, as stored with them (the `GET /jobs/{id}` fields).
/// The lists are JSON text, as the wire carries them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobResult {
    pub state: Option<JobState>,
    pub finished_at: Option<u64>,
    pub pr_url: Option<String>,
    pub branch: Option<String>,
    pub summary: Option<String>,
    pub files: Option<String>,
    pub usage: Option<String>,
    pub error: Option<String>,
}

/// An external resource a job holds, recorded so it can be cleaned up after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `sandbox` or `branch`.
    pub kind: String,
    /// Who it belongs to: the sandbox backend (`e2b`, `local`) or the forge.
    pub backend: String,
    pub external_id: String,
    /// Set once the resource has been cleaned up (a killed sandbox).
    pub released: bool,
}

/// Writes that belong together: stored in one transaction, fenced by the writing instance.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<NewEvent>,
    /// The job's state after the last of `events`.
    pub result: Option<JobResult>,
    pub patch: Option<(bytes::Bytes, bool)>,
    pub transcript: Option<String>,
    pub resources: Vec<Resource>,
    /// Bytes this batch adds to the job's size (events as JSON, the patch).
    pub bytes: u64,
}

impl Batch {
    /// Adds the writes of a later batch: its events follow, its state and files replace.
    pub fn absorb(&mut self, later: Batch) {
        self.events.extend(later.events);
        if later.result.is_some() {
            self.result = later.result;
        }
        if later.patch.is_some() {
            self.patch = later.patch;
        }
        if later.transcript.is_some() {
            self.transcript = later.transcript;
        }
        for resource in later.resources {
            self.resources
                .retain(|r| (&r.kind, &r.external_id) != (&resource.kind, &resource.external_id));
            self.resources.push(resource);
        }
        self.bytes += later.bytes;
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.result.is_none()
            && self.patch.is_none()
            && self.transcript.is_none()
            && self.resources.is_empty()
    }
}

/// A job's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub owner: Option<String>,
    pub state: JobState,
    pub repo_url: String,
    pub prompt: String,
    pub request: String,
    pub created_at: u64,
    pub result: JobResult,
    /// The sequence number of its last stored event.
    pub last_seq: u64,
    pub bytes: u64,
    /// The instance that claimed it, once claimed.
    pub instance: Option<String>,
    pub cancel_requested: bool,
}

impl JobRecord {
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// Which jobs `GET /jobs` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only the jobs this key may see (its own and those created with no key); `None`: all.
    pub visible_to: Option<String>,
    pub state: Option<JobState>,
    /// Only jobs older than this position (`created_at`, `id`): the cursor.
    pub before: Option<(u64, String)>,
    pub limit: usize,
}

/// How long finished jobs are kept, and how many and how large they may be in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_jobs: usize,
    pub max_bytes: u64,
}

/// What a heartbeat learned about the instance's own jobs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// Jobs it runs that someone asked to cancel (through another instance).
    pub cancel_requested: Vec<String>,
    /// Jobs it runs that are no longer its own (another instance ended them).
    pub lost: Vec<String>,
}

/// What one instance tells the others (and itself) through the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Events up to `seq` of `job_id` are stored.
    Appended { job_id: String, seq: u64 },
    /// A job was queued: an instance with a free slot may claim it.
    Queued,
    /// Someone asked to cancel `job_id`.
    CancelRequested { job_id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be used (unreachable, locked, full, corrupt).
    #[error("the job store failed: {0}")]
    Unavailable(String),
    /// The write was refused: this instance no longer holds the job.
    #[error("the job is no longer held by this instance")]
    LeaseLost,
    /// A stored value could not be read back.
    #[error("the job store holds an unreadable value: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(err.to_string())
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// The seam. See the module docs.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// `sqlite` or `postgres`, as `/healthz` shows it.
    fn backend(&self) -> &'static str;

    /// Whether several instances may share this store (then queued jobs are claimed by whichever
    /// has a free slot, and expired leases are reaped).
    fn shared(&self) -> bool;

    /// A cheap round trip, for `/healthz`.
    async fn health(&self) -> Result<(), StoreError>;

    /// Announces (or renews) this instance and its concurrency, so admission knows the capacity
    /// of every live instance; renews the leases of its claimed jobs.
    async fn heartbeat(
        &self,
        instance: &str,
        max_concurrent: usize,
        lease: Duration,
        running: &[String],
    ) -> Result<Heartbeat, StoreError>;

    /// Removes the instance (at shutdown), so its capacity no longer counts.
    async fn leave(&self, instance: &str) -> Result<(), StoreError>;

    /// Admits and inserts a job with its first events, or refuses it, or finds the job an earlier
    /// request with the same `Idempotency-Key` created: all in one transaction.
    async fn create_job(
        &self,
        job: NewJob,
        admission: &Admission,
        first: FirstEvents,
    ) -> Result<Result<Created, Refusal>, StoreError>;

    /// Stores `batch` for a job `instance` holds, in one transaction.
    async fn append(&self, job_id: &str, instance: &str, batch: &Batch) -> Result<(), StoreError>;

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// How many jobs are running and queued, on every instance.
    async fn unfinished(&self) -> Result<Unfinished, StoreError>;

    /// Jobs newest first.
    async fn list_jobs(&self, query: &ListQuery) -> Result<Vec<JobRecord>, StoreError>;

    /// Up to `limit` events after `after`, in order.
    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    async fn patch(&self, id: &str) -> Result<Option<(bytes::Bytes, bool)>, StoreError>;

    async fn transcript(&self, id: &str) -> Result<Option<String>, StoreError>;

    async fn resources(&self, id: &str) -> Result<Vec<Resource>, StoreError>;

    /// Sandboxes recorded and never released whose job has finished: kills that were still
    /// being retried when their process stopped. Oldest job first, at most `limit`.
    async fn unreleased_sandboxes(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, Resource)>, StoreError>;

    /// Marks a job's resource released. Not fenced by an instance: that a sandbox is gone is true
    /// whoever confirms it, and a release is never taken back.
    async fn mark_released(&self, job_id: &str, resource: &Resource) -> Result<(), StoreError>;

    /// Claims the oldest unclaimed queued job for `instance`.
    async fn claim_next(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Claims `id` for `instance` if it is queued and unclaimed (to cancel it).
    async fn claim_queued(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Records that someone asked to cancel `id`, for the instance running it to notice.
    async fn request_cancel(&self, id: &str) -> Result<(), StoreError>;

    /// Unfinished claimed jobs whose instance is gone: for SQLite (one instance) every one held
    /// by another instance id; for PostgreSQL those whose lease has expired.
    async fn orphans(&self, instance: &str) -> Result<Vec<String>, StoreError>;

    /// Takes an orphan over for `instance` (the same condition, checked again atomically).
    async fn take_over(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Deletes finished jobs past the retention; returns how many.
    async fn prune(&self, retention: &Retention) -> Result<usize, StoreError>;

    /// Notices from every instance sharing the store (this one included).
    fn notices(&self) -> broadcast::Receiver<Notice>;
}

/// The default SQLite file under the data directory: `DATA_DIR`, else
/// `$XDG_DATA_HOME/tiny-backspace`, else `./data`.
pub fn default_data_dir(data_dir: Option<&str>, xdg_data_home: Option<&str>) -> std::path::PathBuf {
    match (data_dir, xdg_data_home) {
        (Some(dir), _) => std::path::PathBuf::from(dir),
        (None, Some(xdg)) => std::path::Path::new(xdg).join("tiny-backspace"),
        (None, None) => std::path::PathBuf::from("data"),
    }
}

/// Opens the store a `DATABASE_URL` names (running its migrations), with errors that name the
/// variable and say what is wrong.
pub async fn open(url: &str) -> Result<Arc<dyn JobStore>, String> {
    let shown = redact_url(url);
    if url.starts_with("sqlite:") {
        let store = sqlite::SqliteStore::open(url)
            .await
            .map_err(|e| format!("DATABASE_URL ({shown}): {e}"))?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PostgresStore::open(url)
            .await
            .map_err(|e| format!("DATABASE_URL ({shown}): {e}"))?;
        Ok(Arc::new(store))
    } else {
        Err(format!(
            "DATABASE_URL ({shown}) must start with sqlite: or postgres://"
        ))
    }
}

/// A database URL fit for a log line: its password replaced.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// The cursor of `GET /jobs`: the position of the last job of a page.
pub fn encode_cursor(created_at: u64, id: &str) -> String {
    format!("{created_at}.{id}")
}

pub fn decode_cursor(cursor: &str) -> Option<(u64, String)> {
    let (at, id) = cursor.split_once('.')?;
    let at = at.parse().ok()?;
    let valid =
        !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then(|| (at, id.to_owned()))
}

/// Clamps a count into the `i64` SQL stores.
/// A `jobs` row (the columns of `COLUMNS`) as a record; `cancel_requested` is read by the caller,
/// as the backends store it differently (an integer, a boolean).
fn job_record<'r, R>(row: &'r R, cancel_requested: bool) -> Result<JobRecord, StoreError>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let state: String = row.try_get("state")?;
    let state = JobState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown job state `{state}`")))?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        state,
        repo_url: row.try_get("repo_url")?,
        prompt: row.try_get("prompt")?,
        request: row.try_get("request")?,
        created_at: from_sql_int(row.try_get("created_at")?),
        result: JobResult {
            state: Some(state),
            finished_at: row
                .try_get::<Option<i64>, _>("finished_at")?
                .map(from_sql_int),
            pr_url: row.try_get("pr_url")?,
            branch: row.try_get("branch")?,
            summary: row.try_get("summary")?,
            files: row.try_get("files")?,
            usage: row.try_get("usage")?,
            error: row.try_get("error")?,
        },
        last_seq: from_sql_int(row.try_get("last_seq")?),
        bytes: from_sql_int(row.try_get("bytes")?),
        instance: row.try_get("instance")?,
        cancel_requested,
    })
}

/// A SQL count as a `usize`.
fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql_int(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Who may ask for the rate window's jobs: one minute.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Admission, given the counts: the same rules for every backend.
pub fn admit(counts: &Counts, admission: &Admission, now: u64) -> Result<(), Refusal> {
    if let Some(limit) = admission.key_rate_per_min
        && counts.key_recent.len() >= limit
    {
        let window = RATE_WINDOW.as_millis() as u64;
        let oldest = counts.key_recent.first().copied().unwrap_or(now);
        let wait = window.saturating_sub(now.saturating_sub(oldest));
        return Err(Refusal::KeyRate {
            count: counts.key_recent.len(),
            retry_after: Duration::from_millis(wait).max(Duration::from_secs(1)),
        });
    }
    if let Some(limit) = admission.max_jobs_per_key
        && counts.key_active >= limit
    {
        return Err(Refusal::KeyBusy {
            active: counts.key_active,
        });
    }
    if counts.active >= counts.capacity + admission.max_queued {
        let running = counts.active.min(counts.capacity);
        return Err(Refusal::Busy {
            running,
            queued: counts.active - running,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let id = "6f0c1a2b-0000-4000-8000-000000000001";
        assert_eq!(
            decode_cursor(&encode_cursor(17, id)),
            Some((17, id.to_owned()))
        );
        for junk in ["", "17", ".x", "x.y", "17.", "17.'; drop", "-1.ab"] {
            assert_eq!(decode_cursor(junk), None, "{junk}");
        }
    }

    #[test]
    fn admission_counts_every_instance_and_each_key() {
        let limits = Admission {
            max_queued: 1,
            max_jobs_per_key: Some(2),
            key_rate_per_min: Some(3),
        };
        let counts = |active, capacity, key_active, recent: &[u64]| Counts {
            active,
            capacity,
            ahead: 0,
            key_active,
            key_recent: recent.to_vec(),
        };
        assert_eq!(admit(&counts(1, 1, 0, &[]), &limits, 0), Ok(()));
        assert_eq!(
            admit(&counts(2, 1, 0, &[]), &limits, 0),
            Err(Refusal::Busy {
                running: 1,
                queued: 1
            })
        );
        // A second instance doubles the room.
        assert_eq!(admit(&counts(2, 2, 0, &[]), &limits, 0), Ok(()));
        assert_eq!(
            admit(&counts(0, 1, 2, &[]), &limits, 0),
            Err(Refusal::KeyBusy { active: 2 })
        );
        assert_eq!(
            admit(&counts(0, 1, 0, &[1_000, 2_000, 3_000]), &limits, 31_000),
            Err(Refusal::KeyRate {
                count: 3,
                retry_after: Duration::from_secs(30)
            })
        );
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/jobs"),
            "postgres://app:***@db:5432/jobs"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
