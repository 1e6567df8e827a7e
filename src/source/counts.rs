//! The on-disk cache of per-shard sample counts, so that the header scan a loader needs without a manifest
//! runs once per shard version, not once per loader, rank or job.
//!
//! # Key
//! A shard's *version*: for a local file its path, size and modification time; for an object-store shard its
//! URL, ETag and size (one `HEAD`); for an `http(s)://` shard its URL, `ETag` (else `Last-Modified`) and
//! `Content-Length` (one `HEAD`). A shard without any version information (an HTTP server that sends neither
//! header) is never cached. A shard rewritten in place gets a new key, so a stale count is never used.
//!
//! # Storage and bounds
//! One append-only JSON-lines file, `DIR/shard-counts.jsonl`, one `{"key", "nsamples"}` record per line,
//! appended with one `write` per scan. Concurrent loaders (ranks) may append at once; a line that does not
//! parse (a torn write) is skipped and its shard is simply scanned again. The file grows by one short line per
//! shard version scanned; delete it to reset.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::http::is_url;
use super::{ReadOptions, Shard, object};
use crate::error::{Error, Result};

/// File name of the cache inside its directory.
pub const COUNTS_FILE: &str = "shard-counts.jsonl";

#[derive(Serialize, Deserialize)]
struct Record {
    key: String,
    nsamples: u64,
}

/// Sample counts by shard version, loaded from and appended to [`COUNTS_FILE`].
#[derive(Debug)]
pub struct CountCache {
    path: PathBuf,
    entries: HashMap<String, u64>,
}

impl CountCache {
    /// Opens (creating the directory if needed) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating the count cache `{}`", dir.display()), e))?;
        let path = dir.join(COUNTS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(format!("reading the count cache `{}`", path.display()), e)),
        };
        let entries =
            text.lines().filter_map(|l| serde_json::from_str::<Record>(l).ok()).map(|r| (r.key, r.nsamples)).collect();
        Ok(Self { path, entries })
    }

    /// The cached count of a shard version.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.entries.get(key).copied()
    }

    /// Records counts of shard versions (one append).
    pub fn record(&mut self, counts: impl IntoIterator<Item = (String, u64)>) -> Result<()> {
        let mut lines = String::new();
        for (key, nsamples) in counts {
            let line = serde_json::to_string(&Record { key: key.clone(), nsamples })
                .map_err(|e| Error::Json { context: "count cache record".into(), source: e })?;
            lines.push_str(&line);
            lines.push('\n');
            self.entries.insert(key, nsamples);
        }
        if lines.is_empty() {
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(format!("opening the count cache `{}`", self.path.display()), e))?;
        file.write_all(lines.as_bytes())
            .map_err(|e| Error::io(format!("appending to the count cache `{}`", self.path.display()), e))
    }
}

/// A shard's version key and size (module docs), or `None` when the shard has no version information.
pub(crate) fn version(shard: &Shard, opts: &ReadOptions) -> Result<Option<(String, u64)>> {
    let Shard::Tar(url) = shard else { return Ok(None) };
    let shard_err = |source| Error::Shard { shard: url.clone(), source };
    if object::is_object_url(url) {
        let (size, etag) = object::head(url, opts).map_err(shard_err)?;
        return Ok(etag.map(|t| (format!("{url}|{t}|{size}"), size)));
    }
    if is_url(url) {
        let (size, tag) = super::http::head(url, opts).map_err(shard_err)?;
        return Ok(tag.zip(size).map(|(t, n)| (format!("{url}|{t}|{n}"), n)));
    }
    let meta = std::fs::metadata(url).map_err(shard_err)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(mtime.map(|t| (format!("{url}|{}|{}", meta.len(), t.as_nanos()), meta.len())))
}

/// The default cache directory: `$JUICER_CACHE_DIR`, else `$XDG_CACHE_HOME/juicer`, else `$HOME/.cache/juicer`.
pub fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("JUICER_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("juicer")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("juicer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = CountCache::open(dir.path()).unwrap();
        c.record([("a|1|2".to_string(), 7), ("b|3|4".to_string(), 9)]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(COUNTS_FILE))
            .unwrap()
            .write_all(b"{\"key\": \"c|5")
            .unwrap();
        let c = CountCache::open(dir.path()).unwrap();
        assert_eq!((c.get("a|1|2"), c.get("b|3|4"), c.get("c|5")), (Some(7), Some(9), None));
    }

    #[test]
    fn a_rewritten_local_file_has_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tar");
        std::fs::write(&p, b"one").unwrap();
        let shard = Shard::Tar(p.display().to_string());
        let opts = ReadOptions::default();
        let v1 = version(&shard, &opts).unwrap().unwrap();
        std::fs::write(&p, b"three").unwrap();
        let v2 = version(&shard, &opts).unwrap().unwrap();
        assert_ne!(v1.0, v2.0);
        assert_eq!(v2.1, 5);
    }
}
