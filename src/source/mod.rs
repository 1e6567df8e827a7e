//! Sample sources: WebDataset tar shards (local or over HTTP) and folders of images with a captions JSONL.
//!
//! [`resolve`] turns shard specifications (paths, globs, brace ranges, URLs, folders, manifests) into [`Shard`]s
//! ([`resolve_counted`] also returns the sample counts a manifest or folder source gives for free);
//! [`Shard::open`] streams one shard's samples in file order as `Result<RawSample, SampleError>` items, one
//! item per sample, so item `i` is sample `i` of the shard (after `skip`); [`Shard::open_at`] opens a shard at the
//! byte offset of a sample ([`ShardReader::next_offset`]) with one ranged read (a seek locally). [`ShardWriter`] writes shards in the
//! same format.
//!
//! The WebDataset contract (how members group into samples, which member is the image) is documented in the
//! design notes §5 and implemented in the `tar` submodule.
//!
//! # Compression
//! A tar shard may be gzip-compressed, as published WebDataset datasets often are (`.tar.gz`, `.tgz`; Python
//! `webdataset` reads them): a shard whose name ends in `.gz` or `.tgz`, or whose first bytes are the gzip magic
//! `1f 8b`, is decompressed as a stream (concatenated gzip members included), from any medium. Skipping samples
//! then reads and discards, as over HTTP. A corrupt or cut gzip stream ends the shard like a cut tar: the sample
//! in progress is one `Truncated` item naming the shard and the decoder's error. Members whose name ends in
//! `.gz` (`KEY.txt.gz`, `KEY.jpg.gz`) are decompressed and take the role of the extension before `.gz`, as
//! `webdataset`'s decoder does.

mod counts;
mod folder;
mod http;
pub mod limits;
pub mod manifest;
pub(crate) mod object;
mod pack;
mod spec;
mod tar;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flate2::bufread::MultiGzDecoder;

pub use counts::{COUNTS_FILE, CountCache, default_dir as default_cache_dir};
pub use folder::{FolderEntry, FolderShard};
pub use limits::ReadLimits;
pub use manifest::{Manifest, ManifestShard};
pub use object::is_object_url;
pub use pack::ShardWriter;
pub use spec::{CAPTIONS_FILE, expand_braces, expand_names, resolve, resolve_counted};

use self::folder::FolderReader;
use self::http::HttpReader;
use self::object::ObjectReader;
use self::tar::{LocalMedium, Medium, StreamMedium, TarSamples};
use crate::error::{Error, Result, SampleError};
use crate::sample::RawSample;

/// Buffer between an HTTP body and the tar reader.
const HTTP_BUFFER: usize = 1 << 20;

/// One input shard: a WebDataset tar (local path, http(s) or object-store URL) or a slice of a folder +
/// captions JSONL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shard {
    /// A WebDataset tar: a local path, an `http://`/`https://` URL or an object-store URL (`s3://`, `gs://`,
    /// `az://`, `abfs://`, `file://`).
    Tar(String),
    /// A range of entries of a folder source.
    Folder(FolderShard),
}

/// How shards are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Consecutive failed requests (without progress) before an HTTP or object-store read or open fails
    /// (default 3). Throttling answers (`503 SlowDown`, `429`) count as failed requests.
    pub http_retries: u32,
    /// Timeout for connecting, for the response headers and for each socket read (default 30 s).
    pub http_timeout: Duration,
    /// Explicit object-store settings, `object_store` config keys such as `aws_endpoint`,
    /// `aws_access_key_id`, `aws_region`, `google_service_account`, `azure_storage_account_name`; they
    /// override the `AWS_*`/`GOOGLE_*`/`AZURE_*` environment (see the `object` module docs).
    pub storage_options: Vec<(String, String)>,
    /// Per-sample resource limits (member, caption and metadata bytes, JSON nesting).
    pub limits: ReadLimits,
    /// Request, retry and byte counters of the readers sharing these options.
    pub stats: IoStats,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            http_retries: 3,
            http_timeout: Duration::from_secs(30),
            storage_options: Vec::new(),
            limits: ReadLimits::default(),
            stats: IoStats::default(),
        }
    }
}

/// Remote-read counters shared by every reader of one loader (clones share the counters).
///
/// Counters are not part of the options they travel with: two `IoStats` always compare equal.
#[derive(Debug, Clone, Default)]
pub struct IoStats(Arc<IoCounters>);

#[derive(Debug, Default)]
struct IoCounters {
    requests: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    bytes: AtomicU64,
}

/// A point-in-time copy of [`IoStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoSnapshot {
    /// Requests sent to a remote store or server (GET, HEAD, LIST, PUT), retries included.
    pub requests: u64,
    /// Requests repeated after a failure (throttling, 5xx, a cut connection).
    pub retries: u64,
    /// Reads or requests given up after the retries, or failed without retry (missing, replaced object).
    pub failures: u64,
    /// Body bytes received from object stores and HTTP servers.
    pub bytes: u64,
}

impl IoStats {
    /// Current values.
    pub fn snapshot(&self) -> IoSnapshot {
        let c = &self.0;
        IoSnapshot {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_request(&self) {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_retry(&self) {
        self.0.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_failure(&self) {
        self.0.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_bytes(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

impl PartialEq for IoStats {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for IoStats {}

impl Shard {
    /// Path or URL of a tar shard, or `"<jsonl path>[start..end]"` for a folder shard.
    pub fn name(&self) -> String {
        match self {
            Shard::Tar(path) => path.clone(),
            Shard::Folder(folder) => folder.name(),
        }
    }

    /// Whether the shard is read over the network (HTTP(S) or an object store other than `file://`).
    pub fn is_remote(&self) -> bool {
        matches!(self, Shard::Tar(path) if http::is_url(path)
            || (object::is_object_url(path) && !path.to_ascii_lowercase().starts_with("file://")))
    }

    /// Opens the byte stream of a tar shard from byte `offset` on, decompressing a gzip-compressed one (module
    /// docs). The offset is a position in the shard's own bytes, so a gzip-compressed shard ignores it and is
    /// read from its start ([`Opened::Gzip`]).
    ///
    /// One arm per medium: a new medium (object storage: `ObjectReader::open(url, opts, offset)`) gets its own
    /// arm next to the HTTP one, opening its byte stream at `offset` with a single ranged read.
    fn open_medium(path: &str, opts: &ReadOptions, offset: u64) -> Result<Opened> {
        let shard_err = |source| Error::Shard { shard: path.to_string(), source };
        let by_name = gzip_name(path);
        // A name that says gzip: the offset cannot be used, read from the start.
        let offset = if by_name { 0 } else { offset };
        let mut reader: BufReader<Box<dyn Read + Send>> = if http::is_url(path) {
            // HTTP(S): one request, `Range: bytes=OFFSET-` when the offset is not 0.
            let http = HttpReader::open(path, opts, offset).map_err(shard_err)?;
            BufReader::with_capacity(HTTP_BUFFER, Box::new(http))
        } else if object::is_object_url(path) {
            // Object storage: one GET, ranged from the offset when it is not 0.
            let object = ObjectReader::open(path, opts, offset).map_err(shard_err)?;
            BufReader::with_capacity(HTTP_BUFFER, Box::new(object))
        } else {
            // Local file: sniff the gzip magic at the start, then seek to the offset.
            let mut file = File::open(path).map_err(shard_err)?;
            let mut head = [0u8; 2];
            let n = file.read(&mut head).and_then(|n| file.seek(SeekFrom::Start(0)).map(|_| n)).map_err(shard_err)?;
            if !by_name && !head[..n].starts_with(&GZIP_MAGIC) {
                // Plain local tar: keep the file seekable so skipped members are sought over.
                file.seek(SeekFrom::Start(offset)).map_err(shard_err)?;
                return Ok(Opened::Plain(Box::new(LocalMedium::new(file, offset).map_err(shard_err)?), offset));
            }
            return Ok(Opened::Gzip(Box::new(StreamMedium::new(BufReader::with_capacity(
                HTTP_BUFFER,
                MultiGzDecoder::new(BufReader::with_capacity(HTTP_BUFFER, file)),
            )))));
        };
        // A stream read from its start may still be gzip by its magic; one read from an offset is plain (a
        // compressed shard never has offsets in a checkpoint, and a changed one fails the header check).
        let gzip = by_name || (offset == 0 && reader.fill_buf().map_err(shard_err)?.starts_with(&GZIP_MAGIC));
        if gzip {
            Ok(Opened::Gzip(Box::new(StreamMedium::new(BufReader::with_capacity(
                HTTP_BUFFER,
                MultiGzDecoder::new(reader),
            )))))
        } else {
            Ok(Opened::Plain(Box::new(StreamMedium::new(reader)), offset))
        }
    }

    /// Opens the shard and iterates its samples in file order.
    ///
    /// The first `skip` samples are skipped without reading their member data where the medium allows (local
    /// tar: seek; HTTP and gzip: read and discard; folder: index). Open failure (missing file, HTTP 4xx, refused
    /// connection after retries) -> [`Error::Shard`].
    pub fn open(&self, skip: usize, opts: &ReadOptions) -> Result<ShardReader> {
        self.open_at(Start { index: skip, offset: None }, opts)
    }

    /// Opens the shard at `start`: item `i` is sample `start.index + i`.
    ///
    /// With `start.offset` (the byte offset where sample `start.index` starts, as
    /// [`ShardReader::next_offset`] reported it), a plain tar shard is opened right there: a local file seeks
    /// to it, an HTTP shard asks for it with one `Range: bytes=OFFSET-` request. A gzip-compressed shard has no
    /// usable byte offsets: it ignores the offset and skips `start.index` samples by reading, as does every
    /// shard without an offset. When the bytes at the offset are not a tar header (the shard changed since the
    /// offset was taken), the open fails with [`Error::State`] naming the shard and the offset.
    pub fn open_at(&self, start: Start, opts: &ReadOptions) -> Result<ShardReader> {
        let inner = match self {
            Shard::Tar(path) => match Self::open_medium(path, opts, start.offset.unwrap_or(0))? {
                Opened::Plain(medium, offset) if offset > 0 => {
                    let samples = TarSamples::at_offset(medium, path.clone(), start.index, offset).map_err(|e| {
                        Error::State(format!(
                            "shard `{path}`: no sample starts at byte {offset}, the checkpointed offset of sample {} \
                             (did the shard change since the checkpoint?): {e}",
                            start.index
                        ))
                    })?;
                    Inner::Tar(samples.with_limits(opts.limits))
                }
                Opened::Plain(medium, _) => {
                    Inner::Tar(TarSamples::new(medium, path.clone(), start.index).with_limits(opts.limits))
                }
                Opened::Gzip(medium) => Inner::Tar(
                    TarSamples::new(medium, path.clone(), start.index).without_offsets().with_limits(opts.limits),
                ),
            },
            Shard::Folder(folder) => Inner::Folder(FolderReader::new(folder.clone(), start.index, opts.limits)),
        };
        Ok(ShardReader { name: self.name(), inner })
    }

    /// Number of samples (items [`Shard::open`] yields with `skip = 0`), reading tar headers only (data is
    /// sought over locally, read and discarded over HTTP).
    pub fn count_samples(&self, opts: &ReadOptions) -> Result<usize> {
        match self {
            Shard::Tar(path) => {
                let medium = match Self::open_medium(path, opts, 0)? {
                    Opened::Plain(m, _) | Opened::Gzip(m) => m,
                };
                Ok(TarSamples::count(medium, path.clone()))
            }
            Shard::Folder(folder) => Ok(folder.len()),
        }
    }
}

/// The items of `stream` read as a tar shard named `fuzz.tar` from sample `skip` on, under `limits`: the
/// `tar` and `gzip` fuzz targets' entry to the private reader ([`crate::fuzzing`]).
#[doc(hidden)]
pub fn fuzz_read_tar<R: Read + Send>(
    stream: R,
    skip: usize,
    limits: ReadLimits,
) -> Vec<Result<RawSample, SampleError>> {
    TarSamples::new(StreamMedium::new(stream), "fuzz.tar".into(), skip).with_limits(limits).collect()
}

/// The sample count of `stream` as the count scan sees it (the fuzz targets check it against the reader).
#[doc(hidden)]
pub fn fuzz_count_tar<R: Read + Send>(stream: R) -> usize {
    TarSamples::count(StreamMedium::new(stream), "fuzz.tar".into())
}

/// The whole content of a (small) file or object: a local path, an `http(s)://` URL or an object-store URL
/// (manifests, and what tests compare).
pub fn read_location(location: &str, opts: &ReadOptions) -> Result<Vec<u8>> {
    let shard_err = |source| Error::Shard { shard: location.to_string(), source };
    if http::is_url(location) {
        let mut body = Vec::new();
        HttpReader::open(location, opts, 0).and_then(|mut r| r.read_to_end(&mut body)).map_err(shard_err)?;
        Ok(body)
    } else if object::is_object_url(location) {
        object::read_all(location, opts).map_err(shard_err)
    } else {
        std::fs::read(location).map_err(shard_err)
    }
}

/// Whether a shard's name says it is gzip-compressed (`.gz`, `.tgz`, before a query string). A shard whose
/// first bytes are the gzip magic is too, whatever its name.
fn gzip_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.split(['?', '#']).next().is_some_and(|p| p.ends_with(".gz") || p.ends_with(".tgz"))
}

/// Where [`Shard::open_at`] starts reading a shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Start {
    /// Index (in file order) of the first sample to yield.
    pub index: usize,
    /// Byte offset in the shard where that sample starts, when known (a checkpoint's offset); `None` skips
    /// `index` samples from the start of the shard.
    pub offset: Option<u64>,
}

/// A tar shard's byte stream as [`Shard::open_medium`] opened it.
enum Opened {
    /// The shard's own bytes, from the given offset on.
    Plain(Box<dyn Medium>, u64),
    /// A decompressed gzip stream, from the start of the shard.
    Gzip(Box<dyn Medium>),
}

/// The first two bytes of a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The per-medium iterators behind a [`ShardReader`].
enum Inner {
    Tar(TarSamples<Box<dyn Medium>>),
    Folder(FolderReader),
}

/// Iterator over one shard's samples.
///
/// Each sample, good or bad, is exactly one item, so item `i` is sample `skip + i` of the shard. After a
/// `Truncated` item (the shard or connection ended inside a sample, or a header is corrupt) the reader ends.
pub struct ShardReader {
    name: String,
    inner: Inner,
}

impl ShardReader {
    /// Name of the shard being read (see [`Shard::name`]).
    pub fn shard_name(&self) -> &str {
        &self.name
    }

    /// Byte offset in the shard where the next sample (the one after the last item yielded) starts, so that
    /// [`Shard::open_at`] with it continues there: the end of the last sample's last member, padding included
    /// (the headers of the next sample, extension headers included, start there).
    ///
    /// `None` where byte offsets mean nothing (a gzip-compressed shard, a folder source) or after the shard
    /// ended on a failure.
    pub fn next_offset(&self) -> Option<u64> {
        match &self.inner {
            Inner::Tar(samples) => samples.next_offset(),
            Inner::Folder(_) => None,
        }
    }
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader").field("shard", &self.name).finish_non_exhaustive()
    }
}

impl Iterator for ShardReader {
    type Item = Result<RawSample, SampleError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Tar(samples) => samples.next(),
            Inner::Folder(reader) => reader.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn reader_is_send() {
        assert_send::<ShardReader>();
        assert_send::<Shard>();
    }

    #[test]
    fn missing_file_is_shard_error() {
        let shard = Shard::Tar("/nonexistent/x.tar".into());
        assert!(matches!(shard.open(0, &ReadOptions::default()), Err(Error::Shard { .. })));
        assert!(matches!(shard.count_samples(&ReadOptions::default()), Err(Error::Shard { .. })));
    }
}
