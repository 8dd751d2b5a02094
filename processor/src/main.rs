//! `adstream-processor`: joins impressions, clicks and conversions on event
//! time, rolls them into windows, detects anomalies, writes the results.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

// Join state and result rows are many small allocations; measured with
// `make bench`, glibc malloc cost the engine ~4x (malloc_consolidate on a
// growing heap) where mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use adstream_processor::engine::anomaly::AnomalyConfig;
use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{run, ProcessorOptions, Status};
use adstream_schemas::config::{init_tracing, KafkaArgs};

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

/// Event-time join of ad impressions → clicks → conversions with watermarks,
/// 1-minute rollups (ad-metrics, campaign-ctr) and SPIKE/DROP alerts.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Consumer group of the processor instances.
    #[arg(
        long,
        env = "ADSTREAM_PROCESSOR_GROUP",
        default_value = "adstream-processor"
    )]
    group_id: String,

    /// Partition watermark = highest event time seen minus this.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_out_of_orderness: Duration,
    /// How long after a window's end records may still count.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    allowed_lateness: Duration,
    /// A click matches an impression up to this long after it.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    click_window: Duration,
    /// A conversion matches a click up to this long after it.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    conversion_window: Duration,
    /// Tumbling window size.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// A caught-up partition silent this long stops holding the watermark back.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// How often one transaction commits outputs and input offsets.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    commit_interval: Duration,
    /// Stable name of this instance, unique in its group (its transactional
    /// id is `<group-id>-<instance-id>`). Give a restarted instance its old
    /// name: it then fences the open transaction of its previous incarnation
    /// at once. Default: $HOSTNAME, else "0".
    #[arg(long, env = "PROCESSOR_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Join the group as a static member (`group.instance.id` =
    /// `<group-id>-<instance-id>`, KIP-345): a restarted instance gets its
    /// partitions back without a rebalance. For instances restarted in place
    /// under a stable name (a StatefulSet). The cost: a stopped static member
    /// does not leave the group, so its partitions wait for
    /// `session.timeout.ms` before another instance takes them over; scale in
    /// without it, or lower the session timeout.
    #[arg(long, env = "PROCESSOR_STATIC_MEMBERSHIP")]
    static_membership: bool,
    /// Where task checkpoints are stored: s3://bucket/prefix (AWS_* variables
    /// configure S3), file:///dir, ... Every instance of a group must use
    /// the same store. Default: .adstream/processor-state under the working directory.
    #[arg(long, env = "PROCESSOR_STATE_URL")]
    state_url: Option<String>,
    /// How often each task's state is checkpointed; recovery replays at most
    /// this much input (plus one commit interval).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    checkpoint_interval: Duration,
    /// Exit (after a final commit) once every partition is caught up and idle.
    #[arg(long)]
    stop_when_idle: bool,
    /// Serve Prometheus metrics here (empty to disable).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: String,

    /// Anomalies: EWMA weight of the newest window in the baseline.
    #[arg(long, default_value_t = 0.03)]
    anomaly_alpha: f64,
    /// Anomalies: windows with enough volume before scoring.
    #[arg(long, default_value_t = 10)]
    anomaly_warmup_windows: u32,
    /// Anomalies: rate ratio the SPIKE CUSUM looks for.
    #[arg(long, default_value_t = 3.0)]
    anomaly_spike_ratio: f64,
    /// Anomalies: rate ratio the DROP CUSUM looks for.
    #[arg(long, default_value_t = 0.3)]
    anomaly_drop_ratio: f64,
    /// Anomalies: CUSUM level (log-likelihood ratio) that opens an episode.
    #[arg(long, default_value_t = 15.0)]
    anomaly_threshold: f64,
    /// Anomalies: minimum impressions in a window to score its CTR.
    #[arg(long, default_value_t = 50)]
    anomaly_min_impressions: i64,
    /// Anomalies: minimum clicks in a window to score its conversion rate.
    #[arg(long, default_value_t = 5)]
    anomaly_min_clicks: i64,
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let defaults = AnomalyConfig::default();
    let state_url = match args.state_url {
        Some(u) => u,
        None => {
            let dir = std::env::current_dir()
                .context("reading the working directory")?
                .join(".adstream/processor-state");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            format!("file://{}", dir.display())
        }
    };
    let opts = ProcessorOptions {
        bootstrap: args.kafka.bootstrap_servers,
        registry_url: args.kafka.schema_registry_url,
        overrides: args.kafka.rdkafka,
        topic_prefix: args.kafka.topic_prefix,
        group_id: args.group_id,
        engine: EngineConfig {
            max_out_of_orderness: ms(args.max_out_of_orderness),
            allowed_lateness: ms(args.allowed_lateness),
            click_window: ms(args.click_window),
            conversion_window: ms(args.conversion_window),
            window: ms(args.window).max(1),
            anomaly: AnomalyConfig {
                alpha: args.anomaly_alpha,
                warmup_windows: args.anomaly_warmup_windows,
                spike_ratio: args.anomaly_spike_ratio,
                drop_ratio: args.anomaly_drop_ratio,
                threshold: args.anomaly_threshold,
                min_impressions: args.anomaly_min_impressions,
                min_clicks: args.anomaly_min_clicks,
                ..defaults
            },
        },
        idle_timeout: args.idle_timeout,
        commit_interval: args.commit_interval,
        instance_id: args
            .instance_id
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "0".to_owned()),
        static_membership: args.static_membership,
        state_url,
        checkpoint_interval: args.checkpoint_interval,
        stop_when_idle: args.stop_when_idle,
    };
    let metrics = Arc::new(Metrics::new());
    if !args.metrics_addr.is_empty() {
        let addr: SocketAddr = args
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?} is not host:port", args.metrics_addr))?;
        let shared = metrics.clone();
        let bound = adstream_schemas::config::serve_metrics(addr, move || shared.render())
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let status = Status::default();
    run(&opts, &stop, &status, &metrics).context("processor stopped with an error")?;
    let s = status.snapshot();
    let t = s.stats.total();
    tracing::info!(
        input = t.input,
        counted = t.counted,
        late = t.late,
        duplicate = t.duplicate,
        unmatched = t.unmatched,
        dead_letter = t.dead_letter,
        commits = s.commits,
        "stopped cleanly"
    );
    Ok(())
}
