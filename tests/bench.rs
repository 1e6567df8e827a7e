//! `juicer bench` end to end: the table, the JSON report (layout and internal consistency), the plot, stage
//! prefixes, one pipeline per device, synthetic shards. Nothing here asserts a duration or a speed: only that
//! the numbers the report gives agree with each other and with what the pipeline did.

use std::collections::BTreeSet;
use std::process::Output;

use serde_json::Value;

use crate::util::{juicer, stderr};

const SHARDS: &str = "fixtures/shards/gcompris-{000000..000002}.tar";

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "juicer failed ({}):\n{}", out.status, stderr(out));
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn report(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report written")).expect("report is JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn stage_names(p: &Value) -> Vec<String> {
    p["stages"].as_array().expect("stages").iter().map(|s| s["name"].as_str().expect("name").to_string()).collect()
}

/// What every pipeline report must satisfy, whatever ran.
fn check_pipeline(p: &Value) {
    let (samples, seconds) = (u(&p["samples"]), f(&p["seconds"]));
    assert!(samples > 0 && seconds > 0.0, "{p}");
    for (rate, count) in
        [("samples_per_s", "samples"), ("kept_patches_per_s", "kept_patches"), ("tokens_per_s", "tokens")]
    {
        let want = u(&p[count]) as f64 / seconds;
        assert!((f(&p[rate]) - want).abs() <= 1e-9 * want.max(1.0), "{rate} != {count}/seconds in {p}");
    }
    assert!(u(&p["kept_patches"]) <= u(&p["total_patches"]));
    // The first batch comes before the window opens (the window starts at a batch after the warm-up).
    let first = f(&p["first_batch_seconds"]);
    assert!(first > 0.0 && first <= f(&p["warmup_seconds"]) + 1e-9, "first batch {first} s in {p}");
    let mut best = (f64::MIN, String::new());
    for s in p["stages"].as_array().expect("stages") {
        for share in ["busy", "blocked", "starved"] {
            let x = f(&s[share]);
            assert!((0.0..=1.0).contains(&x), "{share} = {x} in {s}");
        }
        if u(&s["items"]) > 0 && f(&s["busy"]) >= best.0 {
            best = (f(&s["busy"]), s["name"].as_str().expect("name").to_string());
        }
    }
    // The busiest stage; none when no stage took an item inside the window (a window shorter than one batch's
    // trip through the graph, as on a fast machine with tiny synthetic images).
    let busiest = (!best.1.is_empty()).then_some(best.1.as_str());
    assert_eq!(p["bottleneck"].as_str(), busiest, "the bottleneck is the busiest stage: {p}");
    let timeline = p["timeline"].as_array().expect("timeline");
    assert_eq!(f(&timeline[0]["t"]), 0.0);
    assert_eq!(u(&timeline[0]["samples"]), 0);
    for w in timeline.windows(2) {
        assert!(f(&w[1]["t"]) >= f(&w[0]["t"]) && u(&w[1]["samples"]) > u(&w[0]["samples"]), "{w:?}");
        assert_eq!(w[1]["busy"].as_array().map(Vec::len), Some(p["stages"].as_array().map_or(0, Vec::len)));
    }
    // The window's samples are the timeline's last count minus the count when the window opened.
    let last = u(&timeline[timeline.len() - 1]["samples"]);
    assert!(samples < last, "the warm-up batches are not in the window");
}

#[test]
fn bench_fixture_shards_table_json_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (json, png) = (dir.path().join("bench.json"), dir.path().join("bench.png"));
    let out = juicer(&[
        "bench",
        SHARDS,
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--warmup",
        "8",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    let table = ok(&out);
    let r = report(&json);
    assert_eq!(r["schema"], 1);
    assert_eq!(r["setup"]["stages"], "enrich");
    assert_eq!(r["setup"]["scorer"], "cam");
    assert_eq!(r["setup"]["shards"], 3);
    assert!(u(&r["machine"]["cores"]) >= 1);
    let pipelines = r["pipelines"].as_array().unwrap();
    assert_eq!(pipelines.len(), 1);
    let p = &pipelines[0];
    check_pipeline(p);
    assert_eq!(
        stage_names(p),
        ["read", "shuffle", "decode", "score", "prune", "extract", "enrich", "batch", "collate"]
    );
    // 73 samples, batch 8: the window opens at the first batch (8 ≥ warm-up 8) and runs to the end of the data.
    assert_eq!(u(&p["samples"]), 73 - 8);
    assert_eq!(p["exhausted"], true);
    assert_eq!(u(&p["dropped"]), 0);
    // keep ratio 0.5 of a 14×14 grid: 98 of 196 for every sample.
    assert_eq!(u(&p["total_patches"]), 196 * u(&p["samples"]));
    assert_eq!(u(&p["kept_patches"]), 98 * u(&p["samples"]));
    assert!(u(&p["tokens"]) > 2 * u(&p["samples"]), "every caption has SOT, words and EOT");
    assert!(u(&r["total"]["peak_rss_bytes"]) > 50 << 20, "the models alone take more than 50 MiB");
    assert!(f(&r["total"]["cpu_seconds_per_sample"]) > 0.0);
    // The table names every stage and marks the bottleneck the JSON names.
    for name in stage_names(p) {
        assert!(table.contains(&format!("\n  {name} ")), "stage {name} missing from:\n{table}");
    }
    let bottleneck = p["bottleneck"].as_str().unwrap();
    assert!(table.lines().any(|l| l.trim_start().starts_with(bottleneck) && l.ends_with("<- bottleneck")), "{table}");
    let img = image::open(&png).expect("plot is a PNG");
    assert!(img.width() >= 800 && img.height() >= 500);
}

#[test]
fn bench_stage_prefixes_keep_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let j = json.to_str().unwrap();
    let common = ["--device", "cpu", "--batch-size", "8", "--warmup", "8", "--json", j];
    // decode only: every patch kept, no scores, no tokens.
    ok(&juicer(&[&["bench", SHARDS, "--stages", "decode"][..], &common[..]].concat()));
    let r = report(&json);
    let p = &r["pipelines"][0];
    check_pipeline(p);
    assert_eq!(stage_names(p), ["read", "shuffle", "decode", "finish", "batch", "collate"]);
    assert_eq!(p["kept_patches"], p["total_patches"]);
    assert_eq!(u(&p["tokens"]), 0);
    // up to prune: the keep ratio applies, still no classes or tokens.
    ok(&juicer(
        &[&["bench", SHARDS, "--stages", "prune", "--scorer", "random", "--keep-ratio", "0.25"][..], &common[..]]
            .concat(),
    ));
    let r = report(&json);
    let p = &r["pipelines"][0];
    check_pipeline(p);
    assert_eq!(r["setup"]["stages"], "prune");
    assert_eq!(stage_names(p), ["read", "shuffle", "decode", "score", "prune", "finish", "batch", "collate"]);
    assert_eq!(u(&p["kept_patches"]), 49 * u(&p["samples"]));
    assert_eq!(u(&p["tokens"]), 0);
    let bad = juicer(&["bench", SHARDS, "--stages", "everything"]);
    assert!(!bad.status.success());
}

#[test]
fn bench_one_pipeline_per_device_splits_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = juicer(&[
        "bench",
        SHARDS,
        "--devices",
        "cpu,cpu",
        "--scorer",
        "random",
        "--batch-size",
        "4",
        "--warmup",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&out);
    let r = report(&json);
    let ps = r["pipelines"].as_array().unwrap();
    assert_eq!(ps.len(), 2);
    let ranks: BTreeSet<u64> = ps.iter().map(|p| u(&p["rank"])).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1]));
    for p in ps {
        check_pipeline(p);
        assert_eq!(u(&p["world_size"]), 2);
    }
    let sum: f64 = ps.iter().map(|p| f(&p["samples_per_s"])).sum();
    assert!((f(&r["total"]["samples_per_s"]) - sum).abs() < 1e-9 * sum);
}

#[test]
fn bench_synthetic_shards_json_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let syn = dir.path().join("syn");
    let synthetic = [
        "bench",
        "--synthetic",
        "24",
        "--synthetic-size",
        "96x64",
        "--synthetic-shard",
        "8",
        "--synthetic-dir",
        syn.to_str().unwrap(),
        "--scorer",
        "random",
    ];
    let args = [&synthetic[..], &["--batch-size", "8", "--warmup", "8", "--json", "-"]].concat();
    let out = juicer(&args);
    let stdout = ok(&out);
    let r: Value = serde_json::from_str(&stdout).expect("with --json - stdout holds the JSON report only");
    assert_eq!(r["setup"]["shards"], 3);
    let p = &r["pipelines"][0];
    check_pipeline(p);
    assert_eq!(u(&p["samples"]), 24 - 8);
    assert!(stderr(&out).contains("bottleneck"), "the table goes to stderr");
    let shards: Vec<_> = std::fs::read_dir(&syn).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(shards.len(), 4, "3 shards + manifest: {shards:?}");
    // The warm-up must end before the data does.
    let short = juicer(&[&synthetic[..], &["--warmup", "100"]].concat());
    assert!(!short.status.success());
    assert!(stderr(&short).contains("warm-up"), "{}", stderr(&short));
}
