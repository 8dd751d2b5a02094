//! `adstream-admin`: creates and describes adstream's topics through
//! librdkafka's AdminClient, so no Java tooling is needed. Works against any
//! Kafka-protocol broker (Apache Kafka, the local tansu).
//!
//! `create-topics` is idempotent: a topic that already exists is left alone,
//! but a partition count that differs from the one asked for is reported,
//! because CONTRACT.md requires the three input topics to be co-partitioned.

pub mod consumer_errors;
pub mod resume;
pub mod store;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use adstream_schemas::topics;

/// Internal topics of the processor: per-partition partial aggregates with
/// in-band watermarks (repartitioned by grain), and its state changelog.
pub const INTERNAL_TOPICS: [(&str, &[(&str, &str)]); 2] = [
    (
        "adstream-processor-partials",
        &[("cleanup.policy", "delete")],
    ),
    ("adstream-processor-state", &[("cleanup.policy", "compact")]),
];

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the Kafka admin client: {0}")]
    Client(KafkaError),
    #[error("CreateTopics request failed: {0}")]
    Request(KafkaError),
    #[error("cannot fetch cluster metadata: {0}")]
    Metadata(KafkaError),
    #[error("could not create topics: {0}")]
    Create(String),
    #[error("topics exist with a partition count other than {wanted}: {found} (delete them or pass --partitions to match)")]
    PartitionMismatch { wanted: i32, found: String },
    #[error("--partitions and --replication-factor must be at least 1")]
    BadArguments,
}

/// Every adstream topic under `prefix`, with its creation settings.
pub fn all_topics(
    prefix: &str,
    internal: bool,
) -> Vec<(String, Vec<(&'static str, &'static str)>)> {
    let mut out: Vec<_> = topics::contract_topics()
        .map(|t| (format!("{prefix}{t}"), Vec::new()))
        .collect();
    if internal {
        out.extend(
            INTERNAL_TOPICS
                .iter()
                .map(|(t, cfg)| (format!("{prefix}{t}"), cfg.to_vec())),
        );
    }
    out
}

/// An admin client for `bootstrap` with librdkafka overrides.
pub fn admin_client(
    bootstrap: &str,
    overrides: &[(String, String)],
) -> Result<AdminClient<DefaultClientContext>, AdminError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in overrides {
        config.set(k, v);
    }
    config.create().map_err(AdminError::Client)
}

/// Partition count of each named topic (`None` if it does not exist).
pub fn partition_counts(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<Vec<(String, Option<usize>)>, AdminError> {
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(AdminError::Metadata)?;
    Ok(names
        .iter()
        .map(|n| {
            let count = md
                .topics()
                .iter()
                .find(|t| t.name() == n && t.error().is_none())
                .map(|t| t.partitions().len());
            (n.clone(), count)
        })
        .collect())
}

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created(String),
    Exists(String),
}

/// Creates every adstream topic under `prefix` (idempotent) and checks partition counts.
pub async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    prefix: &str,
    partitions: i32,
    replication_factor: i32,
    internal: bool,
) -> Result<Vec<Outcome>, AdminError> {
    if partitions < 1 || replication_factor < 1 {
        return Err(AdminError::BadArguments);
    }
    let wanted = all_topics(prefix, internal);
    let new: Vec<NewTopic> = wanted
        .iter()
        .map(|(name, cfg)| {
            cfg.iter().fold(
                NewTopic::new(
                    name,
                    partitions,
                    TopicReplication::Fixed(replication_factor),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(AdminError::Request)?;
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(name) => outcomes.push(Outcome::Created(name)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                outcomes.push(Outcome::Exists(name))
            }
            Err((name, code)) => failed.push(format!("{name}: {code}")),
        }
    }
    if !failed.is_empty() {
        return Err(AdminError::Create(failed.join("; ")));
    }
    let names: Vec<String> = wanted.into_iter().map(|(n, _)| n).collect();
    // Metadata can lag creation by a moment on some brokers.
    let mut mismatched = Vec::new();
    for attempt in 0..20 {
        mismatched.clear();
        for (name, count) in partition_counts(admin, &names)? {
            match count {
                Some(c) if c as i32 == partitions => {}
                Some(c) => mismatched.push(format!("{name} has {c}")),
                None => mismatched.push(format!("{name} is missing after creation")),
            }
        }
        if mismatched
            .iter()
            .all(|m| !m.ends_with("missing after creation"))
            || attempt == 19
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !mismatched.is_empty() {
        return Err(AdminError::PartitionMismatch {
            wanted: partitions,
            found: mismatched.join(", "),
        });
    }
    Ok(outcomes)
}

/// Decodes `payload` by the contract topic it came from, as JSON.
async fn decode_json(
    codec: &adstream_schemas::Codec,
    contract_topic: &str,
    payload: &[u8],
) -> Result<serde_json::Value, adstream_schemas::CodecError> {
    use adstream_schemas::*;
    async fn typed<T: AvroRecord>(
        codec: &Codec,
        payload: &[u8],
    ) -> Result<serde_json::Value, CodecError> {
        let v: T = codec.decode(payload).await?;
        Ok(serde_json::to_value(v).unwrap_or_default())
    }
    match contract_topic {
        topics::IMPRESSIONS => typed::<Impression>(codec, payload).await,
        topics::CLICKS => typed::<Click>(codec, payload).await,
        topics::CONVERSIONS => typed::<Conversion>(codec, payload).await,
        topics::AD_METRICS => typed::<AdMetric>(codec, payload).await,
        topics::CAMPAIGN_CTR => typed::<CampaignCtr>(codec, payload).await,
        topics::ANOMALY_ALERTS => typed::<AnomalyAlert>(codec, payload).await,
        _ => Ok(serde_json::Value::String(
            String::from_utf8_lossy(payload).into_owned(),
        )),
    }
}

/// Reads up to `count` records of `topic` from the beginning (read_committed)
/// and renders each as one JSON line: partition, offset, key, headers, value.
pub async fn peek(
    bootstrap: &str,
    overrides: &[(String, String)],
    topic: &str,
    contract_topic: &str,
    count: usize,
    codec: &adstream_schemas::Codec,
) -> Result<Vec<String>, AdminError> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "adstream-admin-peek")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    for (k, v) in overrides {
        config.set(k, v);
    }
    let consumer: StreamConsumer = config.create().map_err(AdminError::Client)?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(AdminError::Metadata)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .map_err(AdminError::Metadata)?;
        }
    }
    consumer.assign(&tpl).map_err(AdminError::Metadata)?;
    let mut out = Vec::new();
    while out.len() < count {
        let msg = match tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(AdminError::Metadata(e)),
            Err(_) => break,
        };
        let value = match msg.payload() {
            Some(p) => decode_json(codec, contract_topic, p)
                .await
                .unwrap_or_else(|e| serde_json::json!({ "undecodable": e.to_string() })),
            None => serde_json::Value::Null,
        };
        let headers: serde_json::Map<String, serde_json::Value> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_owned(),
                            serde_json::Value::String(
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(
            serde_json::json!({
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                "headers": headers,
                "value": value,
            })
            .to_string(),
        );
    }
    Ok(out)
}
