//! Resume by byte offset (local and HTTP shards, old-format states) and elastic resume on another world size
//! (library and CLI).

use std::collections::BTreeMap;
use std::path::Path;

use juicer::{ElasticState, JuicedBatch, Juicer, JuicerBuilder, LoaderState};

use crate::util::{Fault, FileServer, juicer as juicer_bin, make_shards, specs, stderr};

fn builder(sources: Vec<String>) -> JuicerBuilder {
    crate::util::small_loader(sources).shuffle_shards(false)
}

fn keys_of(batches: Vec<JuicedBatch>) -> Vec<Vec<String>> {
    batches.into_iter().map(|b| b.keys).collect()
}

fn collect(loader: &Juicer<JuicedBatch>) -> Vec<Vec<String>> {
    keys_of(loader.iter().expect("start").map(|b| b.expect("batch")).collect())
}

/// Byte offset of the first tar header of sample `key` in the shard at `path`, read with the `tar` crate.
fn header_offset(path: &Path, key: &str) -> u64 {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name.split('.').next() == Some(key) {
            return e.raw_header_position();
        }
    }
    panic!("no sample {key} in {}", path.display());
}

/// Runs `stop` batches, returns their keys and the state; the loader is then dropped.
fn run_until(loader: &Juicer<JuicedBatch>, stop: usize) -> (Vec<Vec<String>>, LoaderState) {
    let mut it = loader.iter().unwrap();
    let mut keys = Vec::new();
    for _ in 0..stop {
        match it.next() {
            Some(b) => keys.push(b.unwrap().keys),
            None => break,
        }
    }
    let state = it.state().clone();
    drop(it);
    (keys, state)
}

#[test]
fn local_resume_seeks_to_the_checkpointed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let paths = make_shards(dir.path(), &[12, 9], |_| Fault::None);
    let shards = specs(&paths);
    let make = || builder(shards.clone()).seed(5).shuffle_buffer(0).reader_workers(1).build().unwrap();
    let full = collect(&make());
    let (_, state) = run_until(&make(), 2);
    // 8 samples emitted in file order: the cursor is sample 8 of shard 0, at its first header.
    assert_eq!((state.cursor.shard, state.cursor.index), (0, 8));
    assert_eq!(state.cursor_offset, Some(header_offset(&paths[0], "s0/k00008")));
    let json = serde_json::to_string(&state).unwrap();
    let again = make();
    again.resume(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(collect(&again), full[2..].to_vec());

    // With a shuffle buffer, the buffered samples' offsets are checkpointed too and the refill uses them.
    let shuffled = || builder(shards.clone()).seed(5).shuffle_buffer(7).reader_workers(2).build().unwrap();
    let full = collect(&shuffled());
    let (_, state) = run_until(&shuffled(), 2);
    assert!(!state.buffer.is_empty());
    assert_eq!(state.buffer_offsets.len(), state.buffer.len());
    assert!(state.buffer_offsets.iter().all(Option::is_some), "{state:?}");
    let again = shuffled();
    again.resume(state).unwrap();
    assert_eq!(collect(&again), full[2..].to_vec());
}

#[test]
fn a_wrong_offset_fails_with_a_state_error_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let paths = make_shards(dir.path(), &[12, 9], |_| Fault::None);
    let shards = specs(&paths);
    let make = || builder(shards.clone()).seed(5).shuffle_buffer(0).reader_workers(1).build().unwrap();
    let (_, mut state) = run_until(&make(), 1);
    // The shard changed: the offset now points into the middle of a member.
    state.cursor_offset = state.cursor_offset.map(|o| o + 100);
    let again = make();
    again.resume(state).unwrap();
    let mut it = again.iter().unwrap();
    let err = it.find_map(|b| b.err());
    assert!(matches!(&err, Some(juicer::Error::State(m)) if m.contains(&shards[0]) && m.contains("byte")), "{err:?}");
}

/// A change made to a good state (or its JSON) to break it.
type Edit<T> = Box<dyn Fn(&mut T)>;

#[test]
fn tampered_or_foreign_states_are_state_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let paths = make_shards(dir.path(), &[12, 9], |_| Fault::None);
    let shards = specs(&paths);
    let make = || builder(shards.clone()).seed(5).shuffle_buffer(7).reader_workers(1).build().unwrap();
    let (_, good) = run_until(&make(), 1);
    assert!(!good.buffer.is_empty());
    let json = serde_json::to_value(&good).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = specs(&make_shards(other_dir.path(), &[12, 9], |_| Fault::None));

    // Malformed JSON: negative, overflowing, wrongly typed numbers are named by their path.
    let parse = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = json.clone();
        edit(&mut v);
        LoaderState::from_json(&serde_json::to_vec(&v).unwrap())
    };
    let malformed: Vec<(&str, Edit<serde_json::Value>)> = vec![
        ("cursor.index", Box::new(|v| v["cursor"]["index"] = (-1).into())),
        ("buffer[0].shard", Box::new(|v| v["buffer"][0]["shard"] = (1u64 << 40).into())),
        ("seed", Box::new(|v| v["seed"] = "5".into())),
        ("drawn", Box::new(|v| drop(v.as_object_mut().unwrap().remove("drawn")))),
    ];
    for (field, edit) in &malformed {
        let err = parse(edit.as_ref()).unwrap_err();
        assert!(matches!(&err, juicer::Error::State(m) if m.contains(field)), "{field}: {err}");
    }
    assert_eq!(parse(&|_| ()).unwrap(), good, "an untouched state parses back");

    // Well-formed, but not this loader's, or not consistent: refused by `resume`, before any thread starts.
    let edits: Vec<(&str, Edit<LoaderState>)> = vec![
        ("seed 6", Box::new(|s| s.seed = 6)),
        ("world", Box::new(|s| s.world = juicer::World { rank: 0, world_size: 2 })),
        ("state version 9", Box::new(|s| s.version = 9)),
        ("cursor pass 3 shard 0 is outside the plan", Box::new(|s| s.cursor.pass = 3)),
        ("cursor pass 0 shard 7", Box::new(|s| s.cursor.shard = 7)),
        ("buffer[0] pass 1", Box::new(|s| s.buffer[0].pass = 1)),
        ("buffer holds 40 positions", Box::new(|s| s.buffer = vec![s.buffer[0]; 40])),
        ("buffer_offsets has 1 entries", Box::new(|s| s.buffer_offsets.truncate(1))),
        ("n_shards 3", Box::new(|s| s.n_shards = Some(3))),
        ("shuffle_shards true", Box::new(|s| s.shuffle_shards = Some(true))),
        ("samples_read 1000 is not", Box::new(|s| s.samples_read = 1000)),
        ("drawn 18446744073709551615 is beyond", Box::new(|s| s.drawn = u64::MAX)),
        (
            "epoch 18446744073709551615 is beyond",
            Box::new(|s| {
                s.epoch = u64::MAX;
                s.epoch_complete = true;
            }),
        ),
        (
            "dropped: `no_such_reason`",
            Box::new(|s| {
                s.dropped.insert("no_such_reason".into(), 1);
                s.samples_read += 1;
            }),
        ),
        (
            "(overflowing)",
            Box::new(|s| {
                s.dropped.insert("truncated".into(), u64::MAX);
                s.dropped.insert("missing_image".into(), 1);
            }),
        ),
        ("do not fit in", Box::new(|s| s.batches = 0)),
    ];
    for (needle, edit) in &edits {
        let mut state = good.clone();
        edit(&mut state);
        let err = make().resume(state).unwrap_err();
        assert!(matches!(&err, juicer::Error::State(m) if m.contains(needle)), "{needle}: {err}");
    }
    let foreign = builder(other.clone()).seed(5).shuffle_buffer(7).reader_workers(1).build().unwrap();
    let err = foreign.resume(good.clone()).unwrap_err();
    assert!(err.to_string().contains("shard list differs"), "{err}");
    // The untouched state still resumes, and continues the stream.
    let again = make();
    again.resume(good).unwrap();
    assert!(!collect(&again).is_empty());
}

#[test]
fn http_resume_asks_for_the_rest_of_the_shard_only() {
    let dir = tempfile::tempdir().unwrap();
    let paths = make_shards(dir.path(), &[14, 9], |_| Fault::None);
    let files: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(p).unwrap()))
        .collect();
    let server = FileServer::start(files.clone());
    let urls: Vec<String> = files.iter().map(|(n, _)| server.url(n)).collect();
    let make = || builder(urls.clone()).seed(5).shuffle_buffer(0).reader_workers(1).build().unwrap();
    let full = collect(&make());
    let (_, state) = run_until(&make(), 2);
    let offset = state.cursor_offset.expect("an HTTP shard has byte offsets");
    assert_eq!(offset, header_offset(&paths[0], "s0/k00008"));
    let again = make();
    again.resume(state).unwrap();
    server.take_log();
    assert_eq!(collect(&again), full[2..].to_vec(), "the resumed run is the uninterrupted run's tail");
    let log = server.take_log();
    let first: Vec<_> = log.iter().filter(|s| s.path == files[0].0).collect();
    assert_eq!(first.len(), 1, "one request for the checkpointed shard: {log:?}");
    assert_eq!(first[0].range, Some(offset), "{log:?}");
    assert_eq!(first[0].bytes, files[0].1.len() as u64 - offset, "only the bytes from the offset on: {log:?}");
    // The next shard is read whole, from its start.
    let second: Vec<_> = log.iter().filter(|s| s.path == files[1].0).collect();
    assert_eq!(second.len(), 1, "{log:?}");
    assert_eq!(second[0].range, None);
}

#[test]
fn a_version_1_state_without_offsets_still_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[12, 9], |_| Fault::None));
    let make = || builder(shards.clone()).seed(7).shuffle_buffer(0).build().unwrap();
    let sources = make().iter().unwrap().state().sources.clone();
    // A state as version 1 wrote it: 15 samples read (shard 0 and 3 of shard 1), no offsets, no plan shape.
    let old = r#"{"version":1,"seed":7,"epoch":0,"world":{"rank":0,"world_size":1},"sources":"SOURCES",
        "shuffle_buffer":0,"epoch_complete":false,"cursor":{"pass":0,"shard":1,"index":3},"shuffle_rng":12345,
        "buffer":[],"drawn":15,"samples_read":15,"samples_emitted":15,"batches":4,"dropped":{},
        "patches_kept":60,"patches_total":60,"classes":0,"classes_added":0}"#
        .replace("SOURCES", &sources);
    let state: LoaderState = serde_json::from_str(&old).unwrap();
    assert_eq!((state.version, state.cursor_offset, state.ranges.clone()), (1, None, None));
    let loader = make();
    loader.resume(state).unwrap();
    let keys: Vec<String> = collect(&loader).concat();
    assert_eq!(keys, (15..21).map(|g| format!("s1/k{g:05}")).collect::<Vec<_>>());
    // And merging it is refused with a reason.
    let st: LoaderState = serde_json::from_str(&old).unwrap();
    let err = LoaderState::merge(&[st]).unwrap_err().to_string();
    assert!(err.contains("version 1"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Elastic resume
// ---------------------------------------------------------------------------------------------------------------

/// Shard sizes: every rank of up to 4 has more than 2 batches in its shards, so no rank reaches its epoch target
/// (`DropRemainder`) before the checkpoint.
const SIZES: [usize; 7] = [10, 8, 25, 9, 12, 9, 11];

fn elastic_builder(shards: &[String], rank: usize, world: usize) -> JuicerBuilder {
    builder(shards.to_vec())
        .seed(3)
        .shuffle_buffer(6)
        .shuffle_shards(true)
        .reader_workers(2)
        .rank(rank)
        .world_size(world)
}

/// Every old rank runs `stop` batches; returns the keys they emitted and their states.
fn old_world(shards: &[String], world: usize, stop: usize) -> (Vec<String>, Vec<LoaderState>) {
    let mut keys = Vec::new();
    let mut states = Vec::new();
    for r in 0..world {
        let (k, st) = run_until(&elastic_builder(shards, r, world).build().unwrap(), stop);
        keys.extend(k.concat());
        states.push(st);
    }
    (keys, states)
}

/// Every new rank resumes the merged state and runs to the end of the epoch; returns its batches.
fn new_world(shards: &[String], world: usize, merged: &ElasticState) -> Vec<Vec<Vec<String>>> {
    (0..world)
        .map(|r| {
            let l = elastic_builder(shards, r, world).build().unwrap();
            l.resume_elastic(merged).unwrap();
            collect(&l)
        })
        .collect()
}

fn assert_each_once(before: &[String], after: &[Vec<Vec<String>>], total: usize) {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for k in before.iter().chain(after.iter().flatten().flatten()) {
        *count.entry(k.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "emitted more than once: {twice:?}");
    assert_eq!(count.len(), total, "every sample of the epoch is emitted");
    let batches: Vec<usize> = after.iter().map(Vec::len).collect();
    let (lo, hi) = (batches.iter().min().unwrap(), batches.iter().max().unwrap());
    assert!(hi - lo <= 1, "new ranks' batch counts differ by at most one: {batches:?}");
}

#[test]
fn elastic_resume_from_2_to_3_ranks_emits_the_rest_once() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &SIZES, |_| Fault::None));
    let total: usize = SIZES.iter().sum();
    let (before, states) = old_world(&shards, 2, 3);
    assert_eq!(before.len(), 24);
    let json = serde_json::to_string(&LoaderState::merge(&states).unwrap()).unwrap();
    let merged: ElasticState = serde_json::from_str(&json).unwrap();
    assert_eq!((merged.from_world_size, merged.emitted.clone()), (2, vec![12, 12]));
    let after = new_world(&shards, 3, &merged);
    assert_each_once(&before, &after, total);

    // The next epoch is the new world's plan, as a fresh run has it.
    let l = elastic_builder(&shards, 1, 3).build().unwrap();
    l.resume_elastic(&merged).unwrap();
    let _ = collect(&l);
    let next = collect(&l);
    let fresh = elastic_builder(&shards, 1, 3).build().unwrap();
    let fresh_1: Vec<Vec<String>> = keys_of(fresh.iter_epoch(1).unwrap().map(|b| b.unwrap()).collect());
    assert_eq!(next, fresh_1);
}

#[test]
fn elastic_resume_from_4_ranks_to_1() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &SIZES, |_| Fault::None));
    let (before, states) = old_world(&shards, 4, 1);
    let merged = LoaderState::merge(&states).unwrap();
    let after = new_world(&shards, 1, &merged);
    assert_each_once(&before, &after, SIZES.iter().sum());
}

#[test]
fn an_elastic_epoch_checkpoints_resumes_and_merges_again() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &SIZES, |_| Fault::None));
    let total: usize = SIZES.iter().sum();
    let (mut before, states) = old_world(&shards, 2, 2);
    let merged = LoaderState::merge(&states).unwrap();
    // Same world: a rank of the elastic epoch stops and resumes exactly.
    let make = |r| {
        let l = elastic_builder(&shards, r, 3).build().unwrap();
        l.resume_elastic(&merged).unwrap();
        l
    };
    let full = collect(&make(2));
    let (_, st) = run_until(&make(2), 2);
    assert!(st.ranges.is_some());
    let again = elastic_builder(&shards, 2, 3).build().unwrap();
    again.resume(serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap()).unwrap();
    assert_eq!(collect(&again), full[2..].to_vec());
    // 3 → 2: each of the 3 stops after 2 batches, the states merge again.
    let mut states3 = Vec::new();
    for r in 0..3 {
        let (k, st) = run_until(&make(r), 2);
        before.extend(k.concat());
        states3.push(st);
    }
    let merged2 = LoaderState::merge(&states3).unwrap();
    let after = new_world(&shards, 2, &merged2);
    assert_each_once(&before, &after, total);
}

#[test]
fn merge_rejects_mismatched_or_incomplete_states() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &SIZES, |_| Fault::None));
    let (_, states) = old_world(&shards, 2, 1);
    let err = |s: &[LoaderState]| LoaderState::merge(s).unwrap_err().to_string();
    let e = err(&states[..1]);
    assert!(e.contains("no state for rank(s) [1]"), "{e}");
    let e = err(&[states[0].clone(), states[0].clone()]);
    assert!(e.contains("several states for rank(s) [0]") && e.contains("[1]"), "{e}");
    let mut other = states[1].clone();
    other.seed = 99;
    let e = err(&[states[0].clone(), other]);
    assert!(e.contains("seed 99"), "{e}");
    let mut other = states[1].clone();
    other.epoch = 4;
    assert!(err(&[states[0].clone(), other]).contains("epoch 4"));
    assert!(err(&[]).contains("no loader states"));
    // A loader with another seed refuses the merged state.
    let merged = LoaderState::merge(&states).unwrap();
    let l = builder(shards.clone()).seed(4).shuffle_buffer(6).shuffle_shards(true).build().unwrap();
    let e = l.resume_elastic(&merged).unwrap_err().to_string();
    assert!(e.contains("seed"), "{e}");
    // A rank that wrapped into a repeat pass cannot be merged.
    let mut wrapped = states.clone();
    wrapped[0].cursor.pass = 1;
    wrapped[0].cursor.index = 2;
    assert!(err(&wrapped).contains("repeat pass"));
}

#[test]
fn cli_checkpoints_and_resumes_elastically() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [12, 9, 14, 10, 11];
    let shards = specs(&make_shards(dir.path(), &sizes, |_| Fault::None));
    let total: usize = sizes.iter().sum();
    let common = [
        "--device",
        "cpu",
        "--scorer",
        "none",
        "--image-size",
        "32",
        "--patch-size",
        "16",
        "--batch-size",
        "4",
        "--shuffle-buffer",
        "5",
        "--shuffle-shards",
        "--seed",
        "3",
        "--jsonl",
        "-",
    ];
    let keys = |out: &std::process::Output| -> Vec<String> {
        assert!(out.status.success(), "juicer failed:\n{}", stderr(out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v.get("dropped").is_none(), "{v}");
                v["key"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let mut before = Vec::new();
    let mut files = Vec::new();
    for r in 0..2 {
        let state = dir.path().join(format!("state-{r}.json"));
        let (rank, file) = (r.to_string(), state.display().to_string());
        let mut args: Vec<&str> = vec!["run"];
        args.extend(shards.iter().map(String::as_str));
        args.extend(common);
        args.extend(["--rank", &rank, "--world-size", "2", "--limit", "6", "--checkpoint", &file]);
        let k = keys(&juicer_bin(&args));
        assert_eq!(k.len(), 8, "stops at the batch boundary after 6 samples");
        before.extend(k);
        files.push(file);
    }
    let mut after = Vec::new();
    for r in 0..3 {
        let rank = r.to_string();
        let mut args: Vec<&str> = vec!["run"];
        args.extend(shards.iter().map(String::as_str));
        args.extend(common);
        args.extend(["--rank", &rank, "--world-size", "3", "--resume"]);
        args.extend(files.iter().map(String::as_str));
        let k = keys(&juicer_bin(&args));
        after.push(vec![k]);
    }
    let mut all: Vec<String> = before.iter().cloned().chain(after.iter().flatten().flatten().cloned()).collect();
    assert_eq!(all.len(), total, "each sample once");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), total, "no sample twice");
}
