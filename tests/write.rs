//! `juicer write` end to end: shards of the GCompris fixtures written by the binary, read back by juicer's own
//! reader (members, captions, records, mosaic pixels against the decoder's crop) and by `juicer run`; shard
//! limits; accounting of drops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use juicer::RawSample;
use juicer::decode::{DecodeConfig, Decoder, IMAGENET_MEAN};
use juicer::source::{ReadOptions, resolve};
use serde_json::Value;

use crate::util::{juicer, png, stderr};

const SHARDS: &str = "fixtures/shards/gcompris-{000000..000002}.tar";
/// Small inputs keep the three pipeline runs of the main test to a few seconds; a 7×7 grid of 16-px patches.
const SIZE: usize = 112;
const OPTS: [&str; 8] = ["--device", "cpu", "--image-size", "112", "--seed", "5", "--mix", "0.7"];

fn ok(out: &Output) -> &Output {
    assert!(out.status.success(), "juicer failed ({}):\n{}", out.status, stderr(out));
    out
}

/// `juicer write SOURCE --out DIR` plus `extra`; asserts success and returns (shards listed on stdout, stderr
/// with runs of spaces collapsed).
fn write(source: &str, out_dir: &Path, extra: &[&str]) -> (Vec<PathBuf>, String) {
    let dir = out_dir.to_str().expect("UTF-8 temp path");
    let out = juicer(&[&["write", source, "--out", dir][..], extra].concat());
    ok(&out);
    let listed = String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect();
    (listed, stderr(&out).split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `juicer run --jsonl -` records by key.
fn run_records(sources: &[&str], extra: &[&str]) -> (BTreeMap<String, Value>, String) {
    let out = juicer(&[&["run"][..], sources, &["--jsonl", "-"], extra].concat());
    ok(&out);
    let mut recs = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let key = v["key"].as_str().expect("key").to_string();
        assert!(recs.insert(key.clone(), v).is_none(), "{key} twice");
    }
    (recs, stderr(&out).split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Every sample of the shards, through juicer's reader.
fn read_juicer(specs: &[String]) -> Vec<RawSample> {
    let shards = resolve(specs, usize::MAX).expect("resolve");
    shards
        .iter()
        .flat_map(|s| s.open(0, &ReadOptions::default()).expect("open shard"))
        .map(|s| s.unwrap_or_else(|e| panic!("bad sample: {e}")))
        .collect()
}

/// One sample's members as stored: `(extension, data)` in file order.
type Members = Vec<(String, Vec<u8>)>;

/// The members of a tar shard grouped by key, in file order.
fn tar_samples(path: &Path) -> Vec<(String, Members)> {
    let mut out: Vec<(String, Members)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open shard"));
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let name = entry.path().expect("member path").to_string_lossy().into_owned();
        let (dir, file) = name.rsplit_once('/').map_or(("", name.as_str()), |(d, f)| (d, f));
        let (stem, ext) = file.split_once('.').unwrap_or_else(|| panic!("member without extension: {name}"));
        let key = if dir.is_empty() { stem.to_string() } else { format!("{dir}/{stem}") };
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).expect("member data");
        match out.last_mut() {
            Some((k, members)) if *k == key => members.push((ext.to_string(), data)),
            _ => out.push((key, vec![(ext.to_string(), data)])),
        }
    }
    out
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32)).collect()
}

/// Classes as comparable `(id, name, prob as f32)` (`id` null for a hypernym).
fn classes(v: &Value) -> Vec<(Option<u64>, String, f32)> {
    v.as_array()
        .expect("classes array")
        .iter()
        .map(|c| (c["id"].as_u64(), c["name"].as_str().expect("name").into(), c["prob"].as_f64().expect("prob") as f32))
        .collect()
}

#[test]
fn written_shards_read_back_in_juicer_and_match_a_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (listed, err) = write(SHARDS, dir.path(), &[&OPTS[..], &["--max-count", "20"]].concat());
    assert!(err.contains("read 73 = written 73 + dropped 0 (4 shard(s)"), "{err}");
    let names: Vec<String> = (0..4).map(|i| format!("juiced-{i:06}.tar")).collect();
    assert_eq!(listed, names.iter().map(|n| dir.path().join(n)).collect::<Vec<_>>());

    let (recs, _) = run_records(&[SHARDS], &OPTS);
    assert_eq!(recs.len(), 73);
    let inputs: BTreeMap<String, RawSample> =
        read_juicer(&[SHARDS.to_string()]).into_iter().map(|s| (s.key.clone(), s)).collect();
    assert_eq!(inputs.len(), 73);

    // Member level: every key once, members png, txt, orig.txt, json in that order, 20 samples per shard.
    let mut members = BTreeMap::new();
    let mut per_shard = Vec::new();
    for path in &listed {
        let samples = tar_samples(path);
        per_shard.push(samples.len());
        for (key, m) in samples {
            let exts: Vec<&str> = m.iter().map(|(e, _)| e.as_str()).collect();
            assert_eq!(exts, ["png", "txt", "orig.txt", "json"], "{key}");
            assert!(members.insert(key.clone(), m).is_none(), "{key} written twice");
        }
    }
    assert_eq!(per_shard, [20, 20, 20, 13]);
    assert_eq!(members.keys().collect::<Vec<_>>(), inputs.keys().collect::<Vec<_>>());

    // Juicer's reader: the mosaic is the image, KEY.txt the caption, KEY.json the metadata.
    let written = read_juicer(&listed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
    assert_eq!(written.len(), 73);
    let decoder = Decoder::new(DecodeConfig { image_size: SIZE, ..DecodeConfig::default() });
    let blank = image::Rgb([124u8, 116, 104]);
    assert_eq!(blank.0, juicer::write::blank_colour(IMAGENET_MEAN));
    let (mut kept_total, mut dropped_total, mut mixed, mut exact) = (0usize, 0usize, 0usize, 0usize);
    for s in &written {
        let key = &s.key;
        let rec = &recs[key];
        let input = &inputs[key];
        assert_eq!(s.image_ext, "png", "{key}");
        assert_eq!(s.caption.as_deref(), rec["enriched"].as_str(), "{key}: KEY.txt is the enriched caption");
        let orig = &members[key][2].1;
        assert_eq!(Some(std::str::from_utf8(orig).expect("UTF-8")), input.caption.as_deref(), "{key}: orig.txt");
        assert_eq!(rec["caption"].as_str(), input.caption.as_deref());
        if rec["enriched"] == rec["caption"] {
            mixed += 1;
        }
        let meta = s.meta.as_ref().expect("KEY.json");
        assert_eq!(meta["grid"], rec["grid"], "{key}");
        assert_eq!(meta["patch"], rec["patch"], "{key}");
        assert_eq!(meta["image_size"], SIZE, "{key}");
        assert_eq!(meta["kept"], rec["kept"], "{key}");
        assert_eq!(f32s(&meta["scores"]), f32s(&rec["scores"]), "{key}");
        assert_eq!(classes(&meta["classes"]), classes(&rec["classes"]), "{key}");
        assert_eq!(meta["added"].as_array().expect("added").len() as u64, rec["added"].as_u64().expect("added"));
        assert_eq!(meta["source_meta"].as_object(), input.meta.as_ref().and_then(Value::as_object), "{key}");

        // The mosaic: kept patches are the decoder's own crop (±1 level), dropped ones exactly the blank.
        let mosaic = image::load_from_memory(&s.image).expect("decode mosaic").into_rgb8();
        assert_eq!(mosaic.dimensions(), (SIZE as u32, SIZE as u32), "{key}");
        let rgb = decoder.decode_rgb8(key, &input.image, &input.image_ext).expect("decode input");
        let crop = decoder.resize_crop_rgb8(&rgb);
        let kept: BTreeSet<u64> =
            rec["kept"].as_array().expect("kept").iter().map(|k| k.as_u64().expect("u64")).collect();
        let cols = SIZE / 16;
        for (x, y, px) in mosaic.enumerate_pixels() {
            let patch = (y as usize / 16 * cols + x as usize / 16) as u64;
            if kept.contains(&patch) {
                let want = crop.get_pixel(x, y);
                let diff = (0..3).map(|c| px[c].abs_diff(want[c])).max().unwrap_or(0);
                assert!(diff <= 1, "{key}: kept pixel ({x}, {y}) is {px:?}, the crop has {want:?}");
                exact += usize::from(diff == 0);
            } else {
                assert_eq!(*px, blank, "{key}: dropped pixel ({x}, {y})");
            }
        }
        kept_total += kept.len();
        dropped_total += cols * cols - kept.len();
    }
    assert!(kept_total > 0 && dropped_total > 0, "kept {kept_total}, dropped {dropped_total}");
    assert_eq!(exact, kept_total * 256, "kept pixels should round-trip exactly");
    assert!(mixed > 0 && mixed < 73, "--mix 0.7 should keep some original captions, got {mixed}");

    // `juicer run` over the written shards: every sample decodes, captions are the enriched ones.
    let spec = format!("{}/juiced-{{000000..000003}}.tar", dir.path().display());
    let (again, err) = run_records(&[&spec], &["--device", "cpu", "--image-size", "112"]);
    assert!(err.contains("read 73 = emitted 73 + dropped 0"), "{err}");
    assert_eq!(again.keys().collect::<Vec<_>>(), recs.keys().collect::<Vec<_>>());
    for (key, r) in &again {
        assert_eq!(r["caption"], recs[key]["enriched"], "{key}");
    }
}

#[test]
fn max_size_cuts_shards_and_prefix_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max_size = 60_000u64;
    let args = [&OPTS[..], &["--limit", "12", "--max-size", "60000", "--prefix", "small"]].concat();
    let (listed, err) = write(SHARDS, dir.path(), &args);
    assert!(err.contains("read 12 = written 12 + dropped 0"), "{err}");
    assert!(listed.len() > 1, "{listed:?}");
    let mut total = 0;
    for (i, path) in listed.iter().enumerate() {
        assert_eq!(path, &dir.path().join(format!("small-{i:06}.tar")));
        let n = tar_samples(path).len();
        let size = std::fs::metadata(path).expect("shard").len();
        assert!(size <= max_size || n == 1, "{} holds {n} samples in {size} bytes", path.display());
        assert!(size % 512 == 0 && n >= 1);
        total += n;
    }
    assert_eq!(total, 12);
    // Every cut was needed: no shard but the last could have taken the next shard's first sample.
    for pair in listed.windows(2) {
        let size = std::fs::metadata(&pair[0]).expect("shard").len();
        let next = &tar_samples(&pair[1])[0];
        let next_bytes: u64 = next.1.iter().map(|(_, d)| 512 + (d.len() as u64).div_ceil(512) * 512).sum();
        assert!(size + next_bytes > max_size, "{} ({size} bytes) had room for {}", pair[0].display(), next.0);
    }
}

#[test]
fn every_sample_is_written_or_dropped_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    for (i, name) in ["a.png", "b.png", "d.png"].iter().enumerate() {
        std::fs::write(src.join(name), png(i, 40, 36)).expect("write png");
    }
    let lines = [
        r#"{"image": "a.png", "caption": "first"}"#,
        r#"{"image": "b.png", "key": "b.x", "caption": "second"}"#,
        r#"{"image": "missing.png", "caption": "third"}"#,
        r#"{"image": "d.png"}"#,
    ];
    std::fs::write(src.join("captions.jsonl"), lines.join("\n")).expect("write jsonl");
    let out = dir.path().join("out");
    let src = src.to_str().expect("UTF-8");
    let base = ["--device", "cpu", "--image-size", "32"];
    let (listed, err) = write(src, &out, &base);
    assert!(err.contains("read 4 = written 2 + dropped 2"), "{err}");
    assert!(err.contains("dropped missing_image 1") && err.contains("dropped stage_failed 1"), "{err}");
    assert!(err.contains("`b.x`") && err.contains("`missing`"), "each drop is named: {err}");
    assert_eq!(listed.len(), 1);
    let samples = tar_samples(&listed[0]);
    let shape: Vec<(&str, Vec<&str>)> =
        samples.iter().map(|(k, m)| (k.as_str(), m.iter().map(|(e, _)| e.as_str()).collect())).collect();
    assert_eq!(shape, [("a", vec!["png", "txt", "orig.txt", "json"]), ("d", vec!["png", "txt", "json"])]);
    let json: Value = serde_json::from_slice(&samples[1].1[2].1).expect("json");
    assert_eq!(json["source_meta"], serde_json::json!({"image": "d.png"}));

    let out =
        juicer(&[&["write", src, "--out", out.to_str().expect("UTF-8")][..], &base, &["--on-error", "fail"]].concat());
    assert!(!out.status.success(), "--on-error fail must fail the write");
    assert!(stderr(&out).contains("2 sample(s) failed"), "{}", stderr(&out));
}

/// Every file of a folder, hidden ones included: name → bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read output folder")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read output file"))
        })
        .collect()
}

/// Options of the crash-safety tests: full-size crops (a run long enough to be killed in), small shards.
const CRASH_OPTS: [&str; 8] = ["--device", "cpu", "--seed", "5", "--max-count", "3", "--batch-size", "4"];

#[test]
fn a_write_killed_mid_run_resumes_to_the_uninterrupted_output_byte_for_byte() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    write(SHARDS, &whole, &CRASH_OPTS);
    let expected = files(&whole);
    assert!(expected.keys().all(|n| !n.starts_with('.')), "no progress or partial file left: {expected:?}");

    let out = killed.to_str().expect("UTF-8");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_juicer"))
        .args([&["write", SHARDS, "--out", out][..], &CRASH_OPTS].concat())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn juicer write");
    // Kill it (SIGKILL: no destructor runs) once two shards are complete, well before the 25th.
    let started = std::time::Instant::now();
    while !killed.join("juiced-000001.tar").exists() {
        assert!(child.try_wait().expect("poll").is_none(), "juicer write ended before it could be killed");
        assert!(started.elapsed().as_secs() < 120, "no second shard after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(child.try_wait().expect("poll").is_none(), "juicer write ended before it could be killed");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let left = files(&killed);
    assert!(left.contains_key(".juiced.progress.json"), "progress saved: {:?}", left.keys());
    assert!(!left.contains_key("juiced.json"), "killed before the manifest: {:?}", left.keys());
    assert!(left.len() < expected.len() + 2, "killed mid-run: {:?}", left.keys());

    let (_, err) = write(SHARDS, &killed, &[&CRASH_OPTS[..], &["--resume"]].concat());
    assert!(err.contains("read 73 = written 73 + dropped 0"), "{err}");
    let resumed = files(&killed);
    assert_eq!(resumed.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (name, bytes) in &expected {
        assert!(resumed[name] == *bytes, "`{name}` differs from the uninterrupted run's");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_names_the_shard_keeps_what_is_complete_and_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (whole, full) = (dir.path().join("whole"), dir.path().join("full"));
    write(SHARDS, &whole, &CRASH_OPTS);
    // The second shard's temporary file is /dev/full: every write to it fails with ENOSPC.
    std::fs::create_dir(&full).expect("mkdir");
    let trap = full.join(".juiced-000001.tar.partial");
    std::os::unix::fs::symlink("/dev/full", &trap).expect("symlink to /dev/full");
    let out = juicer(&[&["write", SHARDS, "--out", full.to_str().expect("UTF-8")][..], &CRASH_OPTS].concat());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("juiced-000001.tar") && err.contains("No space left on device"), "{err}");
    let expected = files(&whole);
    assert_eq!(std::fs::read(full.join("juiced-000000.tar")).expect("first shard kept"), expected["juiced-000000.tar"]);
    assert!(!full.join("juiced-000001.tar").exists(), "no half shard under a final name");

    std::fs::remove_file(&trap).expect("free the disk");
    let (_, err) = write(SHARDS, &full, &[&CRASH_OPTS[..], &["--resume"]].concat());
    assert!(err.contains("read 73 = written 73 + dropped 0"), "{err}");
    assert_eq!(files(&full), expected, "the resumed output is the uninterrupted run's");
}
