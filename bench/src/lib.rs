//! Benchmark pieces that talk to services (see `main.rs` for the figures).

pub mod pg;

/// Deletes every topic under `prefix` once a phase is done: the local broker
/// keeps topics in memory and slows down as they pile up (measured: commits
/// 11 ms on a fresh broker, 100-150 ms after a few phases had left GBs
/// behind), which would make the phases' figures depend on their order.
/// A failure is reported, not fatal: the figures are already taken.
pub fn delete_topics(kafka: &adstream_schemas::config::KafkaArgs, prefix: &str) {
    let result = (|| -> anyhow::Result<usize> {
        let admin = adstream_admin::admin_client(&kafka.bootstrap_servers, &kafka.rdkafka)?;
        let metadata = admin
            .inner()
            .fetch_metadata(None, std::time::Duration::from_secs(10))?;
        let names: Vec<&str> = metadata
            .topics()
            .iter()
            .map(|t| t.name())
            // Quix Streams names its changelog and repartition topics after
            // the peer run's consumer group (peer-quix-<id>), not our prefix.
            .filter(|n| n.starts_with(prefix) || n.contains("peer-quix-"))
            .collect();
        if !names.is_empty() {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(admin.delete_topics(&names, &rdkafka::admin::AdminOptions::new()))?;
        }
        Ok(names.len())
    })();
    if let Err(e) = result {
        eprintln!("warning: could not delete the topics under {prefix}: {e:#}");
    }
}
