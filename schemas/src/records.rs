//! The records of CONTRACT.md.
//!
//! Each struct mirrors its `.avsc` file in `schemas/avro/` field for field and
//! in order (Avro binary has no field names, so order matters when encoding).
//! Times are epoch milliseconds (`timestamp-millis`), money is integer micros.
//! `metadata` is a `BTreeMap` so that encoding is byte-for-byte deterministic.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record with a fixed Avro schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    /// Full name, e.g. `adstream.events.Impression`.
    const FULL_NAME: &'static str;
    /// The `.avsc` text.
    const SCHEMA_JSON: &'static str;
    /// The parsed schema, built once per process.
    fn schema() -> &'static serde_avro_fast::Schema;

    /// Appends the Avro binary body of `self` (no framing) to `out`.
    ///
    /// The default serializes through serde_avro_fast. A record written on
    /// the hot path overrides it with a direct writer for its fixed schema;
    /// tests hold every override byte for byte to the serde path and to
    /// apache-avro.
    fn write_body(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let mut config = serde_avro_fast::ser::SerializerConfig::new(Self::schema());
        let buf = std::mem::take(out);
        *out = serde_avro_fast::to_datum(self, buf, &mut config).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Avro binary primitives for the direct writers.
mod avro_binary {
    /// `long`/`int`: zigzag, then base-128 varint.
    // Inlined, as the writers below are: a row calls them thirteen times,
    // and a call cost as much as the work.
    #[inline(always)]
    pub fn long(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    /// `string`: byte length, then the UTF-8 bytes.
    #[inline(always)]
    pub fn string(out: &mut Vec<u8>, s: &str) {
        long(out, s.len() as i64);
        bytes(out, s.as_bytes());
    }

    /// Appends `b`. From 4 to 16 bytes, as two overlapping copies of fixed
    /// size (the second overwrites what the first wrote past the first
    /// part): a copy of unknown length is a call to `memcpy`, which was
    /// most of the cost of a row.
    #[inline(always)]
    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        fn halves<const K: usize>(out: &mut Vec<u8>, b: &[u8]) {
            if let (Some(first), Some(last)) = (b.first_chunk::<K>(), b.last_chunk::<K>()) {
                let start = out.len();
                out.extend_from_slice(first);
                out.truncate(start + b.len() - K);
                out.extend_from_slice(last);
            }
        }
        match b.len() {
            4..=7 => halves::<4>(out, b),
            8..=16 => halves::<8>(out, b),
            _ => out.extend_from_slice(b),
        }
    }

    /// `["null", "double"]`: branch index, then the little-endian double.
    #[inline(always)]
    pub fn optional_double(out: &mut Vec<u8>, v: Option<f64>) {
        match v {
            None => long(out, 0),
            Some(d) => {
                long(out, 1);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}

macro_rules! avro_record {
    ($ty:ty, $name:literal, $file:literal $(, $write:item)?) => {
        impl AvroRecord for $ty {
            $($write)?
            const FULL_NAME: &'static str = $name;
            const SCHEMA_JSON: &'static str = include_str!(concat!("../avro/", $file));
            fn schema() -> &'static serde_avro_fast::Schema {
                static SCHEMA: OnceLock<serde_avro_fast::Schema> = OnceLock::new();
                SCHEMA.get_or_init(|| {
                    Self::SCHEMA_JSON.parse().expect(concat!(
                        "schemas/avro/",
                        $file,
                        " is a valid Avro schema"
                    ))
                })
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impression {
    pub impression_id: String,
    pub event_time: i64,
    pub campaign_id: String,
    pub ad_id: String,
    pub search_keyword: String,
    pub user_id: String,
    pub user_ip: String,
    pub state: String,
    pub device_type: String,
    pub cost_micros: i64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}
avro_record!(Impression, "adstream.events.Impression", "impression.avsc");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click {
    pub click_id: String,
    pub impression_id: String,
    pub event_time: i64,
    pub user_ip: String,
    pub cost_micros: i64,
}
avro_record!(Click, "adstream.events.Click", "click.avsc");

fn default_conversion_type() -> String {
    "purchase".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversion {
    pub conversion_id: String,
    pub click_id: String,
    pub impression_id: String,
    pub event_time: i64,
    #[serde(default = "default_conversion_type")]
    pub conversion_type: String,
    pub revenue_micros: i64,
}
avro_record!(Conversion, "adstream.events.Conversion", "conversion.avsc");

/// A borrowed view of an input record, for the processor's hot path: its
/// strings point into the payload, so decoding allocates nothing.
///
/// A view accepts exactly the payloads its record accepts: every string of
/// the record, used or not, is still read and checked as UTF-8, and fields
/// the view leaves out get the same defaults. Only fields a newer writer
/// adds are skipped unread, as the record skips them.
pub trait AvroView<'a>: Deserialize<'a> {
    /// The record this views; its schema name must match the writer's.
    type Record: AvroRecord;

    /// Reads a body written with exactly [`Self::Record`]'s own schema
    /// (same Parsing Canonical Form), field by field, without the schema
    /// walk of the serde path. It accepts and rejects exactly what that
    /// path does (a property test holds it to it); the caller checks that
    /// nothing is left over.
    fn read_exact(body: &mut avro_read::Body<'a>) -> Result<Self, avro_read::ReadError>;
}

/// Little-endian words read at any offset of a byte string: the
/// overlapping loads short strings are checked, compared and keyed with.
pub mod words {
    /// The 8 bytes at `at` (panics past the end, as indexing does).
    #[inline(always)]
    pub fn u64_at(s: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(w)
    }

    /// The 4 bytes at `at` (panics past the end, as indexing does).
    #[inline(always)]
    pub fn u32_at(s: &[u8], at: usize) -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[at..at + 4]);
        u32::from_le_bytes(w)
    }
}

/// Avro binary primitives for the views' direct readers, with the same
/// limits as serde_avro_fast's: a varint has at most 10 bytes (the tenth
/// below 2), a length is a non-negative `long`, strings are UTF-8.
pub mod avro_read {
    /// What made a body unreadable.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum ReadError {
        #[error("varint runs past the end of the body or past 10 bytes")]
        Varint,
        #[error("negative length")]
        NegativeLength,
        #[error("a length runs past the end of the body")]
        Eof,
        #[error("string is not valid UTF-8")]
        Utf8,
    }

    /// Whether every byte of `s` is below 0x80: [`slice::is_ascii`], in a
    /// few overlapping word loads for the short strings records are made
    /// of (std's loop takes a byte at a time below eight bytes, and at most
    /// a word at a time above; this read was a tenth of the engine's
    /// instructions).
    #[inline(always)]
    pub fn is_ascii(s: &[u8]) -> bool {
        const HIGH: u64 = 0x8080_8080_8080_8080;
        use super::words::{u32_at, u64_at};
        let n = s.len();
        let w8 = |at: usize| u64_at(s, at);
        let w4 = |at: usize| u64::from(u32_at(s, at));
        // Each case's loads together cover all `n` bytes.
        let or = match n {
            0 => 0,
            1..=3 => u64::from(s[0] | s[n / 2] | s[n - 1]),
            4..=7 => w4(0) | w4(n - 4),
            8..=16 => w8(0) | w8(n - 8),
            17..=32 => w8(0) | w8(8) | w8(n - 16) | w8(n - 8),
            _ => return s.is_ascii(),
        };
        or & HIGH == 0
    }

    /// The unread rest of a body.
    #[derive(Debug)]
    pub struct Body<'a> {
        rest: &'a [u8],
    }

    impl<'a> Body<'a> {
        pub fn new(body: &'a [u8]) -> Self {
            Body { rest: body }
        }

        /// Bytes not read yet.
        pub fn remaining(&self) -> usize {
            self.rest.len()
        }

        /// An unsigned base-128 varint.
        #[inline(always)]
        pub fn varint(&mut self) -> Result<u64, ReadError> {
            // Most are one byte: string lengths below 64.
            match self.rest.split_first() {
                Some((&b, rest)) if b < 0x80 => {
                    self.rest = rest;
                    Ok(u64::from(b))
                }
                _ => self.varint_long(),
            }
        }

        fn varint_long(&mut self) -> Result<u64, ReadError> {
            let mut v = 0u64;
            for (i, &b) in self.rest.iter().enumerate().take(10) {
                v |= u64::from(b & 0x7f) << (7 * i);
                let last = if i == 9 { b < 2 } else { b & 0x80 == 0 };
                if last || i == 9 {
                    if !last {
                        return Err(ReadError::Varint);
                    }
                    self.rest = &self.rest[i + 1..];
                    return Ok(v);
                }
            }
            Err(ReadError::Varint)
        }

        /// `long`/`int`: a zigzag varint.
        #[inline(always)]
        pub fn long(&mut self) -> Result<i64, ReadError> {
            let z = self.varint()?;
            Ok((z >> 1) as i64 ^ -((z & 1) as i64))
        }

        /// `string`: a length, then that many bytes of UTF-8.
        #[inline(always)]
        pub fn str(&mut self) -> Result<&'a str, ReadError> {
            let len = usize::try_from(self.long()?).map_err(|_| ReadError::NegativeLength)?;
            let Some((s, rest)) = self.rest.split_at_checked(len) else {
                return Err(ReadError::Eof);
            };
            self.rest = rest;
            if is_ascii(s) {
                // SAFETY: ASCII is UTF-8. (Checking for ASCII first is
                // cheaper on the short strings of our records.)
                return Ok(unsafe { std::str::from_utf8_unchecked(s) });
            }
            std::str::from_utf8(s).map_err(|_| ReadError::Utf8)
        }

        /// `map<string>`, read and checked: blocks of a count (negative:
        /// followed by the block's byte size) and that many key/value
        /// strings, ended by a zero count.
        pub fn map_of_strings(&mut self) -> Result<(), ReadError> {
            loop {
                let count = self.long()?;
                if count == 0 {
                    return Ok(());
                }
                if count < 0 {
                    self.varint()?;
                }
                for _ in 0..count.unsigned_abs() {
                    self.str()?;
                    self.str()?;
                }
            }
        }
    }
}

/// A string read and checked, then dropped (a field the engine does not use).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckedStr;

impl<'de> Deserialize<'de> for CheckedStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CheckedStr;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<CheckedStr, E> {
                Ok(CheckedStr)
            }
        }
        d.deserialize_str(V)
    }
}

/// A `map<string>` read and checked, then dropped (impression `metadata`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckedMap;

impl<'de> Deserialize<'de> for CheckedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CheckedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<CheckedMap, A::Error> {
                while m.next_entry::<CheckedStr, CheckedStr>()?.is_some() {}
                Ok(CheckedMap)
            }
        }
        d.deserialize_map(V)
    }
}

/// [`Impression`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ImpressionView<'a> {
    pub impression_id: &'a str,
    pub event_time: i64,
    pub campaign_id: &'a str,
    pub ad_id: &'a str,
    pub search_keyword: &'a str,
    pub user_id: CheckedStr,
    pub user_ip: &'a str,
    pub state: &'a str,
    pub device_type: &'a str,
    pub cost_micros: i64,
    #[serde(default)]
    pub metadata: CheckedMap,
}

impl<'a> AvroView<'a> for ImpressionView<'a> {
    type Record = Impression;

    fn read_exact(b: &mut avro_read::Body<'a>) -> Result<Self, avro_read::ReadError> {
        Ok(ImpressionView {
            impression_id: b.str()?,
            event_time: b.long()?,
            campaign_id: b.str()?,
            ad_id: b.str()?,
            search_keyword: b.str()?,
            user_id: b.str().map(|_| CheckedStr)?,
            user_ip: b.str()?,
            state: b.str()?,
            device_type: b.str()?,
            cost_micros: b.long()?,
            metadata: b.map_of_strings().map(|()| CheckedMap)?,
        })
    }
}

/// [`Click`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ClickView<'a> {
    pub click_id: &'a str,
    pub impression_id: &'a str,
    pub event_time: i64,
    pub user_ip: &'a str,
    pub cost_micros: i64,
}

impl<'a> AvroView<'a> for ClickView<'a> {
    type Record = Click;

    fn read_exact(b: &mut avro_read::Body<'a>) -> Result<Self, avro_read::ReadError> {
        Ok(ClickView {
            click_id: b.str()?,
            impression_id: b.str()?,
            event_time: b.long()?,
            user_ip: b.str()?,
            cost_micros: b.long()?,
        })
    }
}

/// [`Conversion`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ConversionView<'a> {
    pub conversion_id: &'a str,
    pub click_id: &'a str,
    pub impression_id: &'a str,
    pub event_time: i64,
    #[serde(default)]
    pub conversion_type: CheckedStr,
    pub revenue_micros: i64,
}

impl<'a> AvroView<'a> for ConversionView<'a> {
    type Record = Conversion;

    fn read_exact(b: &mut avro_read::Body<'a>) -> Result<Self, avro_read::ReadError> {
        Ok(ConversionView {
            conversion_id: b.str()?,
            click_id: b.str()?,
            impression_id: b.str()?,
            event_time: b.long()?,
            conversion_type: b.str().map(|_| CheckedStr)?,
            revenue_micros: b.long()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdMetric {
    pub window_start: i64,
    pub window_end: i64,
    pub campaign_id: String,
    pub ad_id: String,
    pub search_keyword: String,
    pub state: String,
    pub ip_range: String,
    pub device_type: String,
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
    pub cost_micros: i64,
    pub revenue_micros: i64,
    pub ctr: Option<f64>,
    pub conversion_rate: Option<f64>,
}
avro_record!(
    AdMetric,
    "adstream.results.AdMetric",
    "ad_metric.avsc",
    // One row per grain and window: the processor's most written record.
    fn write_body(&self, out: &mut Vec<u8>) -> Result<(), String> {
        self.as_ref().write_body(out);
        Ok(())
    }
);

/// An [`AdMetric`] borrowing its strings: what the processor writes its
/// rows as, from one string table per window instead of six strings per row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdMetricRef<'a> {
    pub window_start: i64,
    pub window_end: i64,
    pub campaign_id: &'a str,
    pub ad_id: &'a str,
    pub search_keyword: &'a str,
    pub state: &'a str,
    pub ip_range: &'a str,
    pub device_type: &'a str,
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
    pub cost_micros: i64,
    pub revenue_micros: i64,
    pub ctr: Option<f64>,
    pub conversion_rate: Option<f64>,
}

impl AdMetric {
    pub fn as_ref(&self) -> AdMetricRef<'_> {
        AdMetricRef {
            window_start: self.window_start,
            window_end: self.window_end,
            campaign_id: &self.campaign_id,
            ad_id: &self.ad_id,
            search_keyword: &self.search_keyword,
            state: &self.state,
            ip_range: &self.ip_range,
            device_type: &self.device_type,
            impressions: self.impressions,
            clicks: self.clicks,
            conversions: self.conversions,
            cost_micros: self.cost_micros,
            revenue_micros: self.revenue_micros,
            ctr: self.ctr,
            conversion_rate: self.conversion_rate,
        }
    }
}

impl AdMetricRef<'_> {
    /// The row as a framed payload of schema `id` (Confluent wire format),
    /// written into `out` (cleared first): what goes to the ad-metrics topic.
    pub fn encode_with_id(&self, id: u32, out: &mut Vec<u8>) {
        crate::codec::Codec::frame_with_id(id, out);
        self.write_body(out);
    }

    /// The Avro binary body of the row ([`AdMetric`]'s schema), appended
    /// to `out`: the direct writer [`AdMetric`]'s `write_body` uses.
    pub fn write_body(&self, out: &mut Vec<u8>) {
        use avro_binary::{long, optional_double, string};
        out.reserve(
            64 + self.campaign_id.len()
                + self.ad_id.len()
                + self.search_keyword.len()
                + self.state.len()
                + self.ip_range.len()
                + self.device_type.len(),
        );
        long(out, self.window_start);
        long(out, self.window_end);
        string(out, self.campaign_id);
        string(out, self.ad_id);
        string(out, self.search_keyword);
        string(out, self.state);
        string(out, self.ip_range);
        string(out, self.device_type);
        long(out, self.impressions);
        long(out, self.clicks);
        long(out, self.conversions);
        long(out, self.cost_micros);
        long(out, self.revenue_micros);
        optional_double(out, self.ctr);
        optional_double(out, self.conversion_rate);
    }

    pub fn to_owned(&self) -> AdMetric {
        AdMetric {
            window_start: self.window_start,
            window_end: self.window_end,
            campaign_id: self.campaign_id.to_owned(),
            ad_id: self.ad_id.to_owned(),
            search_keyword: self.search_keyword.to_owned(),
            state: self.state.to_owned(),
            ip_range: self.ip_range.to_owned(),
            device_type: self.device_type.to_owned(),
            impressions: self.impressions,
            clicks: self.clicks,
            conversions: self.conversions,
            cost_micros: self.cost_micros,
            revenue_micros: self.revenue_micros,
            ctr: self.ctr,
            conversion_rate: self.conversion_rate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignCtr {
    pub window_start: i64,
    pub window_end: i64,
    pub campaign_id: String,
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
    pub cost_micros: i64,
    pub revenue_micros: i64,
    pub ctr: Option<f64>,
    pub conversion_rate: Option<f64>,
}
avro_record!(
    CampaignCtr,
    "adstream.results.CampaignCtr",
    "campaign_ctr.avsc"
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyAlert {
    pub alert_id: String,
    pub campaign_id: String,
    pub metric: String,
    pub kind: String,
    pub window_start: i64,
    pub window_end: i64,
    pub value: f64,
    pub baseline: f64,
    pub score: f64,
    pub impressions: i64,
    pub clicks: i64,
    pub detected_at: i64,
}
avro_record!(
    AnomalyAlert,
    "adstream.results.AnomalyAlert",
    "anomaly_alert.avsc"
);

/// `numerator / denominator`, or `None` when the denominator is 0 (CONTRACT.md's rates).
pub fn rate(numerator: i64, denominator: i64) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field names and order of each struct must equal its .avsc file.
    fn avsc_fields(json: &str) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(json).expect("valid json");
        v["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .map(|f| f["name"].as_str().expect("name").to_owned())
            .collect()
    }

    proptest::proptest! {
        /// The direct writer writes what the general serde writer writes,
        /// whatever the lengths of the strings.
        #[test]
        fn ad_metric_rows_are_written_as_serde_writes_them(
            s in proptest::array::uniform6("\\PC{0,60}"),
            n in proptest::array::uniform7(proptest::prelude::any::<i64>()),
            ctr in proptest::prelude::any::<Option<f64>>(),
            conversion_rate in proptest::prelude::any::<Option<f64>>(),
        ) {
            let [campaign_id, ad_id, search_keyword, state, ip_range, device_type] = s;
            let m = AdMetric {
                window_start: n[0],
                window_end: n[1],
                campaign_id,
                ad_id,
                search_keyword,
                state,
                ip_range,
                device_type,
                impressions: n[2],
                clicks: n[3],
                conversions: n[4],
                cost_micros: n[5],
                revenue_micros: n[6],
                ctr,
                conversion_rate,
            };
            let mut direct = vec![9];
            m.as_ref().write_body(&mut direct);
            let mut config = serde_avro_fast::ser::SerializerConfig::new(AdMetric::schema());
            let by_serde = serde_avro_fast::to_datum(&m, vec![9], &mut config).expect("serde writes it");
            proptest::prop_assert_eq!(direct, by_serde);
        }
    }

    #[test]
    fn bytes_appends_every_length_whole() {
        for n in 0..40usize {
            let b: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37)).collect();
            let mut out = vec![7u8; 3];
            avro_binary::bytes(&mut out, &b);
            assert_eq!(out, [&[7, 7, 7], b.as_slice()].concat(), "{n} bytes");
        }
    }

    #[test]
    fn is_ascii_agrees_with_std_at_every_length_and_position() {
        for n in 0..80usize {
            let s: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37) & 0x7f).collect();
            assert!(avro_read::is_ascii(&s), "{n}");
            for at in 0..n {
                let mut t = s.clone();
                t[at] |= 0x80;
                assert!(!avro_read::is_ascii(&t), "{n} bytes, high bit at {at}");
            }
        }
    }

    fn struct_fields<T: Serialize>(sample: &T) -> Vec<String> {
        // serde_json's `preserve_order` keeps the struct's field order.
        match serde_json::to_value(sample).expect("serialize") {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not a struct: {other}"),
        }
    }

    #[test]
    fn structs_match_avsc_field_order() {
        let imp = crate::codec::tests::sample_impression();
        assert_eq!(struct_fields(&imp), avsc_fields(Impression::SCHEMA_JSON));
        let click = crate::codec::tests::sample_click();
        assert_eq!(struct_fields(&click), avsc_fields(Click::SCHEMA_JSON));
        let conv = crate::codec::tests::sample_conversion();
        assert_eq!(struct_fields(&conv), avsc_fields(Conversion::SCHEMA_JSON));
        let m = crate::codec::tests::sample_ad_metric();
        assert_eq!(struct_fields(&m), avsc_fields(AdMetric::SCHEMA_JSON));
        let c = crate::codec::tests::sample_campaign_ctr();
        assert_eq!(struct_fields(&c), avsc_fields(CampaignCtr::SCHEMA_JSON));
        let a = crate::codec::tests::sample_alert();
        assert_eq!(struct_fields(&a), avsc_fields(AnomalyAlert::SCHEMA_JSON));
    }

    #[test]
    fn full_names_match_schemas() {
        fn check<T: AvroRecord>() {
            let v: serde_json::Value = serde_json::from_str(T::SCHEMA_JSON).expect("json");
            let full = format!(
                "{}.{}",
                v["namespace"].as_str().expect("namespace"),
                v["name"].as_str().expect("name")
            );
            assert_eq!(full, T::FULL_NAME);
            let _ = T::schema();
        }
        check::<Impression>();
        check::<Click>();
        check::<Conversion>();
        check::<AdMetric>();
        check::<CampaignCtr>();
        check::<AnomalyAlert>();
    }

    #[test]
    fn direct_ad_metric_writer_matches_serde_and_apache_avro() {
        struct Rng(u64);
        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let long_text = "x".repeat(300);
        let texts = [
            "",
            "c-1",
            "running shoes",
            "ünïcödé ✓",
            "10.1.2.0/24",
            &long_text,
        ];
        let edges = [
            0,
            1,
            -1,
            63,
            64,
            -64,
            -65,
            i64::MAX,
            i64::MIN,
            1_767_225_600_000,
        ];
        for i in 0..2_000 {
            let n = |rng: &mut Rng| {
                let r = rng.next();
                if r.is_multiple_of(3) {
                    edges[(r / 3 % edges.len() as u64) as usize]
                } else {
                    (r as i64) >> (r % 64)
                }
            };
            let t = |rng: &mut Rng| texts[(rng.next() % texts.len() as u64) as usize].to_owned();
            let opt = |rng: &mut Rng| {
                let r = rng.next();
                match r % 3 {
                    0 => None,
                    1 => Some(f64::from_bits(r)),
                    _ => Some((r % 1000) as f64 / 7.0),
                }
            };
            let r = &mut rng;
            let m = AdMetric {
                window_start: n(r),
                window_end: n(r),
                campaign_id: t(r),
                ad_id: t(r),
                search_keyword: t(r),
                state: t(r),
                ip_range: t(r),
                device_type: t(r),
                impressions: n(r),
                clicks: n(r),
                conversions: n(r),
                cost_micros: n(r),
                revenue_micros: n(r),
                ctr: opt(r),
                conversion_rate: opt(r),
            };
            let mut direct = vec![7u8]; // appends after what is there
            m.write_body(&mut direct).expect("direct");
            let serde = serde_avro_fast::to_datum_vec(
                &m,
                &mut serde_avro_fast::ser::SerializerConfig::new(AdMetric::schema()),
            )
            .expect("serde");
            assert_eq!(direct[0], 7);
            assert_eq!(&direct[1..], &serde[..], "row {i}: {m:?}");
            if i < 200 {
                let schema = apache_avro::Schema::parse_str(AdMetric::SCHEMA_JSON).expect("schema");
                let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                    .build()
                    .expect("reader");
                let mut body = &direct[1..];
                let back: AdMetric = reader.read_deser(&mut body).expect("apache-avro reads it");
                assert!(body.is_empty());
                assert_eq!(back.window_start, m.window_start);
                assert_eq!(back.ip_range, m.ip_range);
                assert_eq!(back.revenue_micros, m.revenue_micros);
                assert_eq!(back.ctr.map(f64::to_bits), m.ctr.map(f64::to_bits));
            }
        }
    }

    #[test]
    fn rate_is_null_on_zero_denominator() {
        assert_eq!(rate(1, 0), None);
        assert_eq!(rate(1, 4), Some(0.25));
    }
}
