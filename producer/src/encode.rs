//! Turns generated payloads into the bytes sent to Kafka, broken ones included.

use adstream_schemas::{AvroRecord, Click, Codec, CodecError, Conversion, Impression};

use crate::generator::{Broken, Generator, GeneratorConfig, Payload};
use crate::partitioner::partition_for;

/// Schema ids of the three input records, as registered (or fixed in a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaIds {
    pub impression: u32,
    pub click: u32,
    pub conversion: u32,
}

impl SchemaIds {
    /// The ids used without a registry (dry runs, benchmarks, tests).
    pub const OFFLINE: SchemaIds = SchemaIds {
        impression: 1,
        click: 2,
        conversion: 3,
    };

    /// A codec without a registry that knows the input schemas under these ids.
    pub fn offline_codec(&self) -> Result<Codec, CodecError> {
        let codec = Codec::offline();
        codec.insert_schema(self.impression, Impression::SCHEMA_JSON)?;
        codec.insert_schema(self.click, Click::SCHEMA_JSON)?;
        codec.insert_schema(self.conversion, Conversion::SCHEMA_JSON)?;
        Ok(codec)
    }
}

/// A generated record as the producer sends it, borrowed from
/// [`EncodedRecords`].
#[derive(Debug, Clone, Copy)]
pub struct EncodedRecord<'a> {
    /// Input topic, by [`InputTopic::index`](crate::generator::InputTopic::index).
    pub topic: u8,
    pub partition: i32,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Where one record's key and value sit in [`EncodedRecords`]' buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    topic: u8,
    partition: i32,
    start: usize,
    key_len: u32,
    value_len: u32,
}

/// Encoded records in one buffer, each key followed by its value, in the
/// order they were produced: laid out as a consumer finds them in a fetched
/// record batch (one allocation per record instead would make every first
/// read of a key a cache miss that no consumer pays).
#[derive(Debug, Default)]
pub struct EncodedRecords {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

impl EncodedRecords {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = EncodedRecord<'_>> + '_ {
        self.spans.iter().map(|s| self.record(s))
    }

    fn record(&self, s: &Span) -> EncodedRecord<'_> {
        let key_end = s.start + s.key_len as usize;
        EncodedRecord {
            topic: s.topic,
            partition: s.partition,
            key: &self.bytes[s.start..key_end],
            value: &self.bytes[key_end..key_end + s.value_len as usize],
        }
    }
}

/// The first `events` records of `cfg`'s generator, encoded with `ids` and
/// partitioned over `partitions` as the producer would send them (for
/// benchmarks that replay producer output without a broker). A record whose
/// encoding fails is left out.
pub fn encoded_records(
    cfg: GeneratorConfig,
    events: u64,
    partitions: i32,
    ids: &SchemaIds,
) -> EncodedRecords {
    let mut out = EncodedRecords {
        bytes: Vec::new(),
        spans: Vec::with_capacity(events as usize + events as usize / 8),
    };
    let mut buf = Vec::new();
    for r in Generator::new(cfg, Some(events)) {
        if encode_payload(&r.payload, ids, &mut buf).is_err() {
            continue;
        }
        let key = r.key.as_bytes();
        out.spans.push(Span {
            topic: r.topic.index() as u8,
            partition: partition_for(key, partitions),
            start: out.bytes.len(),
            key_len: key.len() as u32,
            value_len: buf.len() as u32,
        });
        out.bytes.extend_from_slice(key);
        out.bytes.extend_from_slice(&buf);
    }
    out
}

/// A schema id no registry is expected to have issued, for unknown-id records.
pub const UNKNOWN_SCHEMA_ID: u32 = 0x7fff_fff0;

/// Encodes `payload` into `out` (cleared first).
pub fn encode_payload(
    payload: &Payload,
    ids: &SchemaIds,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    match payload {
        Payload::Impression(r) => Codec::encode_with_id(ids.impression, r, out),
        Payload::Click(r) => Codec::encode_with_id(ids.click, r, out),
        Payload::Conversion(r) => Codec::encode_with_id(ids.conversion, r, out),
        Payload::Broken(b) => match b {
            Broken::NotAvro(bytes) => {
                out.clear();
                out.extend_from_slice(bytes);
                Ok(())
            }
            Broken::WrongMagicByte(inner) => {
                encode_payload(inner, ids, out)?;
                out[0] = 1;
                Ok(())
            }
            Broken::UnknownSchemaId(inner) => {
                encode_payload(inner, ids, out)?;
                out[1..5].copy_from_slice(&UNKNOWN_SCHEMA_ID.to_be_bytes());
                Ok(())
            }
            Broken::Truncated { payload, keep } => {
                encode_payload(payload, ids, out)?;
                let body = out.len() - adstream_schemas::codec::HEADER_LEN;
                out.truncate(
                    adstream_schemas::codec::HEADER_LEN + (*keep).min(body.saturating_sub(1)),
                );
                Ok(())
            }
            Broken::WrongRecord(inner) => encode_payload(inner, ids, out),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: SchemaIds = SchemaIds::OFFLINE;

    fn codec() -> Codec {
        IDS.offline_codec().expect("schemas")
    }

    /// Valid payloads decode back equal; each broken kind fails with its own error.
    #[test]
    fn broken_payloads_fail_to_decode_as_intended() {
        let codec = codec();
        let cfg = GeneratorConfig {
            invalid_rate: 0.2,
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in Generator::new(cfg, Some(20_000)) {
            encode_payload(&r.payload, &IDS, &mut out).expect("encode");
            let topic = r.topic;
            let decoded: Result<(), CodecError> = match topic {
                crate::generator::InputTopic::Impressions => {
                    codec.decode_cached::<Impression>(&out).map(|v| {
                        assert_eq!(Payload::Impression(v), r.payload);
                    })
                }
                crate::generator::InputTopic::Clicks => {
                    codec.decode_cached::<Click>(&out).map(|v| {
                        assert_eq!(Payload::Click(v), r.payload);
                    })
                }
                crate::generator::InputTopic::Conversions => {
                    codec.decode_cached::<Conversion>(&out).map(|v| {
                        assert_eq!(Payload::Conversion(v), r.payload);
                    })
                }
            };
            match (&r.payload, decoded) {
                (Payload::Broken(b), Err(e)) => {
                    let want = match b {
                        Broken::NotAvro(_) => &["wrong-magic-byte", "too-short"][..],
                        Broken::WrongMagicByte(_) => &["wrong-magic-byte"][..],
                        Broken::UnknownSchemaId(_) => &["unknown-schema-id"][..],
                        Broken::Truncated { .. } => &["corrupt-body"][..],
                        Broken::WrongRecord(_) => &["wrong-schema"][..],
                    };
                    assert!(want.contains(&e.reason_code()), "{b:?} gave {e}");
                    seen.insert(b.reason());
                }
                (Payload::Broken(b), Ok(())) => panic!("{b:?} decoded"),
                (_, Err(e)) => panic!("valid payload failed: {e}"),
                (_, Ok(())) => {}
            }
        }
        assert_eq!(seen.len(), 5, "every broken kind generated: {seen:?}");
    }
}
