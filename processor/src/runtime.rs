//! Kafka runtime (to come).
