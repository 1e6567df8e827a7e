//! A bounded on-disk cache of scorer outputs, so that later epochs skip the scoring model.
//!
//! # What is cached, under which key
//! One entry per sample: the raw patch scores and, for the `cam` scorer, every class's probability and the
//! top class candidates with their maps (what `extract` needs). Entries live under a *namespace* directory named by a hash of everything that
//! changes the scorer's output: scorer kind, a fingerprint of the weight bytes, the class head (`--classifier`,
//! with a fingerprint of its weights), model input size, resize size, normalisation, patch size, `cam_top`,
//! `top_k`. Inside it, an entry is found by the sample key **and** a hash
//! of the decoded pixels, so a key that names other pixels (another dataset with the same key scheme, a changed
//! image) is a miss, never a wrong hit.
//!
//! # Bounds and eviction
//! The cache holds at most `max_bytes` of entry files per namespace; when an insert goes past it, the oldest
//! entries (insertion order, first in first out) are deleted until it is back under. The order survives a
//! restart (modification times). An epoch that touches more samples than fit keeps the most recent ones.
//!
//! # Integrity
//! Each entry file carries a magic, its key, its pixel hash, explicit lengths and a trailing checksum. A file
//! that fails any check is a miss: it is deleted, counted as `corrupt`, and the sample is scored again. A
//! failed write (disk full, permissions) is counted and otherwise ignored: the cache never fails a sample.
//! Writes go to a temporary file renamed into place, so readers never see half an entry.
//!
//! # Shared in object storage
//! `dir` may be an object-store URL (`s3://bucket/cache`, `gs://`, `az://`): ranks and jobs then share one
//! cache. Keys, namespaces, entry format and checks are the same; an entry is one object, written in one PUT
//! (atomic: readers see the whole entry or none), a corrupt one is deleted and scored again. The byte bound
//! does not apply there (no rank sees the whole cache): bound it with the bucket's lifecycle (expiry) rules.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{Error, Result, SampleError};
use crate::patch::grid;
use crate::rng::{derive, hash_str, mix64};
use crate::sample::{Candidate, Decoded, Scored};
use crate::stage::BatchStage;

const MAGIC: &[u8; 4] = b"JSC2";

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreCacheConfig {
    /// Root directory (namespaces are subdirectories), or an object-store URL (module docs).
    pub dir: PathBuf,
    /// Most bytes of entries kept per namespace (default 1 GiB).
    pub max_bytes: u64,
}

impl ScoreCacheConfig {
    /// A cache in `dir` with the default bound.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), max_bytes: 1 << 30 }
    }
}

/// Counters since the cache was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Samples whose scores came from the cache.
    pub hits: u64,
    /// Samples the scorer had to run for.
    pub misses: u64,
    /// Entries stored.
    pub stored: u64,
    /// Entries deleted to stay within `max_bytes`.
    pub evicted: u64,
    /// Entry files that failed their checks (deleted, scored again).
    pub corrupt: u64,
    /// Writes that failed (ignored).
    pub write_errors: u64,
    /// Bytes of entries in the namespace now.
    pub bytes: u64,
}

/// A cached scorer output.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Raw patch scores, row-major.
    pub scores: Vec<f32>,
    /// Class candidates when the scorer produced them.
    pub candidates: Option<Vec<Candidate>>,
    /// Every class's probability when the scorer produced them (empty otherwise).
    pub probs: Vec<f32>,
}

struct Index {
    /// Entry files in insertion order with their sizes.
    order: VecDeque<(PathBuf, u64)>,
    bytes: u64,
}

/// The cache of one namespace. Shared by the model threads of a stage (`Arc`).
pub struct ScoreCache {
    dir: PathBuf,
    /// Set when `dir` is an object-store URL: the options to reach it.
    remote: Option<crate::source::ReadOptions>,
    max_bytes: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    stored: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    write_errors: AtomicU64,
}

impl std::fmt::Debug for ScoreCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoreCache").field("dir", &self.dir).field("stats", &self.stats()).finish()
    }
}

/// A 64-bit fingerprint of bytes (weights files): SplitMix64's mixer over 8-byte words, length included.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = mix64(bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix64(h ^ u64::from_le_bytes(tail))
}

fn pixel_hash(pixels: &[f32]) -> u64 {
    pixels.chunks(2).fold(mix64(pixels.len() as u64), |h, p| {
        let w = u64::from(p[0].to_bits()) | (u64::from(p.get(1).map_or(0, |x| x.to_bits())) << 32);
        mix64(h ^ w).wrapping_add(0x9E37_79B9_7F4A_7C15)
    })
}

impl ScoreCache {
    /// Opens (creating) the namespace `namespace` under `config.dir` and indexes the entries already there.
    /// An object-store `dir` is reached with `read` (its storage options and I/O counters).
    pub fn open_with(config: &ScoreCacheConfig, namespace: &str, read: &crate::source::ReadOptions) -> Result<Self> {
        let root = config.dir.to_string_lossy();
        if !crate::source::is_object_url(&root) {
            return Self::open(config, namespace);
        }
        let dir = PathBuf::from(format!("{}/{:016x}", root.trim_end_matches('/'), hash_str(namespace)));
        let about = format!("{}/namespace.txt", dir.to_string_lossy());
        crate::source::object::put(&about, read, namespace.as_bytes().to_vec().into())
            .map_err(|e| Error::io(format!("writing score cache `{about}`"), e))?;
        let mut cache = Self::open_in(dir, config.max_bytes, Index { order: VecDeque::new(), bytes: 0 })?;
        cache.remote = Some(read.clone());
        Ok(cache)
    }

    /// Opens (creating) the namespace `namespace` under the local directory `config.dir` and indexes the
    /// entries already there.
    pub fn open(config: &ScoreCacheConfig, namespace: &str) -> Result<Self> {
        let dir = config.dir.join(format!("{:016x}", hash_str(namespace)));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating score cache `{}`", dir.display()), e))?;
        // The namespace's description, for people looking at the directory.
        let about = dir.join("namespace.txt");
        if !about.exists() {
            let _ = std::fs::write(&about, namespace);
        }
        let mut found = Vec::new();
        for sub in read_dir(&dir)? {
            if sub.is_dir() {
                for f in read_dir(&sub)? {
                    if f.extension().is_some_and(|e| e == "bin")
                        && let Ok(m) = f.metadata()
                    {
                        found.push((m.modified().ok(), f, m.len()));
                    }
                }
            }
        }
        found.sort();
        let bytes = found.iter().map(|f| f.2).sum();
        let order = found.into_iter().map(|(_, p, n)| (p, n)).collect();
        Self::open_in(dir, config.max_bytes, Index { order, bytes })
    }

    fn open_in(dir: PathBuf, max_bytes: u64, index: Index) -> Result<Self> {
        if max_bytes == 0 {
            return Err(Error::Config(vec!["score cache: max_bytes must be at least 1".into()]));
        }
        Ok(Self {
            dir,
            remote: None,
            max_bytes,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        })
    }

    /// The namespace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            bytes: self.index.lock().map(|i| i.bytes).unwrap_or(0),
        }
    }

    fn path(&self, key: &str, pixels: u64) -> PathBuf {
        let h = derive(pixels, &[hash_str(key)]);
        self.dir.join(format!("{:02x}", h >> 56)).join(format!("{h:016x}.bin"))
    }

    /// The object URL of an entry (an object-store cache).
    fn url(&self, key: &str, pixels: u64) -> String {
        let h = derive(pixels, &[hash_str(key)]);
        format!("{}/{:02x}/{h:016x}.bin", self.dir.to_string_lossy(), h >> 56)
    }

    /// The entry of `key` with these decoded pixels, counting a hit or a miss.
    pub fn get(&self, key: &str, pixels: &[f32]) -> Option<Entry> {
        let ph = pixel_hash(pixels);
        let bytes = match &self.remote {
            None => std::fs::read(self.path(key, ph)).ok(),
            Some(read) => crate::source::object::get_opt(&self.url(key, ph), read).ok().flatten().map(|b| b.to_vec()),
        };
        let found = match bytes {
            Some(bytes) => match decode_entry(&bytes, key, ph) {
                Some(e) => Some(e),
                None => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    match &self.remote {
                        None => drop(std::fs::remove_file(self.path(key, ph))),
                        Some(read) => drop(crate::source::object::delete(&self.url(key, ph), read)),
                    }
                    None
                }
            },
            None => None,
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores an entry; failures are counted, never returned.
    pub fn put(&self, key: &str, pixels: &[f32], entry: &Entry) {
        let ph = pixel_hash(pixels);
        let bytes = encode_entry(key, ph, entry);
        if let Some(read) = &self.remote {
            let counter = match crate::source::object::put(&self.url(key, ph), read, bytes.into()) {
                Ok(()) => &self.stored,
                Err(_) => &self.write_errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let path = self.path(key, ph);
        let n = bytes.len() as u64;
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        });
        if written.is_err() {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stored.fetch_add(1, Ordering::Relaxed);
        let Ok(mut index) = self.index.lock() else { return };
        index.order.push_back((path, n));
        index.bytes += n;
        while index.bytes > self.max_bytes {
            let Some((old, size)) = index.order.pop_front() else { break };
            index.bytes = index.bytes.saturating_sub(size);
            if std::fs::remove_file(&old).is_ok() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading `{}`", dir.display()), e))?;
    Ok(entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn encode_entry(key: &str, pixels: u64, e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + key.len() + 4 * e.scores.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&pixels.to_le_bytes());
    put_f32s(&mut out, &e.scores);
    match &e.candidates {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            for cand in c {
                out.extend_from_slice(&cand.id.to_le_bytes());
                out.extend_from_slice(&cand.prob.to_le_bytes());
                put_f32s(&mut out, &cand.map);
            }
        }
    }
    put_f32s(&mut out, &e.probs);
    let sum = fingerprint(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// A little-endian reader that fails (returns `None`) past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn f32(&mut self) -> Option<f32> {
        Some(f32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn f32s(&mut self) -> Option<Vec<f32>> {
        let n = self.u32()? as usize;
        let raw = self.take(n.checked_mul(4)?)?;
        Some(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

fn decode_entry(bytes: &[u8], key: &str, pixels: u64) -> Option<Entry> {
    let body_len = bytes.len().checked_sub(8)?;
    let (body, sum) = bytes.split_at(body_len);
    if fingerprint(body) != u64::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let mut r = Reader(body);
    if r.take(4)? != MAGIC {
        return None;
    }
    let klen = r.u32()? as usize;
    if r.take(klen)? != key.as_bytes() || r.u64()? != pixels {
        return None;
    }
    let scores = r.f32s()?;
    let candidates = match r.take(1)?[0] {
        0 => None,
        1 => {
            let n = r.u32()? as usize;
            let mut c = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                c.push(Candidate { id: r.u32()?, prob: r.f32()?, map: r.f32s()? });
            }
            Some(c)
        }
        _ => return None,
    };
    let probs = r.f32s()?;
    r.0.is_empty().then_some(Entry { scores, candidates, probs })
}

/// A scorer stage behind the cache: hits skip the model, misses go through it in one micro-batch and are
/// stored.
#[derive(Clone)]
pub struct Cached<S> {
    /// The scorer.
    pub inner: S,
    /// The cache (shared by the stage's model threads).
    pub cache: std::sync::Arc<ScoreCache>,
    /// Patch side.
    pub patch: usize,
}

impl<S: BatchStage<In = Decoded, Out = Scored>> BatchStage for Cached<S> {
    type In = Decoded;
    type Out = Scored;

    fn process_batch(&mut self, items: Vec<Decoded>) -> Vec<std::result::Result<Scored, SampleError>> {
        let n = items.len();
        let mut out: Vec<Option<std::result::Result<Scored, SampleError>>> = (0..n).map(|_| None).collect();
        let mut miss_at = Vec::new();
        let mut misses = Vec::new();
        for (i, d) in items.into_iter().enumerate() {
            let g = grid(d.size, self.patch);
            match self.cache.get(&d.key, &d.pixels) {
                Some(e) if e.scores.len() == g.0 * g.1 => {
                    out[i] = Some(Ok(Scored {
                        sample: d,
                        grid: g,
                        patch: self.patch,
                        scores: e.scores,
                        probs: e.probs,
                        candidates: e.candidates,
                    }));
                }
                _ => {
                    miss_at.push(i);
                    misses.push(d);
                }
            }
        }
        if !misses.is_empty() {
            for (i, r) in miss_at.into_iter().zip(self.inner.process_batch(misses)) {
                if let Ok(s) = &r {
                    let entry =
                        Entry { scores: s.scores.clone(), candidates: s.candidates.clone(), probs: s.probs.clone() };
                    self.cache.put(&s.sample.key, &s.sample.pixels, &entry);
                }
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(SampleError::new(
                        String::new(),
                        crate::error::DropReason::StageFailed,
                        "score cache: the scorer returned fewer results than items",
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seed: u32, with_candidates: bool) -> Entry {
        let scores = (0..16).map(|i| (i * seed) as f32 * 0.5).collect();
        let candidates = with_candidates.then(|| {
            vec![
                Candidate { id: seed, prob: 0.5, map: vec![1.0; 16] },
                Candidate { id: 7, prob: 0.25, map: vec![-2.0; 16] },
            ]
        });
        let probs = if with_candidates { vec![0.5, 0.25, 0.25] } else { Vec::new() };
        Entry { scores, candidates, probs }
    }

    fn cfg(dir: &Path, max_bytes: u64) -> ScoreCacheConfig {
        ScoreCacheConfig { dir: dir.to_path_buf(), max_bytes }
    }

    #[test]
    fn round_trip_by_key_and_pixels_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let c = ScoreCache::open(&cfg(dir.path(), 1 << 20), "ns").unwrap();
        let px = vec![0.25f32; 48];
        assert_eq!(c.get("a", &px), None);
        c.put("a", &px, &entry(3, true));
        c.put("b", &px, &entry(5, false));
        assert_eq!(c.get("a", &px), Some(entry(3, true)));
        assert_eq!(c.get("b", &px), Some(entry(5, false)));
        // Same key, other pixels: a miss, never the other image's scores.
        let other = vec![0.5f32; 48];
        assert_eq!(c.get("a", &other), None);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.stored), (2, 2, 2));
        // Reopened: the entries are still there; another namespace does not see them.
        let again = ScoreCache::open(&cfg(dir.path(), 1 << 20), "ns").unwrap();
        assert_eq!(again.stats().bytes, s.bytes);
        assert_eq!(again.get("a", &px), Some(entry(3, true)));
        let ns2 = ScoreCache::open(&cfg(dir.path(), 1 << 20), "ns2").unwrap();
        assert_eq!(ns2.get("a", &px), None);
    }

    #[test]
    fn corrupt_entries_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let c = ScoreCache::open(&cfg(dir.path(), 1 << 20), "ns").unwrap();
        let px = vec![1.0f32; 12];
        c.put("k", &px, &entry(2, true));
        let path = c.path("k", pixel_hash(&px));
        let good = std::fs::read(&path).unwrap();
        for cut in [0, 3, 10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(c.get("k", &px), None, "cut at {cut}");
            assert!(!path.exists(), "a corrupt entry is deleted");
        }
        let mut flipped = good.clone();
        flipped[20] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(c.get("k", &px), None);
        assert_eq!(c.stats().corrupt, 6);
        std::fs::write(&path, &good).unwrap();
        assert_eq!(c.get("k", &px), Some(entry(2, true)));
    }

    #[test]
    fn bounded_first_in_first_out() {
        let dir = tempfile::tempdir().unwrap();
        let px = vec![0.0f32; 4];
        let size = encode_entry("k00", pixel_hash(&px), &entry(1, true)).len() as u64;
        let c = ScoreCache::open(&cfg(dir.path(), 3 * size + size / 2), "ns").unwrap();
        for i in 0..10 {
            c.put(&format!("k{i:02}"), &px, &entry(1, true));
        }
        let s = c.stats();
        assert_eq!((s.stored, s.evicted), (10, 7));
        assert!(s.bytes <= 3 * size + size / 2);
        for i in 0..7 {
            assert_eq!(c.get(&format!("k{i:02}"), &px), None, "k{i:02} was evicted");
        }
        for i in 7..10 {
            assert!(c.get(&format!("k{i:02}"), &px).is_some(), "k{i:02} is among the newest");
        }
        assert!(ScoreCache::open(&cfg(dir.path(), 0), "ns").is_err());
    }

    #[test]
    fn fingerprint_sees_every_byte() {
        let a = vec![7u8; 1001];
        let mut b = a.clone();
        b[1000] = 8;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a[..1000]), fingerprint(&a));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
