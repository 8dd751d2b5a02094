//! Criterion micro-benchmarks of the engine's hot paths, on generated
//! producer output encoded exactly as the producer sends it.
//!
//! - `decode`: one Avro impression payload into its record;
//! - `engine/on_record`: the whole per-record path (decode, validate, late
//!   check, join, window, emit, encode of what the records close), per event;
//! - `encode/ad_metric`: one output row into its framed Avro payload;
//! - `checkpoint`: serializing a task's state.
//!
//! `make bench` reports the end-to-end engine figure; these locate a
//! regression or a gain within it. Run: `cargo bench -p adstream-processor`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use adstream_processor::engine::watermark::InputPartition;
use adstream_processor::engine::{Engine, EngineConfig, Output, SourceRef};
use adstream_producer::encode::{encode_payload, SchemaIds};
use adstream_producer::generator::{Generator, GeneratorConfig};
use adstream_producer::partitioner::partition_for;
use adstream_schemas::{AdMetric, AvroRecord, Codec, Impression};

const PARTITIONS: i32 = 6;

struct Recorded {
    topic: u8,
    partition: i32,
    key: Vec<u8>,
    value: Vec<u8>,
}

fn recorded(events: u64) -> Vec<Recorded> {
    let ids = SchemaIds {
        impression: 1,
        click: 2,
        conversion: 3,
    };
    let cfg = GeneratorConfig {
        seed: 11,
        event_rate: 500.0,
        ..Default::default()
    };
    let mut buf = Vec::new();
    Generator::new(cfg, Some(events))
        .filter_map(|r| {
            encode_payload(&r.payload, &ids, &mut buf).ok()?;
            let key = r.key.into_bytes();
            Some(Recorded {
                topic: r.topic.index() as u8,
                partition: partition_for(&key, PARTITIONS),
                key,
                value: buf.clone(),
            })
        })
        .collect()
}

fn codec() -> Codec {
    let codec = Codec::offline();
    for (id, json) in [
        (1, Impression::SCHEMA_JSON),
        (2, adstream_schemas::Click::SCHEMA_JSON),
        (3, adstream_schemas::Conversion::SCHEMA_JSON),
    ] {
        if let Err(e) = codec.insert_schema(id, json) {
            panic!("schema {id}: {e}");
        }
    }
    codec
}

fn engine() -> Engine {
    let mut e = Engine::new(EngineConfig::default(), codec());
    for topic in 0..3u8 {
        for partition in 0..PARTITIONS {
            e.add_partition(InputPartition { topic, partition });
        }
    }
    e
}

/// Feeds `records` through a fresh engine, encoding every output row.
fn run(records: &[Recorded]) -> usize {
    let mut e = engine();
    let mut offsets = [[0i64; PARTITIONS as usize]; 3];
    let mut buf = Vec::with_capacity(512);
    let mut rows = 0;
    for r in records {
        let offset = &mut offsets[r.topic as usize][r.partition as usize];
        e.on_record(
            SourceRef {
                topic: r.topic,
                partition: r.partition,
                offset: *offset,
            },
            Some(&r.key),
            Some(&r.value),
            None,
        );
        *offset += 1;
        if e.has_outputs() {
            for o in e.take_outputs() {
                if let Output::AdMetric(m) = o {
                    if Codec::encode_with_id::<AdMetric>(4, &m, &mut buf).is_ok() {
                        rows += 1;
                    }
                }
            }
        }
    }
    rows
}

fn benches(c: &mut Criterion) {
    let records = recorded(200_000);
    let codec = codec();
    let impression = records
        .iter()
        .find(|r| r.topic == 0 && codec.decode_cached::<Impression>(&r.value).is_ok())
        .map(|r| r.value.clone())
        .expect("the generator writes impressions");

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("impression", |b| {
        b.iter(|| codec.decode_cached::<Impression>(black_box(&impression)))
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("on_record", |b| b.iter(|| run(black_box(&records))));
    g.finish();

    // A realistic row: the first one the engine emits.
    let mut e = engine();
    let mut row = None;
    for (i, r) in records.iter().enumerate() {
        e.on_record(
            SourceRef {
                topic: r.topic,
                partition: r.partition,
                offset: i as i64,
            },
            Some(&r.key),
            Some(&r.value),
            None,
        );
        row = e.take_outputs().into_iter().find_map(|o| match o {
            Output::AdMetric(m) => Some(m),
            _ => None,
        });
        if row.is_some() {
            break;
        }
    }
    let row = row.expect("200 000 events close a window");
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(512);
    g.bench_function("ad_metric", |b| {
        b.iter(|| Codec::encode_with_id::<AdMetric>(4, black_box(&row), &mut buf))
    });
    g.finish();

    // State as a task holds it mid-stream: half the records in.
    let mut half = engine();
    for (i, r) in records[..records.len() / 2].iter().enumerate() {
        half.on_record(
            SourceRef {
                topic: r.topic,
                partition: r.partition,
                offset: i as i64,
            },
            Some(&r.key),
            Some(&r.value),
            None,
        );
        half.take_outputs();
    }
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    g.bench_function("write", |b| b.iter(|| half.checkpoint().len()));
    let bytes = half.checkpoint();
    g.bench_function("restore", |b| {
        b.iter_batched(
            codec_clone_source,
            |codec| Engine::restore(EngineConfig::default(), codec, black_box(&bytes)).is_ok(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn codec_clone_source() -> Codec {
    codec()
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
