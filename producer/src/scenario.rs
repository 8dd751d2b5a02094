//! Labelled anomaly episodes: which campaign's CTR or conversion rate is
//! multiplied by which factor over which event-time range.
//!
//! A scenario is a JSON file `{"episodes": [ ... ]}` or repeated `--anomaly`
//! flags of the form `campaign=cmp-0003,metric=CTR,kind=SPIKE,start=+40m,duration=20m,factor=5`.
//! `start` is either RFC 3339 or `+<duration>` after `--start-time`.
//! The resolved episodes (absolute times) are written out so tests can score
//! detection against them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Metric {
    Ctr,
    ConversionRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    Spike,
    Drop,
}

/// An episode as written in a scenario file (relative or absolute start).
#[derive(Debug, Clone, Deserialize)]
pub struct EpisodeSpec {
    pub campaign: String,
    pub metric: Metric,
    pub kind: Kind,
    pub start: String,
    pub duration: String,
    /// Multiplier of the base probability; > 1 for a SPIKE, < 1 for a DROP.
    /// Defaults to 5 for a SPIKE and 0.1 for a DROP.
    pub factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct ScenarioFile {
    episodes: Vec<EpisodeSpec>,
}

/// An injected episode with absolute event times `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    pub campaign: String,
    pub metric: Metric,
    pub kind: Kind,
    pub start_ms: i64,
    pub end_ms: i64,
    pub factor: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid JSON of the form {{\"episodes\": [...]}}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("anomaly {spec:?}: {reason}")]
    Invalid { spec: String, reason: String },
}

/// Reads a scenario file.
pub fn load_file(path: &str) -> Result<Vec<EpisodeSpec>, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: ScenarioFile =
        serde_json::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.to_owned(),
            source,
        })?;
    Ok(file.episodes)
}

/// Parses one `--anomaly key=value,...` flag.
pub fn parse_flag(spec: &str) -> Result<EpisodeSpec, ScenarioError> {
    let invalid = |reason: String| ScenarioError::Invalid {
        spec: spec.to_owned(),
        reason,
    };
    let mut map = serde_json::Map::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| invalid(format!("{part:?} is not key=value")))?;
        let value = match k.trim() {
            "factor" => serde_json::Value::from(
                v.trim()
                    .parse::<f64>()
                    .map_err(|e| invalid(format!("factor: {e}")))?,
            ),
            _ => serde_json::Value::from(v.trim()),
        };
        map.insert(k.trim().to_owned(), value);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| invalid(e.to_string()))
}

/// Resolves relative starts against `start_time_ms` and checks each episode.
pub fn resolve(specs: &[EpisodeSpec], start_time_ms: i64) -> Result<Vec<Episode>, ScenarioError> {
    specs
        .iter()
        .map(|s| {
            let invalid = |reason: String| ScenarioError::Invalid {
                spec: format!("{s:?}"),
                reason,
            };
            let start_ms = match s.start.strip_prefix('+') {
                Some(rel) => {
                    start_time_ms
                        + humantime::parse_duration(rel)
                            .map_err(|e| invalid(format!("start: {e}")))?
                            .as_millis() as i64
                }
                None => {
                    crate::parse_time_ms(&s.start).map_err(|e| invalid(format!("start: {e}")))?
                }
            };
            let duration = humantime::parse_duration(&s.duration)
                .map_err(|e| invalid(format!("duration: {e}")))?;
            let factor = s.factor.unwrap_or(match s.kind {
                Kind::Spike => 5.0,
                Kind::Drop => 0.1,
            });
            let consistent = match s.kind {
                Kind::Spike => factor > 1.0,
                Kind::Drop => (0.0..1.0).contains(&factor),
            };
            if !consistent {
                return Err(invalid(format!(
                    "factor {factor} does not make a {:?} (SPIKE needs > 1, DROP needs 0..1)",
                    s.kind
                )));
            }
            Ok(Episode {
                campaign: s.campaign.clone(),
                metric: s.metric,
                kind: s.kind,
                start_ms,
                end_ms: start_ms + duration.as_millis() as i64,
                factor,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parses_and_resolves() {
        let spec =
            parse_flag("campaign=cmp-0003,metric=CTR,kind=SPIKE,start=+40m,duration=20m,factor=4")
                .expect("parse");
        let ep = resolve(&[spec], 1_000).expect("resolve");
        assert_eq!(ep[0].start_ms, 1_000 + 40 * 60_000);
        assert_eq!(ep[0].end_ms, ep[0].start_ms + 20 * 60_000);
        assert_eq!(ep[0].metric, Metric::Ctr);
        assert_eq!(ep[0].factor, 4.0);
    }

    #[test]
    fn inconsistent_factor_is_rejected() {
        let spec = parse_flag(
            "campaign=c,metric=CONVERSION_RATE,kind=DROP,start=+1m,duration=1m,factor=3",
        )
        .expect("parse");
        assert!(resolve(&[spec], 0).is_err());
    }

    #[test]
    fn bad_flag_is_rejected() {
        assert!(parse_flag("campaign").is_err());
        assert!(parse_flag("campaign=c,metric=CPM,kind=SPIKE,start=+1m,duration=1m").is_err());
    }
}
