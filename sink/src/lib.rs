//! adstream's sink workers.
//!
//! - [`migrations`]: the embedded, versioned schema (tables of CONTRACT.md,
//!   TimescaleDB hypertables, policies and an hourly continuous aggregate
//!   where the extension exists).
//! - [`postgres`]: the loader from the result topics into PostgreSQL, with
//!   positions stored in the same transaction as the rows.
//!
//! The object-storage loader is not built yet.

pub mod migrations;
pub mod postgres;
