//! The record of exactly what was sent: one JSON line per record, in send order.
//!
//! Line shape:
//! `{"seq":0,"topic":"ad-clicks","partition":2,"key":"imp-…","type":"click","value":{…},"label":"normal"}`.
//! `type` is `impression`, `click`, `conversion` (with `value` the record as
//! JSON, field names as in the Avro schema) or `raw` (with `value_hex` the exact
//! bytes of an undecodable value). `topic` is CONTRACT.md's name, without any
//! `--topic-prefix`. Order within a (topic, partition) is Kafka offset order.
//! `label` is only the generator's intent (normal, duplicate, late, orphan,
//! beyond-window, invalid); an oracle must not rely on it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::generator::{GeneratedRecord, Payload};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedLine {
    pub seq: u64,
    pub topic: String,
    pub partition: i32,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_hex: Option<String>,
    pub label: String,
}

/// Writes [`RecordedLine`]s.
pub struct Recorder {
    out: BufWriter<File>,
    seq: u64,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Recorder {
            out: BufWriter::with_capacity(1 << 20, File::create(path)?),
            seq: 0,
        })
    }

    pub fn write(
        &mut self,
        record: &GeneratedRecord,
        partition: i32,
        value_bytes: &[u8],
    ) -> std::io::Result<()> {
        let (kind, value, value_hex) = match &record.payload {
            Payload::Impression(r) => ("impression", Some(to_json(r)?), None),
            Payload::Click(r) => ("click", Some(to_json(r)?), None),
            Payload::Conversion(r) => ("conversion", Some(to_json(r)?), None),
            Payload::Broken(_) => ("raw", None, Some(hex(value_bytes))),
        };
        let line = RecordedLine {
            seq: self.seq,
            topic: record.topic.name().to_owned(),
            partition,
            key: record.key.clone(),
            kind: kind.to_owned(),
            value,
            value_hex,
            label: record.label.name().to_owned(),
        };
        self.seq += 1;
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

fn to_json<T: Serialize>(v: &T) -> std::io::Result<serde_json::Value> {
    serde_json::to_value(v).map_err(std::io::Error::other)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Reads a recording back.
pub fn read(path: &Path) -> std::io::Result<Vec<RecordedLine>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}
