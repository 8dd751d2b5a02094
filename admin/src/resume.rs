//! Resuming partitions at stored positions on brokers that cannot fetch
//! from the middle of a record batch.
//!
//! Apache Kafka answers a fetch at any offset with the batch containing it
//! (the client drops the records before the offset). Some brokers (tansu,
//! measured) return nothing for an offset inside a batch, so a loader
//! resumed from a stored position would wait forever. [`ResumeGuard`]
//! watches each resumed partition: if it stays silent while the broker holds
//! data past the stored position, the partition is re-read from its start
//! and the records below the stored position are skipped. On Apache Kafka the
//! first fetch answers and the guard never acts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::Offset;

type Key = (String, i32);

/// How long a resumed partition may stay silent before the guard looks at it.
const SILENCE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct ResumeGuard {
    /// Resumed partitions that have not delivered a record yet: stored position, since.
    waiting: HashMap<Key, (i64, Instant)>,
    /// Partitions re-read from their start: records below this offset are skipped.
    skip_below: HashMap<Key, i64>,
}

impl ResumeGuard {
    /// Watches the partitions resumed at `positions` (next offset to read).
    pub fn new(positions: impl IntoIterator<Item = (Key, i64)>) -> Self {
        let now = Instant::now();
        ResumeGuard {
            waiting: positions
                .into_iter()
                .filter(|(_, o)| *o > 0)
                .map(|(k, o)| (k, (o, now)))
                .collect(),
            skip_below: HashMap::new(),
        }
    }

    /// Watches one more partition resumed at `position` (next offset to read).
    pub fn watch(&mut self, key: Key, position: i64) {
        self.skip_below.remove(&key);
        if position > 0 {
            self.waiting.insert(key, (position, Instant::now()));
        } else {
            self.waiting.remove(&key);
        }
    }

    /// Stops watching a partition (revoked).
    pub fn forget(&mut self, key: &Key) {
        self.skip_below.remove(key);
        self.waiting.remove(key);
    }

    /// Seeks silent resumed partitions that have data to their start.
    pub fn check<X: ConsumerContext, C: Consumer<X>>(
        &mut self,
        consumer: &C,
    ) -> Result<(), KafkaError> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let stalled: Vec<Key> = self
            .waiting
            .iter()
            .filter(|(_, (_, since))| since.elapsed() >= SILENCE)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stalled {
            let Some((from, _)) = self.waiting.remove(&key) else {
                continue;
            };
            // The broker's answer to ListOffsets can lie below the end (tansu
            // reports the start of the last batch + 1); the high watermark of
            // fetch responses does not. Either one past `from` means data.
            let listed = consumer
                .fetch_watermarks(&key.0, key.1, Duration::from_secs(5))
                .map(|(_, h)| h)
                .unwrap_or(-1);
            let high = listed.max(cached_high_watermark(consumer, &key.0, key.1).unwrap_or(-1));
            if high <= from {
                // Nothing past the position as far as we know: look again later.
                self.waiting.insert(key, (from, Instant::now()));
                continue;
            }
            {
                tracing::warn!(topic = %key.0, partition = key.1, from,
                    "no data from the stored position; re-reading the partition and skipping loaded records");
                consumer.seek(&key.0, key.1, Offset::Beginning, Duration::from_secs(10))?;
                self.skip_below.insert(key, from);
            }
        }
        Ok(())
    }

    /// Whether a record at `offset` of `partition` of `topic` is new (false:
    /// already loaded, skip it).
    pub fn admit(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        // Called for every record: nothing watched (the usual case, and
        // always on Apache Kafka once the first fetches answered) costs no
        // key and no lookup.
        if self.waiting.is_empty() && self.skip_below.is_empty() {
            return true;
        }
        let key = (topic.to_owned(), partition);
        if !self.waiting.is_empty() {
            self.waiting.remove(&key);
        }
        self.skip_below
            .get(&key)
            .is_none_or(|below| offset >= *below)
    }
}

/// The high watermark librdkafka last saw in a fetch response for a
/// partition (no broker request), if any.
pub fn cached_high_watermark<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let c_topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid for the consumer's lifetime, the
    // topic string outlives the call, and the out-pointers are valid i64s.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            c_topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_everything_until_a_partition_is_reread() {
        let key = ("t".to_owned(), 0);
        let mut g = ResumeGuard::new([(key.clone(), 10)]);
        assert!(g.admit("t", 0, 10));
        g.skip_below.insert(key.clone(), 10);
        assert!(!g.admit("t", 0, 9));
        assert!(g.admit("t", 0, 10));
        assert!(g.admit("u", 0, 0), "other partitions are not held back");
        assert!(g.waiting.is_empty(), "a delivered record ends the wait");
    }
}
