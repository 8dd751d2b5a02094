-- Questions analysts ask of the loaded tables. Each query is separated by a
-- line "-- name: NAME"; sink/tests/postgres_tests.rs runs every one of them.
-- "Now" is the newest loaded window with traffic, so the queries also work on
-- replayed or historical data; replace it with now() for live dashboards.

-- name: top_campaigns_by_ctr_last_hour
WITH latest AS (SELECT max(time) AS t FROM campaign_ctr WHERE impressions > 0)
SELECT campaign_id,
       sum(impressions) AS impressions,
       sum(clicks) AS clicks,
       round(sum(clicks)::numeric / nullif(sum(impressions), 0), 4) AS ctr
FROM campaign_ctr, latest
WHERE time > latest.t - INTERVAL '1 hour'
GROUP BY campaign_id
HAVING sum(impressions) >= 100
ORDER BY ctr DESC NULLS LAST, campaign_id
LIMIT 10;

-- name: ctr_by_state
SELECT state,
       sum(impressions) AS impressions,
       sum(clicks) AS clicks,
       round(sum(clicks)::numeric / nullif(sum(impressions), 0), 4) AS ctr
FROM ad_metrics
GROUP BY state
ORDER BY impressions DESC
LIMIT 20;

-- name: ctr_by_device
SELECT device_type,
       sum(impressions) AS impressions,
       sum(clicks) AS clicks,
       round(sum(clicks)::numeric / nullif(sum(impressions), 0), 4) AS ctr,
       round(sum(conversions)::numeric / nullif(sum(clicks), 0), 4) AS conversion_rate
FROM ad_metrics
GROUP BY device_type
ORDER BY impressions DESC;

-- name: cost_per_conversion_by_campaign
SELECT campaign_id,
       sum(cost_micros) / 1e6 AS cost,
       sum(revenue_micros) / 1e6 AS revenue,
       sum(conversions) AS conversions,
       round((sum(cost_micros) / 1e6 / nullif(sum(conversions), 0))::numeric, 2) AS cost_per_conversion,
       round((sum(revenue_micros)::numeric / nullif(sum(cost_micros), 0)), 2) AS roas
FROM campaign_ctr
GROUP BY campaign_id
ORDER BY cost DESC
LIMIT 20;

-- name: alerts_last_day
WITH latest AS (SELECT max(time) AS t FROM anomaly_alerts)
SELECT alert_id, campaign_id, metric, kind, time AS window_start,
       round(value::numeric, 4) AS value, round(baseline::numeric, 4) AS baseline,
       round(score::numeric, 1) AS score, detected_at
FROM anomaly_alerts, latest
WHERE time > latest.t - INTERVAL '1 day'
ORDER BY time DESC;
