//! Topic names fixed by CONTRACT.md, and the internal topics the processor uses.

pub const IMPRESSIONS: &str = "ad-impressions";
pub const CLICKS: &str = "ad-clicks";
pub const CONVERSIONS: &str = "ad-conversions";

pub const AD_METRICS: &str = "ad-metrics";
pub const CAMPAIGN_CTR: &str = "campaign-ctr";
pub const ANOMALY_ALERTS: &str = "anomaly-alerts";
pub const LATE_EVENTS: &str = "ad-late-events";
pub const UNMATCHED: &str = "ad-unmatched";
pub const DEAD_LETTER: &str = "ad-dead-letter";

/// The three input topics, in join order.
pub const INPUTS: [&str; 3] = [IMPRESSIONS, CLICKS, CONVERSIONS];

/// Result topics carrying Avro records registered under `<topic>-value`.
pub const RESULTS: [&str; 3] = [AD_METRICS, CAMPAIGN_CTR, ANOMALY_ALERTS];

/// Side outputs: original key and value bytes plus provenance headers.
pub const SIDE_OUTPUTS: [&str; 3] = [LATE_EVENTS, UNMATCHED, DEAD_LETTER];

/// Every topic of CONTRACT.md.
pub fn contract_topics() -> impl Iterator<Item = &'static str> {
    INPUTS.into_iter().chain(RESULTS).chain(SIDE_OUTPUTS)
}

/// Header names on side-output records.
pub mod headers {
    pub const SOURCE_TOPIC: &str = "source_topic";
    pub const SOURCE_PARTITION: &str = "source_partition";
    pub const SOURCE_OFFSET: &str = "source_offset";
    pub const REASON: &str = "reason";
}

/// The registry subject of a topic's values (TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}
