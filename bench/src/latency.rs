//! `emit_latency_p99_ms`: the processor live, not reading a backlog.
//!
//! The producer sends at a steady `rate` (events/s of wall time) while the
//! processor keeps up; event time runs faster than wall time (the
//! generator's `event_rate` is lower than `rate`), so a 1-minute window closes
//! about every second and a short run has many windows. Each window's
//! latency is the processor's own histogram sample: from the mark of the
//! last join task whose watermark passed the window's end to the commit of
//! the transaction holding its rollup.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{self, ProcessorOptions, Status};
use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{RunOptions, Target};

pub struct LatencyFigures {
    pub p99_ms: f64,
    pub p50_ms: f64,
    pub windows: usize,
    pub events: u64,
    pub rate: f64,
}

pub fn bench(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    partitions: i32,
    events: u64,
    rate: f64,
) -> anyhow::Result<LatencyFigures> {
    let admin = adstream_admin::admin_client(&kafka.bootstrap_servers, &kafka.rdkafka)?;
    crate::rt()?.block_on(adstream_admin::create_topics(
        &admin, prefix, partitions, 1, true,
    ))?;
    let opts = ProcessorOptions {
        bootstrap: kafka.bootstrap_servers.clone(),
        registry_url: kafka.schema_registry_url.clone(),
        overrides: {
            let mut o = kafka.rdkafka.clone();
            o.push(("session.timeout.ms".into(), "6000".into()));
            o
        },
        topic_prefix: prefix.to_owned(),
        group_id: format!("{prefix}processor"),
        engine: EngineConfig::default(),
        idle_timeout: Duration::from_secs(2),
        commit_interval: Duration::from_secs(1),
        instance_id: "0".into(),
        state_url: format!(
            "file://{}",
            std::env::temp_dir().join("adstream-state").display()
        ),
        checkpoint_interval: Duration::from_secs(10),
        stop_when_idle: true,
    };
    let stop = AtomicBool::new(false);
    let status = Arc::new(Status::default());
    let metrics = Metrics::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        // Input first: with empty topics the processor would find every
        // partition idle and stop (--stop-when-idle) before it began.
        let producer = s.spawn(|| {
            adstream_producer::run(
                RunOptions {
                    generator: GeneratorConfig {
                        seed: 31,
                        event_rate: 300.0,
                        ..Default::default()
                    },
                    events: Some(events),
                    duration: None,
                    rate: Some(rate),
                    target: Target::Kafka {
                        bootstrap: kafka.bootstrap_servers.clone(),
                        registry_url: kafka.schema_registry_url.clone(),
                        overrides: kafka.rdkafka.clone(),
                        topic_prefix: prefix.to_owned(),
                    },
                    record: None,
                    episodes_out: None,
                    progress_every: Duration::from_secs(3600),
                },
                &AtomicBool::new(false),
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        let worker = s.spawn(|| runtime::run(&opts, &stop, &status, &metrics));
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("processor thread panicked"))??;
        Ok(())
    })?;
    let mut l = metrics.emit_latencies_ms();
    anyhow::ensure!(!l.is_empty(), "no window was emitted in the live run");
    l.sort_unstable();
    let at = |q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1] as f64;
    Ok(LatencyFigures {
        p99_ms: at(0.99),
        p50_ms: at(0.5),
        windows: l.len(),
        events,
        rate,
    })
}
