//! adstream's traffic producer: generates seeded, realistic ad events and
//! sends them to the three input topics of CONTRACT.md.
//!
//! - [`generator`]: the deterministic event model (a pure iterator, no I/O).
//! - [`scenario`]: labelled SPIKE/DROP episodes injected into chosen campaigns.
//! - [`encode`]: payload → Confluent-framed bytes, including deliberately broken ones.
//! - [`partitioner`]: Kafka's murmur2 partitioner, so the recording names partitions.
//! - [`recording`]: the JSON-lines record of what was sent, for oracles and tests.
//! - [`send`]: the idempotent rdkafka producer.
//! - [`run`]: the loop tying them together, with rate control and progress.
//!
//! Invariant: for a given [`generator::GeneratorConfig`] and event count the
//! sequence of (topic, partition, key, value bytes) is identical on every run.

pub mod encode;
pub mod generator;
pub mod partitioner;
pub mod recording;
pub mod scenario;
pub mod send;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use encode::{encode_payload, SchemaIds};
use generator::{Generator, GeneratorConfig, InputTopic};
use recording::Recorder;
use send::KafkaSender;

/// Parses RFC 3339 (`2026-01-01T00:00:00Z`) or integer epoch milliseconds.
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?;
    Ok(d.as_millis() as i64)
}

/// Where records go.
pub enum Target {
    /// Encode only (ids 1, 2, 3); measures generation speed.
    DryRun { partitions: i32 },
    Kafka {
        bootstrap: String,
        registry_url: String,
        overrides: Vec<(String, String)>,
        topic_prefix: String,
    },
}

pub struct RunOptions {
    pub generator: GeneratorConfig,
    pub events: Option<u64>,
    pub duration: Option<Duration>,
    /// Records per wall-clock second; None sends as fast as possible.
    pub rate: Option<f64>,
    pub target: Target,
    pub record: Option<PathBuf>,
    pub episodes_out: Option<PathBuf>,
    pub progress_every: Duration,
}

/// What a run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub records: u64,
    pub by_topic: BTreeMap<String, u64>,
    pub by_label: BTreeMap<String, u64>,
    pub first_event_time_ms: Option<i64>,
    pub last_event_time_ms: Option<i64>,
    /// Event time of the last impression (the traffic's end; clicks and conversions trail it).
    pub last_impression_time_ms: Option<i64>,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    pub partitions: i32,
    pub interrupted: bool,
}

/// Generates and sends records until the count, the duration or `stop` ends it.
pub fn run(opts: RunOptions, stop: &AtomicBool) -> anyhow::Result<Summary> {
    let episodes = opts.generator.episodes.clone();
    if let Some(path) = &opts.episodes_out {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "episodes": episodes }))?;
        std::fs::write(path, text)
            .with_context(|| format!("writing episodes to {}", path.display()))?;
    }

    let (mut sender, ids, partitions) = match &opts.target {
        Target::DryRun { partitions } => (None, SchemaIds::OFFLINE, *partitions),
        Target::Kafka {
            bootstrap,
            registry_url,
            overrides,
            topic_prefix,
        } => {
            let topics = InputTopic::ALL.map(|t| format!("{topic_prefix}{}", t.name()));
            let ids = register_schemas(registry_url, &topics)?;
            let sender = KafkaSender::connect(bootstrap, overrides, topics)
                .context("connecting to Kafka")?;
            let partitions = sender.partitions();
            (Some(sender), ids, partitions)
        }
    };

    let mut recorder = match &opts.record {
        Some(path) => {
            Some(Recorder::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => None,
    };

    let generator = Generator::new(opts.generator.clone(), opts.events);
    let mut summary = Summary {
        partitions,
        ..Default::default()
    };
    let mut counts_topic = [0u64; 3];
    let mut counts_label: BTreeMap<&'static str, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut last_progress = started;
    let mut last_count = 0u64;
    let mut buf = Vec::with_capacity(256);

    for record in generator {
        if stop.load(Ordering::Relaxed) {
            summary.interrupted = true;
            break;
        }
        let n = summary.records;
        if n.is_multiple_of(1024) {
            let elapsed = started.elapsed();
            if opts.duration.is_some_and(|d| elapsed >= d) {
                break;
            }
            if let Some(rate) = opts.rate {
                let due = Duration::from_secs_f64(n as f64 / rate);
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            }
            if last_progress.elapsed() >= opts.progress_every {
                let dt = last_progress.elapsed().as_secs_f64();
                tracing::info!(
                    records = n,
                    rate = format!("{:.0}/s", (n - last_count) as f64 / dt),
                    acked = sender.as_ref().map(|s| s.delivered()),
                    "progress"
                );
                last_progress = Instant::now();
                last_count = n;
            }
        }
        encode_payload(&record.payload, &ids, &mut buf)
            .with_context(|| format!("encoding record {n}"))?;
        let partition = partitioner::partition_for(record.key.as_bytes(), partitions);
        if let Some(rec) = recorder.as_mut() {
            rec.write(&record, partition, &buf)
                .context("writing the recording")?;
        }
        if let Some(s) = sender.as_mut() {
            s.send(record.topic, partition, record.key.as_bytes(), &buf)?;
        }
        summary.records += 1;
        counts_topic[record.topic.index()] += 1;
        *counts_label.entry(record.label.name()).or_default() += 1;
        if let generator::Payload::Impression(imp) = &record.payload {
            summary.last_impression_time_ms = Some(
                summary
                    .last_impression_time_ms
                    .map_or(imp.event_time, |l| l.max(imp.event_time)),
            );
        }
        if let Some(t) = event_time(&record.payload) {
            summary.first_event_time_ms = Some(summary.first_event_time_ms.map_or(t, |f| f.min(t)));
            summary.last_event_time_ms = Some(summary.last_event_time_ms.map_or(t, |l| l.max(t)));
        }
    }

    if let Some(s) = sender.take() {
        s.finish(Duration::from_secs(120))
            .context("waiting for acknowledgements")?;
    }
    if let Some(rec) = recorder {
        rec.finish().context("finishing the recording")?;
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.records as f64 / summary.elapsed_s.max(1e-9);
    for t in InputTopic::ALL {
        summary
            .by_topic
            .insert(t.name().to_owned(), counts_topic[t.index()]);
    }
    summary.by_label = counts_label
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Ok(summary)
}

fn event_time(p: &generator::Payload) -> Option<i64> {
    match p {
        generator::Payload::Impression(r) => Some(r.event_time),
        generator::Payload::Click(r) => Some(r.event_time),
        generator::Payload::Conversion(r) => Some(r.event_time),
        generator::Payload::Broken(_) => None,
    }
}

/// Registers the three input schemas (blocking on a small runtime of its own).
fn register_schemas(registry_url: &str, topics: &[String; 3]) -> anyhow::Result<SchemaIds> {
    use adstream_schemas::{Click, Codec, Conversion, Impression};
    let codec = Codec::new(registry_url).context("schema registry settings")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the registry client")?;
    rt.block_on(async {
        let impression = codec
            .register::<Impression>(&topics[0])
            .await
            .with_context(|| format!("registering {}-value", topics[0]))?;
        let click = codec
            .register::<Click>(&topics[1])
            .await
            .with_context(|| format!("registering {}-value", topics[1]))?;
        let conversion = codec
            .register::<Conversion>(&topics[2])
            .await
            .with_context(|| format!("registering {}-value", topics[2]))?;
        Ok(SchemaIds {
            impression,
            click,
            conversion,
        })
    })
}
