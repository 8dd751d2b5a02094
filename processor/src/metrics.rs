//! Prometheus metrics of the processor, served as text on `--metrics-addr`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::{EngineStats, TopicStats};

type Labels = Vec<(String, String)>;

/// The processor's metrics.
pub struct Metrics {
    registry: Registry,
    records: Family<Labels, Counter>,
    outputs: Family<Labels, Counter>,
    watermark: Gauge,
    state: Family<Labels, Gauge>,
    commits: Counter,
    consumer_errors: Counter,
    emit_latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// Emit latencies (ms) for benchmarks, and whether an idle mark closed
    /// the window; the last `LATENCY_SAMPLES`.
    latency_samples: Mutex<std::collections::VecDeque<(u64, bool)>>,
    last: Mutex<EngineStats>,
}

const LATENCY_SAMPLES: usize = 100_000;

const TOPICS: [&str; 3] = ["ad-impressions", "ad-clicks", "ad-conversions"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("adstream_processor");
        let records = Family::<Labels, Counter>::default();
        let outputs = Family::<Labels, Counter>::default();
        let watermark = Gauge::default();
        let state = Family::<Labels, Gauge>::default();
        let commits = Counter::default();
        let consumer_errors = Counter::default();
        registry.register(
            "input_records",
            "Input records by topic and outcome (counted, late, duplicate, unmatched, dead_letter)",
            records.clone(),
        );
        registry.register(
            "output_records",
            "Records written by output kind",
            outputs.clone(),
        );
        registry.register(
            "watermark_ms",
            "Processor watermark (event time, epoch ms)",
            watermark.clone(),
        );
        registry.register(
            "state_entries",
            "Entries held in join and window state",
            state.clone(),
        );
        registry.register(
            "commits",
            "Offset commits after acknowledged outputs",
            commits.clone(),
        );
        registry.register(
            "consumer_errors",
            "Errors the Kafka consumer reported and recovered from (lost connections, timeouts)",
            consumer_errors.clone(),
        );
        let emit_latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            });
        registry.register(
            "emit_latency_seconds",
            "From the watermark passing a window (its last join task's mark) to the commit of its rollup, by what moved the watermark: event_time (input records) or idle (input stopped for --idle-timeout)",
            emit_latency.clone(),
        );
        Metrics {
            registry,
            emit_latency,
            latency_samples: Mutex::new(std::collections::VecDeque::new()),
            records,
            outputs,
            watermark,
            state,
            commits,
            consumer_errors,
            last: Mutex::new(EngineStats::default()),
        }
    }

    fn label(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Brings the counters up to `stats` (they only grow).
    pub fn update(&self, stats: &EngineStats, watermark: i64, sizes: &[(&str, usize)]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for (i, topic) in TOPICS.iter().enumerate() {
            let (now, before): (&TopicStats, &TopicStats) = (&stats.by_topic[i], &last.by_topic[i]);
            for (outcome, n, b) in [
                ("counted", now.counted, before.counted),
                ("late", now.late, before.late),
                ("duplicate", now.duplicate, before.duplicate),
                ("unmatched", now.unmatched, before.unmatched),
                ("dead_letter", now.dead_letter, before.dead_letter),
            ] {
                if n > b {
                    self.records
                        .get_or_create(&Self::label(&[("topic", topic), ("outcome", outcome)]))
                        .inc_by(n - b);
                }
            }
        }
        for (kind, n, b) in [
            ("ad_metric", stats.ad_metric_rows, last.ad_metric_rows),
            ("campaign_ctr", stats.campaign_rows, last.campaign_rows),
            ("alert", stats.alerts, last.alerts),
        ] {
            if n > b {
                self.outputs
                    .get_or_create(&Self::label(&[("kind", kind)]))
                    .inc_by(n - b);
            }
        }
        *last = stats.clone();
        if watermark > i64::MIN {
            self.watermark.set(watermark);
        }
        for (what, n) in sizes {
            self.state
                .get_or_create(&Self::label(&[("state", what)]))
                .set(*n as i64);
        }
    }

    pub fn committed(&self) {
        self.commits.inc();
    }

    pub fn consumer_error(&self) {
        self.consumer_errors.inc();
    }

    /// Records one window's emit latency; `idle`: an idle task's mark
    /// closed it.
    pub fn emit_latency_ms(&self, ms: u64, idle: bool) {
        let cause = if idle { "idle" } else { "event_time" };
        self.emit_latency
            .get_or_create(&vec![("closed_by".to_owned(), cause.to_owned())])
            .observe(ms as f64 / 1000.0);
        let mut s = self
            .latency_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.len() == LATENCY_SAMPLES {
            s.pop_front();
        }
        s.push_back((ms, idle));
    }

    /// The recorded emit latencies (ms) of windows that event time closed,
    /// oldest first.
    pub fn emit_latencies_ms(&self) -> Vec<u64> {
        self.latency_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, idle)| !idle)
            .map(|(ms, _)| *ms)
            .collect()
    }

    /// How many of the recorded windows idle marks closed.
    pub fn idle_closes(&self) -> usize {
        self.latency_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, idle)| *idle)
            .count()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn emit_latency_is_filed_by_what_closed_the_window() {
        let m = Metrics::new();
        m.emit_latency_ms(120, false);
        m.emit_latency_ms(2_400, true);
        m.emit_latency_ms(90, false);
        assert_eq!(m.emit_latencies_ms(), vec![120, 90]);
        assert_eq!(m.idle_closes(), 1);
        let text = m.render();
        for cause in ["event_time", "idle"] {
            let count = format!(
                "adstream_processor_emit_latency_seconds_count{{closed_by=\"{cause}\"}} {}",
                if cause == "idle" { 1 } else { 2 }
            );
            assert!(text.contains(&count), "{count} not in:\n{text}");
        }
    }
}
