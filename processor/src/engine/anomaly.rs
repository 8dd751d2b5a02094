//! SPIKE/DROP detection on each campaign's closed windows (CONTRACT.md "Alerts").
//!
//! For each campaign and metric (CTR = clicks/impressions, CONVERSION_RATE =
//! conversions/clicks) the detector keeps an exponentially weighted baseline
//! of the per-window rate, learned only from windows with enough volume.
//! A window is anomalous when its count of successes deviates from what the
//! baseline predicts for its number of trials by at least `z_enter` standard
//! deviations (binomial variance n·p·(1−p); Poisson n·p when the rate can
//! exceed 1) AND by at least `min_relative_change` of the baseline — the
//! first guards against noise at low volume, the second against trivially
//! small shifts at high volume. One alert opens an episode; no further alert
//! is raised until the deviation has stayed below `z_exit` for
//! `cooldown_windows` windows (hysteresis). The baseline is frozen during an
//! episode so the anomaly does not teach it; an episode lasting longer than
//! `max_episode_windows` is taken as the new normal and the baseline restarts.
//!
//! Everything here is a function of the sequence of closed campaign windows,
//! so alerts are as deterministic as the windows; `detected_at` is filled in
//! by the runtime with wall time.

use std::collections::BTreeMap;

use adstream_schemas::AnomalyAlert;

/// Detector parameters (flags of the processor, defaults documented there).
#[derive(Debug, Clone)]
pub struct AnomalyConfig {
    /// EWMA weight of the newest window in the baseline.
    pub alpha: f64,
    /// Windows with enough volume needed before alerting.
    pub warmup_windows: u32,
    /// |z| that opens an episode.
    pub z_enter: f64,
    /// |z| below which an episode cools down.
    pub z_exit: f64,
    /// Relative deviation from the baseline needed to open an episode.
    pub min_relative_change: f64,
    /// Minimum impressions in a window to judge its CTR.
    pub min_impressions: i64,
    /// Minimum clicks in a window to judge its conversion rate.
    pub min_clicks: i64,
    /// Minimum expected successes (trials × baseline) to judge a window.
    pub min_expected: f64,
    /// Calm windows that end an episode.
    pub cooldown_windows: u32,
    /// Windows after which a lasting shift becomes the new baseline.
    pub max_episode_windows: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            alpha: 0.1,
            warmup_windows: 10,
            z_enter: 4.0,
            z_exit: 2.0,
            min_relative_change: 0.5,
            min_impressions: 100,
            min_clicks: 20,
            min_expected: 5.0,
            cooldown_windows: 3,
            max_episode_windows: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Ctr,
    ConversionRate,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ctr => "CTR",
            Metric::ConversionRate => "CONVERSION_RATE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Spike,
    Drop,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Spike => "SPIKE",
            Kind::Drop => "DROP",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct SeriesState {
    windows: u32,
    mean: f64,
    /// Sums during warm-up, so the first baseline is the pooled rate.
    warm_successes: f64,
    warm_trials: f64,
    episode: Option<(Kind, u32, u32)>, // (kind, calm windows, windows in episode)
}

/// One closed campaign window, as the detector sees it.
#[derive(Debug, Clone, Copy)]
pub struct CampaignWindow<'a> {
    pub campaign_id: &'a str,
    pub window_start: i64,
    pub window_end: i64,
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
}

/// Per-campaign, per-metric baselines and episodes.
#[derive(Debug, Default)]
pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    series: BTreeMap<(String, Metric), SeriesState>,
}

impl AnomalyDetector {
    pub fn new(cfg: AnomalyConfig) -> Self {
        AnomalyDetector {
            cfg,
            series: BTreeMap::new(),
        }
    }

    /// Feeds one closed window; returns the alerts it opens (0, 1 or 2).
    /// Windows of one campaign must come in window order.
    pub fn on_window(&mut self, w: &CampaignWindow<'_>) -> Vec<AnomalyAlert> {
        let mut out = Vec::new();
        for (metric, trials, successes, min_trials) in [
            (
                Metric::Ctr,
                w.impressions,
                w.clicks,
                self.cfg.min_impressions,
            ),
            (
                Metric::ConversionRate,
                w.clicks,
                w.conversions,
                self.cfg.min_clicks,
            ),
        ] {
            if trials < min_trials.max(1) {
                continue;
            }
            let cfg = self.cfg.clone();
            let state = self
                .series
                .entry((w.campaign_id.to_owned(), metric))
                .or_default();
            if let Some(alert) = step(&cfg, state, metric, w, trials, successes) {
                out.push(alert);
            }
        }
        out
    }
}

fn step(
    cfg: &AnomalyConfig,
    s: &mut SeriesState,
    metric: Metric,
    w: &CampaignWindow<'_>,
    trials: i64,
    successes: i64,
) -> Option<AnomalyAlert> {
    let n = trials as f64;
    let x = successes as f64;
    let rate = x / n;
    if s.windows < cfg.warmup_windows {
        s.warm_trials += n;
        s.warm_successes += x;
        s.windows += 1;
        s.mean = s.warm_successes / s.warm_trials;
        return None;
    }
    let p0 = s.mean;
    let expected = n * p0;
    let variance = if p0 < 1.0 {
        n * p0 * (1.0 - p0)
    } else {
        n * p0
    };
    let z = if variance > 0.0 {
        (x - expected) / variance.sqrt()
    } else {
        0.0
    };
    let relative = if p0 > 0.0 {
        rate / p0 - 1.0
    } else {
        f64::INFINITY
    };
    let judged = expected >= cfg.min_expected;
    let anomalous = if !judged {
        None
    } else if z >= cfg.z_enter && relative >= cfg.min_relative_change {
        Some(Kind::Spike)
    } else if z <= -cfg.z_enter && relative <= -cfg.min_relative_change {
        Some(Kind::Drop)
    } else {
        None
    };

    match s.episode {
        None => match anomalous {
            Some(kind) => {
                s.episode = Some((kind, 0, 1));
                Some(AnomalyAlert {
                    alert_id: format!(
                        "{}:{}:{}:{}",
                        w.campaign_id,
                        metric.name(),
                        kind.name(),
                        w.window_start
                    ),
                    campaign_id: w.campaign_id.to_owned(),
                    metric: metric.name().to_owned(),
                    kind: kind.name().to_owned(),
                    window_start: w.window_start,
                    window_end: w.window_end,
                    value: rate,
                    baseline: p0,
                    score: z,
                    impressions: w.impressions,
                    clicks: w.clicks,
                    detected_at: 0,
                })
            }
            None => {
                s.mean += cfg.alpha * (rate - s.mean);
                s.windows += 1;
                None
            }
        },
        Some((kind, calm, len)) => {
            let still = match kind {
                Kind::Spike => z >= cfg.z_exit,
                Kind::Drop => z <= -cfg.z_exit,
            };
            let calm = if still { 0 } else { calm + 1 };
            let len = len + 1;
            if calm >= cfg.cooldown_windows {
                s.episode = None;
                s.mean += cfg.alpha * (rate - s.mean);
            } else if len >= cfg.max_episode_windows {
                // A shift this long is the new normal: learn it afresh.
                *s = SeriesState::default();
            } else {
                s.episode = Some((kind, calm, len));
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(i: i64, impressions: i64, clicks: i64, conversions: i64) -> CampaignWindow<'static> {
        CampaignWindow {
            campaign_id: "c1",
            window_start: i * 60_000,
            window_end: (i + 1) * 60_000,
            impressions,
            clicks,
            conversions,
        }
    }

    #[test]
    fn steady_series_raises_nothing_and_spike_raises_one_alert_per_episode() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        let mut alerts = Vec::new();
        // Steady 5 % CTR with small wiggles.
        for i in 0..30 {
            alerts.extend(d.on_window(&window(i, 1000, 48 + (i % 5), 5)));
        }
        assert!(alerts.is_empty(), "{alerts:?}");
        // A 4x spike for 5 windows: exactly one alert.
        for i in 30..35 {
            alerts.extend(d.on_window(&window(i, 1000, 200, 5)));
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, "SPIKE");
        assert_eq!(alerts[0].metric, "CTR");
        assert_eq!(alerts[0].window_start, 30 * 60_000);
        assert_eq!(alerts[0].alert_id, format!("c1:CTR:SPIKE:{}", 30 * 60_000));
        // Back to normal, then a drop: a new episode, a new alert.
        for i in 35..45 {
            alerts.extend(d.on_window(&window(i, 1000, 50, 5)));
        }
        assert_eq!(alerts.len(), 1);
        for i in 45..48 {
            alerts.extend(d.on_window(&window(i, 1000, 5, 0)));
        }
        assert_eq!(alerts.len(), 2, "{alerts:?}");
        assert_eq!(alerts[1].kind, "DROP");
    }

    #[test]
    fn low_volume_is_not_judged() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        for i in 0..20 {
            assert!(d.on_window(&window(i, 1000, 50, 0)).is_empty());
        }
        // 50 impressions with 40 clicks: below min_impressions.
        assert!(d.on_window(&window(20, 50, 40, 0)).is_empty());
    }
}
