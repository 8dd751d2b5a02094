//! Opening an object store from a URL (`s3://bucket/prefix`, `file:///dir`,
//! `memory:///`, and the other schemes `object_store` knows), shared by the
//! sink's object loader and the processor's checkpoints.

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;

/// A store URL that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("object store URL {url}: {reason}")]
pub struct StoreUrlError {
    pub url: String,
    pub reason: String,
}

/// Opens the store named by `url`. S3 settings (endpoint, credentials,
/// region, `AWS_ALLOW_HTTP`) come from the usual `AWS_*` variables.
pub fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), StoreUrlError> {
    let bad = |reason: String| StoreUrlError {
        url: url.to_owned(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() == "s3" || parsed.scheme() == "s3a" {
        let bucket = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no bucket name".to_owned()))?;
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let root = Path::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
        return Ok((Arc::new(s3), root));
    }
    let (store, root) = object_store::parse_url(&parsed).map_err(|e| bad(e.to_string()))?;
    Ok((Arc::from(store), root))
}
