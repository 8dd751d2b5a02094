//! SPIKE/DROP detection on each campaign's closed windows (CONTRACT.md "Alerts").
//!
//! For each campaign and metric (CTR = clicks/impressions, CONVERSION_RATE =
//! conversions/clicks) the detector keeps a baseline rate: the ratio of
//! exponentially weighted sums of successes and trials over recent windows,
//! so busy windows weigh more than quiet ones. Each new window is then scored
//! with two Poisson CUSUMs, the sequential test that is optimal for detecting
//! a shift of the rate by a chosen ratio (Page, 1954):
//!
//! `S⁺ ← max(0, S⁺ + x·ln r⁺ − λ·(r⁺ − 1))` for a rise to `r⁺` times the baseline,
//! `S⁻ ← max(0, S⁻ + x·ln r⁻ − λ·(r⁻ − 1))` for a fall to `r⁻` times it,
//!
//! where `x` is the window's successes and `λ = trials × baseline` the
//! expected successes. `S` is a log-likelihood ratio, so it accumulates
//! evidence over several windows when counts are small (a DROP to zero in a
//! window expecting 5 clicks is weak evidence alone, strong after three) and
//! fires at once when they are large. Unlike comparing a window with the
//! previous one, it neither fires on single-window noise at low volume nor
//! misses sustained shifts.
//!
//! An alert opens an episode when a statistic exceeds `threshold`; while the
//! episode lasts the statistic is capped (so it falls back quickly once the
//! shift ends), the baseline is frozen (so the anomaly does not teach it) and
//! no further alert is raised; the episode ends when the statistic is back at
//! zero. An episode that outlasts `max_episode_windows` is taken as the new
//! normal and the baseline is learned afresh. The alert's `score` is the
//! statistic at detection.
//!
//! Everything here is a function of the sequence of closed campaign windows,
//! so alerts are as deterministic as the windows; `detected_at` is filled in
//! by the runtime with wall time.

use std::collections::BTreeMap;

use adstream_schemas::AnomalyAlert;

/// Detector parameters (flags of the processor, defaults documented there).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AnomalyConfig {
    /// EWMA weight of the newest window in the baseline sums.
    pub alpha: f64,
    /// Windows with enough volume needed before scoring.
    pub warmup_windows: u32,
    /// Successes the baseline must rest on before scoring.
    pub min_baseline_successes: f64,
    /// Rate ratio the SPIKE test looks for (> 1).
    pub spike_ratio: f64,
    /// Rate ratio the DROP test looks for (< 1).
    pub drop_ratio: f64,
    /// CUSUM level (log-likelihood ratio, nats) that opens an episode.
    pub threshold: f64,
    /// Minimum impressions in a window to score its CTR.
    pub min_impressions: i64,
    /// Minimum clicks in a window to score its conversion rate.
    pub min_clicks: i64,
    /// Windows after which a lasting shift becomes the new baseline.
    pub max_episode_windows: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            alpha: 0.03,
            warmup_windows: 10,
            min_baseline_successes: 20.0,
            spike_ratio: 3.0,
            drop_ratio: 0.3,
            threshold: 15.0,
            min_impressions: 50,
            min_clicks: 5,
            max_episode_windows: 120,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct SeriesState {
    windows: u32,
    /// Whether the baseline has enough history; until then sums are pooled.
    warmed: bool,
    /// Exponentially weighted sums of successes and trials (pooled sums during warm-up).
    successes: f64,
    trials: f64,
    up: f64,
    down: f64,
    /// Open episode: its kind and how many windows it has lasted.
    episode: Option<(Kind, u32)>,
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
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
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
            let state = self
                .series
                .entry((w.campaign_id.to_owned(), metric))
                .or_default();
            if let Some(alert) = step(&self.cfg, state, metric, w, trials, successes) {
                out.push(alert);
            }
        }
        out
    }
}

fn learn(cfg: &AnomalyConfig, s: &mut SeriesState, n: f64, x: f64) {
    s.windows += 1;
    if s.warmed {
        s.trials += cfg.alpha * (n - s.trials);
        s.successes += cfg.alpha * (x - s.successes);
        return;
    }
    s.trials += n;
    s.successes += x;
    if s.windows >= cfg.warmup_windows && s.successes >= cfg.min_baseline_successes {
        // From pooled sums to per-window averages, the scale the EWMA keeps.
        s.warmed = true;
        s.trials /= f64::from(s.windows);
        s.successes /= f64::from(s.windows);
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
    if !s.warmed {
        learn(cfg, s, n, x);
        return None;
    }
    let p0 = s.successes / s.trials;
    let lambda = n * p0;
    let cusum = |prev: f64, r: f64| (prev + x * r.ln() - lambda * (r - 1.0)).max(0.0);
    s.up = cusum(s.up, cfg.spike_ratio);
    s.down = cusum(s.down, cfg.drop_ratio);

    match s.episode {
        None => {
            let fired = if s.up > cfg.threshold {
                Some((Kind::Spike, s.up))
            } else if s.down > cfg.threshold {
                Some((Kind::Drop, s.down))
            } else {
                None
            };
            let Some((kind, score)) = fired else {
                learn(cfg, s, n, x);
                return None;
            };
            s.episode = Some((kind, 1));
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
                value: x / n,
                baseline: p0,
                score,
                impressions: w.impressions,
                clicks: w.clicks,
                detected_at: 0,
            })
        }
        Some((kind, len)) => {
            let cap = 2.0 * cfg.threshold;
            let stat = match kind {
                Kind::Spike => {
                    s.up = s.up.min(cap);
                    s.up
                }
                Kind::Drop => {
                    s.down = s.down.min(cap);
                    s.down
                }
            };
            if stat <= 0.0 {
                s.episode = None;
                s.up = 0.0;
                s.down = 0.0;
            } else if len + 1 >= cfg.max_episode_windows {
                // A shift this long is the new normal: learn it afresh.
                *s = SeriesState::default();
            } else {
                s.episode = Some((kind, len + 1));
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
            alerts.extend(d.on_window(&window(i, 1000, 48 + (i % 5), 50)));
        }
        assert!(alerts.is_empty(), "{alerts:?}");
        // A 4x spike for 5 windows: exactly one alert.
        for i in 30..35 {
            alerts.extend(d.on_window(&window(i, 1000, 200, 200)));
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, "SPIKE");
        assert_eq!(alerts[0].metric, "CTR");
        assert_eq!(alerts[0].window_start, 30 * 60_000);
        assert_eq!(alerts[0].alert_id, format!("c1:CTR:SPIKE:{}", 30 * 60_000));
        // Back to normal, then a drop: a new episode, a new alert.
        for i in 35..45 {
            alerts.extend(d.on_window(&window(i, 1000, 50, 50)));
        }
        assert_eq!(alerts.len(), 1);
        for i in 45..48 {
            alerts.extend(d.on_window(&window(i, 1000, 5, 5)));
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
        // 40 impressions with 40 clicks: below min_impressions.
        assert!(d.on_window(&window(20, 40, 40, 0)).is_empty());
    }

    #[test]
    fn low_counts_accumulate_evidence_for_a_drop() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        // Five expected clicks per window.
        for i in 0..40 {
            assert!(
                d.on_window(&window(i, 100, 4 + (i % 3), 0)).is_empty(),
                "window {i}"
            );
        }
        // Zero clicks: one window is not enough evidence, a few are.
        let first = d.on_window(&window(40, 100, 0, 0));
        assert!(first.is_empty());
        let mut alerts = Vec::new();
        for i in 41..46 {
            alerts.extend(d.on_window(&window(i, 100, 0, 0)));
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, "DROP");
    }

    #[test]
    fn steady_poisson_noise_raises_nothing() {
        // A deterministic pseudo-random Poisson-ish series around 5 clicks per window.
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        let mut x: u64 = 12345;
        for i in 0..5_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((x >> 33) as f64) / (1u64 << 31) as f64;
            // Inverse-CDF of Poisson(5) by summation.
            let (mut k, mut p, mut c) = (0i64, (-5f64).exp(), (-5f64).exp());
            while u > c && k < 40 {
                k += 1;
                p *= 5.0 / k as f64;
                c += p;
            }
            let alerts = d.on_window(&window(i, 100, k, 0));
            assert!(alerts.is_empty(), "false alarm at window {i}: {alerts:?}");
        }
    }
}
