-- Result tables of CONTRACT.md: one column per Avro field, `time` = window_start.
CREATE TABLE IF NOT EXISTS ad_metrics (
    time            timestamptz      NOT NULL,
    window_end      timestamptz      NOT NULL,
    campaign_id     text             NOT NULL,
    ad_id           text             NOT NULL,
    search_keyword  text             NOT NULL,
    state           text             NOT NULL,
    ip_range        text             NOT NULL,
    device_type     text             NOT NULL,
    impressions     bigint           NOT NULL,
    clicks          bigint           NOT NULL,
    conversions     bigint           NOT NULL,
    cost_micros     bigint           NOT NULL,
    revenue_micros  bigint           NOT NULL,
    ctr             double precision,
    conversion_rate double precision,
    PRIMARY KEY (time, campaign_id, ad_id, search_keyword, state, ip_range, device_type)
);
CREATE INDEX IF NOT EXISTS ad_metrics_campaign_time ON ad_metrics (campaign_id, time DESC);

CREATE TABLE IF NOT EXISTS campaign_ctr (
    time            timestamptz      NOT NULL,
    window_end      timestamptz      NOT NULL,
    campaign_id     text             NOT NULL,
    impressions     bigint           NOT NULL,
    clicks          bigint           NOT NULL,
    conversions     bigint           NOT NULL,
    cost_micros     bigint           NOT NULL,
    revenue_micros  bigint           NOT NULL,
    ctr             double precision,
    conversion_rate double precision,
    PRIMARY KEY (time, campaign_id)
);
CREATE INDEX IF NOT EXISTS campaign_ctr_campaign_time ON campaign_ctr (campaign_id, time DESC);

CREATE TABLE IF NOT EXISTS anomaly_alerts (
    alert_id        text             PRIMARY KEY,
    campaign_id     text             NOT NULL,
    metric          text             NOT NULL,
    kind            text             NOT NULL,
    time            timestamptz      NOT NULL,
    window_end      timestamptz      NOT NULL,
    value           double precision NOT NULL,
    baseline        double precision NOT NULL,
    score           double precision NOT NULL,
    impressions     bigint           NOT NULL,
    clicks          bigint           NOT NULL,
    detected_at     timestamptz      NOT NULL
);
CREATE INDEX IF NOT EXISTS anomaly_alerts_time ON anomaly_alerts (time DESC);
CREATE INDEX IF NOT EXISTS anomaly_alerts_campaign_time ON anomaly_alerts (campaign_id, time DESC);

-- Kafka positions, written in the same transaction as the rows they cover.
CREATE TABLE IF NOT EXISTS sink_offsets (
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    next_offset     bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);
