//! End to end on the local stack: producer → broker → processor → output
//! topics, checked against the independent oracle (`oracle/oracle.py`).
//!
//! The run: at least 1 million seeded events spanning more than 3 hours of
//! event time, with duplicates, disorder, late records, orphans, invalid
//! records and labelled anomaly episodes. Every `ad-metrics` and
//! `campaign-ctr` row read back with `read_committed` must equal the oracle's,
//! field for field; late, unmatched and dead-letter records must be the
//! oracle's exactly (by source topic, partition and offset), and the
//! duplicate count must match. Each injected episode must raise its alert and
//! campaigns without an episode must raise none.
//!
//! `ADSTREAM_E2E_EVENTS` overrides the event count (default 1 000 000).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adstream_processor::engine::EngineConfig;
use adstream_processor::metrics::Metrics;
use adstream_processor::runtime::{run as run_processor, ProcessorOptions, Status};
use adstream_producer::generator::GeneratorConfig;
use adstream_producer::scenario::{self, Episode};
use adstream_producer::{parse_time_ms, run as run_producer, RunOptions, Target};
use adstream_schemas::{AdMetric, AnomalyAlert, CampaignCtr, Codec};
use adstream_testkit::{read_all, unique_prefix, Consumed, Stack};
use serde_json::Value;

fn events() -> u64 {
    std::env::var("ADSTREAM_E2E_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("processor/ has a parent")
}

/// Labelled episodes on the busiest campaigns, strong enough to be detectable
/// at this volume (see the closing note for precision and recall).
fn scenario() -> Vec<scenario::EpisodeSpec> {
    [
        "campaign=cmp-0001,metric=CTR,kind=SPIKE,start=+45m,duration=15m,factor=4",
        "campaign=cmp-0002,metric=CTR,kind=DROP,start=+80m,duration=15m,factor=0.05",
        "campaign=cmp-0004,metric=CONVERSION_RATE,kind=SPIKE,start=+110m,duration=30m,factor=6",
    ]
    .iter()
    .map(|s| scenario::parse_flag(s).expect("valid episode"))
    .collect()
}

fn header<'a>(c: &'a Consumed, name: &str) -> &'a str {
    c.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).expect("utf-8 header"))
        .unwrap_or_else(|| panic!("side output without header {name}"))
}

fn side_set(records: &[Consumed], prefix: &str) -> BTreeSet<(String, i64, i64)> {
    records
        .iter()
        .map(|c| {
            let topic = header(c, "source_topic")
                .strip_prefix(prefix)
                .expect("source topic carries the prefix")
                .to_owned();
            let p: i64 = header(c, "source_partition").parse().expect("partition");
            let o: i64 = header(c, "source_offset").parse().expect("offset");
            (topic, p, o)
        })
        .collect()
}

fn oracle_set(v: &[(String, i64, i64)]) -> BTreeSet<(String, i64, i64)> {
    v.iter().cloned().collect()
}

/// The parts of the oracle's output this test compares.
#[derive(serde::Deserialize)]
struct OracleOut {
    final_watermark: i64,
    counts: BTreeMap<String, u64>,
    ad_metrics: Vec<AdMetric>,
    campaign_ctr: Vec<CampaignCtr>,
    side_outputs: BTreeMap<String, Vec<(String, i64, i64)>>,
}

/// Equal row for row (both sorted by grain); reports the first difference.
fn compare_rows<T: PartialEq + std::fmt::Debug>(
    name: &str,
    got: &[T],
    want: &[T],
    key: impl Fn(&T) -> String,
) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g,
            w,
            "{name}: first difference at sorted row {i} ({} vs {})",
            key(g),
            key(w)
        );
    }
    assert_eq!(got.len(), want.len(), "{name}: row counts");
    eprintln!(
        "{name}: {} rows equal to the oracle's, field for field",
        want.len()
    );
}

#[test]
fn million_events_match_the_oracle() {
    let n = events();
    let stack = Stack::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = unique_prefix("e2e");
    rt.block_on(stack.create_topics(&prefix, 6));
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("sent.jsonl");

    // 1. Produce.
    let start_time = parse_time_ms("2026-03-01T00:00:00Z").expect("time");
    let episodes: Vec<Episode> = scenario::resolve(&scenario(), start_time).expect("episodes");
    let t0 = Instant::now();
    let summary = run_producer(
        RunOptions {
            generator: GeneratorConfig {
                seed: 2026,
                start_time_ms: start_time,
                event_rate: 90.0,
                duplicate_rate: 0.01,
                late_rate: 0.002,
                invalid_rate: 0.001,
                orphan_click_rate: 0.002,
                orphan_conversion_rate: 0.001,
                episodes: episodes.clone(),
                ..Default::default()
            },
            events: Some(n),
            duration: None,
            rate: None,
            target: Target::Kafka {
                bootstrap: stack.bootstrap.clone(),
                registry_url: stack.registry_url.clone(),
                overrides: Vec::new(),
                topic_prefix: prefix.clone(),
            },
            record: Some(recording.clone()),
            episodes_out: None,
            progress_every: Duration::from_secs(3600),
        },
        &AtomicBool::new(false),
    )
    .expect("producer");
    assert_eq!(summary.records, n);
    let span_h = (summary.last_event_time_ms.expect("times") - start_time) as f64 / 3.6e6;
    eprintln!(
        "produced {n} records in {:.1}s, event time span {span_h:.1} h",
        t0.elapsed().as_secs_f64()
    );
    assert!(span_h >= 3.0, "event time spans {span_h:.2} h");

    // 2. The oracle, in parallel with the processor.
    let oracle_out = dir.path().join("oracle.json");
    let mut oracle = std::process::Command::new("python3")
        .arg(repo_root().join("oracle/oracle.py"))
        .arg(&recording)
        .arg("--out")
        .arg(&oracle_out)
        .spawn()
        .expect("python3 runs the oracle");

    // 3. Process.
    let opts = ProcessorOptions {
        bootstrap: stack.bootstrap.clone(),
        registry_url: stack.registry_url.clone(),
        overrides: vec![("session.timeout.ms".into(), "6000".into())],
        topic_prefix: prefix.clone(),
        group_id: format!("{prefix}processor"),
        engine: EngineConfig::default(),
        idle_timeout: Duration::from_secs(2),
        commit_interval: Duration::from_secs(1),
        instance_id: "0".into(),
        static_membership: false,
        state_url: format!(
            "file://{}",
            std::env::temp_dir().join("adstream-state").display()
        ),
        checkpoint_interval: std::time::Duration::from_secs(10),
        stop_when_idle: false,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Status::default());
    let metrics = Arc::new(Metrics::new());
    let t1 = Instant::now();
    let handle = {
        let (stop, status, metrics) = (stop.clone(), status.clone(), metrics.clone());
        std::thread::spawn(move || run_processor(&opts, &stop, &status, &metrics))
    };
    let oracle_status = oracle.wait().expect("oracle ran");
    assert!(oracle_status.success(), "oracle failed");
    let expected: OracleOut = serde_json::from_reader(std::io::BufReader::new(
        std::fs::File::open(&oracle_out).expect("oracle output"),
    ))
    .expect("oracle json");
    let final_wm = expected.final_watermark;

    // Done when every record is consumed, every partition idle and the
    // watermark has reached the oracle's final watermark.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut processed_at = None;
    let mut consumed_at = None;
    loop {
        assert!(!handle.is_finished(), "processor exited early");
        let s = status.snapshot();
        if s.stats.total().input == n && consumed_at.is_none() {
            consumed_at = Some(t1.elapsed());
            eprintln!(
                "all input consumed after {:.1}s (watermark {}, idle {}/{})",
                t1.elapsed().as_secs_f64(),
                s.watermark,
                s.idle,
                s.assigned
            );
        }
        if s.stats.total().input == n
            && s.assigned > 0
            && s.idle == s.assigned
            && s.watermark >= final_wm
        {
            processed_at.get_or_insert(t1.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "processor did not finish: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    handle
        .join()
        .expect("processor thread")
        .expect("processor run");
    let secs = processed_at.expect("processed").as_secs_f64();
    let s = status.snapshot();
    eprintln!(
        "processor: {n} records in {secs:.1}s ({:.0} records/s incl. idle detection), watermark {}, stats {:?}",
        n as f64 / secs,
        s.watermark,
        s.stats.total()
    );
    assert_eq!(s.watermark, final_wm, "final watermark equals the oracle's");

    // 4. Read back and compare, typed (a million JSON trees would need gigabytes).
    let topic = |t: &str| vec![format!("{prefix}{t}")];
    let idle = Duration::from_secs(5);
    let codec = Codec::new(&stack.registry_url).expect("codec");
    let mut metrics_rows: Vec<AdMetric> = rt.block_on(async {
        let mut out = Vec::new();
        for r in read_all(
            &stack.bootstrap,
            &topic("ad-metrics"),
            Some(expected.ad_metrics.len()),
            idle,
        ) {
            out.push(
                codec
                    .decode::<AdMetric>(&r.value.expect("value"))
                    .await
                    .expect("AdMetric"),
            );
        }
        out
    });
    let mut campaign_rows: Vec<CampaignCtr> = rt.block_on(async {
        let mut out = Vec::new();
        for r in read_all(
            &stack.bootstrap,
            &topic("campaign-ctr"),
            Some(expected.campaign_ctr.len()),
            idle,
        ) {
            out.push(
                codec
                    .decode::<CampaignCtr>(&r.value.expect("value"))
                    .await
                    .expect("CampaignCtr"),
            );
        }
        out
    });
    let metric_key = |m: &AdMetric| {
        (
            m.window_start,
            m.campaign_id.clone(),
            m.ad_id.clone(),
            m.search_keyword.clone(),
            m.state.clone(),
            m.ip_range.clone(),
            m.device_type.clone(),
        )
    };
    let mut want_metrics = expected.ad_metrics;
    metrics_rows.sort_by_key(metric_key);
    want_metrics.sort_by_key(metric_key);
    compare_rows("ad-metrics", &metrics_rows, &want_metrics, |m| {
        format!("{:?}", metric_key(m))
    });
    let campaign_key = |m: &CampaignCtr| (m.window_start, m.campaign_id.clone());
    let mut want_campaigns = expected.campaign_ctr;
    campaign_rows.sort_by_key(campaign_key);
    want_campaigns.sort_by_key(campaign_key);
    compare_rows("campaign-ctr", &campaign_rows, &want_campaigns, |m| {
        format!("{:?}", campaign_key(m))
    });

    // Side outputs and counts.
    let counts = &expected.counts;
    for (name, t, key) in [
        ("late", "ad-late-events", "late"),
        ("unmatched", "ad-unmatched", "unmatched"),
        ("dead letter", "ad-dead-letter", "dead_letter"),
    ] {
        let want = oracle_set(&expected.side_outputs[key]);
        let got_records = read_all(&stack.bootstrap, &topic(t), Some(want.len()), idle);
        assert_eq!(
            got_records.len(),
            want.len(),
            "{name}: one side output per record"
        );
        let got = side_set(&got_records, &prefix);
        assert_eq!(got, want, "{name} records are the oracle's");
        assert_eq!(counts.get(key).copied(), Some(want.len() as u64));
        eprintln!("{name}: {} records equal to the oracle's", want.len());
    }
    let total = s.stats.total();
    for (k, got) in [
        ("duplicate", total.duplicate),
        ("counted", total.counted),
        ("late", total.late),
        ("unmatched", total.unmatched),
        ("dead_letter", total.dead_letter),
    ] {
        assert_eq!(
            counts.get(k).copied(),
            Some(got),
            "{k} count equals the oracle's"
        );
    }
    for k in ["late", "duplicate", "unmatched", "dead_letter"] {
        assert!(
            counts.get(k).copied().unwrap_or(0) > 0,
            "the run exercised {k}"
        );
    }

    // Alerts: every episode detected, no alert on a campaign without one.
    // The input ends abruptly: the window holding the last impression has a
    // partial impression count but its clicks, a real CTR jump that only a
    // finite test stream has. Alerts from that window on are not scored.
    let last_imp = summary.last_impression_time_ms.expect("impressions sent");
    let alerts: Vec<Value> = rt
        .block_on(async {
            let mut out = Vec::new();
            for r in read_all(&stack.bootstrap, &topic("anomaly-alerts"), None, idle) {
                let a = codec
                    .decode::<AnomalyAlert>(&r.value.expect("value"))
                    .await
                    .expect("alert");
                out.push(serde_json::to_value(a).expect("json"));
            }
            out
        })
        .into_iter()
        .filter(|a| {
            a["window_end"]
                .as_i64()
                .is_some_and(|e| e <= last_imp - last_imp.rem_euclid(60_000))
        })
        .collect();
    let mut detected = 0;
    for e in &episodes {
        let metric = serde_json::to_value(e.metric).expect("metric");
        let kind = serde_json::to_value(e.kind).expect("kind");
        // Conversions trail clicks by minutes to hours, so allow an hour after the episode.
        let hit = alerts.iter().any(|a| {
            a["campaign_id"] == e.campaign.as_str()
                && a["metric"] == metric
                && a["kind"] == kind
                && a["window_start"]
                    .as_i64()
                    .is_some_and(|w| w >= e.start_ms && w < e.end_ms + 3_600_000)
        });
        eprintln!(
            "episode {} {:?} {:?}: {}",
            e.campaign,
            e.metric,
            e.kind,
            if hit { "detected" } else { "MISSED" }
        );
        detected += usize::from(hit);
    }
    let episode_campaigns: BTreeSet<&str> = episodes.iter().map(|e| e.campaign.as_str()).collect();
    let true_alerts = alerts
        .iter()
        .filter(|a| {
            episodes.iter().any(|e| {
                a["campaign_id"] == e.campaign.as_str()
                    && a["metric"] == serde_json::to_value(e.metric).expect("metric")
                    && a["kind"] == serde_json::to_value(e.kind).expect("kind")
            })
        })
        .count();
    eprintln!(
        "alerts: {} raised, precision {:.2}, recall {:.2}: {:?}",
        alerts.len(),
        true_alerts as f64 / alerts.len().max(1) as f64,
        detected as f64 / episodes.len() as f64,
        alerts
            .iter()
            .map(|a| a["alert_id"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        detected,
        episodes.len(),
        "every injected episode raises its alert"
    );
    let steady: Vec<_> = alerts
        .iter()
        .filter(|a| !episode_campaigns.contains(a["campaign_id"].as_str().unwrap_or("")))
        .collect();
    assert!(
        steady.is_empty(),
        "steady campaigns raised alerts: {steady:?}"
    );
}
