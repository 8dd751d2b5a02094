//! `adstream-admin`: create and describe adstream's topics (see the library docs).

use anyhow::bail;
use clap::{Parser, Subcommand};

use adstream_admin::{admin_client, all_topics, create_topics, partition_counts, Outcome};
use adstream_schemas::config::parse_key_value;

#[derive(Parser, Debug)]
#[command(version, about = "Create and describe adstream's Kafka topics")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap_servers: String,
    /// librdkafka setting passed through as is (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value, global = true)]
    rdkafka: Vec<(String, String)>,
    /// Prefix for every topic name (for isolated test runs).
    #[arg(long, env = "ADSTREAM_TOPIC_PREFIX", default_value = "", global = true)]
    topic_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create every topic of CONTRACT.md and the processor's internal topics (idempotent).
    CreateTopics {
        /// Partitions of every topic (the input topics must share one count).
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Replication factor.
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
        /// Skip the processor's internal topics.
        #[arg(long)]
        no_internal: bool,
    },
    /// Print each adstream topic with its partition count; fails if any is missing.
    Describe,
    /// Print the first records of a topic as JSON lines (Avro decoded via the registry).
    Peek {
        /// Contract topic name (the --topic-prefix is added), e.g. ad-impressions.
        #[arg(long)]
        topic: String,
        /// How many records to print.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Schema registry URL.
        #[arg(
            long,
            env = "SCHEMA_REGISTRY_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        schema_registry_url: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    adstream_schemas::config::init_tracing();
    let args = Args::parse();
    let admin = admin_client(&args.bootstrap_servers, &args.rdkafka)?;
    match args.command {
        Command::CreateTopics {
            partitions,
            replication_factor,
            no_internal,
        } => {
            let outcomes = create_topics(
                &admin,
                &args.topic_prefix,
                partitions,
                replication_factor,
                !no_internal,
            )
            .await?;
            for o in outcomes {
                match o {
                    Outcome::Created(name) => {
                        println!(
                            "created {name} ({partitions} partitions, rf {replication_factor})"
                        )
                    }
                    Outcome::Exists(name) => println!("exists  {name}"),
                }
            }
        }
        Command::Describe => {
            let names: Vec<String> = all_topics(&args.topic_prefix, true)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let mut missing = 0;
            for (name, count) in partition_counts(&admin, &names)? {
                match count {
                    Some(c) => println!("{name}\t{c}"),
                    None => {
                        println!("{name}\tMISSING");
                        missing += 1;
                    }
                }
            }
            if missing > 0 {
                bail!("{missing} topic(s) missing: run topics.sh");
            }
        }
        Command::Peek {
            topic,
            count,
            schema_registry_url,
        } => {
            let full = format!("{}{topic}", args.topic_prefix);
            let codec = adstream_schemas::Codec::new(&schema_registry_url)?;
            let lines = adstream_admin::peek(
                &args.bootstrap_servers,
                &args.rdkafka,
                &full,
                &topic,
                count,
                &codec,
            )
            .await?;
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}
