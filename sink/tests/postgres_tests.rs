//! The PostgreSQL loader on the local stack.
//!
//! - Migrations applied twice leave the schema unchanged.
//! - producer → processor → sink: the rows in PostgreSQL equal the oracle's
//!   exactly, after the sink was killed with SIGKILL at 5 random moments
//!   during loading and restarted each time.

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
use adstream_testkit::{unique_prefix, Stack};
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

#[test]
fn rows_equal_the_oracle_after_five_sigkills() {
    const EVENTS: u64 = 150_000;
    let stack = Stack::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = unique_prefix("sink");
    rt.block_on(stack.create_topics(&prefix, 3));
    let db_url = rt.block_on(fresh_database(&prefix));
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("sent.jsonl");
    run_producer(
        RunOptions {
            generator: GeneratorConfig {
                seed: 99,
                event_rate: 200.0,
                ..Default::default()
            },
            events: Some(EVENTS),
            duration: None,
            rate: None,
            target: Target::Kafka {
                bootstrap: stack.bootstrap.clone(),
                registry_url: stack.registry_url.clone(),
                overrides: Vec::new(),
                topic_prefix: prefix.clone(),
            },
            record: Some(recording.clone()),
            episodes_out: None,
            progress_every: Duration::from_secs(3600),
        },
        &AtomicBool::new(false),
    )
    .expect("producer");
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
        max_drift_ms: 3_600_000,
        stop_when_idle: true,
    };
    run_processor(
        &opts,
        &AtomicBool::new(false),
        &Arc::new(Status::default()),
        &Metrics::new(),
    )
    .expect("processor");

    // The sink binary, killed with SIGKILL five times while loading.
    let start_sink = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_adstream-sink"))
            .args([
                "postgres",
                "--topic-prefix",
                &prefix,
                "--batch-size",
                "1000",
                "--linger",
                "200ms",
            ])
            .env("KAFKA_BOOTSTRAP_SERVERS", &stack.bootstrap)
            .env("SCHEMA_REGISTRY_URL", &stack.registry_url)
            .env("DATABASE_URL", &db_url)
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
        eprintln!("kill {kills} after {wait:?}: {loaded} ad_metrics rows loaded");
    }
    assert!(
        mid_load >= 3,
        "at least 3 of the kills hit the sink while it was loading"
    );
    let mut child = start_sink();
    let t0 = Instant::now();
    let want_metrics = expected.ad_metrics.len() as i64;
    let want_campaigns = expected.campaign_ctr.len() as i64;
    while count("ad_metrics") < want_metrics || count("campaign_ctr") < want_campaigns {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "sink did not finish loading"
        );
        std::thread::sleep(Duration::from_millis(300));
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
}

#[test]
fn undecodable_result_records_go_to_the_dead_letter_topic_and_loading_goes_on() {
    use adstream_schemas::Codec;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let stack = Stack::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(adstream_sink::postgres::run(&opts, &stop, &status))
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
