//! `adstream-sink`: loads adstream's results into PostgreSQL/TimescaleDB.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args as ClapArgs, Parser, Subcommand};

use adstream_schemas::config::{init_tracing, KafkaArgs};
use adstream_sink::migrations::migrate;
use adstream_sink::postgres::{pool, run, PgOptions, SinkStatus};

/// Load adstream's result topics into PostgreSQL (TimescaleDB when present).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
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
struct Load {
    #[command(flatten)]
    db: Db,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Records per transaction, at most.
    #[arg(long, default_value_t = 5_000)]
    batch_size: usize,
    /// How long the first record of a batch may wait before the batch is written.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// Name under which positions are stored in sink_offsets.
    #[arg(long, default_value = "adstream-sink-postgres")]
    consumer: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the embedded schema migrations and exit.
    Migrate(Db),
    /// Load the result topics into PostgreSQL.
    Postgres(Load),
    /// Load topics into object storage (not built yet).
    S3,
    /// Run every loader that exists (today: PostgreSQL).
    All(Load),
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
        Command::S3 => {
            bail!("the object-storage loader is not built yet; use `adstream-sink postgres`")
        }
        Command::Postgres(load) | Command::All(load) => {
            let opts = PgOptions {
                bootstrap: load.kafka.bootstrap_servers,
                registry_url: load.kafka.schema_registry_url,
                overrides: load.kafka.rdkafka,
                topic_prefix: load.kafka.topic_prefix,
                database_url: load.db.database_url,
                batch_size: load.batch_size.max(1),
                linger: load.linger,
                consumer: load.consumer,
            };
            let status = SinkStatus::default();
            rt.block_on(run(&opts, &stop, &status))
                .context("sink stopped with an error")?;
            tracing::info!(
                rows = status
                    .rows_loaded
                    .load(std::sync::atomic::Ordering::Relaxed),
                "stopped cleanly"
            );
            Ok(())
        }
    }
}
