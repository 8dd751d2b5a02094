//! Loads the result topics into PostgreSQL, exactly once per row.
//!
//! The loader assigns itself every partition of `ad-metrics`,
//! `campaign-ctr` and `anomaly-alerts` and starts each at the position stored
//! in `sink_offsets` (or the beginning). Rows are batched (`--batch-size`,
//! `--linger`); a batch is written in one transaction: binary `COPY` into a
//! session-local staging table, `INSERT … ON CONFLICT (grain) DO UPDATE` into
//! the real table, and the new positions into `sink_offsets`. Either all of
//! it commits or none, so a crash at any moment neither loses nor duplicates
//! a row: the restarted loader resumes from the committed positions, and
//! rows it writes again overwrite themselves (the upsert makes replays of
//! the topic harmless too). Kafka's own committed offsets are not used.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, Pool};
use futures_util::pin_mut;
use hashbrown::HashTable;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::NoTls;

use adstream_schemas::topics;
use adstream_schemas::{AdMetric, AnomalyAlert, CampaignCtr, Codec, CodecError};

use crate::migrations::{migrate, MigrationError};
use adstream_admin::resume::ResumeGuard;

#[derive(Debug, Clone)]
pub struct PgOptions {
    pub bootstrap: String,
    pub registry_url: String,
    pub overrides: Vec<(String, String)>,
    pub topic_prefix: String,
    pub database_url: String,
    pub batch_size: usize,
    pub linger: Duration,
    /// Name under which positions are stored in `sink_offsets`.
    pub consumer: String,
    /// How long a batch is retried while PostgreSQL cannot be reached
    /// (connection lost, server restarting) before the loader gives up.
    pub retry_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("database URL: {0}")]
    DatabaseUrl(tokio_postgres::Error),
    #[error("connection pool: {0}")]
    Pool(String),
    #[error("PostgreSQL: {context}: {source}")]
    Postgres {
        context: &'static str,
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("Kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    #[error("topic {0} does not exist (create it with topics.sh)")]
    MissingTopic(String),
    #[error("schema registry: {0}")]
    Schema(#[from] CodecError),
}

impl SinkError {
    /// Whether writing again later may succeed: the database could not be
    /// reached, the connection was lost or the server is shutting down or
    /// starting, or the transaction lost a serialization or deadlock race.
    /// A rejected statement or row is not retried: it would fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Pool(_) => true,
            SinkError::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: an I/O error or a closed connection.
                None => true,
                Some(state) => {
                    let code = state.code();
                    code.starts_with("08") // connection exception
                        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                        || code == "53300" // too many connections
                        || code == "40001" // serialization failure
                        || code == "40P01" // deadlock detected
                }
            },
            _ => false,
        }
    }
}

/// A pool error with its causes: deadpool's and tokio-postgres's own
/// messages ("db error") leave out what the server said.
fn pool_error(e: deadpool_postgres::PoolError) -> SinkError {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    SinkError::Pool(text)
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { context, source }
}

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> SinkError {
    move |source| SinkError::Kafka { context, source }
}

/// Counters for tests, health checks and metrics.
#[derive(Debug, Default)]
pub struct SinkStatus {
    /// Records taken from the result topics (loaded or not yet).
    pub records_read: AtomicU64,
    pub rows_loaded: AtomicU64,
    pub batches: AtomicU64,
    pub undecodable: AtomicU64,
}

/// A pool for `url`.
pub fn pool(url: &str) -> Result<Pool, SinkError> {
    let config = tokio_postgres::Config::from_str(url).map_err(SinkError::DatabaseUrl)?;
    Pool::builder(Manager::new(config, NoTls))
        .max_size(4)
        .build()
        .map_err(|e| SinkError::Pool(e.to_string()))
}

fn ts(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// A result row as the loader writes it: its table's primary key (rows of a
/// batch with the same key collapse to the last one, as the upsert would)
/// and its binary `COPY` columns.
trait ResultRow: Send + Sync {
    /// The primary key, borrowed from the row.
    type Key<'a>: std::hash::Hash + Eq
    where
        Self: 'a;
    /// Column types in table order.
    const TYPES: &'static [Type];
    fn key(&self) -> Self::Key<'_>;
    /// Writes the row's columns, borrowed (no per-row copies or boxes).
    fn copy_into(
        &self,
        w: Pin<&mut BinaryCopyInWriter>,
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

impl ResultRow for AdMetric {
    type Key<'a> = (i64, &'a str, &'a str, &'a str, &'a str, &'a str, &'a str);
    const TYPES: &'static [Type] = &METRIC_TYPES;
    fn key(&self) -> Self::Key<'_> {
        (
            self.window_start,
            &self.campaign_id,
            &self.ad_id,
            &self.search_keyword,
            &self.state,
            &self.ip_range,
            &self.device_type,
        )
    }
    async fn copy_into(
        &self,
        w: Pin<&mut BinaryCopyInWriter>,
    ) -> Result<(), tokio_postgres::Error> {
        let (s, e) = (ts(self.window_start), ts(self.window_end));
        w.write(&[
            &s,
            &e,
            &self.campaign_id,
            &self.ad_id,
            &self.search_keyword,
            &self.state,
            &self.ip_range,
            &self.device_type,
            &self.impressions,
            &self.clicks,
            &self.conversions,
            &self.cost_micros,
            &self.revenue_micros,
            &self.ctr,
            &self.conversion_rate,
        ])
        .await
    }
}

impl ResultRow for CampaignCtr {
    type Key<'a> = (i64, &'a str);
    const TYPES: &'static [Type] = &CAMPAIGN_TYPES;
    fn key(&self) -> Self::Key<'_> {
        (self.window_start, &self.campaign_id)
    }
    async fn copy_into(
        &self,
        w: Pin<&mut BinaryCopyInWriter>,
    ) -> Result<(), tokio_postgres::Error> {
        let (s, e) = (ts(self.window_start), ts(self.window_end));
        w.write(&[
            &s,
            &e,
            &self.campaign_id,
            &self.impressions,
            &self.clicks,
            &self.conversions,
            &self.cost_micros,
            &self.revenue_micros,
            &self.ctr,
            &self.conversion_rate,
        ])
        .await
    }
}

impl ResultRow for AnomalyAlert {
    type Key<'a> = &'a str;
    const TYPES: &'static [Type] = &ALERT_TYPES;
    fn key(&self) -> Self::Key<'_> {
        &self.alert_id
    }
    async fn copy_into(
        &self,
        w: Pin<&mut BinaryCopyInWriter>,
    ) -> Result<(), tokio_postgres::Error> {
        let (s, e, d) = (
            ts(self.window_start),
            ts(self.window_end),
            ts(self.detected_at),
        );
        w.write(&[
            &self.alert_id,
            &self.campaign_id,
            &self.metric,
            &self.kind,
            &s,
            &e,
            &self.value,
            &self.baseline,
            &self.score,
            &self.impressions,
            &self.clicks,
            &d,
        ])
        .await
    }
}

/// The rows of one table in a batch, the last one per primary key. Rows
/// are stored once and indexed by position, so collapsing copies no keys.
struct LatestRows<T> {
    rows: Vec<T>,
    index: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl<T> Default for LatestRows<T> {
    fn default() -> Self {
        LatestRows {
            rows: Vec::new(),
            index: HashTable::new(),
            hasher: Default::default(),
        }
    }
}

impl<T: ResultRow> LatestRows<T> {
    fn insert(&mut self, row: T) {
        let (rows, hasher) = (&mut self.rows, &self.hasher);
        let h = hasher.hash_one(row.key());
        match self.index.find(h, |&i| rows[i as usize].key() == row.key()) {
            Some(&i) => rows[i as usize] = row,
            None => {
                self.index.insert_unique(h, rows.len() as u32, |&i| {
                    hasher.hash_one(rows[i as usize].key())
                });
                rows.push(row);
            }
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// One batch: rows collapsed by primary key, and positions.
#[derive(Default)]
struct Batch {
    metrics: LatestRows<AdMetric>,
    campaigns: LatestRows<CampaignCtr>,
    alerts: LatestRows<AnomalyAlert>,
    positions: HashMap<(String, i32), i64>,
    records: usize,
    started: Option<Instant>,
}

impl Batch {
    fn rows(&self) -> usize {
        self.metrics.len() + self.campaigns.len() + self.alerts.len()
    }
}

/// Column types of `ad_metrics`, in table order (for binary `COPY`).
pub const METRIC_TYPES: [Type; 15] = [
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
];
const CAMPAIGN_TYPES: [Type; 10] = [
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
];
const ALERT_TYPES: [Type; 12] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::INT8,
    Type::INT8,
    Type::TIMESTAMPTZ,
];

const STAGING: &str = "
    SET client_min_messages = warning;
    CREATE TEMP TABLE IF NOT EXISTS stage_ad_metrics (LIKE ad_metrics) ON COMMIT DELETE ROWS;
    CREATE TEMP TABLE IF NOT EXISTS stage_campaign_ctr (LIKE campaign_ctr) ON COMMIT DELETE ROWS;
    CREATE TEMP TABLE IF NOT EXISTS stage_anomaly_alerts (LIKE anomaly_alerts) ON COMMIT DELETE ROWS;";

const UPSERT_METRICS: &str = "
    INSERT INTO ad_metrics SELECT * FROM stage_ad_metrics
    ON CONFLICT (time, campaign_id, ad_id, search_keyword, state, ip_range, device_type) DO UPDATE SET
        window_end = EXCLUDED.window_end, impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks,
        conversions = EXCLUDED.conversions, cost_micros = EXCLUDED.cost_micros,
        revenue_micros = EXCLUDED.revenue_micros, ctr = EXCLUDED.ctr, conversion_rate = EXCLUDED.conversion_rate";
const UPSERT_CAMPAIGNS: &str = "
    INSERT INTO campaign_ctr SELECT * FROM stage_campaign_ctr
    ON CONFLICT (time, campaign_id) DO UPDATE SET
        window_end = EXCLUDED.window_end, impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks,
        conversions = EXCLUDED.conversions, cost_micros = EXCLUDED.cost_micros,
        revenue_micros = EXCLUDED.revenue_micros, ctr = EXCLUDED.ctr, conversion_rate = EXCLUDED.conversion_rate";
const UPSERT_ALERTS: &str = "
    INSERT INTO anomaly_alerts SELECT * FROM stage_anomaly_alerts
    ON CONFLICT (alert_id) DO UPDATE SET
        campaign_id = EXCLUDED.campaign_id, metric = EXCLUDED.metric, kind = EXCLUDED.kind,
        time = EXCLUDED.time, window_end = EXCLUDED.window_end, value = EXCLUDED.value,
        baseline = EXCLUDED.baseline, score = EXCLUDED.score, impressions = EXCLUDED.impressions,
        clicks = EXCLUDED.clicks, detected_at = EXCLUDED.detected_at";

async fn copy_rows<T: ResultRow>(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &str,
    rows: &[T],
) -> Result<(), SinkError> {
    let sink = tx.copy_in(statement).await.map_err(pg("starting COPY"))?;
    let writer = BinaryCopyInWriter::new(sink, T::TYPES);
    pin_mut!(writer);
    for row in rows {
        row.copy_into(writer.as_mut())
            .await
            .map_err(pg("COPY row"))?;
    }
    writer.finish().await.map_err(pg("finishing COPY"))?;
    Ok(())
}

/// Loads `rows` into `table`. Fast path: `COPY` straight into the table,
/// which succeeds whenever none of the rows exist yet (the normal case: each
/// window is emitted once). If any does (a replay after a crash), the
/// savepoint is rolled back and the rows go through the staging table and
/// the upsert instead. Either way the outcome is the upsert's.
async fn load<T: ResultRow>(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    upsert: &str,
    rows: &LatestRows<T>,
) -> Result<(), SinkError> {
    if rows.is_empty() {
        return Ok(());
    }
    tx.batch_execute("SAVEPOINT direct_copy")
        .await
        .map_err(pg("SAVEPOINT"))?;
    match copy_rows(tx, &format!("COPY {table} FROM STDIN BINARY"), &rows.rows).await {
        Ok(()) => {
            return tx
                .batch_execute("RELEASE SAVEPOINT direct_copy")
                .await
                .map_err(pg("RELEASE SAVEPOINT"));
        }
        Err(SinkError::Postgres { source, .. })
            if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            tx.batch_execute("ROLLBACK TO SAVEPOINT direct_copy")
                .await
                .map_err(pg("ROLLBACK TO SAVEPOINT"))?;
        }
        Err(e) => return Err(e),
    }
    copy_rows(
        tx,
        &format!("COPY stage_{table} FROM STDIN BINARY"),
        &rows.rows,
    )
    .await?;
    tx.execute(upsert, &[]).await.map_err(pg("upserting"))?;
    Ok(())
}

/// Writes one batch and its positions in one transaction.
async fn flush(pool: &Pool, consumer: &str, batch: &Batch) -> Result<(), SinkError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    client
        .batch_execute(STAGING)
        .await
        .map_err(pg("creating staging tables"))?;
    let tx = client.transaction().await.map_err(pg("BEGIN"))?;
    load(&tx, "ad_metrics", UPSERT_METRICS, &batch.metrics).await?;
    load(&tx, "campaign_ctr", UPSERT_CAMPAIGNS, &batch.campaigns).await?;
    load(&tx, "anomaly_alerts", UPSERT_ALERTS, &batch.alerts).await?;
    // Every position in one statement (one round trip, not one per partition).
    let (topics, (partitions, nexts)): (Vec<&str>, (Vec<i32>, Vec<i64>)) = batch
        .positions
        .iter()
        .map(|((t, p), n)| (t.as_str(), (*p, *n)))
        .unzip();
    tx.execute(
        "INSERT INTO sink_offsets (consumer, topic, partition, next_offset)
         SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::int8[])
         ON CONFLICT (consumer, topic, partition)
         DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        &[&consumer, &topics, &partitions, &nexts],
    )
    .await
    .map_err(pg("storing positions"))?;
    tx.commit().await.map_err(pg("COMMIT"))?;
    Ok(())
}

/// Writes one batch, retrying with backoff while the error is transient
/// (`SinkError::is_transient`) and `retry_for` has not run out. A retry
/// writes the same rows and positions in a new transaction, so a batch is
/// loaded once whatever the number of tries.
async fn flush_retrying(
    pool: &Pool,
    consumer: &str,
    batch: &Batch,
    retry_for: Duration,
) -> Result<(), SinkError> {
    let first = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match flush(pool, consumer, batch).await {
            Err(e) if e.is_transient() && first.elapsed() + wait <= retry_for => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "writing a batch failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
}

/// Waits for a batch being written and counts it.
async fn finish(
    handle: tokio::task::JoinHandle<Result<usize, SinkError>>,
    status: &SinkStatus,
) -> Result<(), SinkError> {
    let rows = handle
        .await
        .map_err(|e| SinkError::Pool(format!("batch writer task: {e}")))??;
    status.rows_loaded.fetch_add(rows as u64, Ordering::Relaxed);
    status.batches.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends an undecodable result record to the dead-letter topic with its
/// provenance and reason, and waits for the broker's acknowledgement (before
/// the batch that covers its offset can commit).
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    msg: &BorrowedMessage<'_>,
    reason: &str,
) -> Result<(), SinkError> {
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: topics::headers::SOURCE_TOPIC,
            value: Some(msg.topic()),
        })
        .insert(Header {
            key: topics::headers::SOURCE_PARTITION,
            value: Some(&partition),
        })
        .insert(Header {
            key: topics::headers::SOURCE_OFFSET,
            value: Some(&offset),
        })
        .insert(Header {
            key: topics::headers::REASON,
            value: Some(reason),
        });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = msg.key() {
        record = record.key(k);
    }
    if let Some(v) = msg.payload() {
        record = record.payload(v);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| kafka("writing to the dead-letter topic")(e))
}

/// Runs the PostgreSQL loader until `stop` is set (then flushes and returns).
pub async fn run(
    opts: &PgOptions,
    stop: &AtomicBool,
    status: &SinkStatus,
) -> Result<(), SinkError> {
    let pool = pool(&opts.database_url)?;
    {
        let client = pool.get().await.map_err(pool_error)?;
        let applied = migrate(&client).await?;
        tracing::info!(?applied, "migrations");
    }
    let codec = Codec::new(&opts.registry_url)?;
    let names = [
        topics::AD_METRICS,
        topics::CAMPAIGN_CTR,
        topics::ANOMALY_ALERTS,
    ]
    .map(|t| format!("{}{t}", opts.topic_prefix));

    let consumer = crate::kafka::consumer(&opts.bootstrap, &opts.consumer, &opts.overrides)
        .map_err(kafka("creating the consumer"))?;
    let mut pc = ClientConfig::new();
    pc.set("bootstrap.servers", &opts.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all");
    for (k, v) in &opts.overrides {
        pc.set(k, v);
    }
    let producer: FutureProducer = pc.create().map_err(kafka("creating the producer"))?;
    let dead_letter_topic = format!("{}{}", opts.topic_prefix, topics::DEAD_LETTER);

    // Start every partition at its committed position in the database.
    let client = pool.get().await.map_err(pool_error)?;
    let stored: HashMap<(String, i32), i64> = client
        .query(
            "SELECT topic, partition, next_offset FROM sink_offsets WHERE consumer = $1",
            &[&opts.consumer],
        )
        .await
        .map_err(pg("reading positions"))?
        .iter()
        .map(|r| {
            (
                (r.get::<_, String>(0), r.get::<_, i32>(1)),
                r.get::<_, i64>(2),
            )
        })
        .collect();
    drop(client);
    let mut tpl = TopicPartitionList::new();
    for t in &names {
        let partitions = crate::kafka::partitions(&consumer, t)
            .map_err(kafka("fetching metadata"))?
            .ok_or_else(|| SinkError::MissingTopic(t.clone()))?;
        for p in partitions {
            let offset = stored
                .get(&(t.clone(), p))
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(t, p, offset)
                .map_err(kafka("building the assignment"))?;
        }
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning partitions"))?;
    tracing::info!(
        partitions = tpl.count(),
        resumed = stored.len(),
        "loading into PostgreSQL"
    );

    let mut resume = ResumeGuard::new(stored);

    let mut batch = Batch::default();
    let mut in_flight: Option<tokio::task::JoinHandle<Result<usize, SinkError>>> = None;
    loop {
        resume
            .check(&consumer)
            .map_err(kafka("seeking to the partition start"))?;
        if let Some(done) = in_flight.take_if(|h| h.is_finished()) {
            finish(done, status).await?;
        }
        let stopping = stop.load(Ordering::Relaxed);
        let due = batch.started.is_some_and(|s| s.elapsed() >= opts.linger);
        if stopping || due || batch.records >= opts.batch_size {
            // One batch is written while the next fills; batches commit in
            // order because the next starts only after the previous commits.
            if let Some(previous) = in_flight.take() {
                finish(previous, status).await?;
            }
            if batch.records > 0 {
                let full = std::mem::take(&mut batch);
                let (pool, consumer, retry_for) =
                    (pool.clone(), opts.consumer.clone(), opts.retry_for);
                in_flight = Some(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let filled_ms = full.started.map_or(0, |s| s.elapsed().as_millis() as u64);
                    let written = flush_retrying(&pool, &consumer, &full, retry_for)
                        .await
                        .map(|()| full.rows());
                    tracing::debug!(
                        rows = full.rows(),
                        records = full.records,
                        filled_ms,
                        ms = t0.elapsed().as_millis() as u64,
                        "batch written"
                    );
                    written
                }));
            }
            if stopping {
                if let Some(last) = in_flight.take() {
                    finish(last, status).await?;
                }
                return Ok(());
            }
        }
        let Some(msg) = crate::kafka::next_record(&consumer, Duration::from_millis(100))
            .await
            .map_err(kafka("consuming"))?
        else {
            continue;
        };
        let topic = msg.topic().to_owned();
        let key = (topic.clone(), msg.partition());
        if !resume.admit(&topic, msg.partition(), msg.offset()) {
            continue;
        }
        batch.positions.insert(key, msg.offset() + 1);
        batch.records += 1;
        status.records_read.fetch_add(1, Ordering::Relaxed);
        batch.started.get_or_insert_with(Instant::now);
        let Some(value) = msg.payload() else {
            status.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%topic, partition = msg.partition(), offset = msg.offset(), "record without a value sent to the dead-letter topic");
            dead_letter(
                &producer,
                &dead_letter_topic,
                &msg,
                "invalid: record has no value",
            )
            .await?;
            continue;
        };
        codec.wait_for_writer_schema(value, stop).await;
        let decoded = if topic == names[0] {
            codec
                .decode::<AdMetric>(value)
                .await
                .map(|m| batch.metrics.insert(m))
        } else if topic == names[1] {
            codec
                .decode::<CampaignCtr>(value)
                .await
                .map(|m| batch.campaigns.insert(m))
        } else {
            codec
                .decode::<AnomalyAlert>(value)
                .await
                .map(|a| batch.alerts.insert(a))
        };
        if let Err(e) = decoded {
            if e.is_retryable() {
                return Err(e.into());
            }
            status.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%topic, partition = msg.partition(), offset = msg.offset(), error = %e, "undecodable result record sent to the dead-letter topic");
            let reason = format!("undecodable: {}: {e}", e.reason_code());
            dead_letter(&producer, &dead_letter_topic, &msg, &reason).await?;
        }
    }
}
