//! The score cache in the pipeline: a later epoch takes every score from the cache (no classifier forward)
//! and yields exactly what the scorer gave; a cache of other settings is not used; the bound holds; corrupt
//! entries are scored again.

use std::collections::BTreeMap;

use juicer::vision::cache::ScoreCacheConfig;
use juicer::{Class, DeviceSpec, JuicedBatch, Juicer, JuicerBuilder, Summary};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");

fn builder() -> JuicerBuilder {
    JuicedBatch::builder([SHARDS]).batch_size(8).device(DeviceSpec::Cpu).shuffle_buffer(16).seed(3)
}

/// Per key: scores, kept patches, classes, enriched caption.
type Outputs = BTreeMap<String, (Vec<f32>, Vec<u32>, Vec<Class>, String)>;

fn epoch(loader: &Juicer<JuicedBatch>) -> (Outputs, Summary) {
    let mut it = loader.iter().expect("start");
    let mut out = Outputs::new();
    for b in it.by_ref() {
        let b = b.expect("batch");
        for i in 0..b.len() {
            let v = (b.scores[i].clone(), b.kept[i].clone(), b.classes[i].clone(), b.enriched[i].clone());
            assert!(out.insert(b.keys[i].clone(), v).is_none());
        }
    }
    (out, it.summary())
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.extension().is_some_and(|x| x == "bin") {
            out.push(p);
        }
    }
    out
}

#[test]
fn second_epoch_is_served_by_the_cache_and_equal() {
    let dir = tempfile::tempdir().unwrap();
    let cached = builder().score_cache(ScoreCacheConfig::new(dir.path())).build().unwrap();
    let (first, s1) = epoch(&cached);
    assert_eq!(first.len(), 73);
    let c1 = s1.score_cache.expect("cache stats");
    assert_eq!((c1.hits, c1.misses, c1.stored), (0, 73, 73));
    assert_eq!(s1.classifier_images, 73);
    let (second, s2) = epoch(&cached);
    let c2 = s2.score_cache.expect("cache stats");
    assert_eq!((c2.hits, c2.misses), (73, 73), "epoch 2: every sample a hit");
    assert_eq!(s2.classifier_images, 73, "no classifier forward in epoch 2");
    assert_eq!(first, second, "cached scores, kept patches, classes and captions are the scorer's own");

    // A fresh loader without a cache computes the same (the cache is not a different answer).
    let (plain, s) = epoch(&builder().build().unwrap());
    assert!(s.score_cache.is_none());
    for (key, (scores, kept, classes, enriched)) in &plain {
        let c = &first[key];
        assert_eq!((&c.1, &c.3), (kept, enriched), "{key}");
        assert_eq!(c.2.iter().map(|c| c.id).collect::<Vec<_>>(), classes.iter().map(|c| c.id).collect::<Vec<_>>());
        let worst = scores.iter().zip(&c.0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{key}: scores differ by {worst}");
    }

    // A new process over the same directory hits from the start; other settings (input size) do not.
    let reopened = builder().score_cache(ScoreCacheConfig::new(dir.path())).limit(16).build().unwrap();
    let (_, s) = epoch(&reopened);
    assert_eq!(s.score_cache.unwrap().misses, 0);
    let other = builder().image_size(112).score_cache(ScoreCacheConfig::new(dir.path())).limit(16).build().unwrap();
    let (_, s) = epoch(&other);
    assert_eq!(s.score_cache.unwrap().hits, 0, "another input size is another namespace");
    assert!(s.classifier_images >= 16);
}

#[test]
fn cache_bound_and_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    // About 30 entries' worth (an entry: 196 scores + 3 maps of 196 + headers ≈ 3.2 KB).
    let max_bytes = 100_000;
    let loader = builder().score_cache(ScoreCacheConfig { dir: dir.path().to_path_buf(), max_bytes }).build().unwrap();
    let (first, s) = epoch(&loader);
    let c = s.score_cache.unwrap();
    assert_eq!(c.stored, 73);
    assert!(c.evicted > 0 && c.bytes <= max_bytes, "{c:?}");
    let on_disk: u64 = files(dir.path()).iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(on_disk, c.bytes, "the index matches the files");

    // Damage every entry left: the next epoch scores those samples again and still yields the same outputs.
    let left = files(dir.path());
    assert!(!left.is_empty());
    for p in &left {
        let mut b = std::fs::read(p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(p, b).unwrap();
    }
    let (second, s) = epoch(&loader);
    let c2 = s.score_cache.unwrap();
    // Damaged entries read in epoch 2 count as corrupt; the others were evicted first by epoch 2's inserts.
    assert!(c2.corrupt >= 1 && c2.corrupt <= left.len() as u64, "{c2:?}");
    assert!(c2.bytes <= max_bytes);
    assert_eq!(c2.hits, 0, "evicted or damaged: nothing left to hit");
    assert_eq!(s.classifier_images, 73 + 73, "every sample scored again");
    assert_eq!(first.keys().collect::<Vec<_>>(), second.keys().collect::<Vec<_>>());
    for (k, v) in &first {
        assert_eq!(
            (&v.1, &v.2.iter().map(|c| c.id).collect::<Vec<_>>()),
            (&second[k].1, &second[k].2.iter().map(|c| c.id).collect::<Vec<_>>())
        );
    }
}
