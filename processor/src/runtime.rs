//! The Kafka shell around the engine: tasks, transactions, checkpoints.
//!
//! Units of work (processor/DESIGN-exactly-once.md):
//! - a **join task** per input partition *p*: an [`Engine`] in task mode fed
//!   by partition *p* of the three co-partitioned input topics. It writes
//!   side outputs, and hands the cells of the windows its watermark closes
//!   to the partials topic, keyed by campaign, followed by its watermark
//!   ([`Mark`]) broadcast to every partials partition;
//! - a **rollup task** per partials partition *q*: a [`Rollup`] that sums
//!   the partials of every join task and writes `ad-metrics`,
//!   `campaign-ctr` and alerts when the minimum of the tasks' watermarks
//!   passes a window.
//!
//! The consumer group assigns input and partials partitions (range
//! assignor, so partition *p* of the three input topics lands together);
//! any number of instances produce the same outputs.
//!
//! Exactly once: one transactional producer per instance. Every
//! `--commit-interval` the outputs, partials and marks produced since the
//! last commit and the consumed positions of every task (sent with the
//! group's metadata, KIP-447) are committed in one transaction. On a
//! rebalance or any transaction error the open transaction is aborted and
//! every task is rebuilt from its checkpoint (below). An instance that did
//! not poll for longer than the session timeout (paused, e.g. SIGSTOP) may
//! have lost its partitions: it aborts instead of committing, whatever the
//! broker would have allowed.
//!
//! Durable state ([`crate::checkpoints`]): every `--checkpoint-interval` a
//! task's state is written to object storage under the positions it covers.
//! A task is restored from the newest checkpoint at or below the committed
//! offsets, then replays from the checkpoint's positions up to the committed
//! offsets with its outputs suppressed (they were committed already); a
//! record that overshoots the committed offset of its partition is held,
//! and the partition paused, until every partition of the task has reached
//! its committed offset. Outputs are a function of the positions, so the
//! suppressed outputs are exactly the committed ones.
//!
//! Idleness is decided here, because it needs wall time and consumer lag: a
//! partition is idle when it has delivered nothing for `--idle-timeout` AND
//! its position has reached its high watermark. A partition with a backlog
//! is never idle, which keeps results independent of how the broker
//! schedules fetches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use adstream_admin::consumer_errors::consumer_error_is_fatal;
use adstream_admin::resume::{cached_high_watermark, ResumeGuard};
use adstream_schemas::codec::{split_frame, CodecError};
use adstream_schemas::topics::{self, headers};
use adstream_schemas::{
    AdMetric, AnomalyAlert, AvroRecord, CampaignCtr, Click, Codec, Conversion, Impression,
};

use crate::checkpoints::{CheckpointStore, CheckpointStoreError};
use crate::engine::rollup::{Mark, PartialMessage, Rollup, WindowClose};
use crate::engine::watermark::InputPartition;
use crate::engine::{Engine, EngineConfig, EngineStats, Output, SideKind, SourceRef};
use crate::metrics::Metrics;

/// Checkpoints kept per task (see [`CheckpointStore::prune`]).
const CHECKPOINTS_KEPT: usize = 3;

/// The internal topic join tasks write partial windows and marks to.
pub const PARTIALS_TOPIC: &str = "adstream-processor-partials";

/// Settings of a processor run.
#[derive(Debug, Clone)]
pub struct ProcessorOptions {
    pub bootstrap: String,
    pub registry_url: String,
    pub overrides: Vec<(String, String)>,
    pub topic_prefix: String,
    pub group_id: String,
    pub engine: EngineConfig,
    pub idle_timeout: Duration,
    pub commit_interval: Duration,
    /// Stable name of this instance: its transactional id is `<group>-<instance>`,
    /// so a restarted instance fences its previous incarnation's open transaction.
    pub instance_id: String,
    /// Join the group as a static member named `<group>-<instance>` (KIP-345).
    pub static_membership: bool,
    /// Object store URL for task checkpoints.
    pub state_url: String,
    pub checkpoint_interval: Duration,
    /// Commit and return once every assigned partition is idle (batch runs, demos).
    pub stop_when_idle: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("Kafka: {context}: {source}")]
    Kafka { context: String, source: KafkaError },
    #[error("input topic {0} does not exist (create it with topics.sh)")]
    MissingTopic(String),
    #[error(
        "input topics are not co-partitioned ({0}); CONTRACT.md requires equal partition counts, \
         so that an impression and its clicks and conversions meet in one partition"
    )]
    NotCoPartitioned(String),
    #[error("schema registry: {0}")]
    Schema(#[from] CodecError),
    #[error(transparent)]
    Checkpoints(#[from] CheckpointStoreError),
    #[error("unreadable checkpoint of task {task}: {reason}")]
    BadCheckpoint { task: String, reason: String },
    #[error("{failed} output records were not acknowledged (first error: {first})")]
    Undelivered { failed: u64, first: String },
    #[error(
        "partition {partition} of the input topics was assigned without its peers ({got:?}); \
         use the range assignor (partition.assignment.strategy=range) so a join task gets \
         partition {partition} of all three input topics"
    )]
    SplitTask { partition: i32, got: Vec<String> },
}

fn kafka(context: &str) -> impl FnOnce(KafkaError) -> RuntimeError + '_ {
    move |source| RuntimeError::Kafka {
        context: context.to_owned(),
        source,
    }
}

/// What a running processor has done, for tests and health checks.
#[derive(Debug, Clone, Default)]
pub struct StatusSnapshot {
    /// Join tasks' counters (input accounting) plus the rollups' output counts.
    pub stats: EngineStats,
    /// Lowest watermark the rollup tasks closed windows to.
    pub watermark: i64,
    /// Assigned input partitions (three per join task).
    pub assigned: usize,
    pub idle: usize,
    pub commits: u64,
    pub outputs_acked: u64,
    pub join_tasks: usize,
    pub rollup_tasks: usize,
    pub restores: u64,
    pub aborts: u64,
}

#[derive(Debug, Default)]
pub struct Status(Mutex<StatusSnapshot>);

impl Status {
    pub fn snapshot(&self) -> StatusSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, s: StatusSnapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

#[derive(Default)]
struct GroupContext {
    events: Mutex<Vec<RebalanceEvent>>,
    pending: AtomicBool,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        };
        let ev = match rebalance {
            Rebalance::Assign(tpl) => RebalanceEvent::Assigned(list(tpl)),
            Rebalance::Revoke(tpl) => RebalanceEvent::Revoked(list(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ev);
        self.pending.store(true, Ordering::Release);
    }
}

/// Counts acknowledgements of produced outputs.
#[derive(Default)]
struct Acks {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

struct Topics {
    inputs: [String; 3],
    partials: String,
    ad_metrics: String,
    campaign_ctr: String,
    alerts: String,
    late: String,
    unmatched: String,
    dead_letter: String,
}

struct SchemaIds {
    ad_metric: u32,
    campaign_ctr: u32,
    alert: u32,
}

/// An input record held back during a replay (it lies past the committed offset).
struct HeldRecord {
    topic: u8,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: Option<i64>,
}

/// A join task: partition `partition` of the three input topics.
struct JoinTask {
    partition: i32,
    engine: Engine,
    /// Next offset to process, per input topic.
    next: [i64; 3],
    /// Replaying up to these committed offsets (outputs suppressed).
    replay_to: Option<[i64; 3]>,
    held: Vec<HeldRecord>,
    paused: [bool; 3],
    last_record: [Instant; 3],
    /// Watermark and idleness last published.
    published: Option<(i64, bool)>,
    /// Positions and watermark of the last checkpoint written.
    checkpointed: Option<([i64; 3], i64)>,
}

impl JoinTask {
    fn name(&self) -> String {
        format!("join-{:04}", self.partition)
    }

    fn replay_done(&self) -> bool {
        self.replay_to
            .is_none_or(|to| self.next.iter().zip(to).all(|(n, t)| *n >= t))
    }
}

/// A rollup task: partition `partition` of the partials topic.
struct RollupTask {
    partition: i32,
    rollup: Rollup,
    next: i64,
    replay_to: Option<i64>,
    last_record: Instant,
    checkpointed: Option<i64>,
}

impl RollupTask {
    fn name(&self) -> String {
        format!("rollup-{:04}", self.partition)
    }
}

/// The shell's state during a run.
struct Shell<'a> {
    opts: &'a ProcessorOptions,
    topics: Topics,
    ids: SchemaIds,
    codec: Codec,
    rt: tokio::runtime::Runtime,
    consumer: Arc<BaseConsumer<GroupContext>>,
    producer: ThreadedProducer<Acks>,
    store: CheckpointStore,
    /// Input partitions per input topic: the number of join tasks.
    tasks_total: usize,
    partials_partitions: usize,
    joins: BTreeMap<i32, JoinTask>,
    rollups: BTreeMap<i32, RollupTask>,
    resume: ResumeGuard,
    session_timeout: Duration,
    last_poll: Instant,
    max_poll_gap: Duration,
    last_checkpoint: Instant,
    started: Instant,
    first_output_committed: bool,
    /// Outputs produced in the open transaction.
    produced: u64,
    /// A window closed (partials or results are waiting): commit now rather
    /// than at the end of the interval, for emit latency.
    window_closed: bool,
    /// The marks that closed the windows emitted in the open transaction.
    closes: Vec<WindowClose>,
    buf: Vec<u8>,
    commits: u64,
    restores: u64,
    aborts: u64,
}

/// Runs the processor until `stop` is set; commits before returning.
pub fn run(
    opts: &ProcessorOptions,
    stop: &AtomicBool,
    status: &Status,
    metrics: &Metrics,
) -> Result<(), RuntimeError> {
    let p = &opts.topic_prefix;
    let topics = Topics {
        inputs: topics::INPUTS.map(|t| format!("{p}{t}")),
        partials: format!("{p}{PARTIALS_TOPIC}"),
        ad_metrics: format!("{p}{}", topics::AD_METRICS),
        campaign_ctr: format!("{p}{}", topics::CAMPAIGN_CTR),
        alerts: format!("{p}{}", topics::ANOMALY_ALERTS),
        late: format!("{p}{}", topics::LATE_EVENTS),
        unmatched: format!("{p}{}", topics::UNMATCHED),
        dead_letter: format!("{p}{}", topics::DEAD_LETTER),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            RuntimeError::Schema(CodecError::Registry {
                url: opts.registry_url.clone(),
                reason: format!("cannot start a runtime: {e}"),
                retryable: false,
            })
        })?;
    let codec = Codec::new(&opts.registry_url)?;
    let ids = rt.block_on(async {
        // Refuse to start when current writers' schemas are unreadable.
        codec
            .check_readable::<Impression>(&topics.inputs[0])
            .await?;
        codec.check_readable::<Click>(&topics.inputs[1]).await?;
        codec
            .check_readable::<Conversion>(&topics.inputs[2])
            .await?;
        Ok::<_, CodecError>(SchemaIds {
            ad_metric: codec.register::<AdMetric>(&topics.ad_metrics).await?,
            campaign_ctr: codec.register::<CampaignCtr>(&topics.campaign_ctr).await?,
            alert: codec.register::<AnomalyAlert>(&topics.alerts).await?,
        })
    })?;
    let store = CheckpointStore::open(&opts.state_url, &opts.group_id)?;

    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &opts.bootstrap)
        .set("group.id", &opts.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "range")
        .set("fetch.wait.max.ms", "100")
        // The default (1 s) pause of a partition whose local queue is full
        // outlasts the time the engine takes to drain it.
        .set("fetch.queue.backoff.ms", "10");
    if opts.static_membership {
        cc.set(
            "group.instance.id",
            format!("{}-{}", opts.group_id, opts.instance_id),
        );
    }
    let mut pc = ClientConfig::new();
    pc.set("bootstrap.servers", &opts.bootstrap)
        .set(
            "transactional.id",
            format!("{}-{}", opts.group_id, opts.instance_id),
        )
        .set("transaction.timeout.ms", "30000")
        .set("linger.ms", "5")
        // Result rows repeat their dimension strings: lz4 shrinks what the
        // broker stores and serves several-fold for little CPU.
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in &opts.overrides {
        cc.set(k, v);
        pc.set(k, v);
    }
    let session_timeout = Duration::from_millis(
        opts.overrides
            .iter()
            .rev()
            .find(|(k, _)| k == "session.timeout.ms")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(45_000),
    );
    let consumer: BaseConsumer<GroupContext> = cc
        .create_with_context(GroupContext::default())
        .map_err(kafka("creating the consumer"))?;
    let producer: ThreadedProducer<Acks> = pc
        .create_with_context(Acks::default())
        .map_err(kafka("creating the producer"))?;
    let tasks_total = check_co_partitioned(&consumer, &topics.inputs)?;
    let partials_partitions = partition_count(&consumer, &topics.partials)?;
    // Fences this instance's previous incarnation and aborts its open transaction.
    let t_init = Instant::now();
    tracing::info!(transactional_id = %format!("{}-{}", opts.group_id, opts.instance_id), "initialising transactions");
    producer
        .init_transactions(Duration::from_secs(60))
        .map_err(kafka("initialising transactions"))?;
    tracing::info!(
        ms = t_init.elapsed().as_millis() as u64,
        "transactions initialised"
    );
    let mut refs: Vec<&str> = topics.inputs.iter().map(String::as_str).collect();
    refs.push(&topics.partials);
    consumer
        .subscribe(&refs)
        .map_err(kafka("subscribing to the input and partials topics"))?;
    tracing::info!(group = %opts.group_id, instance = %opts.instance_id, tasks = tasks_total,
        partials = partials_partitions, "processor started");

    let mut shell = Shell {
        opts,
        topics,
        ids,
        codec,
        rt,
        consumer: Arc::new(consumer),
        producer,
        store,
        tasks_total,
        partials_partitions,
        joins: BTreeMap::new(),
        rollups: BTreeMap::new(),
        resume: ResumeGuard::default(),
        session_timeout,
        last_poll: Instant::now(),
        max_poll_gap: Duration::ZERO,
        last_checkpoint: Instant::now(),
        started: Instant::now(),
        first_output_committed: false,
        produced: 0,
        window_closed: false,
        closes: Vec::new(),
        buf: Vec::with_capacity(256),
        commits: 0,
        restores: 0,
        aborts: 0,
    };
    shell
        .producer
        .begin_transaction()
        .map_err(kafka("beginning a transaction"))?;
    let result = shell.main_loop(stop, status, metrics);
    let last = if result.is_ok() {
        shell.commit(metrics, true)
    } else {
        shell.abort("stopping after an error");
        Ok(())
    };
    shell.publish_status(status, metrics);
    result.and(last)
}

/// Enqueues one record, waiting while librdkafka's queue is full.
fn send(
    producer: &ThreadedProducer<Acks>,
    record: BaseRecord<'_, [u8], [u8]>,
) -> Result<(), RuntimeError> {
    let mut record = record;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(kafka("producing an output")(e)),
        }
    }
}

/// Encodes a result record with its registered schema id and sends it keyed
/// by campaign, stamped with its window start.
fn send_result<T: AvroRecord>(
    producer: &ThreadedProducer<Acks>,
    buf: &mut Vec<u8>,
    topic: &str,
    schema_id: u32,
    campaign_id: &str,
    window_start: i64,
    value: &T,
) -> Result<(), RuntimeError> {
    Codec::encode_with_id(schema_id, value, buf)?;
    send(
        producer,
        BaseRecord::to(topic)
            .key(campaign_id.as_bytes())
            .payload(&buf[..])
            .timestamp(window_start),
    )
}

fn partition_count(
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
) -> Result<usize, RuntimeError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(kafka("fetching topic metadata"))?;
    md.topics()
        .iter()
        .find(|m| m.name() == topic && m.error().is_none())
        .map(|m| m.partitions().len())
        .filter(|n| *n > 0)
        .ok_or_else(|| RuntimeError::MissingTopic(topic.to_owned()))
}

/// Checks the input topics' partition counts are equal; returns the count.
fn check_co_partitioned(
    consumer: &BaseConsumer<GroupContext>,
    inputs: &[String; 3],
) -> Result<usize, RuntimeError> {
    let mut counts = Vec::new();
    for t in inputs {
        counts.push((t, partition_count(consumer, t)?));
    }
    if counts.iter().any(|(_, n)| *n != counts[0].1) {
        let listed: Vec<String> = counts.iter().map(|(t, n)| format!("{t}={n}")).collect();
        return Err(RuntimeError::NotCoPartitioned(listed.join(", ")));
    }
    Ok(counts[0].1)
}

/// Which partials partition a campaign's cells go to.
fn partials_partition(campaign: &str, partitions: usize) -> i32 {
    (xxhash_rust::xxh3::xxh3_64(campaign.as_bytes()) % partitions.max(1) as u64) as i32
}

/// Records still to read (by the fetch responses' high watermarks) below
/// which the processor counts as live rather than reading a backlog.
const LIVE_LAG: i64 = 5_000;

/// Bounds of one poll batch, between which outputs are flushed and a commit
/// may happen. A batch also ends as soon as the local queue runs dry, which
/// is what ends it when the processor is live. The time bound is a backstop,
/// not the rule: at 20 ms it cut batches between the rollup tasks' closes of
/// one window (5-10 ms each, all fetched together), so the later ones
/// waited for a commit of their own and then made their own (live p99
/// 224-280 ms against 195-210 ms at 100 ms, four A/B rounds).
const BATCH_RECORDS: usize = 10_000;
const BATCH_TIME: Duration = Duration::from_millis(100);

impl Shell<'_> {
    /// Records between every assigned task's position and the end of its
    /// partitions, as of the last fetch responses (no broker request).
    fn input_lag(&self) -> i64 {
        let behind = |topic: &str, partition: i32, next: i64| {
            cached_high_watermark(&*self.consumer, topic, partition)
                .map_or(0, |h| (h - next).max(0))
        };
        let joins: i64 = self
            .joins
            .values()
            .map(|t| {
                (0..3)
                    .map(|i| behind(&self.topics.inputs[i], t.partition, t.next[i]))
                    .sum::<i64>()
            })
            .sum();
        let rollups: i64 = self
            .rollups
            .values()
            .map(|t| behind(&self.topics.partials, t.partition, t.next))
            .sum();
        joins + rollups
    }

    fn topic_index(&self, topic: &str) -> Option<usize> {
        self.topics.inputs.iter().position(|t| t == topic)
    }

    fn main_loop(
        &mut self,
        stop: &AtomicBool,
        status: &Status,
        metrics: &Metrics,
    ) -> Result<(), RuntimeError> {
        let mut last_commit = Instant::now();
        let mut last_check = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let consumer = Arc::clone(&self.consumer);
            let mut drained = false;
            // A batch ends after BATCH_RECORDS or BATCH_TIME, or when the
            // local queue runs dry (below).
            let batch_start = Instant::now();
            // Each record is handled once the next one is polled, so the
            // engine can be told what comes next (`Engine::prefetch`) and
            // have its index line in cache by then.
            let mut ahead: Option<BorrowedMessage<'_>> = None;
            // One clock read per record, shared by the batch's time limit,
            // the poll gap and the partitions' last-record times: three
            // reads each were a twentieth of this thread's time.
            let mut now = batch_start;
            for i in 0..BATCH_RECORDS {
                if now - batch_start >= BATCH_TIME {
                    break;
                }
                // Only an empty batch waits for a fetch. Once the local queue
                // runs dry, what this batch did (a closed window above all)
                // is flushed and committed now: waiting here for the next
                // fetch response, which the broker may hold back for tens of
                // milliseconds, added that wait to the emit latency.
                let mut polled = consumer.poll(Duration::ZERO);
                if polled.is_none() {
                    if let Some(held) = ahead.take() {
                        self.on_message(&held, now, stop)?;
                    }
                    if i > 0 {
                        // Not `drained`: between two fetches of a backlog the
                        // queue runs dry too; the input lag tells them apart.
                        break;
                    }
                    polled = consumer.poll(Duration::from_millis(50));
                }
                now = Instant::now();
                self.max_poll_gap = self.max_poll_gap.max(now - self.last_poll);
                self.last_poll = now;
                if self.consumer.context().pending.load(Ordering::Acquire) {
                    // Nothing more until the new assignment is handled: records
                    // fetched for it before the tasks are restored are dropped.
                    break;
                }
                let Some(msg) = polled else {
                    drained = true;
                    break;
                };
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) if !consumer_error_is_fatal(&e) => {
                        // librdkafka reconnects and fetches on from its own
                        // position; nothing is skipped, so only count it.
                        metrics.consumer_error();
                        tracing::warn!(error = %e, "Kafka consumer error; librdkafka recovers from it");
                        continue;
                    }
                    Err(e) => {
                        if let Some(held) = ahead.take() {
                            self.on_message(&held, now, stop)?;
                        }
                        return Err(kafka("consuming")(e));
                    }
                };
                self.prefetch(&msg);
                if let Some(held) = ahead.replace(msg) {
                    self.on_message(&held, now, stop)?;
                }
            }
            if let Some(held) = ahead.take() {
                self.on_message(&held, now, stop)?;
            }
            self.handle_rebalances()?;
            self.flush_outputs()?;
            self.resume
                .check(&*self.consumer)
                .map_err(kafka("re-reading a silent partition"))?;
            if last_check.elapsed() >= Duration::from_millis(200) {
                last_check = Instant::now();
                self.check_idle();
                self.feed_back_global_watermark();
                self.flush_outputs()?;
                self.publish_status(status, metrics);
                if self.opts.stop_when_idle && self.all_idle() {
                    tracing::info!("every partition is idle and every window emitted; stopping");
                    return Ok(());
                }
            }
            // A closed window commits at once when the processor is live
            // (input drained, or fewer than LIVE_LAG records behind): that is
            // the emit latency users see. While a backlog is read it waits
            // for the interval like everything else, since a commit per
            // window would make the backlog pay a broker round trip and an
            // ack wait for every minute of event time.
            let window_due = self.window_closed && (drained || self.input_lag() <= LIVE_LAG);
            if window_due || last_commit.elapsed() >= self.opts.commit_interval {
                self.commit(metrics, false)?;
                last_commit = Instant::now();
            }
        }
        Ok(())
    }

    /// One polled record (polled at `now`): input, or partial rollups from
    /// the join tasks.
    fn on_message(
        &mut self,
        msg: &BorrowedMessage<'_>,
        now: Instant,
        stop: &AtomicBool,
    ) -> Result<(), RuntimeError> {
        // Read once: each call measures and checks the C string again.
        let topic = msg.topic();
        if !self.resume.admit(topic, msg.partition(), msg.offset()) {
            return Ok(());
        }
        if topic == self.topics.partials {
            self.on_partials_record(msg.partition(), msg.offset(), msg.payload())?;
        } else if let Some(ti) = self.topic_index(topic) {
            if let Some(v) = msg.payload() {
                self.ensure_schema(v, stop);
            }
            self.on_input_record(
                HeldRecord {
                    topic: ti as u8,
                    offset: msg.offset(),
                    key: None,
                    value: None,
                    timestamp: msg.timestamp().to_millis(),
                },
                msg.partition(),
                msg.key(),
                msg.payload(),
                now,
            )?;
        }
        Ok(())
    }

    /// Tells the engine of `msg`'s join task that `msg` comes next.
    fn prefetch(&self, msg: &BorrowedMessage<'_>) {
        if let (Some(ti), Some(task)) = (
            self.topic_index(msg.topic()),
            self.joins.get(&msg.partition()),
        ) {
            task.engine.prefetch(ti as u8, msg.key());
        }
    }

    /// Makes sure the writer schema of `value` is cached; waits out registry outages.
    fn ensure_schema(&self, value: &[u8], stop: &AtomicBool) {
        let Ok((id, _)) = split_frame(value) else {
            return;
        };
        if self.codec.knows(id) {
            return;
        }
        // Unknown or unparsable ids come back at once: the engine sends the
        // record to the dead-letter topic.
        self.rt
            .block_on(self.codec.wait_for_writer_schema(value, stop));
    }

    /// One input record (`rec` carries its position; key and value are
    /// borrowed from the consumer unless it was held), taken in at `now`.
    fn on_input_record(
        &mut self,
        rec: HeldRecord,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        now: Instant,
    ) -> Result<(), RuntimeError> {
        let Some(task) = self.joins.get_mut(&partition) else {
            return Ok(());
        };
        let ti = rec.topic as usize;
        if rec.offset < task.next[ti] {
            return Ok(());
        }
        if let Some(to) = task.replay_to {
            if rec.offset >= to[ti] {
                // Past the committed offset: wait for the other partitions.
                task.held.push(HeldRecord {
                    key: key.map(<[u8]>::to_vec),
                    value: value.map(<[u8]>::to_vec),
                    ..rec
                });
                if !task.paused[ti] {
                    task.paused[ti] = true;
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&self.topics.inputs[ti], partition);
                    self.consumer
                        .pause(&tpl)
                        .map_err(kafka("pausing a replayed partition"))?;
                }
                return Ok(());
            }
        }
        task.engine.on_record(
            SourceRef {
                topic: rec.topic,
                partition,
                offset: rec.offset,
            },
            key,
            value,
            rec.timestamp,
        );
        task.next[ti] = rec.offset + 1;
        task.last_record[ti] = now;
        if task.replay_to.is_some() {
            // Committed before the restart: suppressed.
            drop(task.engine.drain_outputs());
            if task.replay_done() {
                self.finish_join_replay(partition)?;
            }
        }
        Ok(())
    }

    /// A join task has reached its committed offsets: from here on its
    /// outputs are new. Processes what it held and resumes its partitions.
    fn finish_join_replay(&mut self, partition: i32) -> Result<(), RuntimeError> {
        let Some(task) = self.joins.get_mut(&partition) else {
            return Ok(());
        };
        drop(task.engine.drain_outputs());
        task.replay_to = None;
        let held = std::mem::take(&mut task.held);
        let mut tpl = TopicPartitionList::new();
        let mut resumed = Vec::new();
        for (ti, paused) in task.paused.iter_mut().enumerate() {
            if *paused {
                *paused = false;
                tpl.add_partition(&self.topics.inputs[ti], partition);
                resumed.push(ti);
            }
        }
        tracing::info!(task = %task.name(), position = ?task.next, "join task caught up with its committed offsets");
        let now = Instant::now();
        for h in held {
            let (k, v) = (h.key.clone(), h.value.clone());
            self.on_input_record(h, partition, k.as_deref(), v.as_deref(), now)?;
        }
        if tpl.count() > 0 {
            self.consumer
                .resume(&tpl)
                .map_err(kafka("resuming replayed partitions"))?;
            // A resumed partition fetches from inside a batch, which some
            // brokers answer with nothing: let the guard re-read it if so.
            if let Some(task) = self.joins.get(&partition) {
                for ti in resumed {
                    self.resume
                        .watch((self.topics.inputs[ti].clone(), partition), task.next[ti]);
                }
            }
        }
        Ok(())
    }

    fn on_partials_record(
        &mut self,
        partition: i32,
        offset: i64,
        value: Option<&[u8]>,
    ) -> Result<(), RuntimeError> {
        let Some(task) = self.rollups.get_mut(&partition) else {
            return Ok(());
        };
        if offset < task.next {
            return Ok(());
        }
        if let Some(to) = task.replay_to {
            if offset >= to {
                task.replay_to = None;
                drop(task.rollup.drain_outputs());
                tracing::info!(task = %task.name(), position = task.next, "rollup task caught up with its committed offset");
            }
        }
        match value.map(|v| task.rollup.on_record(v)) {
            Some(Ok(())) => {}
            other => tracing::error!(partition, offset, error = ?other.and_then(Result::err),
                "undecodable record on the internal partials topic skipped"),
        }
        task.next = offset + 1;
        task.last_record = Instant::now();
        if let Some(to) = task.replay_to {
            drop(task.rollup.drain_outputs());
            if task.next >= to {
                task.replay_to = None;
                tracing::info!(task = %task.name(), position = task.next, "rollup task caught up with its committed offset");
            }
        }
        Ok(())
    }

    fn handle_rebalances(&mut self) -> Result<(), RuntimeError> {
        let ctx = self.consumer.context();
        ctx.pending.store(false, Ordering::Release);
        let events = std::mem::take(&mut *ctx.events.lock().unwrap_or_else(|p| p.into_inner()));
        if events.is_empty() {
            return Ok(());
        }
        // Eager rebalancing revoked everything: what this transaction holds
        // belongs to tasks that may move. Abort; the owners replay it.
        // The group may notice a pause before the commit point does: same
        // outcome as the zombie guard in `commit`, so say so in the log.
        self.abort(if self.paused_past_session() {
            "rebalance after being paused past the session timeout"
        } else {
            "rebalance"
        });
        self.joins.clear();
        self.rollups.clear();
        let mut assigned: Vec<(String, i32)> = Vec::new();
        for ev in events {
            match ev {
                RebalanceEvent::Assigned(list) => assigned = list,
                RebalanceEvent::Revoked(list) => {
                    for key in &list {
                        self.resume.forget(key);
                    }
                    assigned.clear();
                }
            }
        }
        self.restore_tasks(&assigned)
    }

    /// Builds the tasks of `assigned` from their checkpoints and committed
    /// offsets, and seeks their partitions to the checkpoints' positions.
    fn restore_tasks(&mut self, assigned: &[(String, i32)]) -> Result<(), RuntimeError> {
        if assigned.is_empty() {
            return Ok(());
        }
        tracing::info!(
            partitions = assigned.len(),
            since_start_ms = self.started.elapsed().as_millis() as u64,
            "partitions assigned; restoring tasks"
        );
        let t0 = Instant::now();
        let mut inputs: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        let mut partials = Vec::new();
        for (t, p) in assigned {
            if *t == self.topics.partials {
                partials.push(*p);
            } else if let Some(ti) = self.topic_index(t) {
                inputs.entry(*p).or_default().push(ti);
            }
        }
        for (p, tis) in &inputs {
            if tis.len() != 3 {
                return Err(RuntimeError::SplitTask {
                    partition: *p,
                    got: tis.iter().map(|t| self.topics.inputs[*t].clone()).collect(),
                });
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in assigned {
            tpl.add_partition(t, *p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(30))
            .map_err(kafka("reading committed offsets"))?;
        let committed_of = |t: &str, p: i32| -> i64 {
            match committed.find_partition(t, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            }
        };
        let now = Instant::now();
        let mut seeks: Vec<(String, i32, i64)> = Vec::new();
        // Every join task's checkpoint is fetched at once and decoded on its
        // own thread: with millions of buffered impressions decoding is
        // most of a restore, and the tasks are independent.
        let plans: Vec<(i32, [i64; 3], String)> = inputs
            .keys()
            .map(|p| {
                let to = std::array::from_fn(|ti| committed_of(&self.topics.inputs[ti], *p));
                (*p, to, format!("join-{p:04}"))
            })
            .collect();
        let fetched = self.rt.block_on(futures_util::future::try_join_all(
            plans
                .iter()
                .map(|(_, to, name)| self.store.latest(name, to)),
        ))?;
        let (cfg, codec) = (&self.opts.engine, &self.codec);
        type Restored = Result<Option<(Vec<i64>, Engine)>, RuntimeError>;
        let decoded: Vec<Restored> = std::thread::scope(|s| {
            let handles: Vec<_> = fetched
                .into_iter()
                .zip(&plans)
                .map(|(found, (_, _, name))| {
                    s.spawn(move || {
                        found
                            .map(|(pos, bytes)| {
                                Engine::restore(cfg.clone(), codec.clone(), &bytes)
                                    .map(|e| (pos, e))
                                    .map_err(|e| RuntimeError::BadCheckpoint {
                                        task: name.clone(),
                                        reason: e.to_string(),
                                    })
                            })
                            .transpose()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(RuntimeError::BadCheckpoint {
                            task: "join".into(),
                            reason: "decoding panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for ((p, to, name), restored) in plans.iter().zip(decoded) {
            let (engine, from) = match restored? {
                Some((pos, engine)) => (engine, [pos[0], pos[1], pos[2]]),
                None => {
                    let mut e = Engine::new_task(self.opts.engine.clone(), self.codec.clone());
                    for topic in 0..3u8 {
                        e.add_partition(InputPartition {
                            topic,
                            partition: *p,
                        });
                    }
                    (e, [0; 3])
                }
            };
            tracing::info!(task = %name, checkpoint = ?from, committed = ?to, "join task restored");
            for (ti, o) in from.iter().enumerate() {
                seeks.push((self.topics.inputs[ti].clone(), *p, *o));
            }
            let mut task = JoinTask {
                partition: *p,
                engine,
                next: from,
                replay_to: Some(*to),
                held: Vec::new(),
                paused: [false; 3],
                last_record: [now; 3],
                published: None,
                checkpointed: None,
            };
            if task.replay_done() {
                task.replay_to = None;
            }
            self.joins.insert(*p, task);
        }
        for q in partials {
            let to = committed_of(&self.topics.partials, q);
            let name = format!("rollup-{q:04}");
            let found = self.rt.block_on(self.store.latest(&name, &[to]))?;
            let (rollup, from) = match found {
                Some((pos, bytes)) => (
                    Rollup::restore(&bytes).map_err(|e| RuntimeError::BadCheckpoint {
                        task: name.clone(),
                        reason: e.to_string(),
                    })?,
                    pos[0],
                ),
                None => (Rollup::new(&self.opts.engine, self.tasks_total), 0),
            };
            tracing::info!(task = %name, checkpoint = from, committed = to, "rollup task restored");
            seeks.push((self.topics.partials.clone(), q, from));
            self.rollups.insert(
                q,
                RollupTask {
                    partition: q,
                    rollup,
                    next: from,
                    replay_to: (from < to).then_some(to),
                    last_record: now,
                    checkpointed: Some(from),
                },
            );
        }
        for (t, p, o) in seeks {
            let offset = if o > 0 {
                Offset::Offset(o)
            } else {
                Offset::Beginning
            };
            if let Err(e) = self.consumer.seek(&t, p, offset, Duration::from_secs(10)) {
                tracing::warn!(topic = %t, partition = p, error = %e, "seek failed; retrying once");
                std::thread::sleep(Duration::from_millis(200));
                self.consumer
                    .seek(&t, p, offset, Duration::from_secs(10))
                    .map_err(kafka("seeking a restored partition"))?;
            }
            self.resume.watch((t, p), o);
        }
        self.restores += 1;
        self.max_poll_gap = Duration::ZERO;
        tracing::info!(
            join_tasks = self.joins.len(),
            rollup_tasks = self.rollups.len(),
            ms = t0.elapsed().as_millis() as u64,
            "tasks restored"
        );
        Ok(())
    }

    fn caught_up(&self, topic: &str, partition: i32, next: i64) -> bool {
        cached_high_watermark(&*self.consumer, topic, partition).is_some_and(|h| next >= h)
    }

    fn check_idle(&mut self) {
        let now = Instant::now();
        let mut marks = Vec::new();
        for (p, task) in &self.joins {
            if task.replay_to.is_some() {
                continue;
            }
            for ti in 0..3 {
                let quiet = now.duration_since(task.last_record[ti]) >= self.opts.idle_timeout;
                let idle = quiet && self.caught_up(&self.topics.inputs[ti], *p, task.next[ti]);
                marks.push((*p, ti, idle));
            }
        }
        for (p, ti, idle) in marks {
            if let Some(task) = self.joins.get_mut(&p) {
                task.engine.set_idle(
                    InputPartition {
                        topic: ti as u8,
                        partition: p,
                    },
                    idle,
                );
            }
        }
    }

    /// Join tasks whose partitions are all idle follow the processor
    /// watermark the local rollups computed (see engine::rollup).
    fn feed_back_global_watermark(&mut self) {
        let Some(global) = self.rollups.values().map(|r| r.rollup.global()).max() else {
            return;
        };
        for task in self.joins.values_mut() {
            if task.replay_to.is_none() {
                task.engine.on_global_watermark(global);
            }
        }
    }

    /// Whether this instance has nothing left to do (for --stop-when-idle).
    fn all_idle(&self) -> bool {
        if self.joins.len() != self.tasks_total || self.rollups.len() != self.partials_partitions {
            return false;
        }
        let joins_idle = self.joins.values().all(|t| {
            t.replay_to.is_none()
                && t.engine.all_idle()
                && t.published.is_some_and(|(_, idle)| idle)
        });
        // The final marks must be committed (and so visible to the rollups).
        if !joins_idle || self.produced > 0 {
            return false;
        }
        // The partials topic is transactional: its log ends with a commit
        // marker the consumer never delivers, so compare the consumer's
        // position (which steps over markers) with the high watermark.
        let Ok(positions) = self.consumer.position() else {
            return false;
        };
        let now = Instant::now();
        self.rollups.values().all(|r| {
            let position = match positions
                .find_partition(&self.topics.partials, r.partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o.max(r.next),
                _ => r.next,
            };
            let quiet = now.duration_since(r.last_record);
            r.replay_to.is_none()
                && quiet >= self.opts.idle_timeout
                && (self.caught_up(&self.topics.partials, r.partition, position)
                    || quiet >= 2 * self.opts.idle_timeout)
                // Everything the processor watermark allows is emitted (the
                // window holding the latest events stays open, as in the contract).
                && r.rollup.watermark() >= r.rollup.global()
        })
    }

    /// Produces what the tasks have ready; see [`Self::produce_ready`].
    ///
    /// After an abortable transaction error (a produce request that timed
    /// out, a broker that dropped the transaction) librdkafka refuses every
    /// further record of the transaction with `_STATE`. The outputs already
    /// drained from the tasks are then lost to this transaction, so it is
    /// handled as a failed commit is: abort, and rebuild the tasks from their
    /// checkpoints, which replays those outputs. Only a fatal error stops.
    fn flush_outputs(&mut self) -> Result<(), RuntimeError> {
        match self.produce_ready() {
            Err(RuntimeError::Kafka {
                source: KafkaError::MessageProduction(RDKafkaErrorCode::State),
                ..
            }) => {
                tracing::warn!("the producer refused an output: the transaction failed; rebuilding tasks from their checkpoints");
                self.reset_tasks("transaction failed while producing")
            }
            other => other,
        }
    }

    /// Produces what the tasks have ready (not during their replay): side
    /// outputs and partials of join tasks, then their marks when changed,
    /// then the rollups' results.
    fn produce_ready(&mut self) -> Result<(), RuntimeError> {
        let now_ms = wall_ms();
        let partials = self.partials_partitions;
        let mut produced = 0u64;
        for task in self.joins.values_mut() {
            if task.replay_to.is_some() {
                continue;
            }
            for out in task.engine.drain_outputs() {
                produced += 1;
                if let Output::Partial(p) = out {
                    self.window_closed = true;
                    let q = partials_partition(&p.campaign_id, partials);
                    let key = p.campaign_id.clone();
                    let bytes = PartialMessage::Cells {
                        task: task.partition as u32,
                        partial: p,
                    }
                    .encode();
                    send(
                        &self.producer,
                        BaseRecord::to(&self.topics.partials)
                            .partition(q)
                            .key(key.as_bytes())
                            .payload(&bytes),
                    )?;
                } else {
                    produce_output(
                        &self.producer,
                        &self.topics,
                        &self.ids,
                        &mut self.buf,
                        out,
                        now_ms,
                    )?;
                }
            }
            let mark = Mark {
                watermark: task.engine.watermark(),
                idle: task.engine.all_idle(),
                at_ms: now_ms,
            };
            if task.published != Some((mark.watermark, mark.idle)) && mark.watermark > i64::MIN {
                let bytes = PartialMessage::Mark {
                    task: task.partition as u32,
                    mark,
                }
                .encode();
                for q in 0..partials as i32 {
                    send(
                        &self.producer,
                        BaseRecord::to(&self.topics.partials)
                            .partition(q)
                            .payload(&bytes),
                    )?;
                }
                task.published = Some((mark.watermark, mark.idle));
            }
        }
        for task in self.rollups.values_mut() {
            if task.replay_to.is_some() {
                continue;
            }
            let closes = task.rollup.take_closes();
            if let Some(first) = closes.iter().map(|c| c.at_ms).min() {
                tracing::debug!(task = %task.name(), windows = closes.len(), since_mark_ms = now_ms - first, "rollup closed windows");
            }
            self.closes.extend(closes);
            for out in task.rollup.drain_outputs() {
                produced += 1;
                self.window_closed = true;
                produce_output(
                    &self.producer,
                    &self.topics,
                    &self.ids,
                    &mut self.buf,
                    out,
                    now_ms,
                )?;
            }
        }
        self.produced += produced;
        Ok(())
    }

    /// Aborts the open transaction (its outputs never become visible to
    /// `read_committed` readers) and starts a new one. Tasks must be rebuilt
    /// from their checkpoints afterwards.
    fn abort(&mut self, why: &str) {
        self.aborts += 1;
        tracing::warn!(reason = why, "aborting the open transaction");
        if let Err(e) = self.producer.abort_transaction(Duration::from_secs(30)) {
            tracing::warn!(error = %e, "abort failed");
        }
        self.produced = 0;
        self.window_closed = false;
        self.closes.clear();
        if let Err(e) = self.producer.begin_transaction() {
            tracing::warn!(error = %e, "cannot begin a transaction after an abort");
        }
    }

    /// Whether the loop went longer than the session timeout without
    /// polling (paused, e.g. SIGSTOP); says so in the log if it did. The
    /// time since the last poll counts too: a pause while a record was
    /// handled, before the next poll, was not seen by any poll yet.
    fn paused_past_session(&self) -> bool {
        let gap = self.max_poll_gap.max(self.last_poll.elapsed());
        let paused = gap > self.session_timeout;
        if paused {
            tracing::warn!(
                gap_ms = gap.as_millis() as u64,
                "no poll for longer than the session timeout; not committing"
            );
        }
        paused
    }

    /// Aborts and rebuilds every task from its checkpoint (transaction errors).
    fn reset_tasks(&mut self, why: &str) -> Result<(), RuntimeError> {
        self.abort(why);
        let assigned: Vec<(String, i32)> = self
            .consumer
            .assignment()
            .map_err(kafka("reading the assignment"))?
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        self.joins.clear();
        self.rollups.clear();
        self.restore_tasks(&assigned)
    }

    /// The commit point: one transaction holds the outputs since the last
    /// commit and the positions of every task that has caught up.
    fn commit(&mut self, metrics: &Metrics, last: bool) -> Result<(), RuntimeError> {
        self.flush_outputs()?;
        if self.paused_past_session() {
            // The group has likely moved our partitions. Apache Kafka would
            // fence the commit (KIP-447); not every broker does, so do not try.
            return self.reset_tasks("possibly a zombie: paused past the session timeout");
        }
        let mut tpl = TopicPartitionList::new();
        for task in self.joins.values() {
            if task.replay_to.is_some() {
                continue;
            }
            for (ti, next) in task.next.iter().enumerate() {
                if *next > 0 {
                    tpl.add_partition_offset(
                        &self.topics.inputs[ti],
                        task.partition,
                        Offset::Offset(*next),
                    )
                    .map_err(kafka("building the commit"))?;
                }
            }
        }
        for task in self.rollups.values() {
            if task.replay_to.is_none() && task.next > 0 {
                tpl.add_partition_offset(
                    &self.topics.partials,
                    task.partition,
                    Offset::Offset(task.next),
                )
                .map_err(kafka("building the commit"))?;
            }
        }
        if tpl.count() == 0 && self.produced == 0 {
            self.write_checkpoints(last);
            return Ok(());
        }
        let Some(group) = self.consumer.group_metadata() else {
            return self.reset_tasks("no consumer group metadata");
        };
        let t_commit = Instant::now();
        let mut offsets_ms = 0;
        let result = if tpl.count() > 0 {
            let r =
                self.producer
                    .send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30));
            offsets_ms = t_commit.elapsed().as_millis() as u64;
            r
        } else {
            Ok(())
        }
        .and_then(|()| wait_delivered(&self.producer, Duration::from_secs(60)))
        .and_then(|()| self.producer.commit_transaction(Duration::from_secs(60)));
        if let Err(e) = result {
            if let KafkaError::Transaction(te) = &e {
                if te.is_fatal()
                    || te.code() == RDKafkaErrorCode::Fenced
                    || te.code() == RDKafkaErrorCode::ProducerFenced
                {
                    return Err(kafka(
                        "committing a transaction (fenced by another instance)",
                    )(e));
                }
            }
            tracing::warn!(error = %e, "transaction failed; rebuilding tasks from their checkpoints");
            return self.reset_tasks("transaction failed");
        }
        let acks = self.producer.context();
        let failed = acks.failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let first = acks
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            return Err(RuntimeError::Undelivered { failed, first });
        }
        self.commits += 1;
        tracing::debug!(
            ms = t_commit.elapsed().as_millis() as u64,
            offsets_ms,
            input_positions = self.joins.values().flat_map(|t| t.next).sum::<i64>(),
            produced = self.produced,
            window = self.window_closed,
            "transaction committed"
        );
        metrics.committed();
        if self.produced > 0 && !self.first_output_committed {
            self.first_output_committed = true;
            tracing::info!(
                since_start_ms = self.started.elapsed().as_millis() as u64,
                "first output committed"
            );
        }
        self.produced = 0;
        self.window_closed = false;
        let now_ms = wall_ms();
        for c in self.closes.drain(..) {
            metrics.emit_latency_ms((now_ms - c.at_ms).max(0) as u64, c.idle);
        }
        self.max_poll_gap = Duration::ZERO;
        self.write_checkpoints(last);
        if !last {
            self.producer
                .begin_transaction()
                .map_err(kafka("beginning a transaction"))?;
        }
        Ok(())
    }

    /// Writes the checkpoints that are due, right after a commit, so each
    /// holds exactly the committed state of its task. Due: every
    /// `--checkpoint-interval` for a task whose positions moved, and at once
    /// for a join task whose watermark moved without its positions (idleness
    /// or the fed-back global watermark), because what that emitted cannot be
    /// re-derived by a replay of its input. A failed write only makes a later
    /// recovery replay more; it is logged and retried at the next interval.
    fn write_checkpoints(&mut self, last: bool) {
        let interval = last || self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval;
        if interval {
            self.last_checkpoint = Instant::now();
        }
        let t0 = Instant::now();
        let mut written = 0usize;
        let mut bytes = 0usize;
        let mut floors: Option<Option<TopicPartitionList>> = None;
        for task in self.joins.values_mut() {
            if task.replay_to.is_some() {
                continue;
            }
            let wm = task.engine.watermark();
            let due = match task.checkpointed {
                None => interval,
                Some((pos, w)) => (interval && pos != task.next) || (pos == task.next && w != wm),
            };
            if !due {
                continue;
            }
            let state = task.engine.checkpoint();
            bytes += state.len();
            let name = task.name();
            let committed = floors.get_or_insert_with(|| broker_committed(&self.consumer));
            let floor: Option<[i64; 3]> = committed.as_ref().map(|c| {
                std::array::from_fn(|ti| offset_in(c, &self.topics.inputs[ti], task.partition))
            });
            if floor.is_some_and(|f| f != task.next) {
                // Just after a commit the broker should report what it took.
                tracing::warn!(task = %name, committed = ?task.next, broker = ?floor,
                    "the broker's committed offsets differ from the ones this instance just committed");
            }
            let floor = floor.as_ref().map(|f| &f[..]);
            if store_checkpoint(&self.rt, &self.store, &name, &task.next, floor, state) {
                written += 1;
                task.checkpointed = Some((task.next, wm));
            }
        }
        for task in self.rollups.values_mut() {
            if task.replay_to.is_some() || !interval || task.checkpointed == Some(task.next) {
                continue;
            }
            let state = task.rollup.snapshot();
            bytes += state.len();
            let name = task.name();
            let committed = floors.get_or_insert_with(|| broker_committed(&self.consumer));
            let floor = committed
                .as_ref()
                .map(|c| [offset_in(c, &self.topics.partials, task.partition)]);
            let floor = floor.as_ref().map(|f| &f[..]);
            if store_checkpoint(&self.rt, &self.store, &name, &[task.next], floor, state) {
                written += 1;
                task.checkpointed = Some(task.next);
            }
        }
        if written > 0 {
            tracing::debug!(
                tasks = written,
                bytes,
                ms = t0.elapsed().as_millis() as u64,
                "checkpoints written"
            );
        }
        // Writing may have taken a while; it is not a stall of the poll
        // loop. Unless it took longer than the session timeout: then the
        // process may have been paused while writing (SIGSTOP), and the
        // next poll's gap must say so.
        if t0.elapsed() < self.session_timeout {
            self.max_poll_gap = Duration::ZERO;
            self.last_poll = Instant::now();
        }
    }

    fn publish_status(&self, status: &Status, metrics: &Metrics) {
        let mut stats = EngineStats::default();
        let mut sizes = crate::engine::join::JoinSizes::default();
        let mut open_windows = 0;
        let mut strings = 0;
        for t in self.joins.values() {
            let s = t.engine.stats();
            for (a, b) in stats.by_topic.iter_mut().zip(&s.by_topic) {
                a.input += b.input;
                a.counted += b.counted;
                a.late += b.late;
                a.duplicate += b.duplicate;
                a.unmatched += b.unmatched;
                a.dead_letter += b.dead_letter;
            }
            let z = t.engine.join_sizes();
            sizes.impressions += z.impressions;
            sizes.matched_clicks += z.matched_clicks;
            sizes.pending_clicks += z.pending_clicks;
            sizes.pending_conversions += z.pending_conversions;
            open_windows += t.engine.open_windows();
            strings += t.engine.interned_strings();
        }
        for r in self.rollups.values() {
            let s = r.rollup.stats();
            stats.ad_metric_rows += s.ad_metric_rows;
            stats.campaign_rows += s.campaign_rows;
            stats.alerts += s.alerts;
            stats.windows_closed += s.windows_closed;
            open_windows += r.rollup.open_windows();
            strings += r.rollup.interned_strings();
        }
        let watermark = self
            .rollups
            .values()
            .map(|r| r.rollup.watermark())
            .min()
            .unwrap_or(i64::MIN);
        metrics.update(
            &stats,
            watermark,
            &[
                ("impressions", sizes.impressions),
                ("matched_clicks", sizes.matched_clicks),
                ("pending_clicks", sizes.pending_clicks),
                ("pending_conversions", sizes.pending_conversions),
                ("open_windows", open_windows),
                ("interned_strings", strings),
            ],
        );
        let assigned = self.joins.len() * 3;
        let idle = self
            .joins
            .values()
            .map(|t| {
                (0..3u8)
                    .filter(|ti| {
                        t.engine.is_idle(InputPartition {
                            topic: *ti,
                            partition: t.partition,
                        })
                    })
                    .count()
            })
            .sum();
        status.set(StatusSnapshot {
            stats,
            watermark,
            assigned,
            idle,
            commits: self.commits,
            outputs_acked: self.producer.context().acked.load(Ordering::Relaxed),
            join_tasks: self.joins.len(),
            rollup_tasks: self.rollups.len(),
            restores: self.restores,
            aborts: self.aborts,
        });
    }
}

/// Waits until every produced record is acknowledged, so that
/// `commit_transaction` finds nothing to flush. Its own flush polls the
/// event queue for up to 100 ms at a time, racing the producer's polling
/// thread for the delivery reports; losing that race cost every commit
/// 100 ms (measured: ~105 ms per commit, 11-20 ms with this wait).
fn wait_delivered(producer: &ThreadedProducer<Acks>, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// Wall time now, epoch ms.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes one task checkpoint and prunes the task's old ones; a failure is
/// logged (it only lengthens a later recovery). Returns whether it was written.
/// The group's committed offsets of this instance's assignment, as the
/// broker reports them (`None` if it cannot be asked now).
fn broker_committed(consumer: &BaseConsumer<GroupContext>) -> Option<TopicPartitionList> {
    consumer
        .committed(Duration::from_secs(10))
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot read the committed offsets; keeping every checkpoint for now");
        })
        .ok()
}

/// The committed offset of one partition in `tpl` (0 if none).
fn offset_in(tpl: &TopicPartitionList, topic: &str, partition: i32) -> i64 {
    match tpl.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    }
}

/// Writes a checkpoint, then deletes old ones: all but the newest few,
/// except the one a restart from `committed` would load. With `committed`
/// unknown nothing is deleted.
fn store_checkpoint(
    rt: &tokio::runtime::Runtime,
    store: &CheckpointStore,
    name: &str,
    positions: &[i64],
    committed: Option<&[i64]>,
    state: Vec<u8>,
) -> bool {
    if let Err(e) = rt.block_on(store.put(name, positions, state)) {
        tracing::warn!(task = %name, error = %e, "checkpoint not written");
        return false;
    }
    let Some(committed) = committed else {
        return true;
    };
    if let Err(e) = rt.block_on(store.prune(name, CHECKPOINTS_KEPT, committed)) {
        tracing::warn!(task = %name, error = %e, "cannot delete old checkpoints");
    }
    true
}

/// Produces one result or side output.
fn produce_output(
    producer: &ThreadedProducer<Acks>,
    topics: &Topics,
    ids: &SchemaIds,
    buf: &mut Vec<u8>,
    out: Output,
    now_ms: i64,
) -> Result<(), RuntimeError> {
    match out {
        Output::AdMetrics(rows) => rows.try_for_each(|row| {
            row.encode_with_id(ids.ad_metric, buf);
            send(
                producer,
                BaseRecord::to(&topics.ad_metrics)
                    .key(row.campaign_id.as_bytes())
                    .payload(&buf[..])
                    .timestamp(row.window_start),
            )
        }),
        Output::CampaignCtr(row) => send_result(
            producer,
            buf,
            &topics.campaign_ctr,
            ids.campaign_ctr,
            &row.campaign_id,
            row.window_start,
            &row,
        ),
        Output::Alert(mut alert) => {
            alert.detected_at = now_ms;
            send_result(
                producer,
                buf,
                &topics.alerts,
                ids.alert,
                &alert.campaign_id,
                alert.window_start,
                &alert,
            )
        }
        // Partials are routed by the caller.
        Output::Partial(_) => Ok(()),
        Output::Side { kind, raw, reason } => {
            let topic = match kind {
                SideKind::Late => &topics.late,
                SideKind::Unmatched => &topics.unmatched,
                SideKind::DeadLetter => &topics.dead_letter,
            };
            let src_topic = &topics.inputs[raw.source.topic as usize];
            let partition = raw.source.partition.to_string();
            let offset = raw.source.offset.to_string();
            let hdrs = OwnedHeaders::new()
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(src_topic.as_bytes()),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(offset.as_bytes()),
                })
                .insert(Header {
                    key: headers::REASON,
                    value: Some(reason.as_bytes()),
                });
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(hdrs);
            if let Some(k) = raw.key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(v) = raw.value.as_deref() {
                rec = rec.payload(v);
            }
            if let Some(ts) = raw.timestamp {
                rec = rec.timestamp(ts);
            }
            send(producer, rec)
        }
    }
}

/// Shared handle to a stop flag, for callers that run the processor in a thread.
pub type StopFlag = Arc<AtomicBool>;
