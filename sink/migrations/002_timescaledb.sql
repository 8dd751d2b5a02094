-- Applied only when the timescaledb extension is installed in the database.
SELECT create_hypertable('ad_metrics', by_range('time', INTERVAL '1 day'), if_not_exists => TRUE, migrate_data => TRUE);
SELECT create_hypertable('campaign_ctr', by_range('time', INTERVAL '7 days'), if_not_exists => TRUE, migrate_data => TRUE);
ALTER TABLE ad_metrics SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'campaign_id',
    timescaledb.compress_orderby = 'time DESC, ad_id, search_keyword, state, ip_range, device_type'
);
ALTER TABLE campaign_ctr SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'campaign_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('ad_metrics', INTERVAL '7 days', if_not_exists => TRUE);
SELECT add_compression_policy('campaign_ctr', INTERVAL '30 days', if_not_exists => TRUE);
SELECT add_retention_policy('ad_metrics', INTERVAL '90 days', if_not_exists => TRUE);
SELECT add_retention_policy('campaign_ctr', INTERVAL '2 years', if_not_exists => TRUE);
-- Continuous aggregates cannot be created inside a transaction block: own statements.
-- statement-break
CREATE MATERIALIZED VIEW IF NOT EXISTS campaign_ctr_hourly
WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       campaign_id,
       sum(impressions)    AS impressions,
       sum(clicks)         AS clicks,
       sum(conversions)    AS conversions,
       sum(cost_micros)    AS cost_micros,
       sum(revenue_micros) AS revenue_micros
FROM campaign_ctr
GROUP BY bucket, campaign_id
WITH NO DATA;
-- statement-break
SELECT add_continuous_aggregate_policy('campaign_ctr_hourly',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
