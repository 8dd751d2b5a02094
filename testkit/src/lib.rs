//! Helpers shared by adstream's integration tests.
//!
//! Tests run against the real local stack (`scripts/stack.sh up`, which
//! `make test` runs first). [`Stack::from_env`] reads its addresses from the
//! environment and fails loudly when they are missing, so a test never passes
//! by silently skipping. Each test works under its own [`unique_prefix`], so
//! tests neither collide with each other nor with earlier runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Addresses of the local stack's services.
#[derive(Debug, Clone)]
pub struct Stack {
    pub bootstrap: String,
    pub registry_url: String,
}

impl Stack {
    /// Reads `KAFKA_BOOTSTRAP_SERVERS` and `SCHEMA_REGISTRY_URL`; panics with
    /// instructions when they are not set.
    pub fn from_env() -> Stack {
        let get = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!(
                    "{k} is not set: start the local stack with `scripts/stack.sh up` and \
                     `eval \"$(scripts/stack.sh env)\"`, or run `make test`"
                )
            })
        };
        Stack {
            bootstrap: get("KAFKA_BOOTSTRAP_SERVERS"),
            registry_url: get("SCHEMA_REGISTRY_URL"),
        }
    }

    /// Creates every adstream topic under `prefix`.
    pub async fn create_topics(&self, prefix: &str, partitions: i32) {
        let admin = adstream_admin::admin_client(&self.bootstrap, &[]).expect("admin client");
        adstream_admin::create_topics(&admin, prefix, partitions, 1, true)
            .await
            .expect("create topics");
    }
}

/// A topic prefix no other test or run uses, e.g. `t-1732612345123-4711-roundtrip.`.
pub fn unique_prefix(test: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("t-{ms}-{}-{test}.", std::process::id())
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The Kafka record timestamp (ms), when it has one.
    pub timestamp: Option<i64>,
}

/// Reads every record of `topics` from the beginning with `read_committed`,
/// until `expected` records have arrived or nothing new came for `idle`
/// (then it returns what it has; callers compare counts).
pub fn read_all(
    bootstrap: &str,
    topics: &[String],
    expected: Option<usize>,
    idle: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("testkit-{}", unique_prefix("reader")))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md
        .topics()
        .iter()
        .filter(|t| topics.iter().any(|n| n == t.name()))
    {
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)
                .expect("add partition");
        }
    }
    assert!(tpl.count() > 0, "none of {topics:?} exist");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    while last_new.elapsed() < idle && expected.is_none_or(|n| out.len() < n) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_new = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_owned(),
                                    x.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => panic!("consume error: {e}"),
            None => {}
        }
    }
    out
}

/// Groups records by (topic, partition), each group in offset order.
pub fn by_partition(records: Vec<Consumed>) -> BTreeMap<(String, i32), Vec<Consumed>> {
    let mut map: BTreeMap<(String, i32), Vec<Consumed>> = BTreeMap::new();
    for r in records {
        map.entry((r.topic.clone(), r.partition))
            .or_default()
            .push(r);
    }
    for v in map.values_mut() {
        v.sort_by_key(|r| r.offset);
    }
    map
}
