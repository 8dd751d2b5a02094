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

use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{self, Status};
use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{RunOptions, Target};

/// Events per second of event time: with `rate` events/s of wall time,
/// a 1-minute window closes every `60 * EVENT_RATE / rate` seconds.
const EVENT_RATE: f64 = 300.0;

pub struct LatencyFigures {
    pub p99_ms: f64,
    pub p50_ms: f64,
    pub windows: usize,
    pub events: u64,
    pub rate: f64,
    pub event_rate: f64,
}

pub fn bench(
    kafka: &adstream_schemas::config::KafkaArgs,
    prefix: &str,
    partitions: i32,
    events: u64,
    rate: f64,
) -> anyhow::Result<LatencyFigures> {
    crate::create_topics(kafka, prefix, partitions)?;
    let opts = crate::processor_options(kafka, prefix, Duration::from_secs(2));
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
                        event_rate: EVENT_RATE,
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
    l.sort_unstable();
    let (Some(p99_ms), Some(p50_ms)) = (crate::quantile(&l, 0.99), crate::quantile(&l, 0.5)) else {
        anyhow::bail!("no window was emitted in the live run");
    };
    Ok(LatencyFigures {
        p99_ms,
        p50_ms,
        windows: l.len(),
        events,
        rate,
        event_rate: EVENT_RATE,
    })
}
