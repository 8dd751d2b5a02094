//! Helpers shared by the sink's integration tests (local stack: Kafka,
//! registry, PostgreSQL, moto S3): fresh databases, producing seeded events,
//! reading back what PostgreSQL and object storage hold.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{run as run_producer, RunOptions, Target};
use adstream_schemas::{AdMetric, CampaignCtr};
use adstream_testkit::{read_all, Consumed, Stack};
use tokio_postgres::{Client, NoTls};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL is not set: start the local stack (`scripts/stack.sh up`) or run `make test`")
    })
}

/// A fresh database named after `name` (with TimescaleDB when installed); returns its URL.
pub async fn fresh_database(name: &str) -> String {
    let admin_url = database_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let db = name.replace(['.', '-'], "_").to_lowercase();
    for statement in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .expect("create database");
    }
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("DATABASE_URL {admin_url} has no database part"),
    };
    let client = connect(&url).await;
    let available = client
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .expect("query");
    if available.is_some() {
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .await
            .expect("create extension");
    }
    url
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// The parts of the oracle's output compared here.
#[derive(serde::Deserialize)]
pub struct OracleOut {
    pub ad_metrics: Vec<AdMetric>,
    pub campaign_ctr: Vec<CampaignCtr>,
}

pub fn ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

pub fn object_store_url(prefix: &str) -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: start the local stack (`scripts/stack.sh up`) or run `make test`")
    });
    assert!(!endpoint.is_empty());
    format!("s3://adstream/{}", prefix.trim_end_matches('.'))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sends `events` generated events to the input topics under `prefix`,
/// recording them to `record` when given.
pub fn produce(
    stack: &Stack,
    prefix: &str,
    generator: GeneratorConfig,
    events: u64,
    record: Option<std::path::PathBuf>,
) {
    run_producer(
        RunOptions {
            generator,
            events: Some(events),
            duration: None,
            rate: None,
            target: Target::Kafka {
                bootstrap: stack.bootstrap.clone(),
                registry_url: stack.registry_url.clone(),
                overrides: Vec::new(),
                topic_prefix: prefix.to_owned(),
            },
            record,
            episodes_out: None,
            progress_every: Duration::from_secs(3600),
        },
        &AtomicBool::new(false),
    )
    .expect("producer");
}

/// Every record of the input and result topics under `prefix` (what storage
/// must hold), keyed by (contract topic name, partition, offset).
pub fn stored_topics(stack: &Stack, prefix: &str) -> HashMap<(String, i32, i64), Consumed> {
    let names: Vec<String> = adstream_schemas::topics::INPUTS
        .iter()
        .chain(&adstream_schemas::topics::RESULTS)
        .map(|t| format!("{prefix}{t}"))
        .collect();
    read_all(&stack.bootstrap, &names, None, Duration::from_secs(3))
        .into_iter()
        .map(|c| {
            let contract = c.topic.strip_prefix(prefix).expect("prefixed").to_owned();
            ((contract, c.partition, c.offset), c)
        })
        .collect()
}

/// Hive folder `dt=…/hour=…` of a time in ms.
pub fn hive(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time in range")
        .format("dt=%Y-%m-%d/hour=%H")
        .to_string()
}

pub fn field<'a>(v: &'a apache_avro::types::Value, name: &str) -> &'a apache_avro::types::Value {
    match v {
        apache_avro::types::Value::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("field {name}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

pub fn long(v: &apache_avro::types::Value) -> i64 {
    match v {
        apache_avro::types::Value::Long(x) | apache_avro::types::Value::TimestampMillis(x) => *x,
        apache_avro::types::Value::Int(x) => i64::from(*x),
        apache_avro::types::Value::Union(_, inner) => long(inner),
        other => panic!("not a long: {other:?}"),
    }
}

pub fn bytes_of(v: &apache_avro::types::Value) -> Option<Vec<u8>> {
    match v {
        apache_avro::types::Value::Bytes(b) => Some(b.clone()),
        apache_avro::types::Value::Null => None,
        apache_avro::types::Value::Union(_, inner) => bytes_of(inner),
        other => panic!("not bytes: {other:?}"),
    }
}

/// Reads every object under the store URL with apache-avro and checks it
/// against `kafka` (every record of the six topics, keyed by contract topic
/// name): each (topic, partition, offset) exactly once, in a folder of its
/// area and hour, equal to the Kafka record. Returns (objects, records).
pub fn check_storage(
    rt: &tokio::runtime::Runtime,
    store_url: &str,
    kafka: &HashMap<(String, i32, i64), Consumed>,
) -> (usize, usize) {
    use futures_util::TryStreamExt as _;
    use object_store::ObjectStoreExt as _;
    let (store, root) = adstream_sink::objects::open_store(store_url).expect("store");
    let listed: Vec<object_store::ObjectMeta> = rt
        .block_on(store.list(Some(&root)).try_collect())
        .expect("list objects");
    let root_text = format!("{root}/");
    let mut seen: HashSet<(String, i32, i64)> = HashSet::new();
    let mut objects = 0;
    for meta in listed {
        let location = meta.location.to_string();
        let rel = location.strip_prefix(&root_text).expect("under the root");
        if rel.starts_with("_sink/") {
            continue;
        }
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(parts.len(), 5, "{rel}: area/topic/dt=/hour=/name");
        let (area, topic, folder) = (parts[0], parts[1], format!("{}/{}", parts[2], parts[3]));
        let bytes = rt
            .block_on(async { store.get(&meta.location).await?.bytes().await })
            .expect("read object");
        let reader = apache_avro::Reader::new(&bytes[..]).expect("an Avro object container file");
        let meta_of = |k: &str| -> Vec<u8> {
            reader
                .user_metadata()
                .get(k)
                .unwrap_or_else(|| panic!("{rel}: metadata {k}"))
                .clone()
        };
        assert_eq!(meta_of("adstream.topic"), topic.as_bytes(), "{rel}");
        let partition: i32 = String::from_utf8(meta_of("adstream.partition"))
            .expect("utf8")
            .parse()
            .expect("partition");
        let first: i64 = String::from_utf8(meta_of("adstream.first_offset"))
            .expect("utf8")
            .parse()
            .expect("first offset");
        let offsets = adstream_sink::ocf::decode_offsets(first, &meta_of("adstream.offsets"))
            .expect("offsets decode");
        let name = parts[4];
        assert!(
            name.starts_with(&format!(
                "{topic}-p{partition:04}-{first:019}-{:019}",
                offsets.last().expect("a file holds records")
            )),
            "{rel}: named from topic, partition, first and last offset"
        );
        let writer = reader.writer_schema().clone();
        let values: Vec<apache_avro::types::Value> =
            reader.map(|v| v.expect("record decodes")).collect();
        assert_eq!(values.len(), offsets.len(), "{rel}: one offset per record");
        for (value, offset) in values.iter().zip(&offsets) {
            let key = (topic.to_owned(), partition, *offset);
            assert!(seen.insert(key.clone()), "{key:?} stored twice");
            let record = kafka
                .get(&key)
                .unwrap_or_else(|| panic!("{rel}: {key:?} is not a Kafka record"));
            match area {
                "raw" | "metrics" => {
                    let payload = record.value.as_deref().expect("a valid record has a value");
                    let id = u32::from_be_bytes(payload[1..5].try_into().expect("frame"));
                    assert!(
                        name.ends_with(&format!("-s{id}.avro")),
                        "{rel}: schema id {id}"
                    );
                    let want = apache_avro::reader::datum::GenericDatumReader::builder(&writer)
                        .build()
                        .and_then(|r| r.read_value(&mut &payload[5..]))
                        .expect("Kafka body decodes");
                    assert_eq!(value, &want, "{key:?}: stored record equals Kafka's");
                    let time = if area == "raw" {
                        "event_time"
                    } else {
                        "window_start"
                    };
                    assert_eq!(
                        hive(long(field(value, time))),
                        folder,
                        "{key:?}: event hour"
                    );
                    let is_input = adstream_schemas::topics::INPUTS.contains(&topic);
                    assert_eq!(area == "raw", is_input, "{rel}: area of {topic}");
                }
                "raw-invalid" => {
                    assert_eq!(long(field(value, "offset")), *offset);
                    assert_eq!(long(field(value, "partition")), i64::from(partition));
                    assert_eq!(bytes_of(field(value, "value")), record.value, "{key:?}");
                    assert_eq!(bytes_of(field(value, "key")), record.key, "{key:?}");
                    let ts = record.timestamp.expect("Kafka timestamp");
                    assert_eq!(long(field(value, "timestamp")), ts);
                    assert_eq!(hive(ts), folder, "{key:?}: hour of the Kafka timestamp");
                }
                other => panic!("{rel}: unexpected area {other}"),
            }
        }
        objects += 1;
    }
    let missing: Vec<_> = kafka
        .keys()
        .filter(|k| !seen.contains(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "records missing from storage, e.g. {missing:?}"
    );
    assert_eq!(seen.len(), kafka.len(), "nothing else is stored");
    (objects, seen.len())
}

/// Names of the objects stored under the URL (the loader's own `_sink/`
/// intents aside).
pub fn object_keys(rt: &tokio::runtime::Runtime, store_url: &str) -> BTreeSet<String> {
    use futures_util::TryStreamExt as _;
    let (store, root) = adstream_sink::objects::open_store(store_url).expect("store");
    let listed: Vec<object_store::ObjectMeta> = rt
        .block_on(store.list(Some(&root)).try_collect())
        .expect("list objects");
    listed
        .iter()
        .map(|m| m.location.as_ref().to_owned())
        .filter(|k| !k.contains("/_sink/"))
        .collect()
}

/// Whether the consumer group `group` has committed past every record of `kafka`.
pub fn committed_past_all(
    bootstrap: &str,
    group: &str,
    prefix: &str,
    kafka: &HashMap<(String, i32, i64), Consumed>,
) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (t, p, o) in kafka.keys() {
        let e = ends.entry((format!("{prefix}{t}"), *p)).or_insert(0);
        *e = (*e).max(o + 1);
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (t, p) in ends.keys() {
        tpl.add_partition(t, *p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return false;
    };
    committed.elements().iter().all(|e| match e.offset() {
        rdkafka::Offset::Offset(o) => o >= ends[&(e.topic().to_owned(), e.partition())],
        _ => false,
    })
}

/// Every `ad_metrics` row, sorted by grain.
pub fn pg_ad_metrics(rt: &tokio::runtime::Runtime, client: &Client) -> Vec<AdMetric> {
    let rows = rt.block_on(client.query(
        "SELECT time, window_end, campaign_id, ad_id, search_keyword, state, ip_range, device_type,
                impressions, clicks, conversions, cost_micros, revenue_micros, ctr, conversion_rate
           FROM ad_metrics",
        &[],
    ))
    .expect("select");
    let mut got: Vec<AdMetric> = rows
        .iter()
        .map(|r| AdMetric {
            window_start: ms(r.get(0)),
            window_end: ms(r.get(1)),
            campaign_id: r.get(2),
            ad_id: r.get(3),
            search_keyword: r.get(4),
            state: r.get(5),
            ip_range: r.get(6),
            device_type: r.get(7),
            impressions: r.get(8),
            clicks: r.get(9),
            conversions: r.get(10),
            cost_micros: r.get(11),
            revenue_micros: r.get(12),
            ctr: r.get(13),
            conversion_rate: r.get(14),
        })
        .collect();
    got.sort_by_key(metric_key);
    got
}

/// Sort key of an ad-metrics row: its grain.
pub fn metric_key(m: &AdMetric) -> (i64, String, String, String, String, String, String) {
    (
        m.window_start,
        m.campaign_id.clone(),
        m.ad_id.clone(),
        m.search_keyword.clone(),
        m.state.clone(),
        m.ip_range.clone(),
        m.device_type.clone(),
    )
}

/// Every `campaign_ctr` row, sorted by (window, campaign).
pub fn pg_campaigns(rt: &tokio::runtime::Runtime, client: &Client) -> Vec<CampaignCtr> {
    let rows = rt
        .block_on(client.query(
            "SELECT time, window_end, campaign_id, impressions, clicks, conversions, cost_micros,
                revenue_micros, ctr, conversion_rate FROM campaign_ctr",
            &[],
        ))
        .expect("select");
    let mut got: Vec<CampaignCtr> = rows
        .iter()
        .map(|r| CampaignCtr {
            window_start: ms(r.get(0)),
            window_end: ms(r.get(1)),
            campaign_id: r.get(2),
            impressions: r.get(3),
            clicks: r.get(4),
            conversions: r.get(5),
            cost_micros: r.get(6),
            revenue_micros: r.get(7),
            ctr: r.get(8),
            conversion_rate: r.get(9),
        })
        .collect();
    got.sort_by_key(|m| (m.window_start, m.campaign_id.clone()));
    got
}

/// Row count of `table` (0 before migrations ran).
pub fn count_rows(rt: &tokio::runtime::Runtime, client: &Client, table: &str) -> i64 {
    rt.block_on(async {
        match client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
        {
            Ok(r) => r.get(0),
            Err(_) => 0,
        }
    })
}
