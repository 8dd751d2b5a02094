//! Loads the input and result topics into object storage as Avro object
//! container files, every Kafka record exactly once.
//!
//! Layout (CONTRACT.md), under the store URL's path:
//! `raw/<topic>/dt=YYYY-MM-DD/hour=HH/` for the input topics,
//! `metrics/<topic>/dt=…/hour=…/` for the result topics (by event time,
//! `window_start` for results), and `raw-invalid/<topic>/dt=…/hour=…/` (by
//! the Kafka record timestamp) for records that cannot be decoded, kept as
//! [`INVALID_SCHEMA`] records with their raw key and value bytes.
//!
//! **Segments.** Each topic-partition's records are cut into segments of
//! consecutive offsets. A segment ends after `--max-records` records or
//! `--max-bytes` bytes, before a record whose event hour is later than every
//! hour the segment holds, or when it has been open for `--max-open` (wall
//! clock, so idle partitions still reach storage). Its records are split into
//! one file per (hour, writer schema), named
//! `<topic>-p<partition>-<first offset>-<last offset>[-s<schema id>].avro`
//! from the offsets of the records in that file; the bodies are copied
//! verbatim from the Confluent frames, the writer schema comes from the
//! registry. The header's `adstream.offsets` entry lists each record's
//! offset (zig-zag varint deltas from `adstream.first_offset`).
//!
//! **Exactly once.** A segment is closed in three steps: (1) an intent
//! object `_sink/<consumer>/pending/<topic>/p<partition>.json` lists the
//! segment's objects, (2) the objects are written (multipart when large),
//! (3) the consumer group's offset for the partition is committed past the
//! segment. The loader starts every partition at its committed offset, and
//! first deletes the objects listed in an intent whose segment starts at or
//! after that offset: they were written, but not committed, by a run that
//! died. The segment is then rebuilt from the same first offset, so every
//! record lands in exactly one committed object. The wall-clock rule makes
//! boundaries depend on timing; the intent cleanup is what keeps that safe.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use adstream_schemas::codec::split_frame;
use adstream_schemas::{
    topics, AdMetric, AnomalyAlert, CampaignCtr, Click, Codec, CodecError, Conversion, Impression,
};

use crate::ocf::{encode_offsets, write_bytes, write_long, Compression, OcfBuilder};
use adstream_admin::resume::ResumeGuard;

/// Writer schema of the files under `raw-invalid/`.
pub const INVALID_SCHEMA: &str = r#"{"type":"record","name":"InvalidRecord","namespace":"adstream.sink","doc":"A Kafka record that could not be decoded, kept as its raw bytes.","fields":[{"name":"topic","type":"string"},{"name":"partition","type":"int"},{"name":"offset","type":"long"},{"name":"timestamp","type":["null",{"type":"long","logicalType":"timestamp-millis"}]},{"name":"key","type":["null","bytes"]},{"name":"value","type":["null","bytes"]},{"name":"reason","type":"string"}]}"#;

/// Size of the parts of a multipart upload (S3's minimum is 5 MiB, except
/// for the last part).
const PART_BYTES: usize = 8 * 1024 * 1024;
const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, Clone)]
pub struct ObjectOptions {
    pub bootstrap: String,
    pub registry_url: String,
    pub overrides: Vec<(String, String)>,
    pub topic_prefix: String,
    /// `s3://bucket/path`, `file:///dir`, `memory://`.
    pub store_url: String,
    /// Consumer group whose committed offsets are the loader's positions.
    pub consumer: String,
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_open: Duration,
    pub compression: Compression,
    /// Objects larger than this are uploaded in parts.
    pub multipart_above: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectSinkError {
    #[error("object store URL {url}: {reason}")]
    StoreUrl { url: String, reason: String },
    #[error("object store: {context}: {source}")]
    Store {
        context: String,
        source: object_store::Error,
    },
    #[error("Kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    #[error("topic {0} does not exist (create it with topics.sh)")]
    MissingTopic(String),
    #[error("schema registry: {0}")]
    Schema(#[from] CodecError),
    #[error("intent object {path} is not readable: {reason}")]
    BadIntent { path: String, reason: String },
}

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> ObjectSinkError {
    move |source| ObjectSinkError::Kafka { context, source }
}

fn store(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> ObjectSinkError {
    let context = context.into();
    move |source| ObjectSinkError::Store { context, source }
}

/// Counters for tests, health checks and metrics.
#[derive(Debug, Default)]
pub struct ObjectStatus {
    pub records: AtomicU64,
    pub invalid: AtomicU64,
    pub objects: AtomicU64,
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    /// Objects of uncommitted segments deleted at start.
    pub cleaned: AtomicU64,
    /// Objects uploaded in parts.
    pub multipart: AtomicU64,
}

/// Opens the store named by `url` (see [`adstream_admin::store::open_store`]).
pub fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), ObjectSinkError> {
    adstream_admin::store::open_store(url).map_err(|e| ObjectSinkError::StoreUrl {
        url: e.url,
        reason: e.reason,
    })
}

/// Which folder a topic's records go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Raw,
    Metrics,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Raw => "raw",
            Area::Metrics => "metrics",
        }
    }
}

/// One file of a segment: valid records of one hour and writer schema, or
/// undecodable ones of one hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FileKey {
    Valid { hour: i64, schema: u32 },
    Invalid { hour: i64 },
}

struct FileBuf {
    ocf: OcfBuilder,
    offsets: Vec<i64>,
}

struct Segment {
    first: i64,
    records: u64,
    bytes: u64,
    /// Latest event hour among the segment's valid records.
    max_hour: Option<i64>,
    opened: Instant,
    files: BTreeMap<FileKey, FileBuf>,
}

impl Segment {
    fn new(first: i64) -> Self {
        Segment {
            first,
            records: 0,
            bytes: 0,
            max_hour: None,
            opened: Instant::now(),
            files: BTreeMap::new(),
        }
    }
}

/// What is recorded before a segment's objects are written.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    first_offset: i64,
    next_offset: i64,
    objects: Vec<String>,
}

/// A topic being loaded: its contract name and folder.
#[derive(Debug, Clone)]
struct Source {
    contract: &'static str,
    area: Area,
}

/// A decoded record's place: writer schema, event time, and Avro body.
struct Placed<'a> {
    schema: u32,
    event_time: i64,
    body: &'a [u8],
}

async fn place<'a>(
    codec: &Codec,
    contract: &str,
    payload: &'a [u8],
) -> Result<Placed<'a>, CodecError> {
    let event_time = match contract {
        topics::IMPRESSIONS => codec.decode::<Impression>(payload).await?.event_time,
        topics::CLICKS => codec.decode::<Click>(payload).await?.event_time,
        topics::CONVERSIONS => codec.decode::<Conversion>(payload).await?.event_time,
        topics::AD_METRICS => codec.decode::<AdMetric>(payload).await?.window_start,
        topics::CAMPAIGN_CTR => codec.decode::<CampaignCtr>(payload).await?.window_start,
        _ => codec.decode::<AnomalyAlert>(payload).await?.window_start,
    };
    let (schema, body) = split_frame(payload)?;
    Ok(Placed {
        schema,
        event_time,
        body,
    })
}

fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// `dt=YYYY-MM-DD/hour=HH` of an hour start.
fn hive_dir(hour: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(hour) {
        Some(t) => t.format("dt=%Y-%m-%d/hour=%H").to_string(),
        // Outside chrono's range (±262 000 years): still a stable folder.
        None => format!("dt=out-of-range/hour={hour}"),
    }
}

fn invalid_datum(msg: &OwnedMessage, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + msg.payload().map_or(0, <[u8]>::len));
    write_bytes(&mut out, msg.topic().as_bytes());
    write_long(&mut out, i64::from(msg.partition()));
    write_long(&mut out, msg.offset());
    match msg.timestamp().to_millis() {
        Some(ms) => {
            write_long(&mut out, 1);
            write_long(&mut out, ms);
        }
        None => write_long(&mut out, 0),
    }
    for field in [msg.key(), msg.payload()] {
        match field {
            Some(b) => {
                write_long(&mut out, 1);
                write_bytes(&mut out, b);
            }
            None => write_long(&mut out, 0),
        }
    }
    write_bytes(&mut out, reason.as_bytes());
    out
}

struct Loader<'a> {
    opts: &'a ObjectOptions,
    store: Arc<dyn ObjectStore>,
    root: Path,
    codec: Codec,
    consumer: StreamConsumer,
    sources: HashMap<String, Source>,
    segments: HashMap<(String, i32), Segment>,
    status: &'a ObjectStatus,
}

impl Loader<'_> {
    fn path(&self, parts: &[&str]) -> Path {
        parts
            .iter()
            .flat_map(|p| p.split('/'))
            .fold(self.root.clone(), |acc, part| acc.join(part))
    }

    fn intent_path(&self, contract: &str, partition: i32) -> Path {
        self.path(&[
            "_sink",
            &self.opts.consumer,
            "pending",
            contract,
            &format!("p{partition:04}.json"),
        ])
    }

    /// Deletes what an uncommitted segment of `topic`/`partition` wrote.
    async fn clean_up(
        &self,
        contract: &str,
        partition: i32,
        committed: i64,
    ) -> Result<(), ObjectSinkError> {
        let path = self.intent_path(contract, partition);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(store(format!("reading {path}")))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store(format!("reading {path}"))(e)),
        };
        let intent: Intent =
            serde_json::from_slice(&bytes).map_err(|e| ObjectSinkError::BadIntent {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        if intent.first_offset < committed {
            return Ok(()); // that segment committed
        }
        for object in &intent.objects {
            let p = Path::from(object.as_str());
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store(format!("deleting {p}"))(e)),
            }
            self.status.cleaned.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            topic = contract,
            partition,
            first = intent.first_offset,
            objects = intent.objects.len(),
            "deleted the objects of a segment that was not committed"
        );
        Ok(())
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<(), ObjectSinkError> {
        if bytes.len() <= self.opts.multipart_above {
            self.store
                .put(path, PutPayload::from(bytes))
                .await
                .map_err(store(format!("writing {path}")))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(store(format!("starting the upload of {path}")))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        writer.write(&bytes);
        self.status.multipart.fetch_add(1, Ordering::Relaxed);
        writer
            .finish()
            .await
            .map_err(store(format!("completing the upload of {path}")))?;
        Ok(())
    }

    /// Writes a segment's objects, then commits the partition past it.
    async fn close(
        &mut self,
        key: &(String, i32),
        next_offset: i64,
    ) -> Result<(), ObjectSinkError> {
        let Some(segment) = self.segments.remove(key) else {
            return Ok(());
        };
        let Some(source) = self.sources.get(&key.0).cloned() else {
            return Ok(());
        };
        let (topic, partition) = (source.contract, key.1);
        let mut objects: Vec<(Path, Vec<u8>)> = Vec::with_capacity(segment.files.len());
        for (file_key, buf) in segment.files {
            let (Some(&first), Some(&last)) = (buf.offsets.first(), buf.offsets.last()) else {
                continue;
            };
            let (dir, name, hour) = match file_key {
                FileKey::Valid { hour, schema } => (
                    source.area.dir(),
                    format!("{topic}-p{partition:04}-{first:019}-{last:019}-s{schema}.avro"),
                    hour,
                ),
                FileKey::Invalid { hour } => (
                    "raw-invalid",
                    format!("{topic}-p{partition:04}-{first:019}-{last:019}.avro"),
                    hour,
                ),
            };
            let path = self.path(&[dir, topic, &hive_dir(hour), &name]);
            let offsets = encode_offsets(first, &buf.offsets);
            let partition_text = partition.to_string();
            let first_text = first.to_string();
            let bytes = buf.ocf.finish(&[
                ("adstream.topic", topic.as_bytes()),
                ("adstream.partition", partition_text.as_bytes()),
                ("adstream.first_offset", first_text.as_bytes()),
                ("adstream.offsets", &offsets),
            ]);
            objects.push((path, bytes));
        }
        let intent = Intent {
            first_offset: segment.first,
            next_offset,
            objects: objects.iter().map(|(p, _)| p.to_string()).collect(),
        };
        let intent_path = self.intent_path(topic, partition);
        let intent_json = serde_json::to_vec(&intent).unwrap_or_default();
        self.store
            .put(&intent_path, PutPayload::from(intent_json))
            .await
            .map_err(store(format!("writing {intent_path}")))?;
        let written = objects.len() as u64;
        let bytes: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
        let this = &*self;
        let uploads = objects
            .into_iter()
            .map(|(p, b)| async move { this.put(&p, b).await });
        futures_util::future::try_join_all(uploads).await?;

        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&key.0, partition, Offset::Offset(next_offset))
            .map_err(kafka("building the commit"))?;
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(kafka("committing offsets"))?;
        self.status.objects.fetch_add(written, Ordering::Relaxed);
        self.status.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.status
            .records
            .fetch_add(segment.records, Ordering::Relaxed);
        self.status.segments.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            topic,
            partition,
            first = segment.first,
            next_offset,
            objects = written,
            "segment stored"
        );
        Ok(())
    }

    async fn close_all(&mut self, due: impl Fn(&Segment) -> bool) -> Result<(), ObjectSinkError> {
        let keys: Vec<(String, i32)> = self
            .segments
            .iter()
            .filter(|(_, s)| due(s))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let next = self.next_offset(&key);
            self.close(&key, next).await?;
        }
        Ok(())
    }

    /// The offset after the last record of `key`'s open segment.
    fn next_offset(&self, key: &(String, i32)) -> i64 {
        self.segments.get(key).map_or(0, |s| {
            s.files
                .values()
                .filter_map(|f| f.offsets.last())
                .max()
                .map_or(s.first, |o| o + 1)
        })
    }

    async fn on_message(
        &mut self,
        msg: &OwnedMessage,
        stop: &AtomicBool,
    ) -> Result<(), ObjectSinkError> {
        let key = (msg.topic().to_owned(), msg.partition());
        let Some(source) = self.sources.get(&key.0).cloned() else {
            return Ok(());
        };
        let offset = msg.offset();
        let placed = match msg.payload() {
            None => Err("invalid: record has no value".to_owned()),
            Some(payload) => {
                self.codec.wait_for_writer_schema(payload, stop).await;
                match place(&self.codec, source.contract, payload).await {
                    Ok(p) => Ok(p),
                    Err(e) if e.is_retryable() => return Err(e.into()),
                    Err(e) => Err(format!("undecodable: {}: {e}", e.reason_code())),
                }
            }
        };
        let (file_key, datum): (FileKey, std::borrow::Cow<'_, [u8]>) = match &placed {
            Ok(p) => {
                let hour = hour_of(p.event_time);
                if let Some(seg) = self.segments.get(&key) {
                    if seg.max_hour.is_some_and(|h| hour > h) {
                        self.close(&key, offset).await?;
                    }
                }
                (
                    FileKey::Valid {
                        hour,
                        schema: p.schema,
                    },
                    std::borrow::Cow::Borrowed(p.body),
                )
            }
            Err(reason) => {
                self.status.invalid.fetch_add(1, Ordering::Relaxed);
                let ts = msg.timestamp().to_millis().unwrap_or(0);
                (
                    FileKey::Invalid { hour: hour_of(ts) },
                    std::borrow::Cow::Owned(invalid_datum(msg, reason)),
                )
            }
        };
        let schema_json: Arc<str> = match file_key {
            FileKey::Valid { schema, .. } => match self.codec.schema_json(schema) {
                Some(s) => s,
                None => {
                    self.codec.fetch_schema(schema).await?;
                    self.codec
                        .schema_json(schema)
                        .ok_or(CodecError::UnknownSchemaId(schema))?
                }
            },
            FileKey::Invalid { .. } => Arc::from(INVALID_SCHEMA),
        };
        let compression = self.opts.compression;
        let segment = self
            .segments
            .entry(key.clone())
            .or_insert_with(|| Segment::new(offset));
        let file = segment.files.entry(file_key).or_insert_with(|| {
            let seed = format!("{}/{}/{offset}/{file_key:?}", source.contract, key.1);
            FileBuf {
                ocf: OcfBuilder::new(&schema_json, compression, seed.as_bytes()),
                offsets: Vec::new(),
            }
        });
        file.ocf.append(&datum);
        file.offsets.push(offset);
        segment.records += 1;
        segment.bytes += datum.len() as u64;
        if let FileKey::Valid { hour, .. } = file_key {
            segment.max_hour = Some(segment.max_hour.map_or(hour, |h| h.max(hour)));
        }
        if segment.records >= self.opts.max_records || segment.bytes >= self.opts.max_bytes {
            self.close(&key, offset + 1).await?;
        }
        Ok(())
    }
}

/// Runs the object-storage loader until `stop` is set; then it stores what
/// it holds and returns.
pub async fn run(
    opts: &ObjectOptions,
    stop: &AtomicBool,
    status: &ObjectStatus,
) -> Result<(), ObjectSinkError> {
    let (store, root) = open_store(&opts.store_url)?;
    let codec = Codec::new(&opts.registry_url)?;
    let consumer = crate::kafka::consumer(&opts.bootstrap, &opts.consumer, &opts.overrides)
        .map_err(kafka("creating the consumer"))?;

    let mut sources = HashMap::new();
    let mut all = TopicPartitionList::new();
    for (contract, area) in topics::INPUTS
        .iter()
        .map(|t| (*t, Area::Raw))
        .chain(topics::RESULTS.iter().map(|t| (*t, Area::Metrics)))
    {
        let name = format!("{}{contract}", opts.topic_prefix);
        let partitions = crate::kafka::partitions(&consumer, &name)
            .map_err(kafka("fetching metadata"))?
            .ok_or_else(|| ObjectSinkError::MissingTopic(name.clone()))?;
        for p in partitions {
            all.add_partition(&name, p);
        }
        sources.insert(name, Source { contract, area });
    }
    let committed = consumer
        .committed_offsets(all, Duration::from_secs(30))
        .map_err(kafka("reading committed offsets"))?;

    let mut loader = Loader {
        opts,
        store,
        root,
        codec,
        consumer,
        sources,
        segments: HashMap::new(),
        status,
    };
    let mut start = TopicPartitionList::new();
    let mut positions = Vec::new();
    for e in committed.elements() {
        let at = match e.offset() {
            Offset::Offset(o) if o >= 0 => o,
            _ => 0,
        };
        let contract = loader.sources[e.topic()].contract;
        loader.clean_up(contract, e.partition(), at).await?;
        start
            .add_partition_offset(e.topic(), e.partition(), Offset::Offset(at))
            .map_err(kafka("building the assignment"))?;
        positions.push(((e.topic().to_owned(), e.partition()), at));
    }
    loader
        .consumer
        .assign(&start)
        .map_err(kafka("assigning partitions"))?;
    tracing::info!(
        partitions = start.count(),
        store = %opts.store_url,
        "loading into object storage"
    );
    let mut resume = ResumeGuard::new(positions);
    let mut last_age_check = Instant::now();
    loop {
        resume
            .check(&loader.consumer)
            .map_err(kafka("seeking to the partition start"))?;
        if stop.load(Ordering::Relaxed) {
            loader.close_all(|_| true).await?;
            return Ok(());
        }
        if last_age_check.elapsed() >= Duration::from_millis(200) {
            let max_open = opts.max_open;
            loader.close_all(|s| s.opened.elapsed() >= max_open).await?;
            last_age_check = Instant::now();
        }
        let Some(msg) = crate::kafka::next_record(&loader.consumer, Duration::from_millis(100))
            .await
            .map_err(kafka("consuming"))?
        else {
            continue;
        };
        if !resume.admit(msg.topic(), msg.partition(), msg.offset()) {
            continue;
        }
        // The message borrows the consumer; detach it so the loader can
        // commit while handling it.
        let msg = msg.detach();
        loader.on_message(&msg, stop).await?;
    }
}
