//! The sink's loaders on the local stack (Kafka, registry, PostgreSQL, moto S3).
//!
//! - Migrations applied twice leave the schema unchanged.
//! - producer → processor → sink (`all`: PostgreSQL and object storage),
//!   killed with SIGKILL at 5 random moments during loading and restarted
//!   each time: the rows in PostgreSQL equal the oracle's exactly, and the
//!   objects in storage hold every input and result record exactly once by
//!   (topic, partition, offset), equal to what Kafka holds, and nothing else.
//! - Undecodable result records go to the dead-letter topic.
//! - A database that refuses connections for a while (an outage, a restart)
//!   makes the PostgreSQL loader retry its batch, not stop, and every row
//!   is loaded once it is back.
//! - A schema registry that cannot be reached holds records back (none goes
//!   to the dead-letter topic) until it answers again.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{run as run_processor, ProcessorOptions, Status};
use adstream_producer::generator::GeneratorConfig;
use adstream_schemas::AdMetric;
use adstream_sink::migrations::migrate;
use adstream_testkit::{unique_prefix, Stack};
use tokio_postgres::Client;

mod common;
use common::*;

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
        static_membership: false,
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
    let count = |table: &str| count_rows(&rt, &client, table);
    let mut seed = 0x9e37_79b9_u64;
    let mut kills = 0;
    let mut mid_load = 0;
    // A kill hit the storage loader while writing if an object name shows up
    // that no earlier kill saw. Counting objects would not tell: a restart
    // deletes the objects of uncommitted segments, so the count can drop
    // while the loader writes.
    let mut stored_mid_load = 0;
    let mut seen_objects: BTreeSet<String> = BTreeSet::new();
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
        let objects = object_keys(&rt, &store_url);
        let stored = objects.len();
        stored_mid_load += usize::from(!objects.is_subset(&seen_objects));
        seen_objects.extend(objects);
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
    let got = pg_ad_metrics(&rt, &client);
    let mut want = expected.ad_metrics;
    want.sort_by_key(metric_key);
    assert_eq!(got.len(), want.len(), "ad_metrics row count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "ad_metrics row {i}");
    }
    let got = pg_campaigns(&rt, &client);
    let mut want = expected.campaign_ctr;
    want.sort_by_key(|m| (m.window_start, m.campaign_id.clone()));
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
        clicks: 1,
        cost_micros: 30,
        ctr: Some(1.0 / 3.0),
        conversion_rate: Some(0.0),
        ..metric_row("a", 3)
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
    let mut loader =
        RunningLoader::start(&stack, &prefix, &db_url, &stack.registry_url, "dlq-test");
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
        loader.assert_running("loading the valid row");
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
        loader.assert_running("loading the replayed row");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the replayed row did not replace the first"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = loader.stop();
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

/// A PostgreSQL loader (`adstream_sink::postgres::run`) in its own thread.
struct RunningLoader {
    handle: std::thread::JoinHandle<Result<(), adstream_sink::postgres::SinkError>>,
    stop: Arc<AtomicBool>,
    status: Arc<adstream_sink::postgres::SinkStatus>,
}

impl RunningLoader {
    fn start(
        stack: &Stack,
        prefix: &str,
        db_url: &str,
        registry_url: &str,
        consumer: &str,
    ) -> Self {
        let opts = adstream_sink::postgres::PgOptions {
            bootstrap: stack.bootstrap.clone(),
            registry_url: registry_url.to_owned(),
            overrides: Vec::new(),
            topic_prefix: prefix.to_owned(),
            database_url: db_url.to_owned(),
            batch_size: 100,
            linger: Duration::from_millis(100),
            consumer: consumer.to_owned(),
            retry_for: Duration::from_secs(120),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(adstream_sink::postgres::SinkStatus::default());
        let handle = {
            let (stop, status) = (stop.clone(), status.clone());
            std::thread::spawn(move || {
                runtime().block_on(adstream_sink::postgres::run(&opts, &stop, &status))
            })
        };
        RunningLoader {
            handle,
            stop,
            status,
        }
    }

    /// Panics with the loader's result if it has stopped.
    fn assert_running(&mut self, what: &str) {
        if self.handle.is_finished() {
            let handle = std::mem::replace(&mut self.handle, std::thread::spawn(|| Ok(())));
            panic!("the loader stopped {what}: {:?}", handle.join());
        }
    }

    /// Stops it and checks that it ended without an error.
    fn stop(self) -> Arc<adstream_sink::postgres::SinkStatus> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("thread").expect("sink run");
        self.status
    }
}

/// An ad-metrics row of window [60 s, 120 s) of campaign "c".
fn metric_row(ad_id: &str, impressions: i64) -> AdMetric {
    AdMetric {
        window_start: 60_000,
        window_end: 120_000,
        campaign_id: "c".into(),
        ad_id: ad_id.into(),
        search_keyword: "k".into(),
        state: "US-CA".into(),
        ip_range: "10.0.0.0/24".into(),
        device_type: "mobile".into(),
        impressions,
        clicks: 0,
        conversions: 0,
        cost_micros: 0,
        revenue_micros: 0,
        ctr: Some(0.0),
        conversion_rate: None,
    }
}

/// Sends `rows` to `topic` in the Confluent wire format, one at a time.
fn send_metrics(rt: &tokio::runtime::Runtime, stack: &Stack, topic: &str, rows: &[AdMetric]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let codec = adstream_schemas::Codec::new(&stack.registry_url).expect("codec");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.bootstrap)
        .create()
        .expect("producer");
    rt.block_on(async {
        for row in rows {
            let value = codec.encode(topic, row).await.expect("encode");
            producer
                .send(
                    FutureRecord::to(topic).key("c").payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("sent");
        }
    });
}

#[test]
fn a_database_outage_is_retried_and_every_row_is_loaded_after_it() {
    use std::sync::atomic::Ordering;

    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("sinkoutage");
    rt.block_on(stack.create_topics(&prefix, 1));
    let db_url = rt.block_on(fresh_database(&prefix));
    let topic = format!("{prefix}ad-metrics");
    let rows = |ads: std::ops::Range<i64>| -> Vec<AdMetric> {
        ads.map(|i| metric_row(&format!("ad-{i}"), i + 1)).collect()
    };
    send_metrics(&rt, &stack, &topic, &rows(0..50));
    let mut loader =
        RunningLoader::start(&stack, &prefix, &db_url, &stack.registry_url, "outage-test");
    let client = rt.block_on(connect(&db_url));
    let count = |client: &Client| -> i64 {
        rt.block_on(client.query_one("SELECT count(*) FROM ad_metrics", &[]))
            .map(|r| r.get(0))
            .unwrap_or(-1)
    };
    let t0 = Instant::now();
    while count(&client) < 50 {
        loader.assert_running("before the outage");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "first rows not loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The outage: the database takes no new connections and the loader's
    // open ones are closed, from an administrator's connection elsewhere.
    let (db_name, own_pid): (String, i32) = rt
        .block_on(client.query_one("SELECT current_database(), pg_backend_pid()", &[]))
        .map(|r| (r.get(0), r.get(1)))
        .expect("database name and own pid");
    let admin = rt.block_on(connect(&database_url()));
    let outage = |on: bool| {
        rt.block_on(admin.batch_execute(&format!(
            "ALTER DATABASE \"{db_name}\" WITH ALLOW_CONNECTIONS {}",
            !on
        )))
        .expect("ALTER DATABASE");
    };
    outage(true);
    let closed: i64 = rt
        .block_on(admin.query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> $2",
            &[&db_name, &own_pid],
        ))
        .map(|r| r.get(0))
        .expect("pg_terminate_backend");
    assert!(closed >= 1, "the loader held no connection to close");
    send_rows_during_outage(&rt, &stack, &topic, &rows(50..100), &mut loader);
    outage(false);

    let client = rt.block_on(connect(&db_url));
    let t0 = Instant::now();
    while count(&client) < 100 {
        loader.assert_running("after the outage");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rows after the outage not loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sum: i64 = rt
        .block_on(client.query_one("SELECT sum(impressions)::bigint FROM ad_metrics", &[]))
        .map(|r| r.get(0))
        .expect("sum");
    assert_eq!(
        sum,
        (1..=100).sum::<i64>(),
        "each row once, with its values"
    );
    let status = loader.stop();
    assert_eq!(status.rows_loaded.load(Ordering::Relaxed), 100);
}

/// Sends `rows` while the database is down and waits until the loader has
/// read one of them: its batch is due after the linger and cannot be
/// written while the outage lasts (reading pauses too once the next batch
/// is due: one batch is written at a time). The loader must keep running.
fn send_rows_during_outage(
    rt: &tokio::runtime::Runtime,
    stack: &Stack,
    topic: &str,
    rows: &[AdMetric],
    loader: &mut RunningLoader,
) {
    use std::sync::atomic::Ordering;
    let before = loader.status.records_read.load(Ordering::Relaxed);
    send_metrics(rt, stack, topic, rows);
    let t0 = Instant::now();
    while loader.status.records_read.load(Ordering::Relaxed) == before {
        loader.assert_running("during the outage");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no row read during the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    loader.assert_running("during the outage");
}

/// Forwards every connection accepted on `listener` to `to` (a TCP proxy
/// the test can start late, to stand for a service that was down).
fn forward(listener: std::net::TcpListener, to: String) {
    use std::net::{Shutdown, TcpStream};
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let to = to.clone();
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(&to) else {
                    return;
                };
                let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(Shutdown::Write);
                });
                let (mut client, mut server) = (client, server);
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(Shutdown::Write);
                let _ = up.join();
            });
        }
    });
}

#[test]
fn a_registry_outage_holds_records_back_and_sends_none_to_the_dead_letter_topic() {
    use std::sync::atomic::Ordering;

    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("sinkregistry");
    rt.block_on(stack.create_topics(&prefix, 1));
    let db_url = rt.block_on(fresh_database(&prefix));
    let topic = format!("{prefix}ad-metrics");
    let rows: Vec<AdMetric> = (0..20).map(|i| metric_row(&format!("ad-{i}"), 1)).collect();
    send_metrics(&rt, &stack, &topic, &rows);
    // The loader's registry is a port nothing listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let registry_url = format!("http://127.0.0.1:{port}");
    let mut loader = RunningLoader::start(&stack, &prefix, &db_url, &registry_url, "registry-test");
    let t0 = Instant::now();
    while loader.status.records_read.load(Ordering::Relaxed) == 0 {
        loader.assert_running("before reading");
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing read");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    loader.assert_running("while the registry was down");
    let client = rt.block_on(connect(&db_url));
    let count = || -> i64 {
        rt.block_on(client.query_one("SELECT count(*) FROM ad_metrics", &[]))
            .map(|r| r.get(0))
            .unwrap_or(-1)
    };
    assert_eq!(count(), 0, "nothing can be decoded without the registry");
    assert_eq!(
        loader.status.undecodable.load(Ordering::Relaxed),
        0,
        "no dead letters"
    );

    let registry = stack
        .registry_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    forward(
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the registry port again"),
        registry,
    );
    let t0 = Instant::now();
    while count() < 20 {
        loader.assert_running("after the registry came back");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rows not loaded after the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = loader.stop();
    assert_eq!(
        status.undecodable.load(Ordering::Relaxed),
        0,
        "no dead letters"
    );
    assert_eq!(status.rows_loaded.load(Ordering::Relaxed), 20);
}
