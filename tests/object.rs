//! Object storage against a real S3 API (moto, started by the tests on 127.0.0.1) with the fault proxy between
//! juicer and moto: same samples as local disk and HTTP, cut connections, throttling, objects replaced
//! mid-read, listings, manifests and the count scan.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use juicer::source::{Manifest, ReadOptions, Shard};
use juicer::{DeviceSpec, EpochSize, JuicedBatch, LastStage};

use crate::s3util::{KEYS, Proxy, bucket, moto, put, s3_opts, upload};
use crate::util::{Fault, fixtures, juicer_command, make_shards, specs};

/// `juicer` with the S3 environment of a user of an S3-compatible store at `endpoint`.
fn juicer_s3(args: &[&str], endpoint: std::net::SocketAddr) -> Output {
    let mut cmd = juicer_command(args);
    cmd.env("AWS_ENDPOINT_URL", format!("http://{endpoint}"));
    for (k, v) in KEYS {
        cmd.env(k.to_ascii_uppercase(), v);
    }
    cmd.output().expect("spawn juicer")
}

type View = Result<(String, Vec<u8>, Option<String>), String>;

/// Key, image bytes and caption of each sample of a shard read through `opts` (errors as text).
fn read_all(shard: &str, opts: &ReadOptions) -> Vec<View> {
    Shard::Tar(shard.to_string())
        .open(0, opts)
        .expect("open")
        .map(|item| {
            item.map(|s| (s.key.clone(), s.image.to_vec(), s.caption.clone()))
                .map_err(|e| format!("{}: {} {}", e.key, e.reason.as_str(), e.detail))
        })
        .collect()
}

#[test]
fn s3_http_and_local_disk_give_byte_identical_jsonl() {
    let Some(moto) = moto() else { return };
    let b = bucket(moto, "same");
    let local: Vec<_> = (0..3).map(|i| fixtures().join(format!("shards/gcompris-{i:06}.tar"))).collect();
    upload(moto, &b, "gc", &local);
    let common = [
        "--jsonl",
        "-",
        "--device",
        "cpu",
        "--limit",
        "24",
        "--seed",
        "5",
        "--shuffle-buffer",
        "8",
        "--shuffle-shards",
    ];
    let run = |source: String| {
        let mut args = vec!["run".to_string(), source];
        args.extend(common.iter().map(|s| s.to_string()));
        let out = juicer_s3(&args.iter().map(String::as_str).collect::<Vec<_>>(), moto);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let from_disk = run("fixtures/shards/gcompris-{000000..000002}.tar".into());
    let from_s3 = run(format!("s3://{b}/gc/gcompris-{{000000..000002}}.tar"));
    let from_s3_glob = run(format!("s3://{b}/gc/gcompris-*.tar"));
    let from_http = run(format!("http://{moto}/{b}/gc/gcompris-{{000000..000002}}.tar"));
    assert_eq!(String::from_utf8_lossy(&from_disk).lines().count(), 24);
    assert!(from_disk == from_s3, "s3:// output differs from local disk");
    assert!(from_disk == from_s3_glob, "s3:// glob output differs from local disk");
    assert!(from_disk == from_http, "http:// output differs from local disk");
}

#[test]
fn cut_connections_resume_with_an_etag_pinned_range() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "cut");
    let dir = tempfile::tempdir().unwrap();
    let shard = &make_shards(dir.path(), &[12], |_| Fault::None)[0];
    let url = upload(moto, &b, "p", std::slice::from_ref(shard)).remove(0);
    let expected = read_all(&shard.display().to_string(), &ReadOptions::default());

    // Two cuts, each after some progress: both resumed, same samples.
    proxy.faults.lock().unwrap().cut_after = vec![("s0-".into(), 5000), ("s0-".into(), 9000)];
    let opts = s3_opts(proxy.addr);
    assert_eq!(read_all(&url, &opts), expected);
    let seen = proxy.seen();
    assert_eq!(seen.cuts, 2);
    let ranges: Vec<_> = seen.gets.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(ranges, [None, Some("bytes=5000-".into()), Some("bytes=14000-".into())]);
    assert_eq!(seen.get_bytes, std::fs::metadata(shard).unwrap().len(), "no byte is fetched twice");
    let io = opts.stats.snapshot();
    assert_eq!((io.retries, io.failures), (2, 0));
}

#[test]
fn an_object_replaced_mid_read_is_an_error_naming_the_shard() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "swap");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[12, 12], |_| Fault::None);
    let url = upload(moto, &b, "p", &shards[..1]).remove(0);
    let other = std::fs::read(&shards[1]).unwrap();
    let b2 = b.clone();
    {
        let mut f = proxy.faults.lock().unwrap();
        f.cut_after = vec![("s0-".into(), 6000)];
        f.on_cut = Some(Box::new(move || put(moto, &b2, "p/s0-000000.tar", &other)));
    }
    let opts = s3_opts(proxy.addr);
    let items = read_all(&url, &opts);
    let last = items.last().unwrap().as_ref().expect_err("the read must fail, not mix versions");
    assert!(last.contains("truncated") && last.contains("replaced"), "{last}");
    assert!(last.contains(&url) || last.contains("s0-000000.tar"), "names the shard: {last}");
    // Every sample before the cut came from the first version; nothing after it was read.
    assert!(items[..items.len() - 1].iter().all(|i| i.as_ref().is_ok_and(|(k, _, _)| k.starts_with("s0/"))));
    assert!(opts.stats.snapshot().failures >= 1);
}

#[test]
fn throttling_is_retried_and_counted_and_a_dead_store_is_dropped_with_a_reason() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "slow");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[6, 6], |_| Fault::None);
    let urls = upload(moto, &b, "p", &shards);
    let loader = |retries: u32| {
        let mut opts = s3_opts(proxy.addr);
        opts.http_retries = retries;
        JuicedBatch::builder(urls.clone())
            .image_size(32)
            .patch_size(16)
            .batch_size(4)
            .device(DeviceSpec::Cpu)
            .last_stage(LastStage::Decode)
            .reader_workers(1)
            .read_options(opts)
            .build()
            .unwrap()
    };
    // Two SlowDowns: retried to success.
    proxy.faults.lock().unwrap().slow_down = 2;
    let l = loader(3);
    let mut it = l.iter().unwrap();
    let emitted: usize = it.by_ref().map(|b| b.unwrap().len()).sum();
    let s = it.summary();
    assert_eq!((emitted, s.read, s.dropped_total()), (12, 12, 0));
    assert_eq!((s.io.retries, s.io.failures), (2, 0));
    assert_eq!(proxy.seen().slow_downs, 2);

    // Throttled beyond the retries: the shard is dropped with a reason naming it; the other is read.
    proxy.faults.lock().unwrap().slow_down = 2;
    let l = loader(1);
    let mut it = l.iter().unwrap();
    let emitted: usize = it.by_ref().map(|b| b.unwrap().len()).sum();
    let dropped = it.take_dropped();
    let s = it.summary();
    assert_eq!(emitted, 6);
    assert_eq!(s.read, s.emitted + s.dropped_total());
    assert_eq!(dropped.len(), 1);
    // The first shard in read order (shards are shuffled) got both SlowDowns.
    assert!(urls.contains(&dropped[0].key) && dropped[0].detail.contains("giving up"), "{:?}", dropped[0]);
    assert!(dropped[0].detail.contains("SlowDown"), "{:?}", dropped[0]);
    assert_eq!((s.io.retries, s.io.failures), (1, 1));
}

#[test]
fn with_a_manifest_the_first_batch_reads_only_the_shards_it_consumes() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "many");
    let dir = tempfile::tempdir().unwrap();
    let shard = &make_shards(dir.path(), &[2], |_| Fault::None)[0];
    let bytes = std::fs::read(shard).unwrap();
    let n = 1000;
    let mut shardlist = Vec::new();
    for i in 0..n {
        put(moto, &b, &format!("d/s-{i:06}.tar"), &bytes);
        shardlist.push(serde_json::json!({"url": format!("s-{i:06}.tar"), "nsamples": 2, "filesize": bytes.len()}));
    }
    let manifest = serde_json::json!({"wids_version": 1, "shardlist": shardlist});
    put(moto, &b, "d/train.json", manifest.to_string().as_bytes());
    let loader = |source: String| {
        JuicedBatch::builder([source])
            .image_size(32)
            .patch_size(16)
            .batch_size(4)
            .device(DeviceSpec::Cpu)
            .last_stage(LastStage::Decode)
            .reader_workers(2)
            .capacity(2)
            .shuffle_buffer(8)
            .world_size(8)
            .rank(3)
            .epoch_size(EpochSize::DropRemainder)
            .read_options(s3_opts(proxy.addr))
            .build()
            .unwrap()
    };
    let l = loader(format!("s3://{b}/d/train.json"));
    // 250 samples on this rank (2 per shard), cut to whole batches of 4 by the drop-remainder policy.
    assert_eq!(l.epoch_samples(0).unwrap(), 248, "counts come from the manifest");
    let mut it = l.iter().unwrap();
    assert_eq!(it.next().unwrap().unwrap().len(), 4);
    let shards_read: BTreeMap<String, usize> = proxy.seen().gets.iter().fold(BTreeMap::new(), |mut m, (t, _)| {
        *m.entry(t.clone()).or_default() += 1;
        m
    });
    drop(it);
    // The manifest, then only what the first batch needs: the shuffle buffer's 8 samples plus 3 refills (6
    // shards of 2), plus what the bounded graph already holds beyond it (items in flight, at most about
    // 6 x capacity + 4 x workers = 20 samples, and each reader's 3-sample prefetch) - seen here 6 to 9 shards,
    // bounded by the configuration at 20, and never the rank's 125 shards nor any of the other ranks' 875.
    assert!(shards_read.contains_key(&format!("/{b}/d/train.json")));
    let tars = shards_read.keys().filter(|k| k.ends_with(".tar")).count();
    assert!((6..=20).contains(&tars), "read {tars} shards for the first batch: {shards_read:?}");
    assert_eq!(proxy.seen().methods.get("HEAD"), None, "no scan");
}

#[test]
fn without_a_manifest_the_count_scan_is_cached_and_a_second_loader_does_not_scan() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "scan");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[3, 5, 2, 4, 6, 1, 3, 2], |_| Fault::None);
    let urls = upload(moto, &b, "p", &shards);
    let cache = tempfile::tempdir().unwrap();
    let loader = || {
        JuicedBatch::builder(urls.clone())
            .image_size(32)
            .patch_size(16)
            .batch_size(2)
            .device(DeviceSpec::Cpu)
            .last_stage(LastStage::Decode)
            .world_size(2)
            .epoch_size(EpochSize::DropRemainder)
            .count_cache(cache.path())
            .read_options(s3_opts(proxy.addr))
            .build()
            .unwrap()
    };
    let counts = loader().shard_counts().unwrap();
    assert_eq!(counts, [3, 5, 2, 4, 6, 1, 3, 2]);
    let first = proxy.seen();
    assert_eq!(first.gets.len(), 8, "each shard scanned once");
    proxy.reset();
    assert_eq!(loader().shard_counts().unwrap(), counts);
    let second = proxy.seen();
    assert_eq!(second.gets.len(), 0, "the second loader reads no shard: {second:?}");
    // A changed shard is scanned again (its ETag and size changed).
    put(moto, &b, "p/s1-000000.tar", &std::fs::read(&shards[0]).unwrap());
    proxy.reset();
    assert_eq!(loader().shard_counts().unwrap()[1], 3);
    assert_eq!(proxy.seen().gets.len(), 1);
}

#[test]
fn manifests_and_index_work_on_object_storage() {
    let Some(moto) = moto() else { return };
    let b = bucket(moto, "index");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[3, 4], |_| Fault::None);
    upload(moto, &b, "p", &shards);
    let out = dir.path().join("m.json");
    let src = format!("s3://{b}/p/*.tar");
    let r = juicer_s3(&["index", &src, "--out", out.to_str().unwrap()], moto);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = Manifest::read(out.to_str().unwrap(), &ReadOptions::default()).unwrap();
    let got: Vec<(String, u64)> = m.shards.iter().map(|s| (s.url.clone(), s.nsamples)).collect();
    assert_eq!(got, [(format!("s3://{b}/p/s0-000000.tar"), 3), (format!("s3://{b}/p/s1-000000.tar"), 4)]);
    let _ = specs(&shards);
}

/// The bytes of an object, read through juicer's own client.
fn get(moto: std::net::SocketAddr, url: &str) -> Vec<u8> {
    juicer::source::read_location(url, &s3_opts(moto)).expect("read object")
}

#[test]
fn write_as_a_three_task_array_into_s3_then_merge_the_manifest_parts() {
    let Some(moto) = moto() else { return };
    let b = bucket(moto, "array");
    let out = format!("s3://{b}/juiced");
    let task = |id: usize| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_juicer"));
        cmd.args(["write", "fixtures/shards/gcompris-{000000..000002}.tar", "--out", &out, "--device", "cpu"])
            .args(["--max-count", "10", "--image-size", "64", "--scorer", "random"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("AWS_ENDPOINT_URL", format!("http://{moto}"))
            .env("SLURM_ARRAY_TASK_ID", (id + 1).to_string())
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE");
        for (k, v) in KEYS {
            cmd.env(k.to_ascii_uppercase(), v);
        }
        let r = cmd.output().unwrap();
        assert!(r.status.success(), "task {id}: {}", String::from_utf8_lossy(&r.stderr));
        String::from_utf8(r.stdout).unwrap().lines().map(str::to_string).collect::<Vec<_>>()
    };
    let written: Vec<Vec<String>> = (0..3).map(task).collect();
    for (t, urls) in written.iter().enumerate() {
        assert!(!urls.is_empty());
        assert!(urls.iter().all(|u| u.starts_with(&format!("{out}/juiced-{t:05}-of-00003-"))), "{urls:?}");
    }
    let merged = format!("{out}/juiced.json");
    let r = juicer_s3(&["index", "--merge", &format!("{out}/juiced-*-of-00003.json"), "--out", &merged], moto);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = Manifest::read(&merged, &s3_opts(moto)).unwrap();
    let all: Vec<String> = written.concat();
    assert_eq!(m.shards.iter().map(|s| s.url.clone()).collect::<Vec<_>>(), all);
    assert_eq!(m.total(), 73, "every fixture sample written once across the tasks");
    // Each listed count is the shard's real count.
    for s in &m.shards {
        let n = Shard::Tar(s.url.clone()).count_samples(&s3_opts(moto)).unwrap();
        assert_eq!(n as u64, s.nsamples, "{}", s.url);
    }
    // Re-running task 1 replaces exactly its own output with identical bytes.
    let before: Vec<Vec<u8>> = written[1].iter().map(|u| get(moto, u)).collect();
    let listing = |prefix: &str| juicer::source::expand_names(&[format!("{out}/{prefix}*")], &s3_opts(moto)).unwrap();
    let all_before = listing("juiced-");
    assert_eq!(task(1), written[1]);
    let after: Vec<Vec<u8>> = written[1].iter().map(|u| get(moto, u)).collect();
    assert_eq!(listing("juiced-"), all_before, "the re-run adds and removes no object");
    assert!(before == after, "a re-run task writes the same bytes");
    // The merged manifest reads as a source.
    let r = juicer_s3(&["run", &merged, "--device", "cpu", "--image-size", "64", "--scorer", "random"], moto);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("read 73"), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn the_score_cache_in_s3_is_shared_across_loaders() {
    let Some(moto) = moto() else { return };
    let b = bucket(moto, "cache");
    let cache = format!("s3://{b}/scores");
    // The whole shard (no --limit): how far a run reads ahead of a limit depends on scheduling, so only a whole
    // shard makes "the second run scores nothing" exact.
    let args =
        ["run", "fixtures/shards/gcompris-000000.tar", "--device", "cpu", "--score-cache", &cache, "--jsonl", "-"];
    let first = juicer_s3(&args, moto);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = juicer_s3(&args, moto);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(first.stdout, second.stdout, "cached scores give the same output");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("misses 0") && err.contains("classifier forwards 0"), "the second run only hits: {err}");
}

/// A decode-only loader over `urls` through `opts`, read in order (no shuffling), one reader.
fn ordered_loader(urls: &[String], opts: ReadOptions) -> juicer::Juicer<JuicedBatch> {
    JuicedBatch::builder(urls.to_vec())
        .image_size(32)
        .patch_size(16)
        .batch_size(4)
        .device(DeviceSpec::Cpu)
        .last_stage(LastStage::Decode)
        .shuffle_buffer(0)
        .shuffle_shards(false)
        .reader_workers(1)
        .read_options(opts)
        .build()
        .unwrap()
}

#[test]
fn resume_opens_the_object_with_one_ranged_get_at_the_checkpointed_offset() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "resume");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[14, 9], |_| Fault::None);
    let urls = upload(moto, &b, "p", &shards);
    let keys =
        |l: &juicer::Juicer<JuicedBatch>| -> Vec<String> { l.iter().unwrap().flat_map(|b| b.unwrap().keys).collect() };
    let full = keys(&ordered_loader(&urls, s3_opts(proxy.addr)));
    let first = ordered_loader(&urls, s3_opts(proxy.addr));
    let mut it = first.iter().unwrap();
    let head: Vec<String> = it.by_ref().take(2).flat_map(|b| b.unwrap().keys).collect();
    let state = it.state().clone();
    drop(it);
    let offset = state.cursor_offset.expect("an object-store shard has byte offsets");
    let again = ordered_loader(&urls, s3_opts(proxy.addr));
    again.resume(state).unwrap();
    proxy.reset();
    let tail = keys(&again);
    assert_eq!([head, tail].concat(), full, "resumed = the uninterrupted run");
    let seen = proxy.seen();
    let shard0: Vec<_> = seen.gets.iter().filter(|(t, _)| t.ends_with("s0-000000.tar")).collect();
    assert_eq!(shard0.len(), 1, "one GET for the checkpointed shard: {seen:?}");
    assert_eq!(shard0[0].1, Some(format!("bytes={offset}-")), "{seen:?}");
    let sizes: u64 = shards.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert_eq!(seen.get_bytes, sizes - offset, "no byte before the offset is read: {seen:?}");
}

#[test]
fn read_equals_emitted_plus_dropped_under_cuts_throttling_and_a_replaced_object() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto);
    let b = bucket(moto, "acct");
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), &[12, 12, 12], |_| Fault::None);
    let urls = upload(moto, &b, "p", &shards);
    let replacement = std::fs::read(&shards[2]).unwrap();
    let b2 = b.clone();
    let replaced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, faults) = (replaced.clone(), proxy.faults.clone());
    {
        let mut f = proxy.faults.lock().unwrap();
        f.slow_down = 1;
        f.cut_after = vec![("s0-".into(), 4000)];
        // After shard 0's cut: cut shard 1 too, and replace it on the server at that moment.
        f.on_cut = Some(Box::new(move || {
            let mut f = faults.lock().unwrap();
            f.cut_after.push(("s1-".into(), 7000));
            f.on_cut = Some(Box::new(move || {
                put(moto, &b2, "p/s1-000000.tar", &replacement);
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }));
    }
    let l = ordered_loader(&urls, s3_opts(proxy.addr));
    let mut it = l.iter().unwrap();
    let emitted: usize = it.by_ref().map(|b| b.unwrap().len()).sum();
    let dropped = it.take_dropped();
    let s = it.summary();
    assert_eq!(s.read, s.emitted + s.dropped_total(), "{s:?}");
    assert_eq!(s.emitted, emitted as u64);
    assert_eq!(replaced.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Shard 0: throttled once and cut once, both retried: all 12 samples. Shard 1: replaced mid-read, the
    // sample in progress dropped as truncated naming the shard and the rest never read as the other version.
    // Shard 2: whole.
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped[0].detail.contains("replaced") && dropped[0].detail.contains("s1-000000.tar"), "{dropped:?}");
    assert!((24..36).contains(&emitted), "{emitted}");
    // Retries: the SlowDown, shard 0's cut, shard 1's cut (whose ETag-pinned request then fails: one failure).
    assert_eq!((s.io.retries, s.io.failures), (3, 1), "{:?}", s.io);
}
