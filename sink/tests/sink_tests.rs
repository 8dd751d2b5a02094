//! The sink's loaders on the local stack (Kafka, registry, PostgreSQL, moto S3).
//!
//! - Migrations applied twice leave the schema unchanged.
//! - producer → processor → sink (`all`: PostgreSQL and object storage),
//!   killed with SIGKILL at 5 random moments during loading and restarted
//!   each time: the rows in PostgreSQL equal the oracle's exactly, and the
//!   objects in storage hold every input and result record exactly once by
//!   (topic, partition, offset), equal to what Kafka holds, and nothing else.
//! - Undecodable result records go to the dead-letter topic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{run as run_processor, ProcessorOptions, Status};
use adstream_producer::generator::GeneratorConfig;
use adstream_producer::{run as run_producer, RunOptions, Target};
use adstream_schemas::{AdMetric, CampaignCtr};
use adstream_sink::migrations::migrate;
use adstream_testkit::{read_all, unique_prefix, Consumed, Stack};
use tokio_postgres::{Client, NoTls};

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL is not set: start the local stack (`scripts/stack.sh up`) or run `make test`")
    })
}

/// A fresh database named after `name` (with TimescaleDB when installed); returns its URL.
async fn fresh_database(name: &str) -> String {
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

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn schema_snapshot(client: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for q in [
        "SELECT table_name || '.' || column_name || ':' || data_type || ':' || is_nullable
           FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1",
        "SELECT indexname || ':' || indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "SELECT version::text || ':' || name FROM adstream_schema_migrations ORDER BY 1",
    ] {
        for r in client.query(q, &[]).await.expect("snapshot query") {
            out.push(r.get::<_, String>(0));
        }
    }
    if client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await
        .expect("query")
        .is_some()
    {
        for q in [
            "SELECT hypertable_name::text FROM timescaledb_information.hypertables ORDER BY 1",
            "SELECT proc_name::text || ':' || coalesce(hypertable_name::text, '') FROM timescaledb_information.jobs ORDER BY 1",
            "SELECT view_name::text FROM timescaledb_information.continuous_aggregates ORDER BY 1",
        ] {
            for r in client.query(q, &[]).await.expect("timescaledb snapshot") {
                out.push(r.get::<_, String>(0));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_applied_twice_leave_the_schema_unchanged() {
    let url = fresh_database(&unique_prefix("migrate")).await;
    let client = connect(&url).await;
    let first = migrate(&client).await.expect("first migration");
    assert!(first.applied.contains(&1), "{first:?}");
    let before = schema_snapshot(&client).await;
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("ad_metrics.ip_range:text")),
        "{before:?}"
    );
    if first.timescaledb {
        assert!(
            before.iter().any(|l| l == "ad_metrics"),
            "hypertable: {before:?}"
        );
        assert!(
            before.iter().any(|l| l == "campaign_ctr_hourly"),
            "continuous aggregate: {before:?}"
        );
    }
    let second = migrate(&client).await.expect("second migration");
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(schema_snapshot(&client).await, before);
}

/// The parts of the oracle's output compared here.
#[derive(serde::Deserialize)]
struct OracleOut {
    ad_metrics: Vec<AdMetric>,
    campaign_ctr: Vec<CampaignCtr>,
}

fn ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn object_store_url(prefix: &str) -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: start the local stack (`scripts/stack.sh up`) or run `make test`")
    });
    assert!(!endpoint.is_empty());
    format!("s3://adstream/{}", prefix.trim_end_matches('.'))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sends `events` generated events to the input topics under `prefix`,
/// recording them to `record` when given.
fn produce(
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
fn stored_topics(stack: &Stack, prefix: &str) -> HashMap<(String, i32, i64), Consumed> {
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
fn hive(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time in range")
        .format("dt=%Y-%m-%d/hour=%H")
        .to_string()
}

fn field<'a>(v: &'a apache_avro::types::Value, name: &str) -> &'a apache_avro::types::Value {
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

fn long(v: &apache_avro::types::Value) -> i64 {
    match v {
        apache_avro::types::Value::Long(x) | apache_avro::types::Value::TimestampMillis(x) => *x,
        apache_avro::types::Value::Int(x) => i64::from(*x),
        apache_avro::types::Value::Union(_, inner) => long(inner),
        other => panic!("not a long: {other:?}"),
    }
}

fn bytes_of(v: &apache_avro::types::Value) -> Option<Vec<u8>> {
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
fn check_storage(
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

/// Objects stored under the URL (the loader's own `_sink/` intents aside).
fn count_objects(rt: &tokio::runtime::Runtime, store_url: &str) -> usize {
    use futures_util::TryStreamExt as _;
    let (store, root) = adstream_sink::objects::open_store(store_url).expect("store");
    let listed: Vec<object_store::ObjectMeta> = rt
        .block_on(store.list(Some(&root)).try_collect())
        .expect("list objects");
    listed
        .iter()
        .filter(|m| !m.location.as_ref().contains("/_sink/"))
        .count()
}

/// Whether the consumer group `group` has committed past every record of `kafka`.
fn committed_past_all(
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

#[test]
fn rows_and_objects_equal_the_oracle_and_kafka_after_five_sigkills() {
    const EVENTS: u64 = 150_000;
    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("sink");
    rt.block_on(stack.create_topics(&prefix, 3));
    let db_url = rt.block_on(fresh_database(&prefix));
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("sent.jsonl");
    produce(
        &stack,
        &prefix,
        GeneratorConfig {
            seed: 99,
            event_rate: 200.0,
            ..Default::default()
        },
        EVENTS,
        Some(recording.clone()),
    );
    let oracle_out = dir.path().join("oracle.json");
    let oracle = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../oracle/oracle.py"))
        .arg(&recording)
        .arg("--out")
        .arg(&oracle_out)
        .status()
        .expect("python3 runs the oracle");
    assert!(oracle.success());
    let expected: OracleOut = serde_json::from_reader(std::io::BufReader::new(
        std::fs::File::open(&oracle_out).expect("oracle out"),
    ))
    .expect("oracle json");

    let opts = ProcessorOptions {
        bootstrap: stack.bootstrap.clone(),
        registry_url: stack.registry_url.clone(),
        overrides: vec![("session.timeout.ms".into(), "6000".into())],
        topic_prefix: prefix.clone(),
        group_id: format!("{prefix}processor"),
        engine: EngineConfig::default(),
        idle_timeout: Duration::from_secs(2),
        commit_interval: Duration::from_secs(1),
        instance_id: "0".into(),
        state_url: format!(
            "file://{}",
            std::env::temp_dir().join("adstream-state").display()
        ),
        checkpoint_interval: std::time::Duration::from_secs(10),
        stop_when_idle: true,
    };
    run_processor(
        &opts,
        &AtomicBool::new(false),
        &Arc::new(Status::default()),
        &Metrics::new(),
    )
    .expect("processor");

    // What storage must hold: every record of the input and result topics.
    let kafka = stored_topics(&stack, &prefix);
    let store_url = object_store_url(&prefix);
    let s3_group = format!("{prefix}s3");

    // The sink binary, killed with SIGKILL five times while loading.
    let start_sink = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_adstream-sink"))
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "all",
                "--topic-prefix",
                &prefix,
                "--batch-size",
                "1000",
                "--linger",
                "200ms",
                "--group",
                &s3_group,
                "--max-records",
                "5000",
                "--max-open",
                "2s",
            ])
            .env("KAFKA_BOOTSTRAP_SERVERS", &stack.bootstrap)
            .env("SCHEMA_REGISTRY_URL", &stack.registry_url)
            .env("DATABASE_URL", &db_url)
            .env("OBJECT_STORE_URL", &store_url)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the sink")
    };
    let client = rt.block_on(connect(&db_url));
    let count = |table: &str| -> i64 {
        rt.block_on(async {
            match client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
            {
                Ok(r) => r.get(0),
                Err(_) => 0, // not migrated yet
            }
        })
    };
    let mut seed = 0x9e37_79b9_u64;
    let mut kills = 0;
    let mut mid_load = 0;
    let (mut stored_mid_load, mut stored_before) = (0, 0);
    let total = expected.ad_metrics.len() as i64;
    while kills < 5 {
        let mut child = start_sink();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = Duration::from_millis(250 + (seed >> 33) % 500);
        std::thread::sleep(wait);
        let loaded = count("ad_metrics");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
        mid_load += usize::from(loaded > 0 && loaded < total);
        let stored = count_objects(&rt, &store_url);
        stored_mid_load += usize::from(stored > stored_before);
        stored_before = stored;
        eprintln!(
            "kill {kills} after {wait:?}: {loaded} ad_metrics rows loaded, {stored} objects stored"
        );
    }
    assert!(
        mid_load >= 3,
        "at least 3 of the kills hit the PostgreSQL loader while it was loading"
    );
    assert!(
        stored_mid_load >= 3,
        "at least 3 of the kills hit the storage loader while it was writing"
    );
    let mut child = start_sink();
    let t0 = Instant::now();
    let want_metrics = expected.ad_metrics.len() as i64;
    let want_campaigns = expected.campaign_ctr.len() as i64;
    while count("ad_metrics") < want_metrics
        || count("campaign_ctr") < want_campaigns
        || !committed_past_all(&stack.bootstrap, &s3_group, &prefix, &kafka)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "sink did not finish loading"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(
        child.wait().expect("wait").success(),
        "sink stops cleanly on SIGTERM"
    );

    // Exactly the oracle's rows, field for field.
    let rows = rt.block_on(client.query(
        "SELECT time, window_end, campaign_id, ad_id, search_keyword, state, ip_range, device_type,
                impressions, clicks, conversions, cost_micros, revenue_micros, ctr, conversion_rate
           FROM ad_metrics ORDER BY time, campaign_id, ad_id, search_keyword, state, ip_range, device_type",
        &[],
    ))
    .expect("select");
    let got: Vec<AdMetric> = rows
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
    let mut want = expected.ad_metrics;
    // PostgreSQL orders text by collation; compare as sorted by the same key.
    let key = |m: &AdMetric| {
        (
            m.window_start,
            m.campaign_id.clone(),
            m.ad_id.clone(),
            m.search_keyword.clone(),
            m.state.clone(),
            m.ip_range.clone(),
            m.device_type.clone(),
        )
    };
    let mut got = got;
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got.len(), want.len(), "ad_metrics row count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "ad_metrics row {i}");
    }
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
    let mut want = expected.campaign_ctr;
    let ckey = |m: &CampaignCtr| (m.window_start, m.campaign_id.clone());
    got.sort_by_key(ckey);
    want.sort_by_key(ckey);
    assert_eq!(got, want, "campaign_ctr rows");
    eprintln!(
        "after {kills} SIGKILLs: {} ad_metrics and {} campaign_ctr rows equal to the oracle's",
        want_metrics, want_campaigns
    );

    // Every analyst query of sink/queries.sql runs against the loaded tables and returns rows.
    let queries = include_str!("../queries.sql");
    let mut ran = 0;
    for block in queries.split("\n-- name: ").skip(1) {
        let (name, sql) = block.split_once('\n').expect("a name line");
        let rows = rt
            .block_on(client.query(sql, &[]))
            .unwrap_or_else(|e| panic!("query {name} failed: {e}"));
        let may_be_empty = name.starts_with("alerts");
        assert!(
            may_be_empty || !rows.is_empty(),
            "query {name} returned no rows"
        );
        ran += 1;
    }
    assert_eq!(ran, 5, "every query in queries.sql ran");

    let t_check = Instant::now();
    let (objects, records) = check_storage(&rt, &store_url, &kafka);
    eprintln!(
        "storage: {objects} objects hold all {records} Kafka records exactly once (checked in {:?})",
        t_check.elapsed()
    );
}

#[test]
fn undecodable_records_go_to_the_dead_letter_topic_and_replayed_rows_are_upserted() {
    use adstream_schemas::Codec;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("sinkdlq");
    rt.block_on(stack.create_topics(&prefix, 1));
    let db_url = rt.block_on(fresh_database(&prefix));
    let topic = format!("{prefix}ad-metrics");
    let codec = Codec::new(&stack.registry_url).expect("codec");
    let row = AdMetric {
        window_start: 60_000,
        window_end: 120_000,
        campaign_id: "c".into(),
        ad_id: "a".into(),
        search_keyword: "k".into(),
        state: "US-CA".into(),
        ip_range: "10.0.0.0/24".into(),
        device_type: "mobile".into(),
        impressions: 3,
        clicks: 1,
        conversions: 0,
        cost_micros: 30,
        revenue_micros: 0,
        ctr: Some(1.0 / 3.0),
        conversion_rate: Some(0.0),
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.bootstrap)
        .create()
        .expect("producer");
    rt.block_on(async {
        let good = codec.encode(&topic, &row).await.expect("encode");
        for value in [b"{\"oops\": true}".to_vec(), good] {
            producer
                .send(
                    FutureRecord::to(&topic).key("c").payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("sent");
        }
    });
    let opts = adstream_sink::postgres::PgOptions {
        bootstrap: stack.bootstrap.clone(),
        registry_url: stack.registry_url.clone(),
        overrides: Vec::new(),
        topic_prefix: prefix.clone(),
        database_url: db_url.clone(),
        batch_size: 100,
        linger: Duration::from_millis(100),
        consumer: "dlq-test".into(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let status = Arc::new(adstream_sink::postgres::SinkStatus::default());
    let handle = {
        let (stop, status) = (stop.clone(), status.clone());
        std::thread::spawn(move || {
            runtime().block_on(adstream_sink::postgres::run(&opts, &stop, &status))
        })
    };
    let client = rt.block_on(connect(&db_url));
    let t0 = Instant::now();
    loop {
        let n: i64 = rt
            .block_on(client.query_one("SELECT count(*) FROM ad_metrics", &[]))
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the valid row after the bad one was not loaded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The same grain again (a processor replay after a crash): the direct
    // COPY hits the primary key, the batch falls back to the upsert, and
    // the row holds the newer values, once.
    let newer = AdMetric {
        impressions: 5,
        ctr: Some(1.0 / 5.0),
        ..row.clone()
    };
    rt.block_on(async {
        let value = codec.encode(&topic, &newer).await.expect("encode");
        producer
            .send(
                FutureRecord::to(&topic).key("c").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("sent");
    });
    let t0 = Instant::now();
    loop {
        let (n, impressions): (i64, i64) = rt
            .block_on(client.query_one(
                "SELECT count(*), coalesce(max(impressions), 0) FROM ad_metrics",
                &[],
            ))
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, 0));
        assert_eq!(n, 1, "a replayed grain is not duplicated");
        if impressions == 5 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the replayed row did not replace the first"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.join().expect("thread").expect("sink run");
    assert_eq!(
        status
            .undecodable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let dlq = adstream_testkit::read_all(
        &stack.bootstrap,
        &[format!("{prefix}ad-dead-letter")],
        Some(1),
        Duration::from_secs(10),
    );
    assert_eq!(dlq.len(), 1, "one dead letter");
    let header = |k: &str| {
        dlq[0]
            .headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("source_topic"), topic);
    assert_eq!(header("source_offset"), "0");
    assert!(
        header("reason").contains("wrong-magic-byte"),
        "{}",
        header("reason")
    );
    assert_eq!(dlq[0].value.as_deref(), Some(&b"{\"oops\": true}"[..]));
}

#[test]
fn objects_of_an_uncommitted_segment_are_deleted_at_start() {
    use object_store::ObjectStoreExt as _;
    use std::sync::atomic::Ordering;
    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("sinkclean");
    rt.block_on(stack.create_topics(&prefix, 1));
    produce(
        &stack,
        &prefix,
        GeneratorConfig {
            seed: 5,
            ..Default::default()
        },
        3_000,
        None,
    );
    let kafka = stored_topics(&stack, &prefix);
    assert!(kafka.len() >= 3_000);

    // What a run that died between writing a segment's objects and
    // committing its offsets leaves behind: an intent and an object.
    let store_url = object_store_url(&prefix);
    let group = format!("{prefix}s3");
    let (store, root) = adstream_sink::objects::open_store(&store_url).expect("store");
    let stale = root
        .clone()
        .join("raw")
        .join("ad-impressions")
        .join("dt=2020-01-01")
        .join("hour=00")
        .join("ad-impressions-p0000-0000000000000000000-0000000000000000099-s1.avro");
    let intent = root
        .clone()
        .join("_sink")
        .join(group.as_str())
        .join("pending")
        .join("ad-impressions")
        .join("p0000.json");
    let intent_json = serde_json::json!({
        "first_offset": 0,
        "next_offset": 100,
        "objects": [stale.to_string()],
    });
    rt.block_on(async {
        store
            .put(&stale, b"left by a dead run".to_vec().into())
            .await?;
        store
            .put(
                &intent,
                serde_json::to_vec(&intent_json).expect("json").into(),
            )
            .await
    })
    .expect("plant leftovers");

    let opts = adstream_sink::objects::ObjectOptions {
        bootstrap: stack.bootstrap.clone(),
        registry_url: stack.registry_url.clone(),
        overrides: Vec::new(),
        topic_prefix: prefix.clone(),
        store_url: store_url.clone(),
        consumer: group.clone(),
        max_records: 1_000,
        max_bytes: 1 << 30,
        max_open: Duration::from_secs(1),
        compression: adstream_sink::ocf::Compression::Deflate,
        // Every object above 2 KiB goes through the multipart upload path.
        multipart_above: 2048,
    };
    let stop = AtomicBool::new(false);
    let status = adstream_sink::objects::ObjectStatus::default();
    std::thread::scope(|s| {
        let loader = s.spawn(|| rt.block_on(adstream_sink::objects::run(&opts, &stop, &status)));
        let t0 = Instant::now();
        while !committed_past_all(&stack.bootstrap, &group, &prefix, &kafka) {
            assert!(!loader.is_finished(), "the loader stopped early");
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "loader did not finish"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
        loader.join().expect("loader thread").expect("loader");
    });
    assert_eq!(
        status.cleaned.load(Ordering::Relaxed),
        1,
        "the leftover object was deleted"
    );
    let gone = rt.block_on(store.head(&stale));
    assert!(
        matches!(gone, Err(object_store::Error::NotFound { .. })),
        "{gone:?}"
    );
    // And nothing but the Kafka records, each once.
    let (objects, records) = check_storage(&rt, &store_url, &kafka);
    assert_eq!(records, kafka.len());
    assert!(objects > 1);
}
