//! `adstream-sink`: loads adstream's topics into PostgreSQL/TimescaleDB and object storage.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};

use adstream_schemas::config::{init_tracing, KafkaArgs};
use adstream_sink::migrations::migrate;
use adstream_sink::objects::{self, ObjectOptions, ObjectStatus};
use adstream_sink::ocf::Compression;
use adstream_sink::postgres::{self, pool, PgOptions, SinkStatus};

/// Load adstream's result topics into PostgreSQL (TimescaleDB when present)
/// and its input and result topics into object storage.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Serve Prometheus metrics on this host:port (empty: off).
    #[arg(
        long,
        global = true,
        env = "METRICS_ADDR",
        default_value = "127.0.0.1:9465"
    )]
    metrics_addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs, Debug)]
struct Db {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/adstream"
    )]
    database_url: String,
}

#[derive(ClapArgs, Debug)]
struct PgLoad {
    #[command(flatten)]
    db: Db,
    /// Records per transaction, at most (measured: 20 000 loads ~5% faster
    /// than 5 000; each is ~100 ms of PostgreSQL work).
    #[arg(long, default_value_t = 20_000)]
    batch_size: usize,
    /// How long the first record of a batch may wait before the batch is written.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// Name under which positions are stored in sink_offsets.
    #[arg(long, default_value = "adstream-sink-postgres")]
    consumer: String,
    /// How long a batch is retried while PostgreSQL cannot be reached
    /// (lost connection, restart, failover) before the sink stops with the error.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    db_retry_for: Duration,
}

#[derive(ClapArgs, Debug)]
struct S3Load {
    /// Where objects go: s3://bucket/path (endpoint, credentials and region
    /// from the AWS_* variables, e.g. AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true),
    /// file:///dir or memory://.
    #[arg(long, env = "OBJECT_STORE_URL")]
    store_url: String,
    /// Consumer group whose committed offsets mark what is stored.
    #[arg(long, default_value = "adstream-sink-s3")]
    group: String,
    /// A partition's segment ends after this many records.
    #[arg(long, default_value_t = 100_000)]
    max_records: u64,
    /// ... or after this many bytes of records.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_bytes: u64,
    /// ... or when it has been open this long (wall clock), so quiet
    /// partitions reach storage too.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_open: Duration,
    /// Block compression of the Avro files.
    #[arg(long, value_enum, default_value_t = Compression::Deflate)]
    compression: Compression,
    /// Objects larger than this many bytes are uploaded in 8 MiB parts.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    multipart_above: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the embedded schema migrations and exit.
    Migrate(Db),
    /// Load the result topics into PostgreSQL.
    Postgres {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        pg: PgLoad,
    },
    /// Load the input and result topics into object storage (Avro files, Hive layout).
    S3 {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        s3: S3Load,
    },
    /// List the objects under a store URL (path, size), with totals.
    Ls {
        /// s3://bucket/path, file:///dir (AWS_* variables as for `s3`).
        #[arg(long, env = "OBJECT_STORE_URL")]
        store_url: String,
    },
    /// Run both loaders in one process (each keeps its own positions).
    All {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        pg: PgLoad,
        #[command(flatten)]
        s3: S3Load,
    },
}

fn pg_options(kafka: &KafkaArgs, pg: PgLoad) -> PgOptions {
    PgOptions {
        bootstrap: kafka.bootstrap_servers.clone(),
        registry_url: kafka.schema_registry_url.clone(),
        overrides: kafka.rdkafka.clone(),
        topic_prefix: kafka.topic_prefix.clone(),
        database_url: pg.db.database_url,
        batch_size: pg.batch_size.max(1),
        linger: pg.linger,
        consumer: pg.consumer,
        retry_for: pg.db_retry_for,
    }
}

fn s3_options(kafka: &KafkaArgs, s3: S3Load) -> ObjectOptions {
    ObjectOptions {
        bootstrap: kafka.bootstrap_servers.clone(),
        registry_url: kafka.schema_registry_url.clone(),
        overrides: kafka.rdkafka.clone(),
        topic_prefix: kafka.topic_prefix.clone(),
        store_url: s3.store_url,
        consumer: s3.group,
        max_records: s3.max_records.max(1),
        max_bytes: s3.max_bytes.max(1),
        max_open: s3.max_open,
        compression: s3.compression,
        multipart_above: s3.multipart_above,
    }
}

async fn run_pg(opts: PgOptions, stop: &AtomicBool, status: &SinkStatus) -> anyhow::Result<()> {
    postgres::run(&opts, stop, status)
        .await
        .context("PostgreSQL loader stopped with an error")?;
    tracing::info!(
        rows = status.rows_loaded.load(Ordering::Relaxed),
        "PostgreSQL loader stopped cleanly"
    );
    Ok(())
}

async fn run_s3(
    opts: ObjectOptions,
    stop: &AtomicBool,
    status: &ObjectStatus,
) -> anyhow::Result<()> {
    objects::run(&opts, stop, status)
        .await
        .context("object-storage loader stopped with an error")?;
    tracing::info!(
        records = status.records.load(Ordering::Relaxed),
        objects = status.objects.load(Ordering::Relaxed),
        "object-storage loader stopped cleanly"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let pg_status = Arc::new(SinkStatus::default());
    let s3_status = Arc::new(ObjectStatus::default());
    let (with_pg, with_s3) = match &args.command {
        Command::Postgres { .. } => (true, false),
        Command::S3 { .. } => (false, true),
        Command::All { .. } => (true, true),
        Command::Migrate(_) | Command::Ls { .. } => (false, false),
    };
    if (with_pg || with_s3) && !args.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = args
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?} is not host:port", args.metrics_addr))?;
        let (pg, s3) = (pg_status.clone(), s3_status.clone());
        let bound = adstream_schemas::config::serve_metrics(addr, move || {
            adstream_sink::metrics::render(with_pg.then_some(&*pg), with_s3.then_some(&*s3))
        })
        .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    match args.command {
        Command::Migrate(db) => rt.block_on(async {
            let pool = pool(&db.database_url)?;
            let client = pool.get().await.context("connecting to PostgreSQL")?;
            let applied = migrate(&client).await?;
            println!(
                "applied {:?}, already applied {:?}, skipped without TimescaleDB {:?}",
                applied.applied, applied.already, applied.skipped_no_timescaledb
            );
            Ok(())
        }),
        Command::Postgres { kafka, pg } => {
            rt.block_on(run_pg(pg_options(&kafka, pg), &stop, &pg_status))
        }
        Command::Ls { store_url } => rt.block_on(async {
            use futures_util::TryStreamExt as _;
            let (store, root) = objects::open_store(&store_url)?;
            let mut listed: Vec<object_store::ObjectMeta> = store
                .list(Some(&root))
                .try_collect()
                .await
                .with_context(|| format!("listing {store_url}"))?;
            listed.sort_by(|a, b| a.location.cmp(&b.location));
            let bytes: u64 = listed.iter().map(|m| m.size).sum();
            for m in &listed {
                println!("{:>12}  {}", m.size, m.location);
            }
            println!("{} objects, {bytes} bytes", listed.len());
            Ok(())
        }),
        Command::S3 { kafka, s3 } => rt.block_on(run_s3(s3_options(&kafka, s3), &stop, &s3_status)),
        Command::All { kafka, pg, s3 } => {
            let (pg, s3) = (pg_options(&kafka, pg), s3_options(&kafka, s3));
            rt.block_on(async {
                // One loader failing stops the other too, so the process exits
                // and its supervisor restarts both from their positions.
                let stop_both = || stop.store(true, Ordering::Relaxed);
                let (a, b) = tokio::join!(
                    async {
                        let r = run_pg(pg, &stop, &pg_status).await;
                        stop_both();
                        r
                    },
                    async {
                        let r = run_s3(s3, &stop, &s3_status).await;
                        stop_both();
                        r
                    }
                );
                a.and(b)
            })
        }
    }
}
