//! Benchmark pieces that talk to services (see `main.rs` for the figures).

pub mod pg;
