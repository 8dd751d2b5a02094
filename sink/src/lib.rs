//! adstream's sink workers.
//!
//! - [`migrations`]: the embedded, versioned schema (tables of CONTRACT.md,
//!   TimescaleDB hypertables, policies and an hourly continuous aggregate
//!   where the extension exists).
//! - [`postgres`]: the loader from the result topics into PostgreSQL, with
//!   positions stored in the same transaction as the rows.
//!
//! - [`objects`]: the loader from the input and result topics into object
//!   storage (Avro object container files, Hive layout), with Kafka offsets
//!   committed after the objects are written.
//! - [`kafka`]: the consumer both loaders read with, topic partitions.
//! - [`metrics`]: Prometheus text rendered from the loaders' counters.
//! - [`ocf`]: Avro object container files assembled from encoded datums.
//! - [`resume`]: resuming at stored positions on brokers that cannot fetch
//!   from inside a record batch.

pub mod kafka;
pub mod metrics;
pub mod migrations;
pub mod objects;
pub mod ocf;
pub mod postgres;
