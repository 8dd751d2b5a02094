//! Prometheus metrics of the sink, rendered from the loaders' counters at
//! scrape time (the counters stay plain atomics the loaders and tests share).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

use crate::objects::ObjectStatus;
use crate::postgres::SinkStatus;

fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    registry.register(name, help, ConstCounter::new(value.load(Ordering::Relaxed)));
}

/// The metrics of whichever loaders run, as OpenMetrics text.
pub fn render(pg: Option<&SinkStatus>, s3: Option<&ObjectStatus>) -> String {
    let mut registry = Registry::with_prefix("adstream_sink");
    if let Some(pg) = pg {
        counter(
            &mut registry,
            "postgres_rows",
            "Rows upserted into PostgreSQL",
            &pg.rows_loaded,
        );
        counter(
            &mut registry,
            "postgres_batches",
            "Transactions committed",
            &pg.batches,
        );
        counter(
            &mut registry,
            "postgres_undecodable",
            "Result records sent to the dead-letter topic",
            &pg.undecodable,
        );
    }
    if let Some(s3) = s3 {
        counter(
            &mut registry,
            "storage_records",
            "Records stored in committed objects",
            &s3.records,
        );
        counter(
            &mut registry,
            "storage_invalid_records",
            "Undecodable records stored under raw-invalid/",
            &s3.invalid,
        );
        counter(
            &mut registry,
            "storage_objects",
            "Objects written",
            &s3.objects,
        );
        counter(
            &mut registry,
            "storage_bytes",
            "Bytes of objects written",
            &s3.bytes,
        );
        counter(
            &mut registry,
            "storage_segments",
            "Segments committed",
            &s3.segments,
        );
        counter(
            &mut registry,
            "storage_multipart_objects",
            "Objects uploaded in parts",
            &s3.multipart,
        );
        counter(
            &mut registry,
            "storage_cleaned_objects",
            "Objects of uncommitted segments deleted at start",
            &s3.cleaned,
        );
    }
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_counters_of_running_loaders() {
        let pg = SinkStatus::default();
        pg.rows_loaded.store(42, Ordering::Relaxed);
        let text = render(Some(&pg), None);
        assert!(
            text.contains("adstream_sink_postgres_rows_total 42"),
            "{text}"
        );
        assert!(!text.contains("storage"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
