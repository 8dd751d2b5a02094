//! Task checkpoints in object storage (issue 7, durable state).
//!
//! A checkpoint is a task's serialized state after it has processed exactly
//! the records below `positions` (one next-offset per input partition of the
//! task). It is named by those positions:
//! `<root>/<group>/<task>/<p0>-<p1>-….ckpt`.
//!
//! Why any checkpoint at or below the committed offsets is a valid start:
//! a task's state after the records below `positions` is a function of those
//! records alone (CONTRACT.md's determinism), whether or not the transaction
//! that was open when it was written committed. Recovery therefore picks the
//! newest checkpoint whose positions are all at or below the group's
//! committed offsets, and replays from there up to the committed offsets with
//! outputs suppressed (they were committed before). No manifest has to be
//! committed atomically with the offsets, which matters because not every
//! broker keeps offset-commit metadata (tansu drops it).

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use adstream_admin::store::{open_store, StoreUrlError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointStoreError {
    #[error(transparent)]
    Url(#[from] StoreUrlError),
    #[error("checkpoint store: {context}: {source}")]
    Store {
        context: String,
        source: object_store::Error,
    },
}

/// Where a group's task checkpoints live.
#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
}

fn name(positions: &[i64]) -> String {
    let parts: Vec<String> = positions.iter().map(|p| format!("{p:020}")).collect();
    format!("{}.ckpt", parts.join("-"))
}

/// The positions a checkpoint file name (`<p0>-<p1>-….ckpt`) covers.
pub fn positions_in_name(file: &str) -> Option<Vec<i64>> {
    file.strip_suffix(".ckpt")?
        .split('-')
        .map(|p| p.parse().ok())
        .collect()
}

impl CheckpointStore {
    pub fn open(url: &str, group: &str) -> Result<Self, CheckpointStoreError> {
        let (store, root) = open_store(url)?;
        Ok(CheckpointStore {
            store,
            root: root.clone().join(group),
        })
    }

    fn dir(&self, task: &str) -> Path {
        self.root.clone().join(task)
    }

    /// Stores a checkpoint of `task` at `positions`.
    pub async fn put(
        &self,
        task: &str,
        positions: &[i64],
        state: Vec<u8>,
    ) -> Result<(), CheckpointStoreError> {
        let path = self.dir(task).join(name(positions));
        self.store
            .put(&path, PutPayload::from(state))
            .await
            .map(|_| ())
            .map_err(|source| CheckpointStoreError::Store {
                context: format!("writing {path}"),
                source,
            })
    }

    async fn list(&self, task: &str) -> Result<Vec<(Vec<i64>, Path)>, CheckpointStoreError> {
        use futures_util::TryStreamExt as _;
        let dir = self.dir(task);
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|source| CheckpointStoreError::Store {
                context: format!("listing {dir}"),
                source,
            })?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let pos = positions_in_name(m.location.filename()?)?;
                Some((pos, m.location))
            })
            .collect())
    }

    /// The newest checkpoint of `task` whose positions are all at or below
    /// `committed` (same length); `None` when there is none.
    pub async fn latest(
        &self,
        task: &str,
        committed: &[i64],
    ) -> Result<Option<(Vec<i64>, Bytes)>, CheckpointStoreError> {
        let best = self
            .list(task)
            .await?
            .into_iter()
            .filter(|(p, _)| {
                p.len() == committed.len() && p.iter().zip(committed).all(|(a, c)| a <= c)
            })
            .max_by_key(|(p, _)| p.iter().sum::<i64>());
        let Some((pos, path)) = best else {
            return Ok(None);
        };
        let bytes = async { self.store.get(&path).await?.bytes().await }
            .await
            .map_err(|source| CheckpointStoreError::Store {
                context: format!("reading {path}"),
                source,
            })?;
        Ok(Some((pos, bytes)))
    }

    /// Deletes all but the `keep` newest checkpoints of `task`, except the
    /// newest one at or below `committed` (the group's committed offsets as
    /// the broker reports them), which a restart would load.
    ///
    /// More than one is kept because a broker that does not fence stale
    /// members (tansu) can let the committed offsets move back below the
    /// newest checkpoint; `committed` covers the case where they stop
    /// moving at all, however many checkpoints are written meanwhile.
    pub async fn prune(
        &self,
        task: &str,
        keep: usize,
        committed: &[i64],
    ) -> Result<usize, CheckpointStoreError> {
        let mut all = self.list(task).await?;
        all.sort_by_key(|(p, _)| std::cmp::Reverse(p.iter().sum::<i64>()));
        let restart_point = all.iter().position(|(p, _)| {
            p.len() == committed.len() && p.iter().zip(committed).all(|(a, c)| a <= c)
        });
        let mut n = 0;
        for (i, (_, path)) in all.into_iter().enumerate().skip(keep) {
            if Some(i) != restart_point {
                self.store
                    .delete(&path)
                    .await
                    .map_err(|source| CheckpointStoreError::Store {
                        context: format!("deleting {path}"),
                        source,
                    })?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            positions_in_name(&name(&[0, 12, 3456])),
            Some(vec![0, 12, 3456])
        );
        assert_eq!(positions_in_name("x.json"), None);
    }

    #[tokio::test]
    async fn latest_is_the_newest_at_or_below_the_committed_offsets() {
        let store = CheckpointStore::open("memory:///", "g").expect("store");
        store
            .put("join-0", &[1, 1, 1], b"a".to_vec())
            .await
            .expect("put");
        store
            .put("join-0", &[5, 2, 9], b"b".to_vec())
            .await
            .expect("put");
        // Written before a transaction that never committed.
        store
            .put("join-0", &[7, 2, 20], b"c".to_vec())
            .await
            .expect("put");
        let (pos, bytes) = store
            .latest("join-0", &[6, 2, 12])
            .await
            .expect("latest")
            .expect("one");
        assert_eq!((pos, &bytes[..]), (vec![5, 2, 9], &b"b"[..]));
        assert!(store
            .latest("join-0", &[0, 0, 0])
            .await
            .expect("latest")
            .is_none());
        assert!(store
            .latest("join-1", &[9, 9, 9])
            .await
            .expect("latest")
            .is_none());
        // The committed offsets lag every checkpoint but the oldest: it
        // stays, as the one a restart would load.
        assert_eq!(
            store.prune("join-0", 2, &[4, 4, 4]).await.expect("prune"),
            0
        );
        assert!(store
            .latest("join-0", &[4, 4, 4])
            .await
            .expect("latest")
            .is_some());
        assert_eq!(
            store.prune("join-0", 2, &[9, 9, 99]).await.expect("prune"),
            1
        );
        assert!(store
            .latest("join-0", &[4, 4, 4])
            .await
            .expect("latest")
            .is_none());
        assert!(store
            .latest("join-0", &[5, 2, 9])
            .await
            .expect("latest")
            .is_some());
        store
            .put("join-0", &[8, 3, 30], b"d".to_vec())
            .await
            .expect("put");
        // Keep 1 at committed [6, 2, 12]: the newest plus [5, 2, 9].
        assert_eq!(
            store.prune("join-0", 1, &[6, 2, 12]).await.expect("prune"),
            1
        );
        let (pos, _) = store
            .latest("join-0", &[7, 2, 29])
            .await
            .expect("latest")
            .expect("kept");
        assert_eq!(pos, vec![5, 2, 9], "[7, 2, 20] was deleted, [5, 2, 9] kept");
    }
}
