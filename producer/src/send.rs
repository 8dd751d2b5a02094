//! Sends encoded records to Kafka with an idempotent producer and counts acknowledgements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::generator::InputTopic;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot create the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("cannot read metadata of topic {topic}: {source}")]
    Metadata { topic: String, source: KafkaError },
    #[error("topic {topic} does not exist (create it with topics.sh)")]
    MissingTopic { topic: String },
    #[error(
        "input topics are not co-partitioned: {counts}; CONTRACT.md requires equal partition counts"
    )]
    NotCoPartitioned { counts: String },
    #[error("send to {topic}/{partition} failed: {source}")]
    Send {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("{failed} of {total} records were not acknowledged; first error: {first}")]
    Undelivered {
        failed: u64,
        total: u64,
        first: String,
    },
    #[error("flush did not finish: {0}")]
    Flush(KafkaError),
}

/// Counts acknowledgements from the broker.
#[derive(Default)]
pub struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// An idempotent producer bound to the three input topics.
pub struct KafkaSender {
    producer: ThreadedProducer<DeliveryCounter>,
    topics: [String; 3],
    partitions: i32,
    sent: u64,
}

impl KafkaSender {
    /// Connects and checks that the three topics exist with equal partition counts.
    pub fn connect(
        bootstrap: &str,
        overrides: &[(String, String)],
        topics: [String; 3],
    ) -> Result<Self, SendError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "120000");
        for (k, v) in overrides {
            config.set(k, v);
        }
        let producer: ThreadedProducer<DeliveryCounter> = config
            .create_with_context(DeliveryCounter::default())
            .map_err(SendError::Create)?;
        let mut counts = Vec::new();
        for topic in &topics {
            let md = producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(15))
                .map_err(|source| SendError::Metadata {
                    topic: topic.clone(),
                    source,
                })?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len() as i32)
                .filter(|n| *n > 0)
                .ok_or_else(|| SendError::MissingTopic {
                    topic: topic.clone(),
                })?;
            counts.push((topic.clone(), n));
        }
        if counts.iter().any(|(_, n)| *n != counts[0].1) {
            let counts = counts
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SendError::NotCoPartitioned { counts });
        }
        Ok(KafkaSender {
            partitions: counts[0].1,
            producer,
            topics,
            sent: 0,
        })
    }

    /// Partition count shared by the three input topics.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Enqueues one record, waiting while librdkafka's queue is full.
    pub fn send(
        &mut self,
        topic: InputTopic,
        partition: i32,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), SendError> {
        let name = &self.topics[topic.index()];
        let mut record = BaseRecord::to(name)
            .partition(partition)
            .key(key)
            .payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((source, _)) => {
                    return Err(SendError::Send {
                        topic: name.clone(),
                        partition,
                        source,
                    })
                }
            }
        }
    }

    fn counter(&self) -> &Arc<DeliveryCounter> {
        self.producer.context()
    }

    /// Records acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.counter().delivered.load(Ordering::Relaxed)
    }

    /// Waits for every record to be acknowledged; fails if any was not.
    pub fn finish(self, timeout: Duration) -> Result<u64, SendError> {
        self.producer.flush(timeout).map_err(SendError::Flush)?;
        let failed = self.counter().failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .counter()
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(SendError::Undelivered {
                failed,
                total: self.sent,
                first,
            });
        }
        Ok(self.delivered())
    }
}
