//! End to end through the local broker and schema registry: what the
//! producer records is exactly what a consumer reads back.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use adstream_producer::generator::GeneratorConfig;
use adstream_producer::partitioner::partition_for;
use adstream_producer::recording::{hex, read, RecordedLine};
use adstream_producer::{run, RunOptions, Target};
use adstream_schemas::{AvroRecord, Click, Codec, Conversion, Impression};
use adstream_testkit::{by_partition, read_all, unique_prefix, Stack};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn decode_as_json<T: AvroRecord>(codec: &Codec, bytes: &[u8]) -> serde_json::Value {
    let v: T = codec
        .decode(bytes)
        .await
        .expect("a recorded valid record decodes");
    serde_json::to_value(v).expect("json")
}

#[test]
fn hundred_thousand_events_round_trip_record_for_record() {
    const EVENTS: u64 = 100_000;
    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("roundtrip");
    rt.block_on(stack.create_topics(&prefix, 6));

    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("sent.jsonl");
    let generator = GeneratorConfig {
        seed: 42,
        duplicate_rate: 0.02,
        late_rate: 0.005,
        invalid_rate: 0.005,
        ..Default::default()
    };
    let summary = run(
        RunOptions {
            generator,
            events: Some(EVENTS),
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
            progress_every: Duration::from_secs(60),
        },
        &AtomicBool::new(false),
    )
    .expect("producer run");
    assert_eq!(summary.records, EVENTS);
    for label in ["duplicate", "late", "invalid", "orphan"] {
        assert!(
            summary.by_label.get(label).copied().unwrap_or(0) > 0,
            "no {label} records: {summary:?}"
        );
    }

    let sent = read(&recording).expect("read recording");
    assert_eq!(sent.len() as u64, EVENTS);
    let mut expected: BTreeMap<(String, i32), Vec<RecordedLine>> = BTreeMap::new();
    for line in sent {
        expected
            .entry((format!("{prefix}{}", line.topic), line.partition))
            .or_default()
            .push(line);
    }

    let topics: Vec<String> = adstream_schemas::topics::INPUTS
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    let consumed = read_all(
        &stack.bootstrap,
        &topics,
        Some(EVENTS as usize),
        Duration::from_secs(30),
    );
    assert_eq!(
        consumed.len() as u64,
        EVENTS,
        "every sent record is read back"
    );
    let got = by_partition(consumed);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "same (topic, partition) set"
    );

    let codec = Codec::new(&stack.registry_url).expect("codec");
    let mut out_of_order = 0usize;
    let mut duplicates_seen = 0usize;
    let mut raw_seen = 0usize;
    for (tp, want) in &expected {
        let have = &got[tp];
        assert_eq!(have.len(), want.len(), "record count of {tp:?}");
        let mut max_time = i64::MIN;
        let mut ids = std::collections::HashSet::new();
        for (i, (h, w)) in have.iter().zip(want).enumerate() {
            let ctx = format!("{tp:?} #{i} (seq {})", w.seq);
            assert_eq!(h.key.as_deref(), Some(w.key.as_bytes()), "key of {ctx}");
            let bytes = h.value.as_deref().expect("value present");
            match w.kind.as_str() {
                "raw" => {
                    raw_seen += 1;
                    assert_eq!(Some(hex(bytes)), w.value_hex, "raw bytes of {ctx}");
                }
                kind => {
                    let value = rt.block_on(async {
                        match kind {
                            "impression" => decode_as_json::<Impression>(&codec, bytes).await,
                            "click" => decode_as_json::<Click>(&codec, bytes).await,
                            "conversion" => decode_as_json::<Conversion>(&codec, bytes).await,
                            other => panic!("unknown recorded type {other}"),
                        }
                    });
                    assert_eq!(Some(&value), w.value.as_ref(), "value of {ctx}");
                    let t = value["event_time"].as_i64().expect("event_time");
                    if t < max_time {
                        out_of_order += 1;
                    }
                    max_time = max_time.max(t);
                    let id_field = match kind {
                        "impression" => "impression_id",
                        "click" => "click_id",
                        _ => "conversion_id",
                    };
                    if !ids.insert(value[id_field].as_str().unwrap_or_default().to_owned()) {
                        duplicates_seen += 1;
                    }
                }
            }
        }
    }
    assert!(out_of_order > 0, "disorder survives the round trip");
    assert!(duplicates_seen > 0, "duplicates survive the round trip");
    assert!(raw_seen > 0, "undecodable records survive byte for byte");
}

/// librdkafka's `murmur2_random` (what other producers use) picks the same
/// partitions as our partitioner, so the recording's partitions are Kafka's.
#[test]
fn librdkafka_murmur2_random_agrees_with_partition_for() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let stack = Stack::from_env();
    let rt = runtime();
    let prefix = unique_prefix("murmur");
    rt.block_on(stack.create_topics(&prefix, 6));
    let topic = format!("{prefix}ad-clicks");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.bootstrap)
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    let keys: Vec<String> = (0..300)
        .map(|i| format!("imp-{i:05}-{}", i * 7919))
        .collect();
    rt.block_on(async {
        for k in &keys {
            let delivery = producer
                .send(
                    FutureRecord::to(&topic).key(k).payload("x"),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
            assert_eq!(
                delivery.partition,
                partition_for(k.as_bytes(), 6),
                "key {k}"
            );
        }
    });
}
