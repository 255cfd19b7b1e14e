//! PostgreSQL: one database shared by any number of instances.
//!
//! - The queue: a queued job is claimed with `SELECT … FOR UPDATE SKIP LOCKED`, so two instances
//!   never claim the same job and never wait for each other. The claim carries a lease, renewed by
//!   the instance's heartbeat; every write is fenced by the claiming instance's id.
//! - Lease times are the database's clock, so the instances' clocks need not agree.
//! - Admission takes a transaction-scoped advisory lock, so concurrent submissions on several
//!   instances count each other and the limits hold exactly.
//! - `LISTEN/NOTIFY` on one channel carries (job id, seq) after each stored batch, new queued jobs
//!   and cancel requests to every instance; notifications are sent by the transaction that made
//!   the change, so they arrive only once it is committed.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{
    Admission, Batch, Counts, Created, FirstEvents, Heartbeat, JobRecord, JobStore, ListQuery,
    NewJob, Notice, Refusal, Resource, Retention, StoreError, StoredEvent, Unfinished, admit,
    count, from_sql_int, job_record, sql_int,
};

const COLUMNS: &str = "id, owner, state, repo_url, prompt, request, created_at, finished_at, \
     pr_url, branch, summary, files, usage, error, last_seq, bytes, instance, cancel_requested";

const UNFINISHED: &str = "('queued', 'running')";

/// The database's clock, in milliseconds since the Unix epoch.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const CHANNEL: &str = "tiny_backspace";

/// The advisory lock that serialises admission.
const ADMISSION_LOCK: i64 = 0x7469_6e79_6261_636b;

pub struct PostgresStore {
    pool: PgPool,
    notices: broadcast::Sender<Notice>,
    /// Stops the listener task when the store is dropped.
    stop: CancellationToken,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date and starts listening for notices.
    pub async fn open(url: &str) -> Result<PostgresStore, String> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        sqlx::migrate!("src/store/migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| format!("cannot bring the database's schema up to date: {e}"))?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| format!("cannot listen for notifications: {e}"))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| format!("cannot listen for notifications: {e}"))?;
        let (notices, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(relay(listener, notices.clone(), stop.clone()));
        Ok(PostgresStore {
            pool,
            notices,
            stop,
        })
    }
}

/// Turns notifications into [`Notice`]s. A lost connection is re-established by the listener;
/// what was sent meanwhile is missed, which followers cover by reading the store periodically.
async fn relay(
    mut listener: PgListener,
    notices: broadcast::Sender<Notice>,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            received = listener.try_recv() => received,
            _ = stop.cancelled() => return,
        };
        match received {
            Ok(Some(notification)) => {
                if let Some(notice) = decode_notice(notification.payload()) {
                    let _ = notices.send(notice);
                }
            }
            Ok(None) => {
                tracing::warn!("the notification connection to PostgreSQL was lost; reconnecting")
            }
            Err(err) => {
                tracing::warn!(error = %err, "listening for PostgreSQL notifications failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

fn encode_notice(notice: &Notice) -> String {
    match notice {
        Notice::Appended { job_id, seq } => format!("e {job_id} {seq}"),
        Notice::Queued => "q".to_owned(),
        Notice::CancelRequested { job_id } => format!("c {job_id}"),
    }
}

fn decode_notice(payload: &str) -> Option<Notice> {
    let mut parts = payload.split(' ');
    match (parts.next()?, parts.next(), parts.next()) {
        ("e", Some(job_id), Some(seq)) => Some(Notice::Appended {
            job_id: job_id.to_owned(),
            seq: seq.parse().ok()?,
        }),
        ("q", None, None) => Some(Notice::Queued),
        ("c", Some(job_id), None) => Some(Notice::CancelRequested {
            job_id: job_id.to_owned(),
        }),
        _ => None,
    }
}

async fn notify(
    executor: impl sqlx::Executor<'_, Database = Postgres>,
    notice: &Notice,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(encode_notice(notice))
        .execute(executor)
        .await?;
    Ok(())
}

fn record(row: &PgRow) -> Result<JobRecord, StoreError> {
    job_record(row, row.try_get("cancel_requested")?)
}

fn millis(d: Duration) -> i64 {
    sql_int(d.as_millis() as u64)
}

#[async_trait]
impl JobStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        instance: &str,
        max_concurrent: usize,
        lease: Duration,
        running: &[String],
    ) -> Result<Heartbeat, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO instances (id, started_at, lease_until, max_concurrent) \
             VALUES ($1, {NOW_MS}, {NOW_MS} + $2, $3) \
             ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until, \
             max_concurrent = excluded.max_concurrent"
        ))
        .bind(instance)
        .bind(millis(lease))
        .bind(sql_int(max_concurrent as u64))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM instances WHERE lease_until < {NOW_MS}"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE jobs SET lease_until = {NOW_MS} + $1 WHERE instance = $2 AND state IN {UNFINISHED}"
        ))
        .bind(millis(lease))
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        let held: Vec<(String, bool)> = sqlx::query_as(&format!(
            "SELECT id, cancel_requested FROM jobs WHERE instance = $1 AND state IN {UNFINISHED}"
        ))
        .bind(instance)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Heartbeat {
            cancel_requested: held
                .iter()
                .filter(|(_, c)| *c)
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
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(instance)
            .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ADMISSION_LOCK)
            .execute(&mut *tx)
            .await?;
        if let Some(idem) = &job.idempotency {
            let existing: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT id, fingerprint FROM jobs WHERE idempotency_scope = $1 AND idempotency_key = $2",
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
        let (active, capacity, ahead): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM jobs WHERE state IN {UNFINISHED}), \
             (SELECT COALESCE(SUM(max_concurrent), 0)::bigint FROM instances WHERE lease_until >= {NOW_MS}), \
             (SELECT count(*) FROM jobs WHERE state = 'queued' AND instance IS NULL)"
        ))
        .fetch_one(&mut *tx)
        .await?;
        let (key_active, key_recent) = match &job.owner {
            Some(owner) => {
                let active: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM jobs WHERE owner = $1 AND state IN {UNFINISHED}"
                ))
                .bind(owner)
                .fetch_one(&mut *tx)
                .await?;
                let since = now.saturating_sub(super::RATE_WINDOW.as_millis() as u64);
                let recent: Vec<i64> = sqlx::query_scalar(
                    "SELECT created_at FROM jobs WHERE owner = $1 AND created_at > $2 ORDER BY created_at",
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
             VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
        notify(
            &mut *tx,
            &Notice::Appended {
                job_id: job.id.clone(),
                seq: last_seq,
            },
        )
        .await?;
        notify(&mut *tx, &Notice::Queued).await?;
        tx.commit().await?;
        Ok(Ok(Created::New))
    }

    async fn append(&self, job_id: &str, instance: &str, batch: &Batch) -> Result<(), StoreError> {
        let last = batch.events.last().map(|e| e.seq);
        let mut tx = self.pool.begin().await?;
        let mut update = QueryBuilder::<Postgres>::new("UPDATE jobs SET bytes = bytes + ");
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
                "INSERT INTO patches (job_id, patch, truncated) VALUES ($1, $2, $3) \
                 ON CONFLICT (job_id) DO UPDATE SET patch = excluded.patch, truncated = excluded.truncated",
            )
            .bind(job_id)
            .bind(patch.as_ref())
            .bind(*truncated)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(transcript) = &batch.transcript {
            sqlx::query(
                "INSERT INTO transcripts (job_id, transcript) VALUES ($1, $2) \
                 ON CONFLICT (job_id) DO UPDATE SET transcript = excluded.transcript",
            )
            .bind(job_id)
            .bind(transcript)
            .execute(&mut *tx)
            .await?;
        }
        for resource in &batch.resources {
            sqlx::query(
                "INSERT INTO resources (job_id, kind, backend, external_id, released) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (job_id, kind, external_id) DO UPDATE SET released = excluded.released",
            )
            .bind(job_id)
            .bind(&resource.kind)
            .bind(&resource.backend)
            .bind(&resource.external_id)
            .bind(resource.released)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(seq) = last {
            notify(
                &mut *tx,
                &Notice::Appended {
                    job_id: job_id.to_owned(),
                    seq,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record).transpose()
    }

    async fn unfinished(&self) -> Result<Unfinished, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT state, count(*) FROM jobs WHERE state IN {UNFINISHED} GROUP BY state"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(Unfinished::from_counts(
            rows.into_iter().map(|(state, n)| (state, count(n))),
        ))
    }

    async fn list_jobs(&self, query: &ListQuery) -> Result<Vec<JobRecord>, StoreError> {
        let mut sql =
            QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM jobs WHERE TRUE"));
        if let Some(key) = &query.visible_to {
            sql.push(" AND (owner IS NULL OR owner = ")
                .push_bind(key)
                .push(")");
        }
        if let Some(state) = query.state {
            sql.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some((at, id)) = &query.before {
            sql.push(" AND (created_at, id) < (")
                .push_bind(sql_int(*at))
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        sql.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(sql_int(query.limit as u64));
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(record).collect()
    }

    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, body FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(sql_int(after))
        .bind(sql_int(limit as u64))
        .fetch_all(&self.pool)
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
        let row: Option<(Vec<u8>, bool)> =
            sqlx::query_as("SELECT patch, truncated FROM patches WHERE job_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(patch, truncated)| (bytes::Bytes::from(patch), truncated)))
    }

    async fn transcript(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT transcript FROM transcripts WHERE job_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn resources(&self, id: &str) -> Result<Vec<Resource>, StoreError> {
        let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
            "SELECT kind, backend, external_id, released FROM resources WHERE job_id = $1 \
             ORDER BY kind, external_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, backend, external_id, released)| Resource {
                kind,
                backend,
                external_id,
                released,
            })
            .collect())
    }

    async fn unreleased_sandboxes(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, Resource)>, StoreError> {
        let rows: Vec<(String, String, String, String, bool)> = sqlx::query_as(&format!(
            "SELECT r.job_id, r.kind, r.backend, r.external_id, r.released FROM resources r \
             JOIN jobs j ON j.id = r.job_id \
             WHERE r.kind = 'sandbox' AND NOT r.released AND j.state NOT IN {UNFINISHED} \
             ORDER BY j.created_at, r.job_id LIMIT $1"
        ))
        .bind(sql_int(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(job_id, kind, backend, external_id, released)| {
                let resource = Resource {
                    kind,
                    backend,
                    external_id,
                    released,
                };
                (job_id, resource)
            })
            .collect())
    }

    async fn mark_released(&self, job_id: &str, resource: &Resource) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE resources SET released = TRUE \
             WHERE job_id = $1 AND kind = $2 AND external_id = $3",
        )
        .bind(job_id)
        .bind(&resource.kind)
        .bind(&resource.external_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim_next(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = $1, lease_until = {NOW_MS} + $2 WHERE id = (\
             SELECT id FROM jobs WHERE state = 'queued' AND instance IS NULL \
             ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(millis(lease))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn claim_queued(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = $1, lease_until = {NOW_MS} + $2 WHERE id = $3 \
             AND state = 'queued' AND instance IS NULL RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(millis(lease))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE jobs SET cancel_requested = TRUE WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        notify(
            &mut *tx,
            &Notice::CancelRequested {
                job_id: id.to_owned(),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn orphans(&self, _instance: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT id FROM jobs WHERE state IN {UNFINISHED} AND instance IS NOT NULL \
             AND lease_until < {NOW_MS} ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn take_over(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE jobs SET instance = $1, lease_until = {NOW_MS} + $2 WHERE id = $3 \
             AND state IN {UNFINISHED} AND instance IS NOT NULL AND lease_until < {NOW_MS} \
             RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(millis(lease))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn prune(&self, retention: &Retention) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let expired = sqlx::query(&format!(
            "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= {NOW_MS} - $1"
        ))
        .bind(millis(retention.max_age))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let finished: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, bytes FROM jobs WHERE finished_at IS NOT NULL \
             ORDER BY finished_at DESC, created_at DESC, id DESC",
        )
        .fetch_all(&mut *tx)
        .await?;
        let doomed = super::sqlite::beyond_limits(&finished, retention);
        if !doomed.is_empty() {
            sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
                .bind(&doomed)
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

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    job_id: &str,
    events: &[super::NewEvent],
) -> Result<(), StoreError> {
    for chunk in events.chunks(500) {
        let mut insert = QueryBuilder::<Postgres>::new("INSERT INTO events (job_id, seq, body) ");
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

    #[test]
    fn notices_round_trip_through_their_payloads() {
        for notice in [
            Notice::Appended {
                job_id: "6f0c-1".into(),
                seq: 42,
            },
            Notice::Queued,
            Notice::CancelRequested {
                job_id: "6f0c-2".into(),
            },
        ] {
            assert_eq!(decode_notice(&encode_notice(&notice)), Some(notice));
        }
        assert_eq!(decode_notice("e x notanumber"), None);
        assert_eq!(decode_notice(""), None);
    }
}
