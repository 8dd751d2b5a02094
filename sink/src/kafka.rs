//! Kafka plumbing both loaders share: the consumer they read with, how they
//! take the next record, and the partitions of the topics they assign
//! themselves.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;

use adstream_admin::consumer_errors::consumer_error_is_fatal;

/// A consumer that reads committed records only and never commits or stores
/// offsets by itself (each loader keeps its positions its own way).
pub fn consumer(
    bootstrap: &str,
    group: &str,
    overrides: &[(String, String)],
) -> Result<StreamConsumer, KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        // librdkafka postpones the next fetch of a partition by this much
        // (default 1 s) once its local queue is full; a loader drains its
        // queue in milliseconds, so the default stalled it (measured: 400-500
        // ms gaps, 110 k rows/s against 150 k with 10 ms).
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in overrides {
        cc.set(k, v);
    }
    cc.create()
}

/// The partition ids of `topic`, or `None` when the topic does not exist.
pub fn partitions(consumer: &StreamConsumer, topic: &str) -> Result<Option<Vec<i32>>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(15))?;
    Ok(md
        .topics()
        .iter()
        .find(|m| m.name() == topic && m.error().is_none() && !m.partitions().is_empty())
        .map(|m| m.partitions().iter().map(|p| p.id()).collect()))
}

/// The next record, or `None` when none came within `wait` or the consumer
/// reported an error librdkafka recovers from by itself (logged; see
/// `consumer_error_is_fatal`). Only a fatal error is returned.
pub async fn next_record(
    consumer: &StreamConsumer,
    wait: Duration,
) -> Result<Option<BorrowedMessage<'_>>, KafkaError> {
    match tokio::time::timeout(wait, consumer.recv()).await {
        Err(_) => Ok(None),
        Ok(Ok(msg)) => Ok(Some(msg)),
        Ok(Err(e)) if !consumer_error_is_fatal(&e) => {
            tracing::warn!(error = %e, "Kafka consumer error; librdkafka recovers from it");
            Ok(None)
        }
        Ok(Err(e)) => Err(e),
    }
}
