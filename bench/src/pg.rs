//! `pg_sink_vs_copy`: the PostgreSQL loader (Kafka → decode → database)
//! against a raw binary `COPY` of the same rows into the same table, each
//! into its own fresh, migrated database on the same server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures_util::pin_mut;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use adstream_schemas::config::KafkaArgs;
use adstream_schemas::{AdMetric, Codec};
use adstream_sink::postgres::{PgOptions, SinkStatus, METRIC_TYPES};

pub struct PgFigures {
    pub rows: u64,
    pub sink_rows_per_s: f64,
    pub copy_rows_per_s: f64,
}

/// Distinct ad-metrics rows (distinct grains), like a busy hour's output.
pub fn rows(n: u64) -> Vec<AdMetric> {
    (0..n)
        .map(|i| {
            let window_start = 1_767_225_600_000 + (i / 5_000) as i64 * 60_000;
            let impressions = 1 + (i % 17) as i64;
            let clicks = (i % 3) as i64;
            AdMetric {
                window_start,
                window_end: window_start + 60_000,
                campaign_id: format!("cmp-{:04}", i % 40),
                ad_id: format!("ad-{:04}-{}", i % 40, i % 8),
                search_keyword: format!("kw-{}", i % 400),
                state: format!("US-{}", ["CA", "NY", "TX", "WA", "FL"][(i % 5) as usize]),
                ip_range: format!("10.{}.{}.0/24", (i / 256) % 256, i % 256),
                device_type: ["desktop", "mobile", "tablet", "ctv", "other"][(i % 5) as usize]
                    .to_owned(),
                impressions,
                clicks,
                conversions: i64::from(clicks > 1),
                cost_micros: impressions * 1_500 + clicks * 250_000,
                revenue_micros: if clicks > 1 { 4_000_000 } else { 0 },
                ctr: Some(clicks as f64 / impressions as f64),
                conversion_rate: (clicks > 0).then(|| i64::from(clicks > 1) as f64 / clicks as f64),
            }
        })
        .collect()
}

fn ts(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

/// A URL for database `name` on the server of `url`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

async fn fresh_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (admin, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let db_url = with_database(url, name);
    let (client, conn) = tokio_postgres::connect(&db_url, NoTls).await?;
    tokio::spawn(conn);
    // Same schema (with TimescaleDB when the server has it) for both sides.
    let _ = client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        .await;
    adstream_sink::migrations::migrate(&client).await?;
    Ok(db_url)
}

/// Drops the run's databases (their rows were only there to be timed).
async fn drop_databases(url: &str, names: &[String]) -> anyhow::Result<()> {
    let (admin, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(conn);
    for name in names {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    Ok(())
}

async fn raw_copy(db_url: &str, rows: &[AdMetric]) -> anyhow::Result<Duration> {
    let (mut client, conn) = tokio_postgres::connect(db_url, NoTls).await?;
    tokio::spawn(conn);
    let t0 = Instant::now();
    let tx = client.transaction().await?;
    let sink = tx.copy_in("COPY ad_metrics FROM STDIN BINARY").await?;
    let writer = BinaryCopyInWriter::new(sink, &METRIC_TYPES);
    pin_mut!(writer);
    for m in rows {
        let (s, e) = (ts(m.window_start), ts(m.window_end));
        let row: [&(dyn ToSql + Sync); 15] = [
            &s,
            &e,
            &m.campaign_id,
            &m.ad_id,
            &m.search_keyword,
            &m.state,
            &m.ip_range,
            &m.device_type,
            &m.impressions,
            &m.clicks,
            &m.conversions,
            &m.cost_micros,
            &m.revenue_micros,
            &m.ctr,
            &m.conversion_rate,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(t0.elapsed())
}

pub fn bench(kafka: &KafkaArgs, database_url: &str, n: u64) -> anyhow::Result<PgFigures> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let prefix = format!("bench-{ms}-pg.");
    let rows = rows(n);

    // The rows on the ad-metrics topic, as the processor writes them.
    let admin = adstream_admin::admin_client(&kafka.bootstrap_servers, &kafka.rdkafka)?;
    rt.block_on(adstream_admin::create_topics(&admin, &prefix, 6, 1, true))?;
    let topic = format!("{prefix}{}", adstream_schemas::topics::AD_METRICS);
    let codec = Codec::new(&kafka.schema_registry_url)?;
    let id = rt.block_on(codec.register::<AdMetric>(&topic))?;
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true");
    for (k, v) in &kafka.rdkafka {
        cc.set(k, v);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = cc.create()?;
    let mut buf = Vec::new();
    for m in &rows {
        Codec::encode_with_id(id, m, &mut buf)?;
        let mut record = BaseRecord::to(&topic)
            .key(m.campaign_id.as_bytes())
            .payload(&buf);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;

    let name = prefix.replace(['.', '-'], "_");
    let sink_db = rt.block_on(fresh_database(database_url, &format!("{name}sink")))?;
    let copy_db = rt.block_on(fresh_database(database_url, &format!("{name}copy")))?;

    let copy = rt.block_on(raw_copy(&copy_db, &rows))?;

    let opts = PgOptions {
        bootstrap: kafka.bootstrap_servers.clone(),
        registry_url: kafka.schema_registry_url.clone(),
        overrides: kafka.rdkafka.clone(),
        topic_prefix: prefix.clone(),
        database_url: sink_db,
        // The loader's defaults (adstream-sink postgres --help).
        batch_size: 20_000,
        linger: Duration::from_millis(500),
        consumer: "bench".into(),
        retry_for: Duration::from_secs(300),
    };
    let stop = AtomicBool::new(false);
    let status = SinkStatus::default();
    let t0 = Instant::now();
    let mut loaded_in = None;
    // From the first record read: the loader's start-up (pool, migrations,
    // assignment) is paid once per process, as the raw COPY's connection is.
    let mut first_read = None;
    let scoped = std::thread::scope(|s| -> anyhow::Result<()> {
        let worker = s.spawn(|| rt.block_on(adstream_sink::postgres::run(&opts, &stop, &status)));
        while !worker.is_finished() && loaded_in.is_none() {
            if first_read.is_none() && status.records_read.load(Ordering::Relaxed) > 0 {
                first_read = Some(Instant::now());
            }
            if status.rows_loaded.load(Ordering::Relaxed) >= n {
                loaded_in = first_read.map(|f| f.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(600) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
        Ok(())
    });
    crate::delete_topics(kafka, &prefix);
    if let Err(e) = rt.block_on(drop_databases(
        database_url,
        &[format!("{name}sink"), format!("{name}copy")],
    )) {
        eprintln!("warning: could not drop the run's databases: {e:#}");
    }
    scoped?;
    let sink = loaded_in.context("the sink did not load every row")?;
    Ok(PgFigures {
        rows: n,
        sink_rows_per_s: n as f64 / sink.as_secs_f64(),
        copy_rows_per_s: n as f64 / copy.as_secs_f64(),
    })
}
