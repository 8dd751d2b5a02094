//! Confluent wire format: `0x00`, a 4-byte big-endian schema id, an Avro body.
//!
//! The registry is reached only on a cache miss: once to register each
//! (subject, schema) pair on first encode, once to fetch each unknown writer
//! schema on first decode. After that, [`Codec::encode_cached`] and
//! [`Codec::decode_cached`] are synchronous and never block, which is what the
//! processor's hot path calls.
//!
//! A body is decoded with its *writer* schema (the one its id names) into the
//! reader struct by field name, so records written with an older or newer
//! compatible schema still decode (added fields take their serde defaults).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::records::AvroRecord;
use crate::topics::value_subject;

/// Length of the Confluent header: magic byte plus schema id.
pub const HEADER_LEN: usize = 5;
pub const MAGIC_BYTE: u8 = 0;

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload of {len} bytes is shorter than the 5-byte Confluent header")]
    TooShort { len: usize },
    #[error("magic byte is {0:#04x}, not 0x00: not Confluent wire format")]
    WrongMagicByte(u8),
    #[error("schema id {0} is not known to the schema registry")]
    UnknownSchemaId(u32),
    #[error("schema id {id} is record {found}, but {expected} was expected")]
    WrongSchema {
        id: u32,
        expected: &'static str,
        found: String,
    },
    #[error("Avro body (schema id {id}) is truncated or corrupt: {reason}")]
    CorruptBody { id: u32, reason: String },
    #[error("schema id {id} names a schema that cannot be parsed: {reason}")]
    BadWriterSchema { id: u32, reason: String },
    #[error("could not encode {record}: {reason}")]
    Encode {
        record: &'static str,
        reason: String,
    },
    #[error(
        "the latest schema of {subject} (id {id}) cannot be read as this version expects: {reason}"
    )]
    Incompatible {
        subject: String,
        id: u32,
        reason: String,
    },
    #[error("schema registry {url}: {reason}")]
    Registry {
        url: String,
        reason: String,
        retryable: bool,
    },
}

impl CodecError {
    /// Whether trying again later can help (a registry outage can; a corrupt body cannot).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CodecError::Registry {
                retryable: true,
                ..
            }
        )
    }

    /// Short machine-readable reason, used in dead-letter headers and metrics labels.
    pub fn reason_code(&self) -> &'static str {
        match self {
            CodecError::TooShort { .. } => "too-short",
            CodecError::WrongMagicByte(_) => "wrong-magic-byte",
            CodecError::UnknownSchemaId(_) => "unknown-schema-id",
            CodecError::WrongSchema { .. } => "wrong-schema",
            CodecError::CorruptBody { .. } => "corrupt-body",
            CodecError::BadWriterSchema { .. } => "bad-writer-schema",
            CodecError::Encode { .. } => "encode-failed",
            CodecError::Incompatible { .. } => "incompatible-schema",
            CodecError::Registry { .. } => "registry-unavailable",
        }
    }
}

/// Splits a framed payload into its schema id and Avro body.
pub fn split_frame(payload: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if payload.len() < HEADER_LEN {
        return Err(CodecError::TooShort { len: payload.len() });
    }
    if payload[0] != MAGIC_BYTE {
        return Err(CodecError::WrongMagicByte(payload[0]));
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Ok((id, &payload[HEADER_LEN..]))
}

/// A writer schema as fetched from the registry.
struct WriterSchema {
    full_name: String,
    schema: serde_avro_fast::Schema,
    /// The schema as the registry gave it (for object container file headers).
    json: Arc<str>,
    /// Whether this is exactly our own schema of the record (same Parsing
    /// Canonical Form), so views can read it directly.
    exact: bool,
}

/// Full name (`namespace.name`) of a record schema given as JSON text.
pub fn record_full_name(schema_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(schema_json).ok()?;
    let name = v.get("name")?.as_str()?;
    if name.contains('.') {
        return Some(name.to_owned());
    }
    match v.get("namespace").and_then(|n| n.as_str()) {
        Some(ns) if !ns.is_empty() => Some(format!("{ns}.{name}")),
        _ => Some(name.to_owned()),
    }
}

/// The writer schema a [`Codec::decode_view_with`] caller used last.
#[derive(Default)]
pub struct WriterCache {
    last: Option<(u32, Arc<WriterSchema>)>,
}

#[derive(Default)]
struct Caches {
    /// Writer schemas by id.
    by_id: HashMap<u32, Arc<WriterSchema>>,
    /// Registered ids by (subject, record full name).
    registered: HashMap<(String, &'static str), u32>,
}

/// Encodes and decodes Confluent-framed Avro; cheap to clone and share across tasks.
#[derive(Clone)]
pub struct Codec {
    registry: Option<Arc<SrSettings>>,
    url: String,
    caches: Arc<RwLock<Caches>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("url", &self.url).finish()
    }
}

impl Codec {
    /// A codec backed by the schema registry at `url`.
    pub fn new(url: &str) -> Result<Self, CodecError> {
        let settings = SrSettings::new_builder(url.to_owned())
            .set_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| registry_error(url, e))?;
        Ok(Codec {
            registry: Some(Arc::new(settings)),
            url: url.to_owned(),
            caches: Arc::default(),
        })
    }

    /// A codec with no registry: only schemas added with [`Codec::insert_schema`]
    /// are known. For tests and for tools that work on recorded payloads.
    pub fn offline() -> Self {
        Codec {
            registry: None,
            url: "(offline)".to_owned(),
            caches: Arc::default(),
        }
    }

    /// Makes `id` known as `schema_json` without asking the registry.
    pub fn insert_schema(&self, id: u32, schema_json: &str) -> Result<(), CodecError> {
        let writer = parse_writer(id, schema_json)?;
        self.write_caches().by_id.insert(id, Arc::new(writer));
        Ok(())
    }

    /// Registers `T`'s schema under `<topic>-value` (or finds its id if it is
    /// already there) and caches the id. Fails if the registry rejects it as
    /// incompatible with the subject's history.
    pub async fn register<T: AvroRecord>(&self, topic: &str) -> Result<u32, CodecError> {
        let subject = value_subject(topic);
        if let Some(id) = self.cached_id::<T>(&subject) {
            return Ok(id);
        }
        let registry = self.registry.as_ref().ok_or_else(|| CodecError::Registry {
            url: self.url.clone(),
            reason: format!("offline codec cannot register {subject}"),
            retryable: false,
        })?;
        let supplied = SuppliedSchema::new(
            Some(T::FULL_NAME.to_owned()),
            SchemaType::Avro,
            T::SCHEMA_JSON.to_owned(),
        );
        let registered = post_schema(registry, subject.clone(), supplied)
            .await
            .map_err(|e| registry_error(&self.url, e))?;
        let id = registered.id;
        let writer = parse_writer(id, T::SCHEMA_JSON)?;
        let mut caches = self.write_caches();
        caches.registered.insert((subject, T::FULL_NAME), id);
        caches.by_id.entry(id).or_insert_with(|| Arc::new(writer));
        Ok(id)
    }

    /// The id `T` was registered with under `<topic>-value`, if already known.
    pub fn registered_id<T: AvroRecord>(&self, topic: &str) -> Option<u32> {
        self.cached_id::<T>(&value_subject(topic))
    }

    fn cached_id<T: AvroRecord>(&self, subject: &str) -> Option<u32> {
        let caches = self.read_caches();
        caches
            .registered
            .get(&(subject.to_owned(), T::FULL_NAME))
            .copied()
    }

    /// Encodes `value` framed with `id` into `out` (cleared first).
    pub fn encode_with_id<T: AvroRecord>(
        id: u32,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        Self::frame_with_id(id, out);
        value.write_body(out).map_err(|reason| CodecError::Encode {
            record: T::FULL_NAME,
            reason,
        })
    }

    /// Starts `out` (cleared) with the framing of schema `id`; the caller
    /// appends the body (e.g. [`AdMetricRef::write_body`](crate::records::AdMetricRef::write_body)).
    pub fn frame_with_id(id: u32, out: &mut Vec<u8>) {
        out.clear();
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&id.to_be_bytes());
    }

    /// Encodes `value` for `topic`, which must have been [`register`](Codec::register)ed.
    pub fn encode_cached<T: AvroRecord>(
        &self,
        topic: &str,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let id = self
            .registered_id::<T>(topic)
            .ok_or_else(|| CodecError::Encode {
                record: T::FULL_NAME,
                reason: format!("schema not registered for topic {topic}"),
            })?;
        Self::encode_with_id(id, value, out)
    }

    /// Registers on first use, then encodes.
    pub async fn encode<T: AvroRecord>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<Vec<u8>, CodecError> {
        let id = self.register::<T>(topic).await?;
        let mut out = Vec::with_capacity(128);
        Self::encode_with_id(id, value, &mut out)?;
        Ok(out)
    }

    /// Decodes a framed payload whose writer schema is already cached.
    /// Returns [`CodecError::UnknownSchemaId`] on a cache miss; [`Codec::decode`]
    /// then fetches the schema.
    pub fn decode_cached<T: AvroRecord>(&self, payload: &[u8]) -> Result<T, CodecError> {
        self.decode_framed(T::FULL_NAME, payload)
    }

    /// Decodes a framed payload whose writer schema is already cached into a
    /// borrowed [`AvroView`](crate::records::AvroView) of its record: what
    /// [`decode_cached`](Self::decode_cached) accepts, without allocating.
    pub fn decode_view<'a, V: crate::records::AvroView<'a>>(
        &self,
        payload: &'a [u8],
    ) -> Result<V, CodecError> {
        self.decode_framed(V::Record::FULL_NAME, payload)
    }

    /// [`decode_view`](Self::decode_view) through `cache`, which remembers
    /// the writer schema of the last id it saw: while the id repeats (every
    /// record of a topic, in practice) decoding takes no lock. Schemas are
    /// only ever added under an id, never changed, so a remembered one
    /// cannot go stale.
    pub fn decode_view_with<'a, V: crate::records::AvroView<'a>>(
        &self,
        cache: &mut WriterCache,
        payload: &'a [u8],
    ) -> Result<V, CodecError> {
        let (id, body) = split_frame(payload)?;
        let writer = match &mut cache.last {
            Some((last, w)) if *last == id => w,
            slot => {
                let w = self
                    .read_caches()
                    .by_id
                    .get(&id)
                    .cloned()
                    .ok_or(CodecError::UnknownSchemaId(id))?;
                &slot.insert((id, w)).1
            }
        };
        // (A writer of another record goes the serde way, which names it.)
        if !writer.exact || writer.full_name != V::Record::FULL_NAME {
            return decode_body::<V>(id, V::Record::FULL_NAME, writer, body);
        }
        decode_exact(id, body)
    }

    /// Decodes a framed payload with its cached writer schema, which must be
    /// the record `full_name`. The body is decoded under the cache's read
    /// lock (no copy of the schema's handle per record; writers only add
    /// schemas, rarely).
    fn decode_framed<'a, T: serde::Deserialize<'a>>(
        &self,
        full_name: &'static str,
        payload: &'a [u8],
    ) -> Result<T, CodecError> {
        let (id, body) = split_frame(payload)?;
        let caches = self.read_caches();
        let writer = caches
            .by_id
            .get(&id)
            .ok_or(CodecError::UnknownSchemaId(id))?;
        decode_body::<T>(id, full_name, writer, body)
    }

    /// Decodes a framed payload, fetching its writer schema on first sight of its id.
    pub async fn decode<T: AvroRecord>(&self, payload: &[u8]) -> Result<T, CodecError> {
        match self.decode_cached::<T>(payload) {
            Err(CodecError::UnknownSchemaId(id)) => {
                self.fetch_schema(id).await?;
                self.decode_cached::<T>(payload)
            }
            other => other,
        }
    }

    /// The text of writer schema `id`, if it is cached.
    pub fn schema_json(&self, id: u32) -> Option<Arc<str>> {
        self.read_caches().by_id.get(&id).map(|w| w.json.clone())
    }

    /// Whether schema `id` is cached (decoding it needs no registry call).
    pub fn knows(&self, id: u32) -> bool {
        self.read_caches().by_id.contains_key(&id)
    }

    /// Checks that `T` can read what writers of `<topic>-value` write now:
    /// the subject's latest schema, resolved against `T`'s schema with Avro's
    /// resolution rules. `Ok(None)` when the subject has no schema yet.
    pub async fn check_readable<T: AvroRecord>(
        &self,
        topic: &str,
    ) -> Result<Option<u32>, CodecError> {
        use schema_registry_converter::async_impl::schema_registry::get_schema_by_subject;
        use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
        let registry = self.registry.as_ref().ok_or_else(|| CodecError::Registry {
            url: self.url.clone(),
            reason: "offline codec cannot look up subjects".to_owned(),
            retryable: false,
        })?;
        let subject = value_subject(topic);
        let latest = match get_schema_by_subject(
            registry,
            &SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false),
        )
        .await
        {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(registry_error(&self.url, e)),
        };
        let incompatible = |reason: String| CodecError::Incompatible {
            subject: subject.clone(),
            id: latest.id,
            reason,
        };
        let writer = apache_avro::Schema::parse_str(&latest.schema)
            .map_err(|e| incompatible(e.to_string()))?;
        let reader = apache_avro::Schema::parse_str(T::SCHEMA_JSON)
            .map_err(|e| incompatible(e.to_string()))?;
        apache_avro::schema_compatibility::SchemaCompatibility::can_read(&writer, &reader)
            .map_err(|e| incompatible(e.to_string()))?;
        self.insert_schema(latest.id, &latest.schema)?;
        Ok(Some(latest.id))
    }

    /// Makes sure the writer schema of the framed `value` is cached, waiting
    /// out a registry that cannot be reached (backoff 200 ms doubling to
    /// 10 s) until `stop` is set. An unknown id or an unusable schema is left
    /// to `decode`, which reports it for the dead-letter topic: retrying
    /// would not change it.
    pub async fn wait_for_writer_schema(&self, value: &[u8], stop: &std::sync::atomic::AtomicBool) {
        let Ok((id, _)) = split_frame(value) else {
            return;
        };
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            match self.fetch_schema(id).await {
                Err(e) if e.is_retryable() && !stop.load(std::sync::atomic::Ordering::Relaxed) => {
                    tracing::warn!(schema_id = id, error = %e, retry_in_ms = delay.as_millis() as u64, "schema registry unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
                _ => return,
            }
        }
    }

    /// Fetches schema `id` from the registry into the cache.
    pub async fn fetch_schema(&self, id: u32) -> Result<(), CodecError> {
        if self.read_caches().by_id.contains_key(&id) {
            return Ok(());
        }
        let Some(registry) = self.registry.as_ref() else {
            return Err(CodecError::UnknownSchemaId(id));
        };
        let registered = match get_schema_by_id(id, registry).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Err(CodecError::UnknownSchemaId(id)),
            Err(e) => return Err(registry_error(&self.url, e)),
        };
        if registered.schema_type != SchemaType::Avro {
            return Err(CodecError::BadWriterSchema {
                id,
                reason: format!("schema type is {:?}, not Avro", registered.schema_type),
            });
        }
        self.insert_schema(id, &registered.schema)
    }

    fn read_caches(&self) -> std::sync::RwLockReadGuard<'_, Caches> {
        // A panic while holding the lock cannot leave the maps half-updated
        // (each write is one insert), so a poisoned lock is still usable.
        self.caches.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_caches(&self) -> std::sync::RwLockWriteGuard<'_, Caches> {
        self.caches.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse_writer(id: u32, schema_json: &str) -> Result<WriterSchema, CodecError> {
    let full_name = record_full_name(schema_json).ok_or_else(|| CodecError::BadWriterSchema {
        id,
        reason: "not a named record schema".to_owned(),
    })?;
    let schema = schema_json
        .parse::<serde_avro_fast::Schema>()
        .map_err(|e| CodecError::BadWriterSchema {
            id,
            reason: e.to_string(),
        })?;
    let exact = is_own_schema(&full_name, schema_json);
    Ok(WriterSchema {
        full_name,
        schema,
        json: Arc::from(schema_json),
        exact,
    })
}

/// Whether `schema_json` is our own schema of the input record `full_name`
/// up to docs and defaults (same Parsing Canonical Form as apache-avro
/// computes it, which keeps logical types: a writer that differs only
/// there takes the serde path, which is merely slower).
fn is_own_schema(full_name: &str, schema_json: &str) -> bool {
    use crate::records::{Click, Conversion, Impression};
    let own = [
        Impression::SCHEMA_JSON,
        Click::SCHEMA_JSON,
        Conversion::SCHEMA_JSON,
    ]
    .into_iter()
    .find(|json| record_full_name(json).as_deref() == Some(full_name));
    let canonical = |json: &str| {
        apache_avro::Schema::parse_str(json)
            .ok()
            .map(|s| s.canonical_form())
    };
    own.is_some_and(|own| {
        let own = canonical(own);
        own.is_some() && own == canonical(schema_json)
    })
}

fn decode_body<'a, T: serde::Deserialize<'a>>(
    id: u32,
    full_name: &'static str,
    writer: &WriterSchema,
    body: &'a [u8],
) -> Result<T, CodecError> {
    if writer.full_name != full_name {
        return Err(CodecError::WrongSchema {
            id,
            expected: full_name,
            found: writer.full_name.clone(),
        });
    }
    // Slice input: faster than a reader, and strings are copied once.
    let mut state = serde_avro_fast::de::DeserializerState::from_slice(body, &writer.schema);
    let value = serde::Deserialize::deserialize(state.deserializer()).map_err(|e| {
        CodecError::CorruptBody {
            id,
            reason: e.to_string(),
        }
    })?;
    // A well-formed body is consumed exactly; leftovers mean corruption or a
    // payload written with a different schema under the same id. (Skipping
    // one more byte succeeds only if one is left.)
    let mut rest = state.into_reader();
    if serde_avro_fast::de::read::Read::skip_bytes(&mut rest, 1).is_ok() {
        return Err(CodecError::CorruptBody {
            id,
            reason: "bytes left over after the record".to_owned(),
        });
    }
    Ok(value)
}

/// Reads a body written with exactly `V`'s own record schema.
fn decode_exact<'a, V: crate::records::AvroView<'a>>(
    id: u32,
    body: &'a [u8],
) -> Result<V, CodecError> {
    let corrupt = |reason: String| CodecError::CorruptBody { id, reason };
    let mut reader = crate::records::avro_read::Body::new(body);
    let view = V::read_exact(&mut reader).map_err(|e| corrupt(e.to_string()))?;
    if reader.remaining() > 0 {
        return Err(corrupt("bytes left over after the record".to_owned()));
    }
    Ok(view)
}

fn is_not_found(e: &SRCError) -> bool {
    // The converter flattens HTTP errors into text; Confluent's "not found"
    // error codes are 40401 (subject) and 40403 (schema).
    let text = format!("{e:?}");
    text.contains("40403") || text.contains("404")
}

fn registry_error(url: &str, e: SRCError) -> CodecError {
    CodecError::Registry {
        url: url.to_owned(),
        retryable: e.retriable,
        reason: e.error.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::records::*;

    pub fn sample_impression() -> Impression {
        Impression {
            impression_id: "imp-1".into(),
            event_time: 1_700_000_000_123,
            campaign_id: "c-7".into(),
            ad_id: "ad-3".into(),
            search_keyword: "running shoes".into(),
            user_id: "u-9".into(),
            user_ip: "2001:db8::1".into(),
            state: "US-CA".into(),
            device_type: "mobile".into(),
            cost_micros: 1_250,
            metadata: [("src".to_owned(), "test".to_owned())].into(),
        }
    }
    pub fn sample_click() -> Click {
        Click {
            click_id: "clk-1".into(),
            impression_id: "imp-1".into(),
            event_time: 1_700_000_004_000,
            user_ip: "10.1.2.3".into(),
            cost_micros: 420_000,
        }
    }
    pub fn sample_conversion() -> Conversion {
        Conversion {
            conversion_id: "cv-1".into(),
            click_id: "clk-1".into(),
            impression_id: "imp-1".into(),
            event_time: 1_700_000_900_000,
            conversion_type: "signup".into(),
            revenue_micros: 19_990_000,
        }
    }
    pub fn sample_ad_metric() -> AdMetric {
        AdMetric {
            window_start: 1_700_000_040_000,
            window_end: 1_700_000_100_000,
            campaign_id: "c-7".into(),
            ad_id: "ad-3".into(),
            search_keyword: "running shoes".into(),
            state: "US-CA".into(),
            ip_range: "2001:db8::/48".into(),
            device_type: "mobile".into(),
            impressions: 10,
            clicks: 0,
            conversions: 0,
            cost_micros: 12_500,
            revenue_micros: 0,
            ctr: Some(0.0),
            conversion_rate: None,
        }
    }
    pub fn sample_campaign_ctr() -> CampaignCtr {
        CampaignCtr {
            window_start: 1_700_000_040_000,
            window_end: 1_700_000_100_000,
            campaign_id: "c-7".into(),
            impressions: 10,
            clicks: 3,
            conversions: 1,
            cost_micros: 1_012_500,
            revenue_micros: 19_990_000,
            ctr: Some(0.3),
            conversion_rate: Some(1.0 / 3.0),
        }
    }
    pub fn sample_alert() -> AnomalyAlert {
        AnomalyAlert {
            alert_id: "c-7:CTR:SPIKE:1700000040000".into(),
            campaign_id: "c-7".into(),
            metric: "CTR".into(),
            kind: "SPIKE".into(),
            window_start: 1_700_000_040_000,
            window_end: 1_700_000_100_000,
            value: 0.3,
            baseline: 0.02,
            score: 7.5,
            impressions: 1000,
            clicks: 300,
            detected_at: 1_700_000_200_000,
        }
    }

    fn codec_with<T: AvroRecord>(id: u32) -> Codec {
        let codec = Codec::offline();
        codec.insert_schema(id, T::SCHEMA_JSON).expect("schema");
        codec
    }

    fn round_trip<T: AvroRecord + PartialEq + std::fmt::Debug>(value: T) {
        let codec = codec_with::<T>(42);
        let mut buf = Vec::new();
        Codec::encode_with_id(42, &value, &mut buf).expect("encode");
        assert_eq!(&buf[..5], &[0, 0, 0, 0, 42]);
        let back: T = codec.decode_cached(&buf).expect("decode");
        assert_eq!(back, value);
        // Cross-check the body against apache-avro, an independent implementation.
        let schema = apache_avro::Schema::parse_str(T::SCHEMA_JSON).expect("schema");
        let mut body = &buf[5..];
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .expect("reader");
        let again: T = reader.read_deser(&mut body).expect("apache-avro reads it");
        assert!(body.is_empty(), "apache-avro consumed the whole body");
        assert_eq!(again, value);
    }

    #[test]
    fn round_trip_every_record() {
        round_trip(sample_impression());
        round_trip(sample_click());
        round_trip(sample_conversion());
        round_trip(sample_ad_metric());
        round_trip(sample_campaign_ctr());
        round_trip(sample_alert());
    }

    #[test]
    fn too_short() {
        let codec = codec_with::<Click>(1);
        for len in 0..5 {
            let err = codec.decode_cached::<Click>(&vec![0u8; len]).unwrap_err();
            assert!(
                matches!(err, CodecError::TooShort { len: l } if l == len),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_magic_byte() {
        let codec = codec_with::<Click>(1);
        let mut buf = Vec::new();
        Codec::encode_with_id(1, &sample_click(), &mut buf).expect("encode");
        buf[0] = b'{';
        let err = codec.decode_cached::<Click>(&buf).unwrap_err();
        assert!(matches!(err, CodecError::WrongMagicByte(b'{')), "{err}");
        assert_eq!(err.reason_code(), "wrong-magic-byte");
    }

    #[test]
    fn unknown_schema_id() {
        let codec = codec_with::<Click>(1);
        let mut buf = Vec::new();
        Codec::encode_with_id(77, &sample_click(), &mut buf).expect("encode");
        let err = codec.decode_cached::<Click>(&buf).unwrap_err();
        assert!(matches!(err, CodecError::UnknownSchemaId(77)), "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn offline_decode_of_unknown_id_is_unknown_schema() {
        let codec = Codec::offline();
        let mut buf = Vec::new();
        Codec::encode_with_id(5, &sample_click(), &mut buf).expect("encode");
        let err = codec.decode::<Click>(&buf).await.unwrap_err();
        assert!(matches!(err, CodecError::UnknownSchemaId(5)), "{err}");
    }

    #[test]
    fn truncated_body() {
        let codec = codec_with::<Impression>(3);
        let mut buf = Vec::new();
        Codec::encode_with_id(3, &sample_impression(), &mut buf).expect("encode");
        for cut in [6, buf.len() / 2, buf.len() - 1] {
            let err = codec.decode_cached::<Impression>(&buf[..cut]).unwrap_err();
            assert!(
                matches!(err, CodecError::CorruptBody { id: 3, .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_body() {
        let codec = codec_with::<Click>(3);
        // A string length of -1 (zigzag 0x01) is impossible.
        let err = codec
            .decode_cached::<Click>(&[0, 0, 0, 0, 3, 0x01, b'x'])
            .unwrap_err();
        assert!(matches!(err, CodecError::CorruptBody { .. }), "{err}");
        // Trailing garbage after a valid record.
        let mut buf = Vec::new();
        Codec::encode_with_id(3, &sample_click(), &mut buf).expect("encode");
        buf.extend_from_slice(&[1, 2, 3]);
        let err = codec.decode_cached::<Click>(&buf).unwrap_err();
        assert!(
            matches!(&err, CodecError::CorruptBody { reason, .. } if reason.contains("left over")),
            "{err}"
        );
    }

    #[test]
    fn record_of_the_wrong_schema() {
        let codec = Codec::offline();
        codec.insert_schema(1, Click::SCHEMA_JSON).expect("schema");
        let mut buf = Vec::new();
        Codec::encode_with_id(1, &sample_click(), &mut buf).expect("encode");
        let err = codec.decode_cached::<Impression>(&buf).unwrap_err();
        match err {
            CodecError::WrongSchema {
                id,
                expected,
                found,
            } => {
                assert_eq!(id, 1);
                assert_eq!(expected, "adstream.events.Impression");
                assert_eq!(found, "adstream.events.Click");
            }
            other => panic!("expected WrongSchema, got {other}"),
        }
    }

    /// Decodes `buf` as a record and as its view; both must accept or both
    /// reject it, and an accepted view must equal the record.
    fn view_agrees<'a, T, V>(codec: &Codec, buf: &'a [u8], same: impl Fn(&T, &V) -> bool)
    where
        T: AvroRecord + std::fmt::Debug,
        V: AvroView<'a, Record = T> + std::fmt::Debug,
    {
        match (codec.decode_cached::<T>(buf), codec.decode_view::<V>(buf)) {
            (Ok(r), Ok(v)) => assert!(same(&r, &v), "{r:?} vs {v:?}"),
            (Err(a), Err(b)) => assert_eq!(a.reason_code(), b.reason_code()),
            (r, v) => panic!("record {r:?} but view {v:?} for {buf:?}"),
        }
        // Through a writer cache: filling it, then hitting it.
        let mut cache = WriterCache::default();
        for _ in 0..2 {
            match (
                codec.decode_view::<V>(buf),
                codec.decode_view_with::<V>(&mut cache, buf),
            ) {
                (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
                (Err(a), Err(b)) => assert_eq!(a.reason_code(), b.reason_code()),
                (a, b) => panic!("view {a:?} but cached {b:?} for {buf:?}"),
            }
        }
    }

    #[test]
    fn a_writer_cache_follows_the_id_of_each_record() {
        let codec = codec_with::<Impression>(3);
        let mut three = Vec::new();
        Codec::encode_with_id(3, &sample_impression(), &mut three).expect("encode");
        let mut unknown = three.clone();
        unknown[4] = 9;
        let mut cache = WriterCache::default();
        for _ in 0..2 {
            let v: ImpressionView = codec.decode_view_with(&mut cache, &three).expect("id 3");
            assert_eq!(v.search_keyword, "running shoes");
            assert!(matches!(
                codec.decode_view_with::<ImpressionView>(&mut cache, &unknown),
                Err(CodecError::UnknownSchemaId(9))
            ));
        }
        // A click's schema under another id is refused for an impression
        // view, as without the cache.
        let codec = codec_with::<Click>(4);
        let mut click = Vec::new();
        Codec::encode_with_id(4, &sample_click(), &mut click).expect("encode");
        let mut cache = WriterCache::default();
        assert!(matches!(
            codec.decode_view_with::<ImpressionView>(&mut cache, &click),
            Err(CodecError::WrongSchema { id: 4, .. })
        ));
    }

    fn same_impression(r: &Impression, v: &ImpressionView) -> bool {
        r.impression_id == v.impression_id
            && r.event_time == v.event_time
            && r.campaign_id == v.campaign_id
            && r.ad_id == v.ad_id
            && r.search_keyword == v.search_keyword
            && r.user_ip == v.user_ip
            && r.state == v.state
            && r.device_type == v.device_type
            && r.cost_micros == v.cost_micros
    }

    #[test]
    fn views_accept_and_reject_what_records_do() {
        let codec = codec_with::<Impression>(3);
        let mut buf = Vec::new();
        Codec::encode_with_id(3, &sample_impression(), &mut buf).expect("encode");
        let v: ImpressionView = codec.decode_view(&buf).expect("view");
        assert_eq!(v.search_keyword, "running shoes");
        // Every cut, and every single-byte corruption, is judged alike.
        for cut in 0..buf.len() {
            view_agrees(&codec, &buf[..cut], same_impression);
        }
        for i in 5..buf.len() {
            for b in [0x00, 0x01, 0x7f, 0x80, 0xc3, 0xff] {
                let mut bad = buf.clone();
                bad[i] = b;
                view_agrees(&codec, &bad, same_impression);
            }
        }
        // Invalid UTF-8 in fields the engine does not read (user_id, metadata).
        for field in ["u-9", "src", "test"] {
            let at = buf
                .windows(field.len())
                .position(|w| w == field.as_bytes())
                .expect("field bytes");
            let mut bad = buf.clone();
            bad[at] = 0xff;
            assert!(codec.decode_cached::<Impression>(&bad).is_err());
            assert!(
                codec.decode_view::<ImpressionView>(&bad).is_err(),
                "{field}"
            );
        }

        let codec = codec_with::<Click>(4);
        Codec::encode_with_id(4, &sample_click(), &mut buf).expect("encode");
        view_agrees(&codec, &buf, |r: &Click, v: &ClickView| {
            r.click_id == v.click_id
                && r.impression_id == v.impression_id
                && r.event_time == v.event_time
                && r.user_ip == v.user_ip
                && r.cost_micros == v.cost_micros
        });
        let codec = codec_with::<Conversion>(5);
        Codec::encode_with_id(5, &sample_conversion(), &mut buf).expect("encode");
        let same_conv = |r: &Conversion, v: &ConversionView| {
            r.conversion_id == v.conversion_id
                && r.click_id == v.click_id
                && r.impression_id == v.impression_id
                && r.event_time == v.event_time
                && r.revenue_micros == v.revenue_micros
        };
        view_agrees(&codec, &buf, same_conv);
        let at = buf
            .windows(6)
            .position(|w| w == b"signup")
            .expect("conversion_type bytes");
        buf[at] = 0xff;
        assert!(codec.decode_view::<ConversionView>(&buf).is_err());
        view_agrees(&codec, &buf, same_conv);
        // A view checks the writer's schema name as the record does.
        let err = codec.decode_view::<ImpressionView>(&buf).unwrap_err();
        assert!(matches!(err, CodecError::WrongSchema { .. }), "{err}");
    }

    #[test]
    fn older_writer_schema_decodes_with_defaults() {
        // A Conversion written before conversion_type existed.
        let old = r#"{"type":"record","name":"Conversion","namespace":"adstream.events","fields":[
            {"name":"conversion_id","type":"string"},{"name":"click_id","type":"string"},
            {"name":"impression_id","type":"string"},
            {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"revenue_micros","type":"long"}]}"#;
        let codec = Codec::offline();
        codec.insert_schema(9, old).expect("schema");
        let schema: serde_avro_fast::Schema = old.parse().expect("parse");
        #[derive(serde::Serialize)]
        struct OldConversion<'a> {
            conversion_id: &'a str,
            click_id: &'a str,
            impression_id: &'a str,
            event_time: i64,
            revenue_micros: i64,
        }
        let body = serde_avro_fast::to_datum_vec(
            &OldConversion {
                conversion_id: "cv",
                click_id: "ck",
                impression_id: "im",
                event_time: 5,
                revenue_micros: 7,
            },
            &mut serde_avro_fast::ser::SerializerConfig::new(&schema),
        )
        .expect("encode");
        let mut buf = vec![0, 0, 0, 0, 9];
        buf.extend_from_slice(&body);
        let conv: Conversion = codec.decode_cached(&buf).expect("decode");
        assert_eq!(conv.conversion_type, "purchase");
        assert_eq!(conv.revenue_micros, 7);
    }

    #[test]
    fn encoding_is_deterministic() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        Codec::encode_with_id(1, &sample_impression(), &mut a).expect("encode");
        Codec::encode_with_id(1, &sample_impression(), &mut b).expect("encode");
        assert_eq!(a, b);
    }

    /// The direct readers of the views accept and reject exactly what the
    /// serde path accepts and rejects, and read the same values.
    mod exact_reader {
        use super::*;
        use proptest::prelude::*;

        fn writer_of<R: AvroRecord>() -> WriterSchema {
            parse_writer(1, R::SCHEMA_JSON).expect("own schema parses")
        }

        fn agree<'a, V: AvroView<'a> + std::fmt::Debug + PartialEq>(
            writer: &WriterSchema,
            body: &'a [u8],
        ) -> Result<(), TestCaseError> {
            let by_serde = decode_body::<V>(1, V::Record::FULL_NAME, writer, body);
            let direct = decode_exact::<V>(1, body);
            match (&by_serde, &direct) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "serde {by_serde:?} but direct {direct:?}"),
            }
            Ok(())
        }

        /// A body, then damage: cut, one byte changed, one inserted, or
        /// bytes appended.
        fn damaged(body: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
            let n = body.len();
            prop_oneof![
                Just(body.clone()),
                (0..=n).prop_map({
                    let b = body.clone();
                    move |k| b[..k].to_vec()
                }),
                (0..n.max(1), any::<u8>()).prop_map({
                    let b = body.clone();
                    move |(i, x)| {
                        let mut b = b.clone();
                        if let Some(v) = b.get_mut(i) {
                            *v = x;
                        }
                        b
                    }
                }),
                (0..=n, any::<u8>()).prop_map({
                    let b = body.clone();
                    move |(i, x)| {
                        let mut b = b.clone();
                        b.insert(i, x);
                        b
                    }
                }),
                proptest::collection::vec(any::<u8>(), 1..12).prop_map(move |tail| {
                    let mut b = body.clone();
                    b.extend(tail);
                    b
                }),
            ]
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof!["[a-z0-9.:-]{0,12}", ".{0,6}", "\\PC{0,140}"]
        }

        fn impression() -> impl Strategy<Value = Impression> {
            (
                (text(), any::<i64>(), text(), text(), text(), text()),
                (text(), text(), text(), any::<i64>()),
                proptest::collection::btree_map(text(), text(), 0..4),
            )
                .prop_map(|((id, t, c, a, k, u), (ip, st, d, cost), metadata)| {
                    Impression {
                        impression_id: id,
                        event_time: t,
                        campaign_id: c,
                        ad_id: a,
                        search_keyword: k,
                        user_id: u,
                        user_ip: ip,
                        state: st,
                        device_type: d,
                        cost_micros: cost,
                        metadata,
                    }
                })
        }

        fn body_of<R: AvroRecord>(r: &R) -> Vec<u8> {
            let mut out = Vec::new();
            r.write_body(&mut out).expect("encodes");
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn impressions(body in impression().prop_flat_map(|r| damaged(body_of(&r)))) {
                agree::<ImpressionView>(&writer_of::<Impression>(), &body)?;
            }

            #[test]
            fn clicks(body in (text(), text(), any::<i64>(), text(), any::<i64>())
                .prop_flat_map(|(c, i, t, ip, cost)| damaged(body_of(&Click {
                    click_id: c, impression_id: i, event_time: t, user_ip: ip, cost_micros: cost,
                })))) {
                agree::<ClickView>(&writer_of::<Click>(), &body)?;
            }

            #[test]
            fn conversions(body in (text(), text(), text(), any::<i64>(), text(), any::<i64>())
                .prop_flat_map(|(v, c, i, t, ty, rev)| damaged(body_of(&Conversion {
                    conversion_id: v, click_id: c, impression_id: i, event_time: t,
                    conversion_type: ty, revenue_micros: rev,
                })))) {
                agree::<ConversionView>(&writer_of::<Conversion>(), &body)?;
            }

            #[test]
            fn arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..64)) {
                agree::<ImpressionView>(&writer_of::<Impression>(), &body)?;
                agree::<ClickView>(&writer_of::<Click>(), &body)?;
                agree::<ConversionView>(&writer_of::<Conversion>(), &body)?;
            }

            /// Everything after the fixed fields: map blocks of any shape,
            /// negative counts with byte sizes included, varints of any length.
            #[test]
            fn arbitrary_metadata(tail in proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1), Just(2), Just(3), Just(0x80), Just(0xff), Just(b'a'), any::<u8>()],
                0..40,
            )) {
                let mut r = sample_impression();
                r.metadata.clear();
                let mut body = body_of(&r);
                body.pop(); // the empty map's 0 count
                body.extend(tail);
                agree::<ImpressionView>(&writer_of::<Impression>(), &body)?;
            }
        }

        #[test]
        fn negative_block_counts_and_long_varints() {
            let mut r = sample_impression();
            r.metadata.clear();
            let mut prefix = body_of(&r);
            prefix.pop();
            for tail in [
                // count -1 (zigzag 1), byte size 4, "a" -> "b", end
                vec![1u8, 8, 2, b'a', 2, b'b', 0],
                // count 1 written in 10 bytes, the last below 2
                vec![
                    0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 2, b'a', 2, b'b', 0,
                ],
                // an 11-byte varint, and a tenth byte of 2
                vec![
                    0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
                ],
                vec![0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02],
            ] {
                let mut body = prefix.clone();
                body.extend(&tail);
                agree::<ImpressionView>(&writer_of::<Impression>(), &body)
                    .map_err(|e| format!("tail {tail:?}: {e}"))
                    .expect("agree");
            }
            let mut ok = prefix.clone();
            ok.extend([1u8, 8, 2, b'a', 2, b'b', 0]);
            assert!(decode_exact::<ImpressionView>(1, &ok).is_ok());
        }

        #[test]
        fn only_our_own_schemas_are_read_directly() {
            assert!(writer_of::<Impression>().exact);
            assert!(writer_of::<Click>().exact);
            assert!(writer_of::<Conversion>().exact);
            // Docs and defaults do not change the binary layout.
            let bare = r#"{"type":"record","name":"Click","namespace":"adstream.events","fields":[
                {"name":"click_id","type":"string"},{"name":"impression_id","type":"string"},
                {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},{"name":"user_ip","type":"string"},
                {"name":"cost_micros","type":"long"}]}"#;
            assert!(parse_writer(9, bare).expect("parses").exact);
            // A field more, or fields in another order, do.
            let more = bare.replace(
                r#"{"name":"cost_micros","type":"long"}"#,
                r#"{"name":"cost_micros","type":"long"},{"name":"x","type":"string","default":""}"#,
            );
            assert!(!parse_writer(9, &more).expect("parses").exact);
            let reordered = bare.replace(
                r#"{"name":"click_id","type":"string"},{"name":"impression_id","type":"string"}"#,
                r#"{"name":"impression_id","type":"string"},{"name":"click_id","type":"string"}"#,
            );
            assert!(!parse_writer(9, &reordered).expect("parses").exact);
            // Another record is never read as ours.
            assert!(
                !parse_writer(9, AdMetric::SCHEMA_JSON)
                    .expect("parses")
                    .exact
            );
        }
    }
}
