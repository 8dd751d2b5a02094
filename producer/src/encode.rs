//! Turns generated payloads into the bytes sent to Kafka, broken ones included.

use adstream_schemas::{Codec, CodecError};

use crate::generator::{Broken, Payload};

/// Schema ids of the three input records, as registered (or fixed in a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaIds {
    pub impression: u32,
    pub click: u32,
    pub conversion: u32,
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
    use crate::generator::{Generator, GeneratorConfig};
    use adstream_schemas::{AvroRecord, Click, Conversion, Impression};

    const IDS: SchemaIds = SchemaIds {
        impression: 1,
        click: 2,
        conversion: 3,
    };

    fn codec() -> Codec {
        let c = Codec::offline();
        c.insert_schema(1, Impression::SCHEMA_JSON).expect("schema");
        c.insert_schema(2, Click::SCHEMA_JSON).expect("schema");
        c.insert_schema(3, Conversion::SCHEMA_JSON).expect("schema");
        c
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
