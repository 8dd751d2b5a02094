//! `emit_latency_p99_ms`: the processor live, not reading a backlog.
//!
//! The producer starts once the processor holds its partitions and sends at
//! a steady `rate` (events/s of wall time) that the processor keeps up with.
//! Event time runs faster than wall time (the generator's `event_rate` is
//! lower than `rate`), so a 1-minute window closes about every second and a
//! short run has many windows. Each window's latency is the processor's own
//! histogram sample: from the mark of the last join task whose watermark
//! passed the window's end to the commit of the transaction holding its
//! rollup. There is one sample per window and rollup task (partials
//! partition), as each rollup task closes its share of a window. Windows
//! closed when the input ends (below) are left out.

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
    /// Window closes measured (one per window and rollup task).
    pub windows: usize,
    /// Closes at the end of the input, left out.
    pub end_of_input: usize,
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
    let idle_timeout = Duration::from_secs(2);
    let opts = crate::processor_options(kafka, prefix, idle_timeout);
    let stop = AtomicBool::new(false);
    let status = Arc::new(Status::default());
    let metrics = Metrics::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let worker = s.spawn(|| runtime::run(&opts, &stop, &status, &metrics));
        // The producer starts once the processor holds every task, so the
        // first records are read as they arrive. Started earlier, it left
        // the processor a backlog of a few seconds (the group join) to catch
        // up on, and the windows closed meanwhile (some 5 % of the samples)
        // measured that catch-up, not the live pipeline. Empty topics do not
        // stop the processor: it stops when idle only after its watermark
        // has moved.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let holds_tasks = loop {
            let st = status.snapshot();
            if st.join_tasks == partitions as usize && st.rollup_tasks == partitions as usize {
                break true;
            }
            if worker.is_finished() || std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let produced = if holds_tasks {
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
            .map(drop)
        } else {
            Err(anyhow::anyhow!(
                "the processor did not take its partitions within 120 s"
            ))
        };
        if produced.is_err() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // The processor's own error first: a processor that failed early is
        // also why it never took its partitions.
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("processor thread panicked"))??;
        produced?;
        Ok(())
    })?;
    // When the input ends, every partition turns idle after the idle
    // timeout and the watermark jumps to the newest event time, closing at
    // once the windows that only delayed clicks and conversions opened:
    // about two thirds of all closes in this run. Idle marks close them, so
    // the processor files them apart (`closed_by="idle"`); they measure the
    // idle timeout, not the live pipeline, and are left out.
    let mut l = metrics.emit_latencies_ms();
    l.sort_unstable();
    let (Some(p99_ms), Some(p50_ms)) = (crate::quantile(&l, 0.99), crate::quantile(&l, 0.5)) else {
        anyhow::bail!("no window was emitted in the live run");
    };
    Ok(LatencyFigures {
        p99_ms,
        p50_ms,
        windows: l.len(),
        end_of_input: metrics.idle_closes(),
        events,
        rate,
        event_rate: EVENT_RATE,
    })
}
