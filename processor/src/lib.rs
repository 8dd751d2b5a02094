//! adstream's processor.
//!
//! - [`engine`]: the deterministic core (watermarks, join, windows, anomaly
//!   detection), free of Kafka and tokio so it can be tested and benchmarked
//!   alone.
//! - [`runtime`]: the thin Kafka/tokio shell: consumes the three input
//!   topics, feeds the engine, writes its outputs, and commits input offsets
//!   only after every output they cover is acknowledged.

pub mod checkpoints;
pub mod engine;
pub mod metrics;
pub mod runtime;
