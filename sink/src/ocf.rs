//! Avro object container files built from already-encoded datums.
//!
//! The values on adstream's topics are Confluent-framed Avro: after the five
//! frame bytes comes exactly the Avro binary encoding of the record under its
//! writer schema. An object container file is a header (magic, metadata map
//! with `avro.schema` and `avro.codec`, 16-byte sync marker) followed by
//! blocks of concatenated datums, so a file for one writer schema is made by
//! copying the bodies verbatim: nothing is decoded and re-encoded.
//!
//! Invariants: every datum appended must be a complete encoding under the
//! schema given to [`OcfBuilder::new`]; the output bytes are a function of
//! the inputs alone (the sync marker is derived from a caller-given seed, not
//! random), so rewriting a file after a crash produces the identical object.

use std::io::Write as _;

/// How blocks are compressed (Avro's `avro.codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// No compression.
    Null,
    /// Raw DEFLATE (RFC 1951), as the Avro specification defines `deflate`.
    Deflate,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::Null => "null",
            Compression::Deflate => "deflate",
        }
    }
}

/// Uncompressed bytes per block before a new block starts.
const BLOCK_BYTES: usize = 256 * 1024;

/// One object container file being assembled in memory.
#[derive(Debug)]
pub struct OcfBuilder {
    schema_json: String,
    compression: Compression,
    sync: [u8; 16],
    /// Finished blocks (count, size, data, sync), in order.
    blocks: Vec<u8>,
    /// Datums of the block being filled, uncompressed.
    pending: Vec<u8>,
    pending_count: u64,
    records: u64,
    /// Bytes of datums appended, before compression.
    datum_bytes: u64,
}

/// Appends Avro's zig-zag varint encoding of `v` to `out`.
pub fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends an Avro `bytes`/`string` value (length, then the bytes).
pub fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

impl OcfBuilder {
    /// A file for datums written with `schema_json`; `seed` (e.g. the object
    /// name) fixes the sync marker.
    pub fn new(schema_json: &str, compression: Compression, seed: &[u8]) -> Self {
        let sync = xxhash_rust::xxh3::xxh3_128(seed).to_le_bytes();
        OcfBuilder {
            schema_json: schema_json.to_owned(),
            compression,
            sync,
            blocks: Vec::new(),
            pending: Vec::new(),
            pending_count: 0,
            records: 0,
            datum_bytes: 0,
        }
    }

    /// Appends one encoded datum.
    pub fn append(&mut self, datum: &[u8]) {
        self.pending.extend_from_slice(datum);
        self.pending_count += 1;
        self.records += 1;
        self.datum_bytes += datum.len() as u64;
        if self.pending.len() >= BLOCK_BYTES {
            self.close_block();
        }
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Size of the datums appended so far (uncompressed).
    pub fn datum_bytes(&self) -> u64 {
        self.datum_bytes
    }

    fn close_block(&mut self) {
        if self.pending_count == 0 {
            return;
        }
        let data = match self.compression {
            Compression::Null => std::mem::take(&mut self.pending),
            Compression::Deflate => {
                let mut enc = flate2::write::DeflateEncoder::new(
                    Vec::with_capacity(self.pending.len() / 3),
                    flate2::Compression::fast(),
                );
                // Writing into a Vec cannot fail.
                let _ = enc.write_all(&self.pending);
                self.pending.clear();
                enc.finish().unwrap_or_default()
            }
        };
        write_long(&mut self.blocks, self.pending_count as i64);
        write_bytes(&mut self.blocks, &data);
        self.blocks.extend_from_slice(&self.sync);
        self.pending_count = 0;
    }

    /// The complete file, with `metadata` (keys must not start with `avro.`)
    /// added to the header.
    pub fn finish(mut self, metadata: &[(&str, &[u8])]) -> Vec<u8> {
        self.close_block();
        let mut out = Vec::with_capacity(self.blocks.len() + self.schema_json.len() + 128);
        out.extend_from_slice(b"Obj\x01");
        let entries: Vec<(&str, &[u8])> = [
            ("avro.schema", self.schema_json.as_bytes()),
            ("avro.codec", self.compression.name().as_bytes()),
        ]
        .into_iter()
        .chain(metadata.iter().copied())
        .collect();
        write_long(&mut out, entries.len() as i64);
        for (k, v) in entries {
            write_bytes(&mut out, k.as_bytes());
            write_bytes(&mut out, v);
        }
        write_long(&mut out, 0);
        out.extend_from_slice(&self.sync);
        out.extend_from_slice(&self.blocks);
        out
    }
}

/// Encodes ascending `offsets` as zig-zag varint deltas from `first`, the
/// form of the `adstream.offsets` metadata entry.
pub fn encode_offsets(first: i64, offsets: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(offsets.len() + 8);
    let mut prev = first;
    for &o in offsets {
        write_long(&mut out, o - prev);
        prev = o;
    }
    out
}

/// Reverses [`encode_offsets`]; `None` if the bytes are malformed.
pub fn decode_offsets(first: i64, mut bytes: &[u8]) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    let mut prev = first;
    while !bytes.is_empty() {
        let mut n: u64 = 0;
        let mut shift = 0;
        loop {
            let (&b, rest) = bytes.split_first()?;
            bytes = rest;
            if shift > 63 {
                return None;
            }
            n |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let delta = ((n >> 1) as i64) ^ -((n & 1) as i64);
        prev += delta;
        out.push(prev);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"},{"name":"s","type":"string"}]}"#;

    fn datum(a: i64, s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_long(&mut out, a);
        write_bytes(&mut out, s.as_bytes());
        out
    }

    type Metadata = std::collections::HashMap<String, Vec<u8>>;

    fn read_back(file: &[u8]) -> (Vec<(i64, String)>, Metadata) {
        let reader = apache_avro::Reader::new(file).expect("apache-avro opens the file");
        let meta = reader.user_metadata().clone();
        let rows = reader
            .map(|v| match v.expect("record") {
                apache_avro::types::Value::Record(fields) => {
                    let a = match &fields[0].1 {
                        apache_avro::types::Value::Long(a) => *a,
                        other => panic!("a = {other:?}"),
                    };
                    let s = match &fields[1].1 {
                        apache_avro::types::Value::String(s) => s.clone(),
                        other => panic!("s = {other:?}"),
                    };
                    (a, s)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        (rows, meta)
    }

    #[test]
    fn apache_avro_reads_what_we_write_with_either_codec() {
        for compression in [Compression::Null, Compression::Deflate] {
            let mut b = OcfBuilder::new(SCHEMA, compression, b"name");
            // Enough to span several blocks.
            let want: Vec<(i64, String)> = (0..40_000)
                .map(|i| {
                    (
                        i * 7919 - 1_000_000,
                        format!("row-{i}-{}", "x".repeat(i as usize % 13)),
                    )
                })
                .collect();
            for (a, s) in &want {
                b.append(&datum(*a, s));
            }
            assert_eq!(b.records(), 40_000);
            let file = b.finish(&[("adstream.topic", b"ad-clicks")]);
            let (got, meta) = read_back(&file);
            assert_eq!(got, want, "{compression:?}");
            assert_eq!(
                meta.get("adstream.topic").map(Vec::as_slice),
                Some(&b"ad-clicks"[..])
            );
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let build = |seed: &[u8]| {
            let mut b = OcfBuilder::new(SCHEMA, Compression::Deflate, seed);
            b.append(&datum(1, "a"));
            b.finish(&[])
        };
        assert_eq!(build(b"k1"), build(b"k1"));
        assert_ne!(
            build(b"k1"),
            build(b"k2"),
            "the sync marker follows the seed"
        );
    }

    #[test]
    fn an_empty_file_is_valid() {
        let file = OcfBuilder::new(SCHEMA, Compression::Null, b"e").finish(&[]);
        assert!(read_back(&file).0.is_empty());
    }

    #[test]
    fn offsets_round_trip() {
        let offsets = [100, 101, 105, 1_000_000, 1_000_001];
        let enc = encode_offsets(100, &offsets);
        assert_eq!(decode_offsets(100, &enc).as_deref(), Some(&offsets[..]));
        assert_eq!(decode_offsets(0, &[0x80]), None, "truncated varint");
        assert_eq!(decode_offsets(5, &[]), Some(vec![]));
    }
}
