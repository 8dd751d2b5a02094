//! The Kafka shell around the engine.
//!
//! One consumer in one consumer group reads the three input topics; each
//! record goes to [`Engine::on_record`]; the engine's outputs are produced as
//! they appear (results as Confluent-framed Avro keyed by `campaign_id`, side
//! outputs with their original key and value plus provenance headers).
//!
//! Commit point ([`Shell::commit`], the only place offsets are committed):
//! flush the producer, check every output was acknowledged, then commit the
//! consumed positions. So offsets never run ahead of the outputs they cover:
//! at least once. (Transactions replace this point in the exactly-once work.)
//!
//! Idleness is decided here, because it needs wall time and consumer lag: a
//! partition is idle when it has delivered nothing for `--idle-timeout` AND
//! its position has reached its high watermark. A partition with a backlog
//! is never idle, which keeps results independent of how the broker
//! schedules fetches. Partitions whose event time runs more than
//! `--max-drift` ahead of the watermark are paused until it catches up.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use adstream_schemas::codec::{split_frame, CodecError};
use adstream_schemas::topics::{self, headers};
use adstream_schemas::{
    AdMetric, AnomalyAlert, AvroRecord, CampaignCtr, Click, Codec, Conversion, Impression,
};

use crate::engine::watermark::InputPartition;
use crate::engine::{Engine, EngineConfig, EngineStats, Output, SideKind, SourceRef};
use crate::metrics::Metrics;

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
    /// Pause a partition whose event time runs this far (ms) ahead of the watermark.
    pub max_drift_ms: i64,
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
    #[error("{failed} output records were not acknowledged (first error: {first}); offsets not committed")]
    Undelivered { failed: u64, first: String },
    #[error(
        "consumer group {group} already has {members} member(s): another processor instance is \
         running. This version computes campaign rollups in one instance owning every input \
         partition (scale-out is not built yet, see processor/DESIGN-exactly-once.md); a second \
         instance would split partitions and write partial rollups. Stop the other instance or \
         use another --group-id"
    )]
    GroupBusy { group: String, members: usize },
    #[error(
        "this instance was assigned {owned} of the {total} input partitions of group {group}: \
         another instance joined. Stopping rather than writing partial rollups (scale-out is \
         not built yet, see processor/DESIGN-exactly-once.md)"
    )]
    PartialAssignment {
        group: String,
        owned: usize,
        total: usize,
    },
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
    pub stats: EngineStats,
    pub watermark: i64,
    pub assigned: usize,
    pub idle: usize,
    pub commits: u64,
    pub outputs_acked: u64,
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

struct PartitionRt {
    last_record: Instant,
    paused: bool,
}

struct Topics {
    inputs: [String; 3],
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

/// The shell's state during a run.
struct Shell<'a> {
    opts: &'a ProcessorOptions,
    topics: Topics,
    ids: SchemaIds,
    codec: Codec,
    rt: tokio::runtime::Runtime,
    consumer: BaseConsumer<GroupContext>,
    producer: ThreadedProducer<Acks>,
    engine: Engine,
    partitions: HashMap<InputPartition, PartitionRt>,
    /// Input partitions of the three topics together; one instance owns them all.
    input_partitions: usize,
    positions: HashMap<(usize, i32), i64>,
    buf: Vec<u8>,
    commits: u64,
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

    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &opts.bootstrap)
        .set("group.id", &opts.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100");
    let mut pc = ClientConfig::new();
    pc.set("bootstrap.servers", &opts.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Result rows repeat their dimension strings: lz4 shrinks what the
        // broker stores and serves several-fold for little CPU.
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in &opts.overrides {
        cc.set(k, v);
        pc.set(k, v);
    }
    let consumer: BaseConsumer<GroupContext> = cc
        .create_with_context(GroupContext::default())
        .map_err(kafka("creating the consumer"))?;
    let producer: ThreadedProducer<Acks> = pc
        .create_with_context(Acks::default())
        .map_err(kafka("creating the producer"))?;
    let partitions_per_topic = check_co_partitioned(&consumer, &topics.inputs)?;
    wait_for_empty_group(&consumer, &opts.group_id, &opts.overrides, stop)?;
    let refs: Vec<&str> = topics.inputs.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(kafka("subscribing to the input topics"))?;
    tracing::info!(group = %opts.group_id, inputs = ?topics.inputs, "processor started");

    let mut shell = Shell {
        engine: Engine::new(opts.engine.clone(), codec.clone()),
        opts,
        topics,
        ids,
        codec,
        rt,
        consumer,
        producer,
        partitions: HashMap::new(),
        input_partitions: 3 * partitions_per_topic,
        positions: HashMap::new(),
        buf: Vec::with_capacity(256),
        commits: 0,
    };
    let result = shell.main_loop(stop, status, metrics);
    let last = shell.commit(metrics);
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

/// Checks the input topics' partition counts are equal; returns the count.
fn check_co_partitioned(
    consumer: &BaseConsumer<GroupContext>,
    inputs: &[String; 3],
) -> Result<usize, RuntimeError> {
    let mut counts = Vec::new();
    for t in inputs {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(15))
            .map_err(kafka("fetching input topic metadata"))?;
        let n = md
            .topics()
            .iter()
            .find(|m| m.name() == t && m.error().is_none())
            .map(|m| m.partitions().len())
            .filter(|n| *n > 0)
            .ok_or_else(|| RuntimeError::MissingTopic(t.clone()))?;
        counts.push((t, n));
    }
    if counts.iter().any(|(_, n)| *n != counts[0].1) {
        let listed: Vec<String> = counts.iter().map(|(t, n)| format!("{t}={n}")).collect();
        return Err(RuntimeError::NotCoPartitioned(listed.join(", ")));
    }
    Ok(counts[0].1)
}

/// Waits until consumer group `group` has no members (a crashed instance
/// leaves once its session times out), or fails with [`RuntimeError::GroupBusy`].
/// A broker that cannot describe groups is not an error: the partial
/// assignment check still stops a second instance.
fn wait_for_empty_group(
    consumer: &BaseConsumer<GroupContext>,
    group: &str,
    overrides: &[(String, String)],
    stop: &AtomicBool,
) -> Result<(), RuntimeError> {
    let session_ms: u64 = overrides
        .iter()
        .rev()
        .find(|(k, _)| k == "session.timeout.ms")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(45_000);
    let deadline = Instant::now() + Duration::from_millis(session_ms) + Duration::from_secs(5);
    loop {
        let members = match consumer.fetch_group_list(Some(group), Duration::from_secs(10)) {
            Ok(list) => list
                .groups()
                .iter()
                .find(|g| g.name() == group)
                .map_or(0, |g| g.members().len()),
            Err(e) => {
                tracing::warn!(%group, error = %e, "cannot describe the consumer group; skipping the single-instance check");
                return Ok(());
            }
        };
        if members == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::GroupBusy {
                group: group.to_owned(),
                members,
            });
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        tracing::info!(%group, members, "waiting for the group's previous members to leave");
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Shell<'_> {
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
            // Drain what is fetched, up to a batch, then handle the rest of the loop.
            for _ in 0..10_000 {
                let Some(msg) = self.consumer.poll(Duration::from_millis(50)) else {
                    break;
                };
                let msg = msg.map_err(kafka("consuming"))?;
                let Some(ti) = self.topic_index(msg.topic()) else {
                    continue;
                };
                let source = SourceRef {
                    topic: ti as u8,
                    partition: msg.partition(),
                    offset: msg.offset(),
                };
                if let Some(v) = msg.payload() {
                    self.ensure_schema(v, stop);
                }
                self.engine.on_record(
                    source,
                    msg.key(),
                    msg.payload(),
                    msg.timestamp().to_millis(),
                );
                self.positions
                    .insert((ti, msg.partition()), msg.offset() + 1);
                if let Some(p) = self.partitions.get_mut(&source.input_partition()) {
                    p.last_record = Instant::now();
                }
                if self.engine.has_outputs() {
                    self.produce_outputs()?;
                }
            }
            self.handle_rebalances()?;
            if last_check.elapsed() >= Duration::from_millis(200) {
                last_check = Instant::now();
                self.check_idle_and_drift();
                self.produce_outputs()?;
                self.publish_status(status, metrics);
                if self.opts.stop_when_idle
                    && !self.partitions.is_empty()
                    && self.partitions.keys().all(|p| self.engine.is_idle(*p))
                {
                    tracing::info!(
                        watermark = self.engine.watermark(),
                        "every partition is idle; stopping"
                    );
                    return Ok(());
                }
            }
            if last_commit.elapsed() >= self.opts.commit_interval {
                self.commit(metrics)?;
                last_commit = Instant::now();
            }
        }
        Ok(())
    }

    /// Makes sure the writer schema of `value` is cached; waits out registry outages.
    fn ensure_schema(&self, value: &[u8], stop: &AtomicBool) {
        let Ok((id, _)) = split_frame(value) else {
            return;
        };
        if self.codec.knows(id) {
            return;
        }
        let mut delay = Duration::from_millis(200);
        loop {
            match self.rt.block_on(self.codec.fetch_schema(id)) {
                Ok(()) => return,
                Err(e) if e.is_retryable() && !stop.load(Ordering::Relaxed) => {
                    tracing::warn!(schema_id = id, error = %e, "schema registry unavailable; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                // Unknown or unparsable: the engine sends the record to the dead letter topic.
                Err(_) => return,
            }
        }
    }

    fn handle_rebalances(&mut self) -> Result<(), RuntimeError> {
        let events = std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for ev in events {
            match ev {
                RebalanceEvent::Assigned(list) => {
                    for (t, partition) in list {
                        let Some(ti) = self.topic_index(&t) else {
                            continue;
                        };
                        let p = InputPartition {
                            topic: ti as u8,
                            partition,
                        };
                        self.engine.add_partition(p);
                        self.partitions.insert(
                            p,
                            PartitionRt {
                                last_record: Instant::now(),
                                paused: false,
                            },
                        );
                    }
                    tracing::info!(partitions = self.partitions.len(), "partitions assigned");
                    if self.partitions.len() < self.input_partitions {
                        return Err(RuntimeError::PartialAssignment {
                            group: self.opts.group_id.clone(),
                            owned: self.partitions.len(),
                            total: self.input_partitions,
                        });
                    }
                }
                RebalanceEvent::Revoked(list) => {
                    for (t, partition) in list {
                        let Some(ti) = self.topic_index(&t) else {
                            continue;
                        };
                        let p = InputPartition {
                            topic: ti as u8,
                            partition,
                        };
                        self.partitions.remove(&p);
                        self.positions.remove(&(ti, partition));
                        // Keep its watermark state but stop it holding the watermark back.
                        self.engine.set_idle(p, true);
                    }
                    tracing::info!(partitions = self.partitions.len(), "partitions revoked");
                }
            }
        }
        Ok(())
    }

    /// High watermark librdkafka last saw for a partition (no broker request).
    fn cached_high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        let c_topic = CString::new(topic).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer is valid for the consumer's lifetime, the
        // topic string outlives the call, and the out-pointers are valid i64s.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                c_topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then_some(high)
    }

    fn check_idle_and_drift(&mut self) {
        struct Info {
            p: InputPartition,
            topic: String,
            caught_up: bool,
            ahead: i64,
        }
        let now = Instant::now();
        let wm = self.engine.watermark();
        let keys: Vec<InputPartition> = self.partitions.keys().copied().collect();
        let infos: Vec<Info> = keys
            .into_iter()
            .map(|p| {
                let topic = self.topics.inputs[p.topic as usize].clone();
                let position = self
                    .positions
                    .get(&(p.topic as usize, p.partition))
                    .copied();
                let caught_up = match (self.cached_high_watermark(&topic, p.partition), position) {
                    (Some(h), Some(pos)) => pos >= h,
                    (Some(h), None) => h == 0,
                    (None, _) => false,
                };
                let ahead = if wm == i64::MIN {
                    0
                } else {
                    self.engine.partition_watermark(p).saturating_sub(wm)
                };
                Info {
                    p,
                    topic,
                    caught_up,
                    ahead,
                }
            })
            .collect();
        // Pausing a partition that runs ahead only helps while some partition
        // behind it still has a backlog to catch up with.
        let backlog_behind = infos.iter().any(|i| {
            !i.caught_up
                && i.ahead <= self.opts.max_drift_ms
                && self.partitions.get(&i.p).is_some_and(|rt| !rt.paused)
        });
        let mut to_pause = TopicPartitionList::new();
        let mut to_resume = TopicPartitionList::new();
        for i in infos {
            let Some(rt) = self.partitions.get_mut(&i.p) else {
                continue;
            };
            let quiet = now.duration_since(rt.last_record) >= self.opts.idle_timeout;
            self.engine
                .set_idle(i.p, quiet && i.caught_up && !rt.paused);
            if !rt.paused && backlog_behind && i.ahead > self.opts.max_drift_ms {
                rt.paused = true;
                let _ = to_pause.add_partition(&i.topic, i.p.partition);
            } else if rt.paused && (!backlog_behind || i.ahead <= self.opts.max_drift_ms / 4 * 3) {
                rt.paused = false;
                rt.last_record = now;
                let _ = to_resume.add_partition(&i.topic, i.p.partition);
            }
        }
        if to_pause.count() > 0 {
            if let Err(e) = self.consumer.pause(&to_pause) {
                tracing::warn!(error = %e, "pausing partitions that run ahead");
            }
        }
        if to_resume.count() > 0 {
            if let Err(e) = self.consumer.resume(&to_resume) {
                tracing::warn!(error = %e, "resuming partitions");
            }
        }
    }

    fn produce_outputs(&mut self) -> Result<(), RuntimeError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for out in self.engine.take_outputs() {
            match out {
                Output::AdMetric(row) => send_result(
                    &self.producer,
                    &mut self.buf,
                    &self.topics.ad_metrics,
                    self.ids.ad_metric,
                    &row.campaign_id,
                    row.window_start,
                    &row,
                )?,
                Output::CampaignCtr(row) => send_result(
                    &self.producer,
                    &mut self.buf,
                    &self.topics.campaign_ctr,
                    self.ids.campaign_ctr,
                    &row.campaign_id,
                    row.window_start,
                    &row,
                )?,
                Output::Alert(mut alert) => {
                    alert.detected_at = now_ms;
                    send_result(
                        &self.producer,
                        &mut self.buf,
                        &self.topics.alerts,
                        self.ids.alert,
                        &alert.campaign_id,
                        alert.window_start,
                        &alert,
                    )?
                }
                Output::Partial(_) => {}
                Output::Side { kind, raw, reason } => {
                    let topic = match kind {
                        SideKind::Late => &self.topics.late,
                        SideKind::Unmatched => &self.topics.unmatched,
                        SideKind::DeadLetter => &self.topics.dead_letter,
                    };
                    let src_topic = &self.topics.inputs[raw.source.topic as usize];
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
                    send(&self.producer, rec)?;
                }
            }
        }
        Ok(())
    }

    /// The commit point: outputs acknowledged first, then input offsets.
    fn commit(&mut self, metrics: &Metrics) -> Result<(), RuntimeError> {
        self.produce_outputs()?;
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(kafka("flushing outputs"))?;
        let acks = self.producer.context();
        let failed = acks.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = acks
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(RuntimeError::Undelivered { failed, first });
        }
        if self.positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((ti, partition), pos) in &self.positions {
            tpl.add_partition_offset(&self.topics.inputs[*ti], *partition, Offset::Offset(*pos))
                .map_err(kafka("building the commit"))?;
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.commits += 1;
                metrics.committed();
                Ok(())
            }
            // A rebalance in progress: the next commit covers these offsets.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)) => {
                tracing::warn!("commit skipped during a rebalance");
                Ok(())
            }
            Err(e) => Err(kafka("committing offsets")(e)),
        }
    }

    fn publish_status(&self, status: &Status, metrics: &Metrics) {
        let sizes = self.engine.join_sizes();
        metrics.update(
            self.engine.stats(),
            self.engine.watermark(),
            &[
                ("impressions", sizes.impressions),
                ("matched_clicks", sizes.matched_clicks),
                ("pending_clicks", sizes.pending_clicks),
                ("pending_conversions", sizes.pending_conversions),
                ("open_windows", self.engine.open_windows()),
            ],
        );
        status.set(StatusSnapshot {
            stats: self.engine.stats().clone(),
            watermark: self.engine.watermark(),
            assigned: self.partitions.len(),
            idle: self
                .partitions
                .keys()
                .filter(|p| self.engine_is_idle(**p))
                .count(),
            commits: self.commits,
            outputs_acked: self.producer.context().acked.load(Ordering::Relaxed),
        });
    }

    fn engine_is_idle(&self, p: InputPartition) -> bool {
        self.engine.is_idle(p)
    }
}

/// Shared handle to a stop flag, for callers that run the processor in a thread.
pub type StopFlag = Arc<AtomicBool>;
