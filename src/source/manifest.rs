//! Shard manifests in the `wids` shard-index format of Python `webdataset`, so that a dataset indexed for either
//! tool works in both, and a loader learns every shard's sample count without reading the shards.
//!
//! ```json
//! {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "train",
//!  "shardlist": [{"url": "train-000000.tar", "nsamples": 10000, "filesize": 412345678}, ...]}
//! ```
//!
//! - `url` is a path or URL; a relative one is resolved against `base_path` when the manifest has one, else
//!   against the manifest's own folder (or URL), as `wids` does. `nsamples` is required; `filesize` (bytes) is
//!   optional; other fields are ignored on reading.
//! - A manifest is accepted wherever sources are: a source whose name ends in `.json` is read as one
//!   ([`super::resolve_counted`]). Its shards keep the manifest's order.
//! - [`Manifest::index`] builds one for existing shards, reading tar headers only, several shards at a time;
//!   [`Manifest::merge`] joins parts (the per-task manifests of a fanned-out `juicer write`).
//! - [`Manifest::write`] writes to a temporary name in the target folder and renames it into place, so a
//!   reader never sees half a manifest.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use super::{CountCache, ReadOptions, Shard};
use crate::error::{Error, Result};

/// The `__kind__` the `wids` tools write.
pub const KIND: &str = "wids-shard-index-v1";

/// One shard of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    /// Path or URL of the shard (resolved: never relative after [`Manifest::parse`]).
    pub url: String,
    /// Samples in the shard (what [`Shard::count_samples`] counts).
    pub nsamples: u64,
    /// Size of the shard in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesize: Option<u64>,
}

/// A list of shards with their sample counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Dataset name, when given.
    pub name: Option<String>,
    /// The shards, in order.
    pub shards: Vec<ManifestShard>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    wids_version: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    base_path: Option<String>,
    shardlist: Vec<ManifestShard>,
}

/// Whether a source names a manifest (ends in `.json`, any case, before a query string).
pub fn is_manifest(spec: &str) -> bool {
    let lower = spec.to_ascii_lowercase();
    lower.split(['?', '#']).next().is_some_and(|p| p.ends_with(".json"))
}

/// `rel` resolved against the folder of `base` (a path or an `http(s)://` URL), unless it is absolute already.
fn join(base: &str, rel: &str) -> String {
    // Any URL (`http(s)://`, `s3://`, `file://`, ...) contains "://".
    if rel.contains("://") || Path::new(rel).is_absolute() {
        return rel.to_string();
    }
    if base.contains("://") {
        let dir = base.rsplit_once('/').map_or(base, |(d, _)| d);
        return format!("{dir}/{rel}");
    }
    match Path::new(base).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(rel).to_string_lossy().into_owned(),
        _ => rel.to_string(),
    }
}

impl Manifest {
    /// Parses manifest bytes read from `location` (a path or URL: relative shard URLs are resolved against it).
    pub fn parse(bytes: &[u8], location: &str) -> Result<Self> {
        let file: File = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            context: format!("manifest `{location}` (expected wids {{\"wids_version\": 1, \"shardlist\": [...]}})"),
            source: e,
        })?;
        if let Some(v) = file.wids_version.filter(|&v| v != 1) {
            return Err(Error::ShardSpec { spec: location.into(), detail: format!("wids_version {v} (reads 1)") });
        }
        let base = match &file.base_path {
            // `base_path` names a folder: resolve against a file inside it.
            Some(b) => format!("{}/_", join(location, b).trim_end_matches('/')),
            None => location.to_string(),
        };
        let shards = file.shardlist.into_iter().map(|s| ManifestShard { url: join(&base, &s.url), ..s }).collect();
        Ok(Self { name: file.name, shards })
    }

    /// Reads a manifest from a local path, an `http(s)://` URL or an object-store URL.
    pub fn read(location: &str, opts: &ReadOptions) -> Result<Self> {
        Self::parse(&super::read_location(location, opts)?, location)
    }

    /// The manifest as wids JSON; shard URLs under `relative_to` (a folder) are written relative to it.
    pub fn to_json(&self, relative_to: Option<&Path>) -> String {
        let shards: Vec<ManifestShard> = self
            .shards
            .iter()
            .map(|s| {
                let url = relative_to
                    .and_then(|dir| Path::new(&s.url).strip_prefix(dir).ok())
                    .map_or_else(|| s.url.clone(), |p| p.to_string_lossy().into_owned());
                ManifestShard { url, ..s.clone() }
            })
            .collect();
        let mut out = serde_json::Map::new();
        out.insert("__kind__".into(), KIND.into());
        out.insert("wids_version".into(), 1.into());
        if let Some(n) = &self.name {
            out.insert("name".into(), n.clone().into());
        }
        out.insert("shardlist".into(), serde_json::to_value(shards).unwrap_or_default());
        let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Writes the manifest to `path` (shard URLs relative to its folder where they lie below it), through a
    /// temporary file renamed into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let abs_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let rel = Manifest {
            shards: self
                .shards
                .iter()
                .map(|s| {
                    let p = std::fs::canonicalize(&s.url).map(|p| p.to_string_lossy().into_owned());
                    ManifestShard { url: p.unwrap_or_else(|_| s.url.clone()), ..s.clone() }
                })
                .collect(),
            ..self.clone()
        };
        let text = rel.to_json(Some(&abs_dir));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let context = |what: &str| format!("{what} manifest `{}`", path.display());
        std::fs::write(&tmp, text).map_err(|e| Error::io(context("writing"), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(context("renaming into place"), e))
    }

    /// Writes the manifest to a local path ([`Manifest::write`]) or, in one atomic PUT, to an object-store URL
    /// (shard URLs in the same folder written relative to it, so the folder can be copied or renamed whole).
    pub fn save(&self, location: &str, opts: &ReadOptions) -> Result<()> {
        if !super::object::is_object_url(location) {
            return self.write(Path::new(location));
        }
        let dir = location.rsplit_once('/').map_or(location, |(d, _)| d);
        let rel = Manifest {
            shards: self
                .shards
                .iter()
                .map(|s| {
                    let url = s.url.strip_prefix(dir).and_then(|r| r.strip_prefix('/')).filter(|r| !r.contains('/'));
                    ManifestShard { url: url.map_or_else(|| s.url.clone(), str::to_string), ..s.clone() }
                })
                .collect(),
            ..self.clone()
        };
        super::object::put(location, opts, rel.to_json(None).into_bytes().into())
            .map_err(|e| Error::Shard { shard: location.to_string(), source: e })
    }

    /// Builds a manifest for `shards` (tar shards; folder sources are not indexed), counting samples from tar
    /// headers with at most `jobs` shards read at a time. `progress` is called with the number of shards done.
    pub fn index(shards: &[Shard], opts: &ReadOptions, jobs: usize, progress: &(dyn Fn(usize) + Sync)) -> Result<Self> {
        Self::index_cached(shards, opts, jobs, None, progress)
    }

    /// [`Manifest::index`] through the count cache in `cache` (see [`super::CountCache`]): a shard whose
    /// current version is cached is not read (one `HEAD` for a remote shard), and the counts of the shards
    /// read are added to the cache.
    pub fn index_cached(
        shards: &[Shard],
        opts: &ReadOptions,
        jobs: usize,
        cache: Option<&Path>,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Self> {
        let urls: Vec<&str> = shards
            .iter()
            .map(|s| match s {
                Shard::Tar(url) => Ok(url.as_str()),
                Shard::Folder(f) => {
                    Err(Error::ShardSpec { spec: f.name(), detail: "a folder source has no shard to index".into() })
                }
            })
            .collect::<Result<_>>()?;
        let mut counts = cache.map(CountCache::open).transpose()?;
        let cached = counts.as_ref();
        let done = AtomicUsize::new(0);
        let results = par_map(&urls, jobs, |&url| {
            let shard = Shard::Tar(url.to_string());
            let result = (|| {
                let version = if cached.is_some() { super::counts::version(&shard, opts)? } else { None };
                let local = !super::http::is_url(url) && !super::object::is_object_url(url);
                let filesize = version
                    .as_ref()
                    .map(|v| v.1)
                    .or_else(|| local.then(|| std::fs::metadata(url).ok().map(|m| m.len())).flatten());
                let hit = version.as_ref().and_then(|(key, _)| cached.and_then(|c| c.get(key)));
                let (nsamples, new) = match hit {
                    Some(n) => (n, None),
                    None => {
                        let n = shard.count_samples(opts)? as u64;
                        (n, version.map(|(key, _)| (key, n)))
                    }
                };
                Ok((ManifestShard { url: url.to_string(), nsamples, filesize }, new))
            })();
            progress(done.fetch_add(1, Ordering::SeqCst) + 1);
            result
        });
        let results: Vec<(ManifestShard, Option<(String, u64)>)> = results.into_iter().collect::<Result<_>>()?;
        if let Some(c) = counts.as_mut() {
            c.record(results.iter().filter_map(|(_, new)| new.clone()))?;
        }
        Ok(Self { name: None, shards: results.into_iter().map(|(s, _)| s).collect() })
    }

    /// Joins manifests in order; a shard listed twice (same URL) is an error naming it.
    pub fn merge(parts: impl IntoIterator<Item = Manifest>) -> Result<Self> {
        let mut out = Manifest::default();
        let mut seen = std::collections::HashSet::new();
        for part in parts {
            out.name = out.name.or(part.name);
            for s in part.shards {
                if !seen.insert(s.url.clone()) {
                    return Err(Error::ShardSpec { spec: s.url, detail: "listed in two manifests".into() });
                }
                out.shards.push(s);
            }
        }
        Ok(out)
    }

    /// Samples in all shards.
    pub fn total(&self) -> u64 {
        // Saturating: the counts come from a file, and a crafted one must not overflow.
        self.shards.iter().fold(0u64, |a, s| a.saturating_add(s.nsamples))
    }

    /// A manifest of shards a writer produced: `(path, samples, bytes)` each, in order.
    pub fn from_written(written: &[(PathBuf, u64, u64)]) -> Self {
        let shards = written
            .iter()
            .map(|(p, n, size)| ManifestShard {
                url: p.to_string_lossy().into_owned(),
                nsamples: *n,
                filesize: Some(*size),
            })
            .collect();
        Self { name: None, shards }
    }
}

/// `f` over `items` on at most `jobs` threads; results in item order.
fn par_map<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, R)>> = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut out) = results.lock() {
                        out.push((i, r));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wids_and_resolves_relative_urls() {
        let text = br#"{"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "t",
            "shardlist": [{"url": "a-0.tar", "nsamples": 3, "filesize": 10}, {"url": "/abs/b.tar", "nsamples": 2},
                          {"url": "http://h/c.tar", "nsamples": 1, "dataset": "ignored"}]}"#;
        let m = Manifest::parse(text, "data/train.json").unwrap();
        let urls: Vec<&str> = m.shards.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(urls, ["data/a-0.tar", "/abs/b.tar", "http://h/c.tar"]);
        assert_eq!((m.total(), m.name.as_deref(), m.shards[0].filesize), (6, Some("t"), Some(10)));
        let remote = Manifest::parse(text, "https://host/x/train.json").unwrap();
        assert_eq!(remote.shards[0].url, "https://host/x/a-0.tar");
        let based = br#"{"base_path": "shards", "shardlist": [{"url": "a.tar", "nsamples": 1}]}"#;
        assert_eq!(Manifest::parse(based, "d/m.json").unwrap().shards[0].url, "d/shards/a.tar");
        assert!(is_manifest("s3://b/x/train.JSON") && !is_manifest("a.jsonl") && !is_manifest("a.tar"));
    }

    #[test]
    fn bad_manifests_name_the_file() {
        for bad in [&b"[]"[..], br#"{"shardlist": [{"url": "a.tar"}]}"#, br#"{"wids_version": 2, "shardlist": []}"#] {
            let e = Manifest::parse(bad, "m.json").unwrap_err().to_string();
            assert!(e.contains("m.json"), "{e}");
        }
    }

    #[test]
    fn round_trips_relative_to_its_folder_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            name: Some("x".into()),
            shards: vec![ManifestShard {
                url: dir.path().join("a.tar").display().to_string(),
                nsamples: 4,
                filesize: None,
            }],
        };
        let path = dir.path().join("m.json");
        m.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"url\": \"a.tar\"") && text.contains(KIND), "{text}");
        let back = Manifest::read(&path.display().to_string(), &ReadOptions::default()).unwrap();
        assert_eq!(back.shards[0].nsamples, 4);
        assert!(Path::new(&back.shards[0].url).ends_with("a.tar"));
        let merged = Manifest::merge([m.clone(), Manifest { name: None, shards: vec![] }]).unwrap();
        assert_eq!(merged.shards.len(), 1);
        assert!(Manifest::merge([m.clone(), m]).unwrap_err().to_string().contains("two manifests"));
    }
}
