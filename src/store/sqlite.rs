//! SQLite: the embedded default, for one instance. The library is linked into the binary, so a
//! fresh checkout needs nothing installed.
//!
//! - WAL mode with `synchronous=NORMAL`: a committed write survives the process being killed
//!   (SIGKILL, a crash); only a power loss can take the last commits back. Readers never wait
//!   for the writer.
//! - One writer connection (SQLite has one writer at a time anyway; a single connection means a
//!   transaction never fails to upgrade its lock) and a few readers.
//! - A lock file beside the database keeps a second process from using it: SQLite serves one
//!   instance, and a second one would take the first one's running jobs for orphans.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::broadcast;

use super::{
    Admission, Batch, Counts, Created, FirstEvents, Heartbeat, JobRecord, JobStore, ListQuery,
    NewJob, Notice, Refusal, Resource, Retention, StoreError, StoredEvent, Unfinished, admit,
    count, from_sql_int, job_record, sql_int,
};

const COLUMNS: &str = "id, owner, state, repo_url, prompt, request, created_at, finished_at, \
     pr_url, branch, summary, files, usage, error, last_seq, bytes, instance, cancel_requested";

const UNFINISHED: &str = "('queued', 'running')";

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    notices: broadcast::Sender<Notice>,
    /// Held for the life of the store: this process is the database's one instance.
    _lock: Option<File>,
    /// An in-memory database's own connection, outside the pool: the database lives as long as
    /// one connection to it is open, and a pool may close and reopen its connections (a query
    /// whose request went away can take its connection with it).
    _anchor: Option<std::sync::Mutex<SqliteConnection>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database `url` names and brings its schema up to date.
    pub async fn open(url: &str) -> Result<SqliteStore, String> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| format!("not a SQLite URL: {e}"))?
            .create_if_missing(true)
            .journal_mode(if memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let (notices, _) = broadcast::channel(1024);
        if memory {
            // `sqlite::memory:` is a named database in shared-cache mode, alive while any
            // connection to it is: the anchor keeps it.
            let anchor = options
                .connect()
                .await
                .map_err(|e| format!("cannot open the in-memory database: {e}"))?;
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .map_err(|e| format!("cannot open the in-memory database: {e}"))?;
            migrate(&pool).await?;
            return Ok(SqliteStore {
                writer: pool.clone(),
                reader: pool,
                notices,
                _lock: None,
                _anchor: Some(std::sync::Mutex::new(anchor)),
            });
        }
        let path = options.get_filename().to_path_buf();
        let lock = lock_beside(&path)?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_error(&path, &e))?;
        migrate(&writer)
            .await
            .map_err(|e| format!("{e} (is {} a Tiny Backspace database?)", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await
            .map_err(|e| open_error(&path, &e))?;
        Ok(SqliteStore {
            writer,
            reader,
            notices,
            _lock: Some(lock),
            _anchor: None,
        })
    }

    fn notify(&self, notice: Notice) {
        let _ = self.notices.send(notice);
    }
}

fn open_error(path: &Path, err: &sqlx::Error) -> String {
    format!("cannot open the SQLite database {}: {err}", path.display())
}

async fn migrate(pool: &SqlitePool) -> Result<(), String> {
    sqlx::migrate!("src/store/migrations/sqlite")
        .run(pool)
        .await
        .map_err(|e| format!("cannot bring the database's schema up to date: {e}"))
}

/// Takes `<database>.lock`, or says who holds it. The directory must exist and be writable.
fn lock_beside(path: &Path) -> Result<File, String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!("the directory {} does not exist", dir.display()));
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "cannot write in {} ({e}); the database's directory must be writable",
                dir.display()
            )
        })?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            format!(
                "another Tiny Backspace process is using {}; SQLite serves one instance (use a postgres:// DATABASE_URL to run several)",
                path.display()
            )
        },
    )?;
    Ok(file)
}

fn record(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    job_record(row, row.try_get::<i64, _>("cancel_requested")? != 0)
}

#[async_trait]
impl JobStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn shared(&self) -> bool {
        false
    }

    async fn health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        instance: &str,
        max_concurrent: usize,
        lease: Duration,
        running: &[String],
    ) -> Result<Heartbeat, StoreError> {
        let now = crate::now_ms();
        let until = sql_int(now.saturating_add(lease.as_millis() as u64));
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO instances (id, started_at, lease_until, max_concurrent) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until, \
             max_concurrent = excluded.max_concurrent",
        )
        .bind(instance)
        .bind(sql_int(now))
        .bind(until)
        .bind(sql_int(max_concurrent as u64))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM instances WHERE lease_until < ?")
            .bind(sql_int(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "UPDATE jobs SET lease_until = ? WHERE instance = ? AND state IN {UNFINISHED}"
        ))
        .bind(until)
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        let held: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT id, cancel_requested FROM jobs WHERE instance = ? AND state IN {UNFINISHED}"
        ))
        .bind(instance)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Heartbeat {
            cancel_requested: held
                .iter()
                .filter(|(_, c)| *c != 0)
                .map(|(id, _)| id.clone())
                .collect(),
            lost: running
                .iter()
                .filter(|id| !held.iter().any(|(h, _)| h == *id))
                .cloned()
                .collect(),
        })
    }

    async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM instances WHERE id = ?")
            .bind(instance)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn create_job(
        &self,
        job: NewJob,
        admission: &Admission,
        first: FirstEvents,
    ) -> Result<Result<Created, Refusal>, StoreError> {
        let now = crate::now_ms();
        let scope = job.owner.clone().unwrap_or_default();
        let mut tx = self.writer.begin().await?;
        if let Some(idem) = &job.idempotency {
            let existing: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT id, fingerprint FROM jobs WHERE idempotency_scope = ? AND idempotency_key = ?",
            )
            .bind(&scope)
            .bind(&idem.key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id, fingerprint)) = existing {
                return Ok(Ok(Created::Existing {
                    id,
                    same_request: fingerprint.as_deref() == Some(idem.fingerprint.as_str()),
                }));
            }
        }
        let active: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM jobs WHERE state IN {UNFINISHED}"
        ))
        .fetch_one(&mut *tx)
        .await?;
        let capacity: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(max_concurrent), 0) FROM instances WHERE lease_until >= ?",
        )
        .bind(sql_int(now))
        .fetch_one(&mut *tx)
        .await?;
        let ahead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND instance IS NULL",
        )
        .fetch_one(&mut *tx)
        .await?;
        let (key_active, key_recent) = match &job.owner {
            Some(owner) => {
                let active: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM jobs WHERE owner = ? AND state IN {UNFINISHED}"
                ))
                .bind(owner)
                .fetch_one(&mut *tx)
                .await?;
                let since = now.saturating_sub(super::RATE_WINDOW.as_millis() as u64);
                let recent: Vec<i64> = sqlx::query_scalar(
                    "SELECT created_at FROM jobs WHERE owner = ? AND created_at > ? ORDER BY created_at",
                )
                .bind(owner)
                .bind(sql_int(since))
                .fetch_all(&mut *tx)
                .await?;
                (
                    count(active),
                    recent.into_iter().map(from_sql_int).collect(),
                )
            }
            None => (0, Vec::new()),
        };
        let counts = Counts {
            active: count(active),
            capacity: count(capacity),
            ahead: count(ahead),
            key_active,
            key_recent,
        };
        if let Err(refusal) = admit(&counts, admission, now) {
            return Ok(Err(refusal));
        }
        let events = first(&counts);
        let last_seq = events.last().map_or(0, |e| e.seq);
        let bytes: usize = events.iter().map(|e| e.json.len()).sum();
        sqlx::query(
            "INSERT INTO jobs (id, owner, state, repo_url, prompt, request, created_at, last_seq, \
             bytes, idempotency_scope, idempotency_key, fingerprint) \
             VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&job.id)
        .bind(&job.owner)
        .bind(&job.repo_url)
        .bind(&job.prompt)
        .bind(&job.request)
        .bind(sql_int(job.created_at))
        .bind(sql_int(last_seq))
        .bind(sql_int(bytes as u64))
        .bind(job.idempotency.as_ref().map(|_| scope.clone()))
        .bind(job.idempotency.as_ref().map(|i| i.key.clone()))
        .bind(job.idempotency.as_ref().map(|i| i.fingerprint.clone()))
        .execute(&mut *tx)
        .await?;
        insert_events(&mut tx, &job.id, &events).await?;
        tx.commit().await?;
        self.notify(Notice::Appended {
            job_id: job.id,
            seq: last_seq,
        });
        self.notify(Notice::Queued);
        Ok(Ok(Created::New))
    }

    async fn append(&self, job_id: &str, instance: &str, batch: &Batch) -> Result<(), StoreError> {
        let last = batch.events.last().map(|e| e.seq);
        let mut tx = self.writer.begin().await?;
        let mut update = QueryBuilder::<Sqlite>::new("UPDATE jobs SET bytes = bytes + ");
        update.push_bind(sql_int(batch.bytes));
        if let Some(last) = last {
            update.push(", last_seq = ").push_bind(sql_int(last));
        }
        if let Some(result) = &batch.result {
            if let Some(state) = result.state {
                update.push(", state = ").push_bind(state.as_str());
            }
            update
                .push(", finished_at = ")
                .push_bind(result.finished_at.map(sql_int))
                .push(", pr_url = ")
                .push_bind(&result.pr_url)
                .push(", branch = ")
                .push_bind(&result.branch)
                .push(", summary = ")
                .push_bind(&result.summary)
                .push(", files = ")
                .push_bind(&result.files)
                .push(", usage = ")
                .push_bind(&result.usage)
                .push(", error = ")
                .push_bind(&result.error);
        }
        update
            .push(" WHERE id = ")
            .push_bind(job_id)
            .push(" AND instance = ")
            .push_bind(instance);
        let updated = update.build().execute(&mut *tx).await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        insert_events(&mut tx, job_id, &batch.events).await?;
        if let Some((patch, truncated)) = &batch.patch {
            sqlx::query(
                "INSERT OR REPLACE INTO patches (job_id, patch, truncated) VALUES (?, ?, ?)",
            )
            .bind(job_id)
            .bind(patch.as_ref())
            .bind(i64::from(*truncated))
            .execute(&mut *tx)
            .await?;
        }
        if let Some(transcript) = &batch.transcript {
            sqlx::query("INSERT OR REPLACE INTO transcripts (job_id, transcript) VALUES (?, ?)")
                .bind(job_id)
                .bind(transcript)
                .execute(&mut *tx)
                .await?;
        }
        for resource in &batch.resources {
            sqlx::query(
                "INSERT INTO resources (job_id, kind, backend, external_id, released) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (job_id, kind, external_id) DO UPDATE SET released = excluded.released",
            )
            .bind(job_id)
            .bind(&resource.kind)
            .bind(&resource.backend)
            .bind(&resource.external_id)
            .bind(i64::from(resource.released))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if let Some(seq) = last {
            self.notify(Notice::Appended {
                job_id: job_id.to_owned(),
                seq,
            });
        }
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(record).transpose()
    }

    async fn unfinished(&self) -> Result<Unfinished, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT state, count(*) FROM jobs WHERE state IN {UNFINISHED} GROUP BY state"
        ))
        .fetch_all(&self.reader)
        .await?;
        Ok(Unfinished::from_counts(
            rows.into_iter().map(|(state, n)| (state, count(n))),
        ))
    }

    async fn list_jobs(&self, query: &ListQuery) -> Result<Vec<JobRecord>, StoreError> {
        let mut sql =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM jobs WHERE 1 = 1"));
        if let Some(key) = &query.visible_to {
            sql.push(" AND (owner IS NULL OR owner = ")
                .push_bind(key)
                .push(")");
        }
        if let Some(state) = query.state {
            sql.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some((at, id)) = &query.before {
            sql.push(" AND (created_at < ")
                .push_bind(sql_int(*at))
                .push(" OR (created_at = ")
                .push_bind(sql_int(*at))
                .push(" AND id < ")
                .push_bind(id)
                .push("))");
        }
        sql.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(sql_int(query.limit as u64));
        let rows = sql.build().fetch_all(&self.reader).await?;
        rows.iter().map(record).collect()
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id)
        .bind(sql_int(after))
        .bind(sql_int(limit as u64))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, json)| StoredEvent {
                seq: from_sql_int(seq),
                json,
            })
            .collect())
    }

    async fn patch(&self, id: &str) -> Result<Option<(bytes::Bytes, bool)>, StoreError> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT patch, truncated FROM patches WHERE job_id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(|(patch, truncated)| (bytes::Bytes::from(patch), truncated != 0)))
    }

    async fn transcript(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT transcript FROM transcripts WHERE job_id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn resources(&self, id: &str) -> Result<Vec<Resource>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT kind, backend, external_id, released FROM resources WHERE job_id = ? ORDER BY kind, external_id",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, backend, external_id, released)| Resource {
                kind,
                backend,
                external_id,
                released: released != 0,
            })
            .collect())
    }

    async fn unreleased_sandboxes(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, Resource)>, StoreError> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(&format!(
            "SELECT r.job_id, r.kind, r.backend, r.external_id, r.released FROM resources r \
             JOIN jobs j ON j.id = r.job_id \
             WHERE r.kind = 'sandbox' AND NOT r.released AND j.state NOT IN {UNFINISHED} \
             ORDER BY j.created_at, r.job_id LIMIT ?"
        ))
        .bind(sql_int(limit as u64))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(job_id, kind, backend, external_id, released)| {
                let resource = Resource {
                    kind,
                    backend,
                    external_id,
                    released: released != 0,
                };
                (job_id, resource)
            })
            .collect())
    }

    async fn mark_released(&self, job_id: &str, resource: &Resource) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE resources SET released = 1 \
             WHERE job_id = ? AND kind = ? AND external_id = ?",
        )
        .bind(job_id)
        .bind(&resource.kind)
        .bind(&resource.external_id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn claim_next(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let until = sql_int(crate::now_ms().saturating_add(lease.as_millis() as u64));
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = ?, lease_until = ? WHERE id = (SELECT id FROM jobs \
             WHERE state = 'queued' AND instance IS NULL ORDER BY created_at, id LIMIT 1) \
             RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(until)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn claim_queued(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let until = sql_int(crate::now_ms().saturating_add(lease.as_millis() as u64));
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = ?, lease_until = ? WHERE id = ? AND state = 'queued' \
             AND instance IS NULL RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(until)
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        self.notify(Notice::CancelRequested {
            job_id: id.to_owned(),
        });
        Ok(())
    }

    async fn orphans(&self, instance: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT id FROM jobs WHERE state IN {UNFINISHED} AND instance IS NOT NULL \
             AND instance != ? ORDER BY created_at"
        ))
        .bind(instance)
        .fetch_all(&self.reader)
        .await?)
    }

    async fn take_over(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let until = sql_int(crate::now_ms().saturating_add(lease.as_millis() as u64));
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = ?, lease_until = ? WHERE id = ? AND state IN {UNFINISHED} \
             AND instance IS NOT NULL AND instance != ? RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(until)
        .bind(id)
        .bind(instance)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn prune(&self, retention: &Retention) -> Result<usize, StoreError> {
        let now = crate::now_ms();
        let cutoff = now.saturating_sub(retention.max_age.as_millis() as u64);
        let mut tx = self.writer.begin().await?;
        let expired =
            sqlx::query("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= ?")
                .bind(sql_int(cutoff))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        let finished: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, bytes FROM jobs WHERE finished_at IS NOT NULL \
             ORDER BY finished_at DESC, created_at DESC, id DESC",
        )
        .fetch_all(&mut *tx)
        .await?;
        let doomed = beyond_limits(&finished, retention);
        for id in &doomed {
            sqlx::query("DELETE FROM jobs WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(expired as usize + doomed.len())
    }

    fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}

/// Of finished jobs newest first, the ids past the count or byte limit (the oldest go first).
pub(super) fn beyond_limits(newest_first: &[(String, i64)], retention: &Retention) -> Vec<String> {
    let mut kept = 0usize;
    let mut bytes = 0u64;
    let mut doomed = Vec::new();
    for (id, size) in newest_first {
        let size = from_sql_int(*size);
        if doomed.is_empty()
            && kept < retention.max_jobs
            && bytes.saturating_add(size) <= retention.max_bytes
        {
            kept += 1;
            bytes += size;
        } else {
            doomed.push(id.clone());
        }
    }
    doomed
}

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    job_id: &str,
    events: &[super::NewEvent],
) -> Result<(), StoreError> {
    // Well under SQLite's limit of bound variables per statement.
    for chunk in events.chunks(200) {
        let mut insert = QueryBuilder::<Sqlite>::new("INSERT INTO events (job_id, seq, body) ");
        insert.push_values(chunk, |mut row, event| {
            row.push_bind(job_id)
                .push_bind(sql_int(event.seq))
                .push_bind(&event.json);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The web page's browser test found this: a request cut mid-query took the pool's one
    /// connection with it, and the next one opened an empty database ("no such table: jobs").
    #[tokio::test]
    async fn an_in_memory_database_outlives_its_pool_connections() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let connection = store.writer.acquire().await.unwrap();
        connection.close().await.unwrap();
        assert_eq!(store.unfinished().await.unwrap(), Unfinished::default());
    }
}
