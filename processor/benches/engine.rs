//! Criterion micro-benchmarks of the engine's hot paths, on generated
//! producer output encoded exactly as the producer sends it.
//!
//! - `decode`: one Avro impression payload into its record;
//! - `engine/on_record`: the whole per-record path (decode, validate, late
//!   check, join, window, emit, encode of what the records close), per event;
//! - `encode/ad_metric`: one output row into its framed Avro payload;
//! - `checkpoint`: writing and restoring a task's state.
//!
//! `make bench` reports the end-to-end engine figure; these locate a
//! regression or a gain within it. Run: `cargo bench -p adstream-processor`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use adstream_processor::engine::watermark::InputPartition;
use adstream_processor::engine::{Engine, EngineConfig, Output, SourceRef};
use adstream_producer::encode::{encoded_records, EncodedRecord, EncodedRecords, SchemaIds};
use adstream_producer::generator::GeneratorConfig;
use adstream_schemas::codec::WriterCache;
use adstream_schemas::records::ImpressionView;
use adstream_schemas::{AdMetric, Codec, Impression};

const PARTITIONS: i32 = 6;

fn recorded(events: u64) -> EncodedRecords {
    let cfg = GeneratorConfig {
        seed: 11,
        event_rate: 500.0,
        ..Default::default()
    };
    encoded_records(cfg, events, PARTITIONS, &SchemaIds::OFFLINE)
}

fn codec() -> Codec {
    SchemaIds::OFFLINE
        .offline_codec()
        .unwrap_or_else(|e| panic!("input schemas: {e}"))
}

/// A fresh engine fed records in order, each at the next offset of its
/// partition.
struct Fed {
    engine: Engine,
    offsets: [[i64; PARTITIONS as usize]; 3],
}

impl Fed {
    fn new() -> Self {
        let mut engine = Engine::new(EngineConfig::default(), codec());
        for topic in 0..3u8 {
            for partition in 0..PARTITIONS {
                engine.add_partition(InputPartition { topic, partition });
            }
        }
        Fed {
            engine,
            offsets: [[0; PARTITIONS as usize]; 3],
        }
    }

    /// Processes one record; returns the outputs it produced.
    fn push(&mut self, r: EncodedRecord<'_>) -> Vec<Output> {
        let offset = &mut self.offsets[r.topic as usize][r.partition as usize];
        self.engine.on_record(
            SourceRef {
                topic: r.topic,
                partition: r.partition,
                offset: *offset,
            },
            Some(r.key),
            Some(r.value),
            None,
        );
        *offset += 1;
        self.engine.take_outputs()
    }
}

/// Feeds `records` through a fresh engine, encoding every output row.
fn run(records: &EncodedRecords) -> usize {
    let mut fed = Fed::new();
    let mut buf = Vec::with_capacity(512);
    let mut rows = 0;
    // One record ahead, as the processor's poll loop hints the engine.
    let mut ahead = records.iter().skip(1);
    for r in records.iter() {
        if let Some(next) = ahead.next() {
            fed.engine.prefetch(next.topic, Some(next.key));
        }
        for o in fed.push(r) {
            if let Output::AdMetrics(batch) = o {
                let _ = batch.try_for_each(|m| {
                    m.encode_with_id(4, &mut buf);
                    rows += 1;
                    Ok::<(), ()>(())
                });
            }
        }
    }
    rows
}

fn benches(c: &mut Criterion) {
    let records = recorded(200_000);
    let input_codec = codec();
    let impression = records
        .iter()
        .find(|r| r.topic == 0 && input_codec.decode_cached::<Impression>(r.value).is_ok())
        .map(|r| r.value.to_vec())
        .expect("the generator writes impressions");

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("impression", |b| {
        b.iter(|| input_codec.decode_cached::<Impression>(black_box(&impression)))
    });
    // As the engine reads it: borrowed, through its writer cache, by the
    // direct reader of our own schema.
    let mut writers = WriterCache::default();
    g.bench_function("impression_view", |b| {
        b.iter(|| {
            input_codec
                .decode_view_with::<ImpressionView>(&mut writers, black_box(&impression))
                .is_ok()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("on_record", |b| b.iter(|| run(black_box(&records))));
    g.finish();

    // A realistic row: the first one the engine emits.
    let mut fed = Fed::new();
    let row = records.iter().find_map(|r| {
        fed.push(r).into_iter().find_map(|o| match o {
            Output::AdMetrics(rows) => rows.to_vec().into_iter().next(),
            _ => None,
        })
    });
    let row = row.expect("200 000 events close a window");
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(512);
    g.bench_function("ad_metric", |b| {
        b.iter(|| Codec::encode_with_id::<AdMetric>(4, black_box(&row), &mut buf))
    });
    g.finish();

    // State as a task holds it mid-stream: half the records in.
    let mut half = Fed::new();
    for r in records.iter().take(records.len() / 2) {
        half.push(r);
    }
    let half = half.engine;
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    g.bench_function("write", |b| b.iter(|| half.checkpoint().len()));
    let bytes = half.checkpoint();
    g.bench_function("restore", |b| {
        b.iter_batched(
            codec,
            |codec| Engine::restore(EngineConfig::default(), codec, black_box(&bytes)).is_ok(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
