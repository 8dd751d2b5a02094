//! `adstream-bench`: the figures of `make bench`, measured side by side in
//! one run (this machine is shared and noisy: ratios within a run hold,
//! absolute numbers drift). Writes `results.json` (numbers only) and a
//! readable `results.md`.
//!
//! - `engine_events_per_s_per_core`: the engine alone, in process, on the
//!   producer's generated records: decode → join → window → encode of the
//!   results, per CPU-second of the measuring thread, in steady state (the
//!   last third of the records; the cold figure goes in the notes).
//! - `producer_events_per_s`: the producer unthrottled into the broker.
//! - `e2e_vs_ceiling`: the processor through the broker on those records,
//!   divided by a plain rdkafka consumer that only consumes and decodes them.
//! - `pg_sink_vs_copy`: the PostgreSQL loader's rows/s (from Kafka) divided
//!   by a raw binary COPY of the same rows.
//! - `state_bytes_per_impression`: resident memory growth of the engine per
//!   buffered impression.
//!
//! Peers (Quix Streams) are separate jobs under `bench/peers/`; `make bench`
//! runs them and merges their figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

mod latency;
mod recovery;

// The processor binary's allocator, so the engine figure is the processor's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use adstream_processor::engine::watermark::InputPartition;
use adstream_processor::engine::{Engine, EngineConfig, Output, SourceRef};
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{self, ProcessorOptions, Status};
use adstream_producer::encode::{encode_payload, encoded_records, SchemaIds};
use adstream_producer::generator::{Generator, GeneratorConfig, InputTopic};
use adstream_producer::partitioner::partition_for;
use adstream_producer::{RunOptions, Target};
use adstream_schemas::{AnomalyAlert, CampaignCtr, Click, Codec, Conversion, Impression};

/// Measure adstream against the hardware and against a plain consumer.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    kafka: adstream_schemas::config::KafkaArgs,
    /// PostgreSQL server (a database per run is created on it).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Events for the engine figure (the last third is timed).
    #[arg(long, default_value_t = 3_000_000)]
    engine_events: u64,
    /// Events through the broker (producer, processor, ceiling).
    #[arg(long, default_value_t = 1_000_000)]
    e2e_events: u64,
    /// Rows for the PostgreSQL figure.
    #[arg(long, default_value_t = 300_000)]
    pg_rows: u64,
    /// Buffered impressions for the state figure.
    #[arg(long, default_value_t = 10_000_000)]
    state_impressions: u64,
    /// Events of the live run for the emit-latency figure.
    #[arg(long, default_value_t = 600_000)]
    latency_events: u64,
    /// Their pace (events/s) in the live run; the processor must keep up.
    #[arg(long, default_value_t = 20_000.0)]
    latency_rate: f64,
    /// Buffered impressions when the processor is killed for the recovery figure.
    #[arg(long, default_value_t = 10_000_000)]
    recovery_impressions: u64,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Object store for the storage figure (s3://bucket/path; AWS_* variables
    /// as for the sink); without it the figure is skipped.
    #[arg(long, env = "OBJECT_STORE_URL")]
    store_url: Option<String>,
    /// Python of the peers' venv (bench/peers/install.sh); when given, the
    /// Quix Streams job runs on the same topics after the processor.
    #[arg(long)]
    quix_python: Option<PathBuf>,
    /// Figures measured by other jobs, merged into the results: a JSON object file.
    #[arg(long)]
    merge: Vec<PathBuf>,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "bench")]
    out_dir: PathBuf,
    /// Run only these figures (engine, state, pg, e2e, latency, recovery); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Tiny sizes, to keep the harness from rotting (make test); figures are not meaningful.
    #[arg(long)]
    smoke: bool,
    /// Internal: measure this in-process figure (engine or state) and print
    /// it as JSON; the harness runs each in a fresh process of its own.
    #[arg(long, hide = true)]
    phase: Option<String>,
}

/// Runs an in-process figure in a fresh copy of this process, so that no
/// figure sees memory another one allocated, freed and left resident (that
/// made the state figure look smaller and the engine's warm-up cheaper).
fn in_fresh_process<T: serde::de::DeserializeOwned>(phase: &str) -> anyhow::Result<T> {
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let out = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .args(["--phase", phase])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running the {phase} figure"))?;
    anyhow::ensure!(
        out.status.success(),
        "the {phase} figure failed: {}",
        out.status
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading the {phase} figure"))
}

/// CPU time spent so far on `clock` (a thread or the whole process).
fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    cpu_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole process (all threads, librdkafka's included).
fn process_cpu() -> Duration {
    cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn new_engine(codec: Codec, partitions: i32) -> Engine {
    let mut engine = Engine::new(EngineConfig::default(), codec);
    for topic in 0..3u8 {
        for partition in 0..partitions {
            engine.add_partition(InputPartition { topic, partition });
        }
    }
    engine
}

/// Encodes results as the runtime does before sending them.
fn encode_outputs(outputs: impl Iterator<Item = Output>, buf: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for o in outputs {
        let ok = match &o {
            Output::AdMetrics(rows) => {
                let _ = rows.try_for_each(|r| {
                    r.encode_with_id(4, buf);
                    Ok::<(), ()>(())
                });
                n += rows.len() as u64;
                continue;
            }
            Output::CampaignCtr(m) => Codec::encode_with_id::<CampaignCtr>(5, m, buf).is_ok(),
            Output::Alert(a) => Codec::encode_with_id::<AnomalyAlert>(6, a, buf).is_ok(),
            Output::Partial(p) => {
                buf.clear();
                buf.extend(
                    adstream_processor::engine::rollup::PartialMessage::Cells {
                        task: 0,
                        partial: p.clone(),
                    }
                    .encode(),
                );
                true
            }
            Output::Side { .. } => true,
        };
        n += u64::from(ok);
    }
    n
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EngineFigure {
    /// Events and CPU time of the measured last third.
    events: u64,
    cpu_s: f64,
    /// The whole run from an empty engine, warm-up included.
    cold_events: u64,
    cold_cpu_s: f64,
    outputs: u64,
    /// [`random_load_ns`] over 64 MB and over 256 KB, just before the run.
    load_ns_64mb: f64,
    load_ns_256kb: f64,
}

impl EngineFigure {
    /// Events per CPU-second over the measured last third.
    fn rate(&self) -> f64 {
        self.events as f64 / self.cpu_s
    }

    /// Events per CPU-second over the whole run from an empty engine.
    fn cold_rate(&self) -> f64 {
        self.cold_events as f64 / self.cold_cpu_s
    }
}

/// Runs of the engine figure, each in a fresh process: the figure is their
/// median.
const ENGINE_RUNS: usize = 3;

/// Nanoseconds per dependent load at random places in `bytes` of memory:
/// a chase through one random cycle, so every load waits for the one
/// before. The engine's join and window state is far larger than the
/// cache, and its lookups are such loads; on this shared machine their
/// cost moved the engine figure more than any change of ours (the same
/// binary measured 1.77 M events/s one day and 0.52 to 0.85 M the next),
/// so each run says what memory cost while it ran.
fn random_load_ns(bytes: usize) -> f64 {
    let n = bytes / std::mem::size_of::<usize>();
    // Sattolo's shuffle: a random permutation that is one cycle.
    let mut next: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        next.swap(i, (x % i as u64) as usize);
    }
    let steps = 4_000_000;
    let mut at = 0;
    let t = std::time::Instant::now();
    for _ in 0..steps {
        at = next[at];
    }
    let ns = t.elapsed().as_nanos() as f64 / steps as f64;
    std::hint::black_box(at);
    ns
}

/// The engine's throughput in steady state: the first two thirds of the
/// records are not timed, the last third is. At the default pace and size
/// the join state stops growing within the first two thirds: the click
/// window fills in about the first 0.95 M records, and the expired records
/// left in place until their batch is freed (a quarter of those held) take
/// about 0.25 M more. The cold figure, from an empty engine, is kept too:
/// its extra cost is the first touch of the memory the state grows into.
fn bench_engine(events: u64, partitions: i32) -> anyhow::Result<EngineFigure> {
    let load_ns_64mb = random_load_ns(64 << 20);
    let load_ns_256kb = random_load_ns(256 << 10);
    let records = encoded_records(
        GeneratorConfig {
            seed: 11,
            event_rate: 500.0,
            ..Default::default()
        },
        events,
        partitions,
        &SchemaIds::OFFLINE,
    );
    let mut engine = new_engine(SchemaIds::OFFLINE.offline_codec()?, partitions);
    let mut buf = Vec::with_capacity(512);
    let mut outputs = 0;
    let mut offsets = [[0i64; 256]; 3];
    let warm = records.len() * 2 / 3;
    let cpu0 = thread_cpu();
    let mut cpu_warm = cpu0;
    // One record ahead, as the runtime hints the engine from a fetch.
    let mut ahead = records.iter().skip(1);
    for (i, r) in records.iter().enumerate() {
        if i == warm {
            cpu_warm = thread_cpu();
        }
        if let Some(next) = ahead.next() {
            engine.prefetch(next.topic, Some(next.key));
        }
        let offset = &mut offsets[r.topic as usize][r.partition as usize % 256];
        engine.on_record(
            SourceRef {
                topic: r.topic,
                partition: r.partition,
                offset: *offset,
            },
            Some(r.key),
            Some(r.value),
            None,
        );
        *offset += 1;
        if engine.has_outputs() {
            outputs += encode_outputs(engine.drain_outputs(), &mut buf);
        }
    }
    let cpu_end = thread_cpu();
    Ok(EngineFigure {
        events: (records.len() - warm) as u64,
        cpu_s: (cpu_end - cpu_warm).as_secs_f64(),
        cold_events: records.len() as u64,
        cold_cpu_s: (cpu_end - cpu0).as_secs_f64(),
        outputs,
        load_ns_64mb,
        load_ns_256kb,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StateFigure {
    bytes_per_impression: f64,
    buffered: u64,
    checkpoint_bytes: usize,
    checkpoint_s: f64,
    restore_s: f64,
}

/// Resident bytes per buffered impression, `impressions` of them inside one
/// click window; and the cost of checkpointing and restoring that state.
fn bench_state(impressions: u64, partitions: i32) -> anyhow::Result<StateFigure> {
    let mut engine = new_engine(SchemaIds::OFFLINE.offline_codec()?, partitions);
    // Only impressions are fed: the click and conversion partitions are
    // idle, so the watermark follows the impressions and windows close as
    // in a live run (otherwise every cell of the 20 minutes stays open).
    for topic in [1u8, 2] {
        for partition in 0..partitions {
            engine.set_idle(InputPartition { topic, partition }, true);
        }
    }
    let ids = SchemaIds::OFFLINE;
    // 10 M impressions within 20 minutes of event time: none can expire.
    let cfg = GeneratorConfig {
        seed: 13,
        event_rate: impressions as f64 / 1_200.0,
        duplicate_rate: 0.0,
        ..Default::default()
    };
    let mut buf = Vec::new();
    let mut offset = 0i64;
    let before = rss_bytes();
    for r in Generator::new(cfg, None) {
        if r.topic != InputTopic::Impressions {
            continue; // only impressions, so the figure is per impression
        }
        if encode_payload(&r.payload, &ids, &mut buf).is_err() {
            continue;
        }
        let p = partition_for(r.key.as_bytes(), partitions);
        engine.on_record(
            SourceRef {
                topic: 0,
                partition: p,
                offset,
            },
            Some(r.key.as_bytes()),
            Some(&buf),
            None,
        );
        offset += 1;
        if engine.has_outputs() {
            drop(engine.drain_outputs());
        }
        if engine.join_sizes().impressions as u64 >= impressions {
            break;
        }
    }
    let buffered = engine.join_sizes().impressions as u64;
    let grown = rss_bytes().saturating_sub(before);
    let t = Instant::now();
    let checkpoint = engine.checkpoint();
    let checkpoint_s = t.elapsed().as_secs_f64();
    drop(engine);
    let t = Instant::now();
    let restored = Engine::restore(
        EngineConfig::default(),
        SchemaIds::OFFLINE.offline_codec()?,
        &checkpoint,
    )
    .context("restoring the state checkpoint")?;
    let restore_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        restored.join_sizes().impressions as u64 == buffered,
        "the restored state lost impressions"
    );
    Ok(StateFigure {
        bytes_per_impression: grown as f64 / buffered.max(1) as f64,
        buffered,
        checkpoint_bytes: checkpoint.len(),
        checkpoint_s,
        restore_s,
    })
}

/// The in-process processor of the e2e and live runs: one instance, the
/// default engine, a 6 s session (the smallest Apache Kafka allows by default).
fn processor_options(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    idle_timeout: Duration,
) -> ProcessorOptions {
    let mut overrides = kafka.rdkafka.clone();
    overrides.push(("session.timeout.ms".into(), "6000".into()));
    ProcessorOptions {
        bootstrap: kafka.bootstrap_servers.clone(),
        registry_url: kafka.schema_registry_url.clone(),
        overrides,
        topic_prefix: prefix.to_owned(),
        group_id: format!("{prefix}processor"),
        engine: EngineConfig::default(),
        idle_timeout,
        commit_interval: Duration::from_secs(1),
        instance_id: "0".into(),
        static_membership: false,
        state_url: format!("file://{}", state_dir(prefix).display()),
        checkpoint_interval: Duration::from_secs(10),
        stop_when_idle: true,
    }
}

/// Checkpoints of the in-process processor of the run under `prefix`
/// (removed with the run's topics).
fn state_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "adstream-bench-state-{}",
        prefix.trim_end_matches('.')
    ))
}

/// Creates the input, result and internal topics of a run under `prefix`.
fn create_topics(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin = adstream_admin::admin_client(&kafka.bootstrap_servers, &kafka.rdkafka)?;
    rt()?.block_on(adstream_admin::create_topics(
        &admin, prefix, partitions, 1, true,
    ))?;
    Ok(())
}

/// The `q` quantile (nearest rank) of sorted samples; `None` when empty.
fn quantile(sorted: &[u64], q: f64) -> Option<f64> {
    let n = sorted.len();
    (n > 0).then(|| sorted[((n as f64 * q).ceil() as usize).clamp(1, n) - 1] as f64)
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")
}

fn prefix(name: &str) -> String {
    let ms = chrono::Utc::now().timestamp_millis();
    format!("bench-{ms}-{name}.")
}

struct E2eFigures {
    producer_events_per_s: f64,
    processor_events_per_s: f64,
    processor_events_per_cpu_s: f64,
    quix: Option<serde_json::Value>,
    /// Records/s, records and objects written by the object-storage loader.
    storage: Option<(f64, u64, u64)>,
    ceiling_events_per_s: f64,
    records: u64,
    /// p99 and count of the windows' emit latencies (ms), of the first run.
    emit_latency: Option<(f64, usize)>,
    /// Every ceiling and processor run, by ratio.
    pairs: Vec<E2ePair>,
}

fn bench_e2e(args: &Args, p: &str, events: u64) -> anyhow::Result<E2eFigures> {
    let p = p.to_owned();
    let rt = rt()?;
    create_topics(&args.kafka, &p, args.partitions)?;
    let summary = adstream_producer::run(
        RunOptions {
            generator: GeneratorConfig {
                seed: 17,
                event_rate: 300.0,
                ..Default::default()
            },
            events: Some(events),
            duration: None,
            rate: None,
            target: Target::Kafka {
                bootstrap: args.kafka.bootstrap_servers.clone(),
                registry_url: args.kafka.schema_registry_url.clone(),
                overrides: args.kafka.rdkafka.clone(),
                topic_prefix: p.clone(),
            },
            record: None,
            episodes_out: None,
            progress_every: Duration::from_secs(3600),
        },
        &AtomicBool::new(false),
    )?;
    let records = summary.records;

    // Pairs of runs of the ceiling and the processor: the figure is the
    // median of their ratios (single pairs on this VM varied from 0.60 to
    // 0.92).
    let codec = Codec::new(&args.kafka.schema_registry_url)?;
    let pairs = if args.smoke { 1 } else { E2E_PAIRS };
    let mut runs: Vec<E2ePair> = Vec::with_capacity(pairs);
    let ceiling_s = ceiling_run(args, &p, records, &rt, &codec, 0)?;
    let first = processor_run(args, &p, records, 0)?;
    let emit_latency = first.emit_latency;
    let results = first.results;
    runs.push(E2ePair {
        ceiling_s,
        processor_s: first.seconds,
        processor_cpu_s: first.cpu_s,
    });

    // The object-storage loader on every input and result record of the
    // first processor run (before the others add their results).
    let storage = match &args.store_url {
        None => None,
        Some(url) => {
            let opts = adstream_sink::objects::ObjectOptions {
                bootstrap: args.kafka.bootstrap_servers.clone(),
                registry_url: args.kafka.schema_registry_url.clone(),
                overrides: args.kafka.rdkafka.clone(),
                topic_prefix: p.clone(),
                store_url: format!("{}/{}", url.trim_end_matches('/'), p.trim_end_matches('.')),
                consumer: format!("{p}s3"),
                max_records: 100_000,
                max_bytes: 32 << 20,
                max_open: Duration::from_secs(1),
                compression: adstream_sink::ocf::Compression::Deflate,
                multipart_above: 16 << 20,
            };
            let want = records + results;
            let stop = AtomicBool::new(false);
            let st = adstream_sink::objects::ObjectStatus::default();
            let t0 = Instant::now();
            let mut took = None;
            std::thread::scope(|s| -> anyhow::Result<()> {
                let worker =
                    s.spawn(|| rt.block_on(adstream_sink::objects::run(&opts, &stop, &st)));
                while !worker.is_finished() && took.is_none() {
                    if st.records.load(std::sync::atomic::Ordering::Relaxed) >= want {
                        took = Some(t0.elapsed());
                    }
                    if t0.elapsed() > Duration::from_secs(600) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("storage loader panicked"))??;
                Ok(())
            })?;
            let took = took.context("the storage loader did not store every record")?;
            let objects = st.objects.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "storage: {want} records in {objects} objects in {:.2} s",
                took.as_secs_f64()
            );
            Some((want as f64 / took.as_secs_f64(), want, objects))
        }
    };

    for run in 1..pairs {
        let ceiling_s = ceiling_run(args, &p, records, &rt, &codec, run)?;
        let r = processor_run(args, &p, records, run)?;
        runs.push(E2ePair {
            ceiling_s,
            processor_s: r.seconds,
            processor_cpu_s: r.cpu_s,
        });
    }
    runs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let median = runs[runs.len() / 2];

    let quix = match &args.quix_python {
        None => None,
        Some(python) => {
            let out = std::process::Command::new(python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/peers/quixstreams/run.py"
                ))
                .args(["--prefix", &p, "--bootstrap", &args.kafka.bootstrap_servers])
                .args(["--registry", &args.kafka.schema_registry_url])
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("running the Quix Streams peer")?;
            anyhow::ensure!(out.status.success(), "the Quix Streams peer failed");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .unwrap_or("{}");
            let v: serde_json::Value =
                serde_json::from_str(line).context("the Quix Streams peer's JSON line")?;
            eprintln!("quixstreams: {v}");
            Some(v)
        }
    };
    Ok(E2eFigures {
        producer_events_per_s: summary.records_per_s,
        processor_events_per_s: records as f64 / median.processor_s,
        processor_events_per_cpu_s: records as f64 / median.processor_cpu_s.max(1e-9),
        quix,
        storage,
        ceiling_events_per_s: records as f64 / median.ceiling_s,
        records,
        emit_latency,
        pairs: runs,
    })
}

/// Pairs of ceiling and processor runs in the e2e figure: it is the median
/// of their ratios.
const E2E_PAIRS: usize = 3;

/// One ceiling run and the processor run after it (seconds).
#[derive(Debug, Clone, Copy)]
struct E2ePair {
    ceiling_s: f64,
    processor_s: f64,
    processor_cpu_s: f64,
}

impl E2ePair {
    /// The processor's rate over the ceiling's.
    fn ratio(&self) -> f64 {
        self.ceiling_s / self.processor_s
    }
}

/// The ceiling: a plain consumer (its own group, `run`) consumes and
/// decodes every input record of the run under `p`, nothing else; the
/// seconds it took.
fn ceiling_run(
    args: &Args,
    p: &str,
    records: u64,
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    run: usize,
) -> anyhow::Result<f64> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &args.kafka.bootstrap_servers)
        .set("group.id", format!("{p}ceiling-{run}"))
        .set("enable.auto.commit", "false")
        // The processor's fetch settings, so the two read alike.
        .set("fetch.wait.max.ms", "100")
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in &args.kafka.rdkafka {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create()?;
    let mut tpl = TopicPartitionList::new();
    for t in adstream_schemas::topics::INPUTS {
        for part in 0..args.partitions {
            tpl.add_partition_offset(&format!("{p}{t}"), part, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let names = adstream_schemas::topics::INPUTS.map(|t| format!("{p}{t}"));
    let t0 = Instant::now();
    let mut seen = 0u64;
    let mut decoded = 0u64;
    while seen < records {
        if t0.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("ceiling consumer saw {seen} of {records} records in 10 minutes");
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        seen += 1;
        let Some(v) = m.payload() else { continue };
        let ok = if m.topic() == names[0] {
            rt.block_on(codec.decode::<Impression>(v)).is_ok()
        } else if m.topic() == names[1] {
            rt.block_on(codec.decode::<Click>(v)).is_ok()
        } else {
            rt.block_on(codec.decode::<Conversion>(v)).is_ok()
        };
        decoded += u64::from(ok);
    }
    let ceiling_s = t0.elapsed().as_secs_f64();
    drop(consumer);
    eprintln!("ceiling: {seen} records ({decoded} decodable) in {ceiling_s:.2} s");
    Ok(ceiling_s)
}

/// What one processor run measured.
struct ProcessorRun {
    /// From its partition assignment to the moment it had taken in every
    /// input record: wall and process CPU seconds.
    seconds: f64,
    cpu_s: f64,
    /// p99 and count of the windows' emit latencies (ms).
    emit_latency: Option<(f64, usize)>,
    /// Result records it wrote.
    results: u64,
}

/// The processor on the input topics of the run under `p`, in process,
/// until it has taken in all `records` and stops when idle. Run `run` has
/// its own consumer group, transactional id and checkpoints, so each run
/// reads everything from the start (each writes its results again).
fn processor_run(args: &Args, p: &str, records: u64, run: usize) -> anyhow::Result<ProcessorRun> {
    let mut opts = processor_options(&args.kafka, p, Duration::from_secs(1));
    // Run 0 keeps the run's own checkpoints, which the caller removes.
    let state = (run > 0).then(|| state_dir(&format!("{p}{run}")));
    if let Some(dir) = &state {
        opts.group_id = format!("{p}processor-{run}");
        opts.state_url = format!("file://{}", dir.display());
    }
    let stop = AtomicBool::new(false);
    let status = Arc::new(Status::default());
    let metrics = Metrics::new();
    let (mut assigned_at, mut done_at) = (None, None);
    let (mut cpu_at_assign, mut cpu_at_done) = (Duration::ZERO, Duration::ZERO);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let worker = s.spawn(|| runtime::run(&opts, &stop, &status, &metrics));
        while !worker.is_finished() {
            let snap = status.snapshot();
            if assigned_at.is_none() && snap.assigned > 0 {
                assigned_at = Some(Instant::now());
                cpu_at_assign = process_cpu();
            }
            if done_at.is_none() && snap.stats.total().input >= records {
                done_at = Some(Instant::now());
                cpu_at_done = process_cpu();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("processor thread panicked"))??;
        Ok(())
    })?;
    let (Some(a), Some(d)) = (assigned_at, done_at) else {
        anyhow::bail!("the processor did not take in every record");
    };
    let processor_s = (d - a).as_secs_f64();
    let processor_cpu_s = (cpu_at_done - cpu_at_assign).as_secs_f64();
    eprintln!("processor: {records} records in {processor_s:.2} s, {processor_cpu_s:.2} CPU-s");
    let emit_latency = {
        let mut l = metrics.emit_latencies_ms();
        l.sort_unstable();
        quantile(&l, 0.99).map(|p99| (p99, l.len()))
    };
    let results = {
        let st = status.snapshot().stats;
        st.ad_metric_rows + st.campaign_rows + st.alerts
    };
    if let Some(dir) = state {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(ProcessorRun {
        seconds: processor_s,
        cpu_s: processor_cpu_s,
        emit_latency,
        results,
    })
}

fn main() -> anyhow::Result<()> {
    adstream_schemas::config::init_tracing();
    let mut args = Args::parse();
    if args.smoke {
        args.engine_events = 20_000;
        args.e2e_events = 5_000;
        args.pg_rows = 2_000;
        args.state_impressions = 20_000;
        args.recovery_impressions = 20_000;
        // Enough event time (333 s) for live windows to close: the closes
        // at the end of the input are not counted.
        args.latency_events = 100_000;
        args.latency_rate = 20_000.0;
    }
    match args.phase.as_deref() {
        Some("engine") => {
            let e = bench_engine(args.engine_events, args.partitions)?;
            println!("{}", serde_json::to_string(&e)?);
            return Ok(());
        }
        Some("state") => {
            let st = bench_state(args.state_impressions, args.partitions)?;
            println!("{}", serde_json::to_string(&st)?);
            return Ok(());
        }
        Some(other) => anyhow::bail!("unknown phase {other} (engine or state)"),
        None => {}
    }
    let mut figures: BTreeMap<String, f64> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    let started = chrono::Utc::now();

    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    if wanted("state") {
        let st: StateFigure = in_fresh_process("state")?;
        eprintln!(
            "state: {} impressions buffered, {:.1} resident bytes each",
            st.buffered, st.bytes_per_impression
        );
        figures.insert(
            "state_bytes_per_impression".into(),
            (st.bytes_per_impression * 10.0).round() / 10.0,
        );
        notes.push(format!(
            "state: {} buffered impressions in one engine; its checkpoint is {:.0} MB ({:.1} B per impression), serialized in {:.2} s and restored in {:.2} s (one thread)",
            st.buffered,
            st.checkpoint_bytes as f64 / 1e6,
            st.checkpoint_bytes as f64 / st.buffered.max(1) as f64,
            st.checkpoint_s,
            st.restore_s
        ));
    }
    if wanted("engine") {
        // Single runs of the same binary on this shared VM differ by a
        // third or more (memory and the other tenants move the CPU time of
        // the same work): the figure is the median of several, each in a
        // fresh process, and the note lists them all.
        let runs = if args.smoke { 1 } else { ENGINE_RUNS };
        let mut all: Vec<EngineFigure> = Vec::with_capacity(runs);
        for _ in 0..runs {
            let e: EngineFigure = in_fresh_process("engine")?;
            eprintln!(
                "engine: {} events, {} results encoded; steady state (last third): {:.2} CPU-s → {:.0} events/s per core; from empty: {:.0} events/s per core; random load {:.0} ns in 64 MB, {:.1} ns in 256 KB",
                e.cold_events, e.outputs, e.cpu_s, e.rate(), e.cold_rate(), e.load_ns_64mb, e.load_ns_256kb
            );
            all.push(e);
        }
        all.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        let e = &all[all.len() / 2];
        figures.insert("engine_events_per_s_per_core".into(), e.rate().round());
        let list =
            |f: fn(&EngineFigure) -> String| all.iter().map(f).collect::<Vec<_>>().join(", ");
        notes.push(format!(
            "engine: the figure is the median of {} runs, each in a fresh process (steady state, in order of rate: {} events/s per core), each the last third of {} events, after the first two thirds brought the join state to its steady size; the same runs from an empty engine: {} events/s per core (their extra cost is first-touch page faults of the growing state). Memory just before each run: a dependent load at a random place took {} in 64 MB and {} in 256 KB (a chase through one random cycle); the engine's state lookups are such loads",
            all.len(),
            list(|e| format!("{:.0}", e.rate())),
            e.cold_events,
            list(|e| format!("{:.0}", e.cold_rate())),
            list(|e| format!("{:.0} ns", e.load_ns_64mb)),
            list(|e| format!("{:.1} ns", e.load_ns_256kb)),
        ));
    }
    // The live run comes before the runs that push millions of records
    // through the local broker: tansu's commits and fetches were measured
    // slower after them (p50 123-129 ms on a fresh broker, 159-170 ms after
    // four e2e runs), which says something about tansu, not the processor.
    if wanted("latency") {
        let p = prefix("live");
        let l = latency::bench(
            &args.kafka,
            &p,
            args.partitions,
            args.latency_events,
            args.latency_rate,
        );
        adstream_bench::delete_topics(&args.kafka, &p);
        let _ = std::fs::remove_dir_all(state_dir(&p));
        let l = l?;
        eprintln!(
            "latency: p99 {:.0} ms, p50 {:.0} ms over {} live window closes ({} at the end of the input left out)",
            l.p99_ms, l.p50_ms, l.windows, l.end_of_input
        );
        figures.insert("emit_latency_p99_ms".into(), l.p99_ms);
        notes.push(format!(
            "emit_latency_p99_ms: a live run ({} events produced at {:.0}/s from the moment the processor holds its partitions, while it keeps up; event time runs 1 minute per {:.1} s of wall time, so windows close often): p99 {:.0} ms, p50 {:.0} ms over {} window closes (one per window and rollup task), from the mark of the last join task whose watermark passed a window to the commit of the transaction holding its rollup; the {} closes when the input ended are left out (idle marks made them: the processor files them under closed_by=\"idle\")",
            l.events,
            l.rate,
            60.0 * l.event_rate / l.rate,
            l.p99_ms,
            l.p50_ms,
            l.windows,
            l.end_of_input
        ));
    }
    if wanted("pg") {
        let pg = adstream_bench::pg::bench(&args.kafka, &args.database_url, args.pg_rows)?;
        eprintln!(
            "postgres: sink {:.0} rows/s, raw COPY {:.0} rows/s ({} rows)",
            pg.sink_rows_per_s, pg.copy_rows_per_s, pg.rows
        );
        figures.insert(
            "pg_sink_vs_copy".into(),
            (pg.sink_rows_per_s / pg.copy_rows_per_s * 1000.0).round() / 1000.0,
        );
    }
    if wanted("e2e") {
        let p = prefix("e2e");
        let x = bench_e2e(&args, &p, args.e2e_events);
        adstream_bench::delete_topics(&args.kafka, &p);
        let _ = std::fs::remove_dir_all(state_dir(&p));
        let x = x?;
        figures.insert(
            "producer_events_per_s".into(),
            x.producer_events_per_s.round(),
        );
        figures.insert(
            "e2e_vs_ceiling".into(),
            (x.processor_events_per_s / x.ceiling_events_per_s * 1000.0).round() / 1000.0,
        );
        let ratios: Vec<String> = x
            .pairs
            .iter()
            .map(|r| {
                format!(
                    "{:.3} ({:.2} s / {:.2} s)",
                    r.ratio(),
                    r.ceiling_s,
                    r.processor_s
                )
            })
            .collect();
        notes.push(format!(
            "e2e: {} records, read by a plain consumer+decode and then by the processor, {} times, each run in a consumer group of its own; the figure is the median of the ratios (ceiling time / processor time, by size: {}); in the median pair the processor took in {:.0} events/s ({:.0} per CPU-s of the whole process) and the plain consumer+decode {:.0} events/s",
            x.records,
            x.pairs.len(),
            ratios.join(", "),
            x.processor_events_per_s,
            x.processor_events_per_cpu_s,
            x.ceiling_events_per_s
        ));
        if let Some((rate, n, objects)) = x.storage {
            figures.insert("storage_records_per_s".into(), rate.round());
            notes.push(format!(
                "storage: the object-storage loader wrote {n} records (inputs and results of the e2e run) as {objects} Avro objects into moto S3 at {rate:.0} records/s"
            ));
        }
        if let Some((p99, n)) = x.emit_latency {
            notes.push(format!(
                "e2e: while reading that backlog, window closes wait for the commit interval (a commit per window would slow the backlog): p99 emit latency there {p99:.0} ms over {n} window closes (closes made by idle marks at the end left out); emit_latency_p99_ms is the live run's"
            ));
        }
        if let Some(q) = &x.quix {
            if let Some(theirs) = q
                .get("events_per_cpu_s")
                .and_then(serde_json::Value::as_f64)
            {
                figures.insert(
                    "vs_quixstreams".into(),
                    (x.processor_events_per_cpu_s / theirs * 10.0).round() / 10.0,
                );
                notes.push(format!(
                    "vs_quixstreams: adstream {:.0} events per CPU-s (the full job: 3-way join, ad-metrics, campaign-ctr, alerts, side outputs) / Quix Streams {theirs:.0} (impression-click join, campaign CTR), same topics; Quix run: {q}",
                    x.processor_events_per_cpu_s
                ));
            }
        }
    }

    if wanted("recovery") {
        let p = prefix("recovery");
        let r = recovery::bench(&args.kafka, &p, args.partitions, args.recovery_impressions);
        adstream_bench::delete_topics(&args.kafka, &p);
        let r = r?;
        eprintln!(
            "recovery: {:.2} s from restart to the first committed output ({:.2} s from the kill)",
            r.recovery_s, r.kill_to_output_s
        );
        figures.insert("recovery_s".into(), (r.recovery_s * 100.0).round() / 100.0);
        notes.push(format!(
            "recovery_s: the processor binary held {} buffered impressions (counted in its checkpoints; {:.0} MB of join-task checkpoints, taken in and checkpointed in {:.0} s), was killed with SIGKILL and restarted; the figure is the restarted process's start to its first committed output: {} s waiting for the group to assign its partitions (restarted with --static-membership: tansu still waits out the dead member's 6 s session; Apache Kafka would hand the partitions back at once), {} s loading the checkpoints, the rest the new input; kill to output was {:.2} s",
            r.buffered_impressions,
            r.checkpoint_bytes as f64 / 1e6,
            r.catch_up_s,
            r.group_wait_s.map_or("?".to_owned(), |s| format!("{s:.2}")),
            r.restore_s.map_or("?".to_owned(), |s| format!("{s:.2}")),
            r.kill_to_output_s
        ));
    }

    for path in &args.merge {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        if let Some(obj) = v.as_object() {
            for (k, v) in obj {
                if let Some(n) = v.as_f64() {
                    figures.insert(k.clone(), n);
                }
            }
        }
    }

    std::fs::create_dir_all(&args.out_dir)?;
    let json = serde_json::to_string_pretty(&figures)?;
    std::fs::write(args.out_dir.join("results.json"), json + "\n")?;
    let targets: BTreeMap<&str, &str> = [
        ("engine_events_per_s_per_core", "≥ 1 500 000"),
        ("e2e_vs_ceiling", "≥ 0.70"),
        ("vs_quixstreams", "≥ 10"),
        ("vs_pyflink", "≥ 3"),
        ("state_bytes_per_impression", "≤ 96"),
        ("emit_latency_p99_ms", "≤ 250"),
        ("recovery_s", "≤ 10"),
        ("pg_sink_vs_copy", "≥ 0.80"),
        ("producer_events_per_s", "report"),
        ("storage_records_per_s", "report"),
    ]
    .into_iter()
    .collect();
    let mut md = format!(
        "# adstream benchmarks\n\n- date: {}\n- machine: {} CPUs, {}\n- command: `{}`{}\n\n| figure | value | target |\n|---|---|---|\n",
        started.format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
            .unwrap_or_default(),
        std::env::args().collect::<Vec<_>>().join(" "),
        if args.smoke { " (smoke: tiny sizes, figures not meaningful)" } else { "" },
    );
    for (k, target) in &targets {
        match figures.get(*k) {
            Some(v) => md.push_str(&format!("| `{k}` | {v} | {target} |\n")),
            None => md.push_str(&format!(
                "| `{k}` | not measured (see notes) | {target} |\n"
            )),
        }
    }
    notes.push(
        "vs_pyflink: left out; PyFlink's Kafka connector is on PyPI only as an unofficial redistribution for Flink 2.0.x (bench/peers/pyflink/README.md)".to_owned(),
    );
    md.push_str("\n## Notes\n\n");
    for n in &notes {
        md.push_str(&format!("- {n}\n"));
    }
    std::fs::write(args.out_dir.join("results.md"), md)?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
