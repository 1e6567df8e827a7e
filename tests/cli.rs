//! The `juicer` binary end to end: `run` over the GCompris fixture shards (records, accounting, limits,
//! ranks, bad samples, bad input) and `pack` reproducing the committed shards byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::util::{Fault, fixtures, juicer, juicer_command, make_shards, png, png_bomb, specs, stderr};

const SHARDS: &str = "fixtures/shards/gcompris-{000000..000002}.tar";
const SHARD_FILES: [&str; 3] = ["gcompris-000000.tar", "gcompris-000001.tar", "gcompris-000002.tar"];

/// Asserts success and parses stdout as JSON lines.
fn records(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "juicer failed ({}):\n{}", out.status, stderr(out));
    String::from_utf8(out.stdout.clone())
        .expect("stdout is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn key(r: &Value) -> String {
    r["key"].as_str().unwrap_or_else(|| panic!("record without a key: {r}")).to_string()
}

/// Key → caption of every GCompris pair, from the fixture's JSONL.
fn pairs() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fixtures().join("gcompris/pairs.jsonl")).expect("pairs.jsonl");
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("pair line");
            (key(&v), v["caption"].as_str().expect("caption").to_string())
        })
        .collect()
}

/// Sample keys stored in one tar shard (member name up to its first dot, as WebDataset groups them).
fn shard_keys(path: &Path) -> BTreeSet<String> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open shard"));
    archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            let e = e.expect("tar entry");
            let name = e.path().expect("member path").to_string_lossy().into_owned();
            let (dir, base) = name.rsplit_once('/').map_or(("", name.as_str()), |(d, b)| (d, b));
            let stem = base.split('.').next().unwrap_or(base);
            if dir.is_empty() { stem.to_string() } else { format!("{dir}/{stem}") }
        })
        .collect()
}

/// The stderr summary with runs of spaces collapsed, so `read 73  =  emitted 73` reads `read 73 = emitted 73`.
fn summary_line(out: &Output) -> String {
    let err = stderr(out);
    let line = err.lines().find(|l| l.contains("emitted")).unwrap_or_else(|| panic!("no summary line in:\n{err}"));
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn run_emits_one_record_per_gcompris_pair() {
    let out = juicer(&["run", SHARDS, "--jsonl", "-", "--device", "cpu"]);
    let recs = records(&out);
    assert_eq!(recs.len(), 73, "{}", stderr(&out));
    let pairs = pairs();
    assert_eq!(pairs.len(), 73);
    let mut seen = BTreeSet::new();
    for r in &recs {
        let k = key(r);
        assert_eq!(r["grid"], serde_json::json!([14, 14]), "{r}");
        assert_eq!(r["patch"], 16, "{r}");
        assert_eq!(r["classifier"], "mobilenet-v2", "{r}");
        assert!(r.get("dropped").is_none(), "{r}");
        let caption = pairs.get(&k).unwrap_or_else(|| panic!("key {k} is not a GCompris pair"));
        assert_eq!(r["caption"].as_str(), Some(caption.as_str()), "caption of {k}");
        assert!(seen.insert(k.clone()), "key {k} twice");
    }
    assert_eq!(seen, pairs.keys().cloned().collect::<BTreeSet<_>>());
    let summary = summary_line(&out);
    assert!(summary.contains("read 73 = emitted 73 + dropped 0"), "{summary}");
}

#[test]
fn pack_reproduces_the_fixture_shards_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().to_str().expect("UTF-8 temp path");
    let out = juicer(&[
        "pack",
        "fixtures/gcompris/pairs.jsonl",
        "--out",
        out_dir,
        "--prefix",
        "gcompris",
        "--max-count",
        "25",
    ]);
    assert!(out.status.success(), "pack failed:\n{}", stderr(&out));
    let mut written: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read out dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    // The shards, and their manifest (sample counts per shard, read by loaders instead of a scan).
    let mut expected: Vec<String> = SHARD_FILES.iter().map(|s| s.to_string()).collect();
    expected.push("gcompris.json".into());
    assert_eq!(written, expected);
    for name in SHARD_FILES {
        let fresh = std::fs::read(dir.path().join(name)).expect("packed shard");
        let committed = std::fs::read(fixtures().join("shards").join(name)).expect("fixture shard");
        assert!(
            fresh == committed,
            "{name} differs from the committed fixture ({} vs {} bytes)",
            fresh.len(),
            committed.len()
        );
    }
    // stdout lists the written shards, one path per line.
    let listed: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect();
    assert_eq!(listed, SHARD_FILES.iter().map(|n| dir.path().join(n)).collect::<Vec<_>>());
}

#[test]
fn a_corrupt_image_is_dropped_by_default_and_fails_the_run_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shards = specs(&make_shards(dir.path(), &[6], |g| if g == 2 { Fault::Corrupt } else { Fault::None }));
    let bad = "s0/k00002";
    let base = ["run", shards[0].as_str(), "--jsonl", "-", "--device", "cpu", "--image-size", "32"];

    let out = juicer(&base);
    let recs = records(&out);
    assert_eq!(recs.len(), 6, "five samples and one drop record");
    let dropped: Vec<&Value> = recs.iter().filter(|r| r.get("dropped").is_some()).collect();
    assert_eq!(dropped.len(), 1, "{recs:?}");
    assert_eq!(dropped[0]["key"], bad);
    assert_eq!(dropped[0]["dropped"], "undecodable_image");
    let emitted: BTreeSet<String> = recs.iter().filter(|r| r.get("dropped").is_none()).map(key).collect();
    assert_eq!(emitted.len(), 5);
    assert!(!emitted.contains(bad));
    let summary = summary_line(&out);
    assert!(summary.contains("read 6 = emitted 5 + dropped 1"), "{summary}");

    let out = juicer(&[&base[..], &["--on-error", "fail"]].concat());
    assert!(!out.status.success(), "--on-error fail must fail the run");
    assert!(stderr(&out).contains(bad), "stderr should name {bad}:\n{}", stderr(&out));
}

#[test]
fn a_png_bomb_is_dropped_as_image_too_large_from_its_header() {
    // 20000 x 20000 pixels in a few hundred KB: refused before any pixel memory is allocated, the other samples
    // emitted, and the limit is an option.
    let dir = tempfile::tempdir().expect("tempdir");
    let bomb = png_bomb(20_000, 20_000);
    assert!(bomb.len() < 1 << 20, "the bomb is small: {} bytes", bomb.len());
    let mut w = juicer::source::ShardWriter::new(dir.path(), "bomb", usize::MAX, u64::MAX).expect("writer");
    for i in 0..4 {
        let image = if i == 1 { bomb.clone() } else { png(i, 40, 30) };
        w.write(&format!("k{i}"), &[("png", &image), ("txt", b"a caption")]).expect("write");
    }
    let shard = w.finish().expect("finish").remove(0).display().to_string();
    let base = ["run", shard.as_str(), "--jsonl", "-", "--device", "cpu", "--image-size", "32"];

    let out = juicer(&base);
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = records(&out);
    let dropped: Vec<&Value> = recs.iter().filter(|r| r.get("dropped").is_some()).collect();
    assert_eq!(dropped.len(), 1, "{recs:?}");
    assert_eq!((dropped[0]["key"].as_str(), dropped[0]["dropped"].as_str()), (Some("k1"), Some("image_too_large")));
    assert!(dropped[0].to_string().contains("20000x20000"), "the record names the size: {}", dropped[0]);
    assert!(summary_line(&out).contains("read 4 = emitted 3 + dropped 1"), "{}", summary_line(&out));

    // A limit below the good images' 1,200 pixels drops them all; 0 lifts the limit (not decoded here: the
    // bomb would take 1.2 GB).
    let out = juicer(&[&base[..], &["--max-image-pixels", "1000"]].concat());
    assert!(summary_line(&out).contains("read 4 = emitted 0 + dropped 4"), "{}", summary_line(&out));
}

#[test]
fn a_random_bytes_shard_is_named_once_on_stderr_and_the_good_shards_are_emitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut shards = specs(&make_shards(dir.path(), &[5, 4], |_| Fault::None));
    let junk = dir.path().join("junk-000001.tar");
    // Multiplicative hashing of the index: noise with no tar header in it.
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&junk, bytes).expect("write junk");
    let empty = dir.path().join("empty.tar");
    std::fs::write(&empty, b"").expect("write empty");
    shards.insert(1, junk.display().to_string());
    shards.push(empty.display().to_string());
    let mut args = vec!["run", "--jsonl", "-", "--device", "cpu", "--image-size", "32"];
    args.extend(shards.iter().map(String::as_str));

    let out = juicer(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: unreadable shard")).collect();
    assert_eq!(warnings.len(), 2, "one warning per bad shard:\n{err}");
    let junk_name = junk.display().to_string();
    assert!(warnings.iter().any(|w| w.contains(&junk_name) && w.contains("not a tar archive")), "{warnings:?}");
    let recs = records(&out);
    let dropped: Vec<&Value> = recs.iter().filter(|r| r.get("dropped").is_some()).collect();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(dropped.iter().all(|r| r["dropped"] == "unreadable_shard"), "{dropped:?}");
    assert!(dropped.iter().any(|r| r["key"] == junk_name.as_str()), "the record names the shard: {dropped:?}");
    let emitted = recs.iter().filter(|r| r.get("dropped").is_none()).count();
    assert_eq!(emitted, 9, "every sample of the good shards");
    assert!(summary_line(&out).contains("read 11 = emitted 9 + dropped 2"), "{}", summary_line(&out));
    assert!(err.lines().any(|l| l.contains("unreadable shard") && l.contains(&junk_name) && !l.starts_with("warning")));
}

#[test]
fn limit_stops_after_n_samples() {
    let out = juicer(&["run", SHARDS, "--jsonl", "-", "--device", "cpu", "--limit", "10"]);
    let recs = records(&out);
    assert_eq!(recs.len(), 10);
    let pairs = pairs();
    let keys: BTreeSet<String> = recs.iter().map(key).collect();
    assert_eq!(keys.len(), 10);
    assert!(keys.iter().all(|k| pairs.contains_key(k)), "{keys:?}");
    let summary = summary_line(&out);
    assert!(summary.contains("read 10 = emitted 10 + dropped 0"), "{summary}");
}

#[test]
fn ranks_split_the_shards_and_together_read_every_key_once() {
    // `--epoch-size exhaust`: every rank reads all of its shards (the default for several ranks drops the
    // longer ranks' remainder so that batch counts match, and then the union is not the whole data set).
    let per_shard: Vec<BTreeSet<String>> =
        SHARD_FILES.iter().map(|n| shard_keys(&fixtures().join("shards").join(n))).collect();
    assert_eq!(per_shard.iter().map(BTreeSet::len).sum::<usize>(), 73);
    let mut all = Vec::new();
    for rank in 0..3 {
        let r = rank.to_string();
        let args = ["run", SHARDS, "--jsonl", "-", "--device", "cpu", "--rank", &r, "--world-size", "3"];
        let out = juicer(&[&args[..], &["--epoch-size", "exhaust"]].concat());
        let keys: BTreeSet<String> = records(&out).iter().map(key).collect();
        assert!(!keys.is_empty(), "rank {rank} read nothing");
        let home: Vec<usize> = (0..3).filter(|&s| !keys.is_disjoint(&per_shard[s])).collect();
        assert_eq!(home, [rank], "rank {rank} read from shards {home:?} (shard order is not shuffled by default)");
        assert_eq!(keys, per_shard[home[0]], "rank {rank} must read its whole shard");
        all.extend(keys);
    }
    all.sort();
    let unique: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(all.len(), unique.len(), "a key was read by two ranks");
    assert_eq!(unique, pairs().keys().cloned().collect::<BTreeSet<_>>());
}

#[test]
fn rank_one_of_three_reads_only_its_shard_under_the_default_epoch_policy() {
    // Default `auto` = drop-remainder across ranks: floor(23 / 8) = 2 batches of 8 on every rank (the
    // smallest rank has 23 samples), all from rank 1's one shard (shard order is not shuffled by default).
    let args = ["run", SHARDS, "--jsonl", "-", "--device", "cpu", "--rank", "1", "--world-size", "3"];
    let out = juicer(&[&args[..], &["--batch-size", "8"]].concat());
    let keys: BTreeSet<String> = records(&out).iter().map(key).collect();
    assert_eq!(keys.len(), 16, "{keys:?}");
    let from: Vec<&str> = SHARD_FILES
        .iter()
        .copied()
        .filter(|n| !keys.is_disjoint(&shard_keys(&fixtures().join("shards").join(n))))
        .collect();
    assert_eq!(from, ["gcompris-000001.tar"]);
}

#[test]
fn a_headless_run_on_the_auto_device_prints_nothing_but_its_own_lines_on_stderr() {
    // `auto` probes wgpu; without the fix, Mesa's device-select Vulkan layer (installed wherever Mesa's Vulkan
    // drivers are, CI included) made libwayland print "error: XDG_RUNTIME_DIR is invalid ..." twice here.
    let out = juicer_command(&["run", SHARDS, "--scorer", "random", "--limit", "4"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .expect("spawn the juicer binary");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR") && !err.lines().any(|l| l.starts_with("error:")), "{err}");
    assert!(summary_line(&out).contains("read 4 = emitted 4 + dropped 0"), "{}", summary_line(&out));
}

#[test]
fn a_missing_shard_fails_naming_it() {
    let out = juicer(&["run", "fixtures/shards/gcompris-{000000..000003}.tar", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gcompris-000003.tar"), "{}", stderr(&out));

    let out = juicer(&["run", "fixtures/shards/gcompris-000000.tar", "fixtures/shards/nope.tar", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("fixtures/shards/nope.tar"), "{}", stderr(&out));
}

#[test]
fn a_bogus_device_fails_with_a_clear_message() {
    let out = juicer(&["run", SHARDS, "--device", "bogus"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bogus") && err.contains("expected auto, cpu, wgpu, wgpu:N, cuda or cuda:N"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_gpu_that_is_not_there_is_a_device_error_naming_what_exists() {
    // `wgpu:N` asks for the N-th discrete GPU; CI has none (at most Mesa's software driver), and burn panicked
    // with a backtrace on first use of the missing adapter.
    let discrete = juicer::device::hardware_gpus().0;
    let (past, further) = (format!("wgpu:{discrete}"), format!("wgpu:{}", discrete + 3));
    for cmd in [&["run", SHARDS, "--limit", "4", "--device", &past][..], &["bench", "--layers", "--device", &further]] {
        let out = juicer(cmd);
        assert!(!out.status.success(), "{cmd:?}");
        let err = stderr(&out);
        assert!(err.contains("device `wgpu:") && err.contains("no discrete GPU #"), "{cmd:?}: {err}");
        assert!(err.contains("found)") && err.contains("wgpu finds"), "names what exists: {err}");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "no panic: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn export_weights_writes_the_embedded_safetensors_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mobilenet_v2.safetensors");
    let out = juicer(&["export-weights", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shipped = std::fs::read(fixtures().join("mobilenet_v2/mobilenet_v2.safetensors")).unwrap();
    assert!(std::fs::read(&file).unwrap() == shipped, "the exported weights are the shipped file");
}

#[test]
fn cuda_without_the_cuda_feature_says_how_to_get_it() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = juicer(&["run", SHARDS, "--device", "cuda:0", "--limit", "1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
}
