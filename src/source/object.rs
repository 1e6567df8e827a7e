//! Object-storage shards (`s3://`, `gs://`, `az://`/`abfs://`, `file://`) through the `object_store` crate.
//!
//! # Stores and credentials
//! One client per bucket (scheme + authority) and set of explicit options, built on first use and shared by
//! every reader: S3 from the `AWS_*` environment (`AWS_ENDPOINT_URL` for MinIO, Ceph, R2, moto; an `http://`
//! endpoint is allowed as such), GCS from `GOOGLE_*`, Azure from `AZURE_*`, each overridden by the explicit
//! `key=value` options of [`ReadOptions::storage_options`] (the `object_store` config keys, e.g.
//! `aws_endpoint`, `aws_access_key_id`, `google_service_account`, `azure_storage_account_name`).
//!
//! # Reading
//! A shard is one streaming GET whose body is pumped ahead of the tar reader (read-ahead of
//! [`READ_AHEAD`] chunks, see [`crate::graph::Prefetch`]). The reader tracks its byte offset. When the body
//! breaks (cut connection, early end), it asks again with a ranged GET from that offset, **pinned to the ETag
//! of the first answer** (`If-Match`): a shard replaced mid-read fails with an error naming it and both
//! versions are never mixed. Failed requests (throttling `503 SlowDown`/`429`, resets, timeouts) are retried
//! with exponential backoff up to [`ReadOptions::http_retries`] consecutive failures without progress; every
//! request, retry and give-up is counted in [`super::IoStats`]. `object_store`'s own retries are off so that
//! the counts are exact. Missing objects and refused credentials are not retried.
//!
//! # Listing
//! A glob (`s3://b/train-*.tar`) lists the objects under the literal prefix before the first wildcard (the
//! client pages through the listing) and keeps the keys matching the pattern, sorted. Brace ranges never list.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};

use super::ReadOptions;
use super::http::backoff;
use crate::error::{Error, Result};
use crate::graph::{Prefetch, block_on};

/// Body chunks buffered ahead of the reader (chunks are the transport's, typically 8–64 KiB).
pub(crate) const READ_AHEAD: usize = 64;

/// URL schemes served by object storage.
const SCHEMES: [&str; 9] = ["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "file"];

/// Whether `spec` is an object-storage URL: `s3://`, `s3a://`, `gs://`, `az://`, `azure://`, `abfs://`,
/// `abfss://`, `adl://` or `file://`.
pub fn is_object_url(spec: &str) -> bool {
    spec.split_once("://").is_some_and(|(scheme, _)| SCHEMES.iter().any(|s| scheme.eq_ignore_ascii_case(s)))
}

/// A client and the object path for one URL.
pub(crate) struct Located {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) path: Path,
}

/// Splits `url` into its client (cached per bucket and options) and object path.
pub(crate) fn locate(url: &str, opts: &ReadOptions) -> Result<Located> {
    let bad = |detail: String| Error::ShardSpec { spec: url.to_string(), detail };
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
    let (scheme, path) =
        object_store::ObjectStoreScheme::parse(&parsed).map_err(|e| bad(format!("not an object-store URL: {e}")))?;
    let path = Path::parse(path).map_err(|e| bad(format!("bad object path: {e}")))?;
    let key =
        format!("{}://{}|{:?}|{:?}", parsed.scheme(), parsed.authority(), opts.storage_options, opts.http_timeout);
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    if let Some(store) = stores.lock().ok().and_then(|s| s.get(&key).cloned()) {
        return Ok(Located { store, path });
    }
    let store = build(&parsed, scheme, opts).map_err(|e| bad(format!("cannot set up the store client: {e}")))?;
    if let Ok(mut s) = stores.lock() {
        s.insert(key, store.clone());
    }
    Ok(Located { store, path })
}

/// Builds a client for `url`'s bucket: environment first, then the explicit options.
fn build(
    url: &url::Url,
    scheme: object_store::ObjectStoreScheme,
    opts: &ReadOptions,
) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    use object_store::ObjectStoreScheme as S;
    // reqwest's rustls has no provider compiled in; ring is (shared with the HTTP reader). Installing twice
    // is harmless, so the result is ignored.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // No client-side retries (ours count them) and no whole-request timeout (a shard streams for as long as
    // the trainer takes to consume it); connect and per-read timeouts keep a dead peer from hanging a reader.
    let retry = RetryConfig { max_retries: 0, ..RetryConfig::default() };
    let client = ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(opts.http_timeout)
        .with_read_timeout(opts.http_timeout);
    macro_rules! configure {
        ($builder:ty, $key:ty) => {{
            let mut b = <$builder>::from_env().with_url(url.as_str());
            for (k, v) in &opts.storage_options {
                let key: $key = k.to_ascii_lowercase().parse().map_err(|e| format!("option `{k}`: {e}"))?;
                b = b.with_config(key, v.clone());
            }
            b.with_retry(retry).with_client_options(client.clone())
        }};
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        S::AmazonS3 => {
            let b = configure!(object_store::aws::AmazonS3Builder, object_store::aws::AmazonS3ConfigKey);
            let endpoint = b.get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint);
            let plain = endpoint.is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"));
            let b = if plain { b.with_client_options(client.with_allow_http(true)) } else { b };
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        S::GoogleCloudStorage => Arc::new(
            configure!(object_store::gcp::GoogleCloudStorageBuilder, object_store::gcp::GoogleConfigKey)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        S::MicrosoftAzure => Arc::new(
            configure!(object_store::azure::MicrosoftAzureBuilder, object_store::azure::AzureConfigKey)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        S::Local => Arc::new(object_store::local::LocalFileSystem::new()),
        other => return Err(format!("scheme {other:?} is not supported")),
    };
    Ok(store)
}

/// How a failed request is handled.
enum Failure {
    /// Worth retrying: throttling, 5xx, resets, timeouts.
    Transient(String),
    /// Retrying cannot help: missing object, refused credentials, bad path.
    Fatal(io::Error),
}

/// Classifies an `object_store` error for `name`.
fn classify(name: &str, e: object_store::Error) -> Failure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Failure::Fatal(io::Error::new(io::ErrorKind::NotFound, format!("no such object: {e}"))),
        E::Precondition { .. } => Failure::Fatal(io::Error::other(format!(
            "`{name}` was replaced while it was being read (its ETag changed); not mixing two versions: {e}"
        ))),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Failure::Fatal(io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))
        }
        E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => {
            Failure::Fatal(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
        }
        other => Failure::Transient(other.to_string()),
    }
}

/// Runs `attempt` until it succeeds, fails fatally, or fails `retries + 1` times in a row; counts every
/// request and retry in `stats`.
fn with_retries<T, F, Fut>(name: &str, opts: &ReadOptions, mut attempt: F) -> io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let stats = &opts.stats;
    let mut failures = 0u32;
    loop {
        stats.count_request();
        let outcome = block_on(attempt()).map_err(|e| io::Error::other(e.to_string()))?;
        let msg = match outcome {
            Ok(v) => return Ok(v),
            Err(e) => match classify(name, e) {
                Failure::Fatal(e) => {
                    // A missing object is an answer, not a transport failure (cache misses are normal).
                    if e.kind() != io::ErrorKind::NotFound {
                        stats.count_failure();
                    }
                    return Err(e);
                }
                Failure::Transient(msg) => msg,
            },
        };
        failures += 1;
        if failures > opts.http_retries {
            stats.count_failure();
            return Err(io::Error::other(format!("`{name}`: giving up after {failures} failed requests: {msg}")));
        }
        stats.count_retry();
        std::thread::sleep(backoff(failures));
    }
}

/// A resumable, read-ahead `Read` over one object (module docs).
pub(crate) struct ObjectReader {
    name: String,
    store: Arc<dyn ObjectStore>,
    path: Path,
    opts: ReadOptions,
    /// ETag of the version being read, when the store gives one.
    etag: Option<String>,
    /// Object size, from the first answer (`None` before it).
    size: Option<u64>,
    /// Bytes delivered so far (absolute position in the object).
    offset: u64,
    body: Option<Prefetch<object_store::Result<Bytes>>>,
    chunk: Bytes,
    /// Consecutive failed attempts since the last byte arrived.
    failures: u32,
}

impl ObjectReader {
    /// Opens `url` at byte `offset` (0 for the whole object) with one (ranged) GET.
    pub(crate) fn open(url: &str, opts: &ReadOptions, offset: u64) -> io::Result<Self> {
        let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut reader = Self {
            name: url.to_string(),
            store: located.store,
            path: located.path,
            opts: opts.clone(),
            etag: None,
            size: None,
            offset,
            body: None,
            chunk: Bytes::new(),
            failures: 0,
        };
        reader.request()?;
        Ok(reader)
    }

    /// Issues the GET for the bytes from `self.offset` on (pinned to the first answer's ETag).
    fn request(&mut self) -> io::Result<()> {
        let (store, path, etag, offset) = (self.store.clone(), self.path.clone(), self.etag.clone(), self.offset);
        let result = with_retries(&self.name, &self.opts, || {
            let (store, path) = (store.clone(), path.clone());
            let options = GetOptions {
                range: (offset > 0).then_some(GetRange::Offset(offset)),
                if_match: etag.clone(),
                ..GetOptions::default()
            };
            async move { store.get_opts(&path, options).await }
        })?;
        match self.size {
            None => {
                self.etag = result.meta.e_tag.clone();
                self.size = Some(result.meta.size);
            }
            // No ETag to pin: the size is the only check left.
            Some(size) if self.etag.is_none() && result.meta.size != size => {
                return Err(io::Error::other(format!(
                    "`{}` changed size while being read ({size} -> {} bytes)",
                    self.name, result.meta.size
                )));
            }
            Some(_) => {}
        }
        if result.range.start != offset {
            return Err(io::Error::other(format!(
                "`{}`: asked for bytes from {offset}, the store answered from {}",
                self.name, result.range.start
            )));
        }
        let body = Prefetch::new(result.into_stream(), READ_AHEAD).map_err(|e| io::Error::other(e.to_string()))?;
        self.body = Some(body);
        Ok(())
    }

    /// Reconnects after a broken body, or gives up after `http_retries` attempts without progress.
    fn reconnect(&mut self, why: String) -> io::Result<()> {
        self.body = None;
        self.failures += 1;
        if self.failures > self.opts.http_retries {
            self.opts.stats.count_failure();
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "`{}` broke at byte {} of {} and did not resume: {why}",
                    self.name,
                    self.offset,
                    self.size.unwrap_or(0)
                ),
            ));
        }
        self.opts.stats.count_retry();
        std::thread::sleep(backoff(self.failures));
        self.request()
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.chunk.is_empty() {
                let n = buf.len().min(self.chunk.len());
                buf[..n].copy_from_slice(&self.chunk.split_to(n));
                self.offset += n as u64;
                self.opts.stats.count_bytes(n as u64);
                return Ok(n);
            }
            if self.size.is_some_and(|size| self.offset >= size) || buf.is_empty() {
                return Ok(0);
            }
            let next = match self.body.as_mut() {
                Some(body) => body.next(),
                None => None,
            };
            match next {
                Some(Ok(bytes)) => {
                    if !bytes.is_empty() {
                        self.failures = 0;
                    }
                    self.chunk = bytes;
                }
                Some(Err(e)) => self.reconnect(e.to_string())?,
                None => self.reconnect("the body ended early".to_string())?,
            }
        }
    }
}

/// Reads a whole (small) object, e.g. a manifest, with retries.
pub(crate) fn read_all(url: &str, opts: &ReadOptions) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    ObjectReader::open(url, opts, 0)?.read_to_end(&mut out)?;
    Ok(out)
}

/// The whole object at `url`, or `None` when there is none.
pub(crate) fn get_opt(url: &str, opts: &ReadOptions) -> io::Result<Option<Bytes>> {
    let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let got = with_retries(url, opts, || {
        let (store, path) = (located.store.clone(), located.path.clone());
        async move { store.get(&path).await?.bytes().await }
    });
    match got {
        Ok(bytes) => {
            opts.stats.count_bytes(bytes.len() as u64);
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the object at `url` (a missing one is not an error).
pub(crate) fn delete(url: &str, opts: &ReadOptions) -> io::Result<()> {
    let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    match with_retries(url, opts, || {
        let (store, path) = (located.store.clone(), located.path.clone());
        async move { store.delete(&path).await }
    }) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Object metadata used to key caches: size and ETag.
pub(crate) fn head(url: &str, opts: &ReadOptions) -> io::Result<(u64, Option<String>)> {
    let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let meta = with_retries(url, opts, || {
        let (store, path) = (located.store.clone(), located.path.clone());
        async move { store.head(&path).await }
    })?;
    Ok((meta.size, meta.e_tag))
}

/// Writes `bytes` to `url` in one atomic PUT (readers see the old object or the new one, never a part).
pub(crate) fn put(url: &str, opts: &ReadOptions, bytes: Bytes) -> io::Result<()> {
    let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    with_retries(url, opts, || {
        let (store, path, payload) = (located.store.clone(), located.path.clone(), bytes.clone());
        async move { store.put(&path, payload.into()).await.map(|_| ()) }
    })
}

/// Shards up to this size are uploaded in one PUT; larger ones in parts of this size.
const PART: u64 = 64 << 20;

/// Uploads the local file `path` to `url`: one PUT up to [`PART`] bytes, else a multipart upload, which the
/// store makes visible only when it completes. Either way no reader sees a partial object.
pub(crate) fn upload_file(url: &str, opts: &ReadOptions, path: &std::path::Path) -> io::Result<()> {
    let size = std::fs::metadata(path)?.len();
    if size <= PART {
        return put(url, opts, Bytes::from(std::fs::read(path)?));
    }
    let located = locate(url, opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (store, key) = (located.store.clone(), located.path.clone());
    opts.stats.count_request();
    let mut upload = block_on(async move { store.put_multipart(&key).await })
        .map_err(|e| io::Error::other(e.to_string()))?
        .map_err(|e| io::Error::other(format!("`{url}`: starting the multipart upload: {e}")))?;
    let mut file = std::fs::File::open(path)?;
    let mut sent = 0u64;
    while sent < size {
        let mut part = vec![0u8; PART.min(size - sent) as usize];
        file.read_exact(&mut part)?;
        sent += part.len() as u64;
        opts.stats.count_request();
        let fut = upload.put_part(Bytes::from(part).into());
        let done = block_on(fut).map_err(|e| io::Error::other(e.to_string()))?;
        if let Err(e) = done {
            opts.stats.count_failure();
            let _ = block_on(async move { upload.abort().await });
            return Err(io::Error::other(format!("`{url}`: uploading a part: {e}")));
        }
    }
    opts.stats.count_request();
    block_on(async move { upload.complete().await.map(|_| ()) })
        .map_err(|e| io::Error::other(e.to_string()))?
        .map_err(|e| io::Error::other(format!("`{url}`: completing the upload: {e}")))
}

/// The object URLs matching a glob URL, sorted (module docs). No match is an empty list.
pub(crate) fn glob(pattern: &str, opts: &ReadOptions) -> Result<Vec<String>> {
    let bad = |detail: String| Error::ShardSpec { spec: pattern.to_string(), detail };
    let (root, key_pattern) = split_root(pattern).ok_or_else(|| bad("no bucket in the URL".into()))?;
    let matcher = glob::Pattern::new(key_pattern).map_err(|e| bad(format!("bad glob: {e}")))?;
    let literal = key_pattern.find(['*', '?', '[']).map_or(key_pattern, |i| &key_pattern[..i]);
    let prefix_dir = literal.rsplit_once('/').map(|(d, _)| d.to_string());
    let located = locate(&format!("{root}/{}", prefix_dir.as_deref().unwrap_or("")), opts)?;
    let store = located.store.clone();
    let prefix = prefix_dir.map(Path::from);
    opts.stats.count_request();
    let listed: Vec<object_store::Result<object_store::ObjectMeta>> =
        block_on(async move { store.list(prefix.as_ref()).collect().await })?;
    let mut out = Vec::new();
    for meta in listed {
        let meta = meta.map_err(|e| bad(format!("listing failed: {e}")))?;
        let key = meta.location.as_ref();
        if matcher.matches_with(key, glob::MatchOptions { require_literal_separator: true, ..Default::default() }) {
            out.push(format!("{root}/{key}"));
        }
    }
    out.sort();
    Ok(out)
}

/// `scheme://authority` and the key part of an object URL.
fn split_root(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let slash = rest.find('/')?;
    Some((&url[..scheme.len() + 3 + slash], &rest[slash + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_roots() {
        assert!(is_object_url("s3://b/x.tar"));
        assert!(is_object_url("GS://b/x.tar"));
        assert!(is_object_url("abfss://c@a.dfs.core.windows.net/x.tar"));
        assert!(is_object_url("file:///data/x.tar"));
        assert!(!is_object_url("http://h/x.tar"));
        assert!(!is_object_url("data/s3.tar"));
        assert_eq!(split_root("s3://bucket/a/b-*.tar"), Some(("s3://bucket", "a/b-*.tar")));
        assert_eq!(split_root("s3://bucket"), None);
    }

    #[test]
    fn file_urls_read_ranges_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let url = format!("file://{}", path.display());
        let opts = ReadOptions::default();
        assert_eq!(read_all(&url, &opts).unwrap(), data);
        let mut tail = Vec::new();
        ObjectReader::open(&url, &opts, 99_000).unwrap().read_to_end(&mut tail).unwrap();
        assert_eq!(tail, &data[99_000..]);
        let s = opts.stats.snapshot();
        assert_eq!((s.requests, s.retries, s.failures, s.bytes), (2, 0, 0, 101_000));
        assert_eq!(head(&url, &opts).unwrap().0, 100_000);
        let missing = format!("file://{}", dir.path().join("nope.tar").display());
        assert_eq!(ObjectReader::open(&missing, &opts, 0).err().map(|e| e.kind()), Some(io::ErrorKind::NotFound));
        let listed = glob(&format!("file://{}/*.bin", dir.path().display()), &opts).unwrap();
        assert_eq!(listed, [url]);
    }
}
