//! adstream's shared records and their Kafka codec.
//!
//! - [`records`]: the Avro records of CONTRACT.md as Rust structs, each tied to
//!   its `.avsc` file under `schemas/avro/` (the files are the source of truth;
//!   the structs mirror them field for field).
//! - [`codec`]: Confluent wire format (magic byte 0, 4-byte big-endian schema
//!   id, Avro binary body). Schemas are registered on first use through
//!   `schema_registry_converter` and ids are cached; bodies are encoded and
//!   decoded with `serde_avro_fast`, which STACK.md measured at several times
//!   the speed of apache-avro's `Value` path.
//! - [`topics`]: the topic names of CONTRACT.md.
//!
//! Invariant: every crate encodes and decodes through [`codec::Codec`], so a
//! record written by one crate is always readable by another.

pub mod codec;
pub mod config;
pub mod records;
pub mod topics;

pub use codec::{Codec, CodecError};
pub use records::{AdMetric, AnomalyAlert, AvroRecord, CampaignCtr, Click, Conversion, Impression};
