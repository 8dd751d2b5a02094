//! `adstream-producer`: generate seeded ad traffic into the input topics.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{parse_time_ms, run, scenario, RunOptions, Target};
use adstream_schemas::config::{init_tracing, KafkaArgs};

// The generator allocates a handful of short strings per event; mimalloc
// roughly halves what glibc malloc costs for that pattern.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generate realistic, seeded ad traffic (impressions, clicks, conversions)
/// into adstream's input topics. The same seed and flags give the same
/// records, byte for byte.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// Stop after this many records (all topics, duplicates and invalid ones included).
    #[arg(long)]
    events: Option<u64>,
    /// Stop after this much wall-clock time (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Records per wall-clock second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Generate and encode only; send nothing (measures the generator).
    #[arg(long)]
    dry_run: bool,
    /// Partition count assumed by --dry-run.
    #[arg(long, default_value_t = 6)]
    dry_run_partitions: i32,

    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Event time of the first impression (RFC 3339 or epoch ms).
    #[arg(long, default_value = "2026-01-01T00:00:00Z", value_parser = parse_time_ms)]
    start_time: i64,
    /// Impressions per second of event time (event time runs independently of wall time).
    #[arg(long, default_value_t = 100.0)]
    event_rate: f64,
    #[arg(long, default_value_t = 40)]
    campaigns: usize,
    #[arg(long, default_value_t = 8)]
    ads_per_campaign: usize,
    #[arg(long, default_value_t = 400)]
    keywords: usize,
    #[arg(long, default_value_t = 200_000)]
    users: usize,
    /// Share of users on IPv6.
    #[arg(long, default_value_t = 0.2)]
    ipv6_share: f64,

    /// Probability that a record is sent twice.
    #[arg(long, default_value_t = 0.01)]
    duplicate_rate: f64,
    /// Bound on how far out of event-time order on-time records arrive.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    max_disorder: Duration,
    /// Probability that a record arrives late (beyond --max-disorder).
    #[arg(long, default_value_t = 0.002)]
    late_rate: f64,
    /// How far beyond --max-disorder a late record may arrive.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    max_lateness: Duration,
    /// Probability (per impression) of a click whose impression never existed.
    #[arg(long, default_value_t = 0.002)]
    orphan_click_rate: f64,
    /// Probability (per impression) of a conversion whose click never existed.
    #[arg(long, default_value_t = 0.001)]
    orphan_conversion_rate: f64,
    /// Probability (per impression) of an undecodable or invalid record.
    #[arg(long, default_value_t = 0.001)]
    invalid_rate: f64,
    /// Share of clicks/conversions delayed beyond the join windows.
    #[arg(long, default_value_t = 0.01)]
    beyond_window_rate: f64,
    /// The processor's click window (to place beyond-window clicks).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    click_window: Duration,
    /// The processor's conversion window (to place beyond-window conversions).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    conversion_window: Duration,

    /// Scenario file of labelled anomaly episodes: {"episodes": [...]}.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// One anomaly episode (repeatable): campaign=cmp-0003,metric=CTR,kind=SPIKE,start=+40m,duration=20m,factor=5
    #[arg(long = "anomaly", value_name = "SPEC")]
    anomalies: Vec<String>,
    /// Write the injected episodes (absolute times) to this JSON file.
    #[arg(long)]
    episodes_out: Option<PathBuf>,
    /// Record every sent record as JSON lines to this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Write the run summary as JSON to this file.
    #[arg(long)]
    summary_out: Option<PathBuf>,
    /// Interval between progress lines.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    progress_interval: Duration,
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    if args.events.is_none() && args.duration.is_none() {
        anyhow::bail!("give --events N or --duration D: the producer is bounded");
    }

    let mut specs = Vec::new();
    if let Some(path) = &args.scenario {
        specs.extend(scenario::load_file(&path.to_string_lossy())?);
    }
    for a in &args.anomalies {
        specs.push(scenario::parse_flag(a)?);
    }
    let episodes = scenario::resolve(&specs, args.start_time)?;

    let generator = GeneratorConfig {
        seed: args.seed,
        start_time_ms: args.start_time,
        event_rate: args.event_rate,
        campaigns: args.campaigns,
        max_ads_per_campaign: args.ads_per_campaign,
        keywords: args.keywords,
        users: args.users,
        ipv6_share: args.ipv6_share,
        duplicate_rate: args.duplicate_rate,
        max_disorder_ms: args.max_disorder.as_millis() as i64,
        late_rate: args.late_rate,
        max_lateness_ms: args.max_lateness.as_millis() as i64,
        orphan_click_rate: args.orphan_click_rate,
        orphan_conversion_rate: args.orphan_conversion_rate,
        invalid_rate: args.invalid_rate,
        beyond_window_rate: args.beyond_window_rate,
        click_window_ms: args.click_window.as_millis() as i64,
        conversion_window_ms: args.conversion_window.as_millis() as i64,
        episodes,
    };
    let target = if args.dry_run {
        Target::DryRun {
            partitions: args.dry_run_partitions,
        }
    } else {
        Target::Kafka {
            bootstrap: args.kafka.bootstrap_servers.clone(),
            registry_url: args.kafka.schema_registry_url.clone(),
            overrides: args.kafka.rdkafka.clone(),
            topic_prefix: args.kafka.topic_prefix.clone(),
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handler")?;
    }

    let summary = run(
        RunOptions {
            generator,
            events: args.events,
            duration: args.duration,
            rate: args.rate,
            target,
            record: args.record,
            episodes_out: args.episodes_out,
            progress_every: args.progress_interval,
        },
        &stop,
    )?;
    tracing::info!(
        records = summary.records,
        elapsed_s = format!("{:.2}", summary.elapsed_s),
        rate = format!("{:.0}/s", summary.records_per_s),
        interrupted = summary.interrupted,
        "done"
    );
    let text = serde_json::to_string_pretty(&summary)?;
    match &args.summary_out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}
