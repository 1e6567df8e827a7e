//! End-to-end tests of the stage graph: backpressure, order, cancellation, accounting, resume, ranks.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use juicer::{EpochSize, JuicedBatch, JuicerBuilder, LoaderState, OnError};
use proptest::prelude::*;

use crate::util::{Fault, make_shards, specs};

fn builder(sources: Vec<String>) -> JuicerBuilder {
    crate::util::small_loader(sources)
}

/// Batch contents as comparable host data: keys plus the raw patch values.
fn contents(b: &JuicedBatch) -> (Vec<String>, Vec<f32>) {
    let data = b.patches.to_data().try_to_vec::<f32>().expect("f32 patches");
    (b.keys.clone(), data)
}

fn collect(loader: &juicer::Juicer<JuicedBatch>) -> Vec<(Vec<String>, Vec<f32>)> {
    loader.iter().expect("start").map(|b| contents(&b.expect("batch"))).collect()
}

#[test]
fn order_is_independent_of_worker_counts() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[13, 7, 20, 9], |_| Fault::None));
    let run = |readers, workers| {
        let l = builder(shards.clone())
            .seed(42)
            .shuffle_buffer(17)
            .reader_workers(readers)
            .decode_workers(workers)
            .build()
            .unwrap();
        collect(&l)
    };
    let one = run(1, 1);
    let four = run(4, 4);
    assert_eq!(one.len(), 13); // 49 samples, batch 4: 12 full + 1 partial
    assert_eq!(one, four);
    let other_seed = collect(&builder(shards).seed(43).shuffle_buffer(17).build().unwrap());
    assert_ne!(one.iter().map(|b| &b.0).collect::<Vec<_>>(), other_seed.iter().map(|b| &b.0).collect::<Vec<_>>());
}

#[test]
fn backpressure_blocks_every_stage_and_bounds_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[200, 200], |_| Fault::None));
    let (cap, workers, readers, buffer, bs, micro) = (4usize, 2usize, 2usize, 8usize, 4usize, 4usize);
    let loader = builder(shards)
        .capacity(cap)
        .decode_workers(workers)
        .reader_workers(readers)
        .shuffle_buffer(buffer)
        .batch_size(bs)
        .micro_batch(micro)
        .build()
        .unwrap();
    let collators = loader.config().collate_workers;
    let mut it = loader.iter().unwrap();
    let first = it.next().unwrap().unwrap();
    assert_eq!(first.len(), bs);
    // The consumer stops reading. Wait until no counter moves any more (progress stops by itself).
    let mut last = Vec::new();
    let mut stable = 0;
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(20));
        let now: Vec<(u64, u64)> = it.metrics().iter().map(|s| (s.items_in, s.items_out)).collect();
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        if stable >= 10 {
            break;
        }
    }
    assert!(stable >= 10, "the graph never settled: {:?}", it.metrics());
    let m = it.metrics();
    let by = |n: &str| m.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("stage {n}")).clone();
    let read = by("read");
    assert!(read.items_out < 400, "reading stopped early: {read:?}");
    for name in ["read", "shuffle", "decode", "score", "prune", "extract", "enrich", "batch", "collate"] {
        let s = by(name);
        // No worker works: each waits on its output or, where the credit window has every item downstream of
        // it, on an empty input. Which stages end up starved rather than blocked depends on where the window's
        // items sit when everything stops; the ends of the chain are always blocked on their output.
        assert_eq!((s.waiting_output + s.waiting_input) as usize, s.workers, "every worker of `{name}` waits: {s:?}");
        if ["read", "shuffle", "batch", "collate"].contains(&name) {
            assert_eq!(s.waiting_output as usize, s.workers, "every worker of `{name}` waits on its output: {s:?}");
        }
        if s.waiting_input > 0 {
            assert_eq!(s.queue_depth, 0, "a worker of `{name}` waits for input while its edge holds items: {s:?}");
        }
        // Edges are bounded.
        assert!(s.queue_depth as usize <= cap, "edge into `{name}` holds more than its capacity: {s:?}");
    }
    // Everything read but not handed to the consumer sits in an edge, the shuffle buffer, a worker or the sink.
    let consumed = bs as u64;
    let in_flight = read.items_out - consumed;
    let bound = readers * cap   // reader edges
        + buffer                // shuffle buffer
        // Between the shuffle and the sink: the credit window (edges, workers, micro-batches, reorder buffer).
        + 6 * cap + 4 * workers + 2 * micro * by("score").workers + 1 // model replicas chosen at build
        + cap * bs              // batches waiting on the last edge
        + bs                    // the full batch the sink holds while blocked on its collators
        + 2 * collators * bs    // batches queued for or held by the collators
        + bs                    // the batch being built
        + 2; // end-of-shard markers the readers count as sent (one per shard)
    assert!(in_flight as usize <= bound, "in flight {in_flight} > bound {bound}");
    drop(it);
}

fn drop_within(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what}: drop hung"));
}

#[test]
fn dropping_mid_stream_joins_every_thread() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[150, 150], |_| Fault::None));
    for consume in [0usize, 1, 5] {
        let loader = builder(shards.clone()).decode_workers(3).reader_workers(2).build().unwrap();
        let mut it = loader.iter().unwrap();
        for _ in 0..consume {
            it.next().unwrap().unwrap();
        }
        let live = it.thread_gauge();
        assert!(live.load(Ordering::SeqCst) >= 5, "readers, shuffle, decoders and sink are running");
        // Let the stages fill every edge and block, then drop.
        std::thread::sleep(Duration::from_millis(200));
        drop_within("iterator", move || drop(it));
        assert_eq!(live.load(Ordering::SeqCst), 0, "threads left after dropping after {consume} batches");
    }
    // The async stream too.
    let loader = builder(shards).build().unwrap();
    let it = loader.iter().unwrap();
    let live = it.thread_gauge();
    let stream = it.into_stream();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let stream = rt.block_on(async move {
        use futures::StreamExt;
        let mut stream = Box::pin(stream);
        let b = stream.next().await.unwrap().unwrap();
        assert_eq!(b.len(), 4);
        stream
    });
    drop_within("stream", move || drop(stream));
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

#[test]
fn accounting_under_injected_faults() {
    let dir = tempfile::tempdir().unwrap();
    let fault = |g: usize| match g {
        g if g % 13 == 5 => Fault::Corrupt, // ~7.7 %
        17 => Fault::NoImage,
        23 => Fault::BadCaption,
        _ => Fault::None,
    };
    let mut paths = make_shards(dir.path(), &[40, 40], fault);
    // A third shard cut in the middle of a member.
    let full = make_shards(&dir.path().join("t"), &[10], |_| Fault::None);
    let bytes = std::fs::read(&full[0]).unwrap();
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2 + 300]).unwrap();
    paths.push(cut);
    let loader = builder(specs(&paths)).seed(1).shuffle_buffer(10).build().unwrap();
    let mut it = loader.iter().unwrap();
    let mut emitted = 0u64;
    let mut keys = BTreeSet::new();
    for b in it.by_ref() {
        let b = b.unwrap();
        emitted += b.len() as u64;
        keys.extend(b.keys.clone());
    }
    let dropped = it.take_dropped();
    let s = it.summary();
    let corrupt = (0..80).filter(|g| g % 13 == 5).count() as u64;
    assert_eq!(s.dropped.get("undecodable_image").copied(), Some(corrupt));
    assert_eq!(s.dropped.get("missing_image").copied(), Some(1));
    assert_eq!(s.dropped.get("invalid_caption").copied(), Some(1));
    assert_eq!(s.dropped.get("truncated").copied(), Some(1));
    assert_eq!(s.emitted, emitted);
    assert_eq!(s.read, s.emitted + s.dropped_total(), "read = emitted + dropped");
    assert_eq!(dropped.len() as u64, s.dropped_total(), "every drop is reported with its key");
    assert!(dropped.iter().any(|e| e.key == "s0/k00017" && e.reason == juicer::DropReason::MissingImage));
    // 80 + the samples before the cut; the cut one is dropped, none is silently lost.
    let whole_in_cut = s.read - 80;
    assert!((1..10).contains(&whole_in_cut), "read {} samples of the cut shard", whole_in_cut);

    // on_error = fail: the same faults come back as Err items naming the key, and the stream goes on.
    let loader = builder(specs(&paths)).seed(1).shuffle_buffer(10).on_error(OnError::Fail).build().unwrap();
    let mut errs = Vec::new();
    let mut ok = 0;
    for item in loader.iter().unwrap() {
        match item {
            Ok(b) => ok += b.len(),
            Err(juicer::Error::Sample(e)) => errs.push(e),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok as u64, emitted);
    assert_eq!(errs.len() as u64, s.dropped_total());
    assert!(errs.iter().any(|e| e.key == "s0/k00005" && e.to_string().contains("s0/k00005")));
}

fn resume_case(shards: &[String], buffer: usize, stop_after: usize, world: Option<(usize, usize)>) {
    let make = || {
        let mut b = builder(shards.to_vec()).seed(7).shuffle_buffer(buffer).reader_workers(2).shuffle_shards(true);
        if let Some((r, w)) = world {
            b = b.rank(r).world_size(w);
        }
        b.build().unwrap()
    };
    let full = collect(&make());
    let first = make();
    let mut it = first.iter().unwrap();
    for _ in 0..stop_after {
        it.next().unwrap().unwrap();
    }
    let json = serde_json::to_string(it.state()).unwrap();
    drop(it);
    let state: LoaderState = serde_json::from_str(&json).unwrap();
    let second = make();
    second.resume(state).unwrap();
    let rest = collect(&second);
    assert_eq!(rest.len(), full.len() - stop_after, "batches after resuming at {stop_after}");
    assert!(rest == full[stop_after..], "resumed batches differ at stop {stop_after}");
}

#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let shards =
        specs(&make_shards(dir.path(), &[11, 6, 14, 9], |g| if g == 8 { Fault::Corrupt } else { Fault::None }));
    // Checkpoints at the start, inside the shuffle buffer's fill, in steady state, near the end and at the end.
    for stop in [0, 1, 3, 6, 9] {
        resume_case(&shards, 16, stop, None);
    }
    // Without a shuffle buffer, and with a buffer larger than the data.
    resume_case(&shards, 0, 4, None);
    resume_case(&shards, 100, 4, None);
    // Resuming a finished epoch starts the next one.
    let l = builder(shards.clone()).seed(7).build().unwrap();
    let mut it = l.iter().unwrap();
    while it.next().is_some() {}
    let st = it.state().clone();
    assert!(st.epoch_complete);
    let l2 = builder(shards).seed(7).build().unwrap();
    l2.resume(st).unwrap();
    let it2 = l2.iter().unwrap();
    assert_eq!(it2.state().epoch, 1);
}

#[test]
fn resume_rejects_a_foreign_state() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[5, 5], |_| Fault::None));
    let l = builder(shards.clone()).seed(1).build().unwrap();
    let st = l.iter().unwrap().state().clone();
    let other = builder(shards[..1].to_vec()).seed(2).build().unwrap();
    let err = other.resume(st).unwrap_err().to_string();
    assert!(err.contains("seed") && err.contains("shard list"), "{err}");
}

#[test]
fn resume_into_a_changed_source_fails_with_a_typed_state_error() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[12, 12], |_| Fault::None));
    let l = builder(shards.clone()).seed(3).shuffle_buffer(8).build().unwrap();
    let mut it = l.iter().unwrap();
    it.next().unwrap().unwrap();
    let mut state = it.state().clone();
    drop(it);
    assert!(!state.buffer.is_empty(), "the checkpoint holds a shuffle buffer");
    // The buffered sample no longer exists: the shard shrank since the checkpoint.
    state.buffer[0].index = 999;
    let again = builder(shards).seed(3).shuffle_buffer(8).build().unwrap();
    again.resume(state).unwrap();
    let mut it = again.iter().unwrap();
    let first = it.find_map(|b| b.err());
    assert!(
        matches!(&first, Some(juicer::Error::State(m)) if m.contains("index 999") && m.contains("no longer exists")),
        "{first:?}"
    );
    let live = it.thread_gauge();
    drop(it);
    assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn ranks_split_without_overlap_and_with_equal_batch_counts() {
    let dir = tempfile::tempdir().unwrap();
    let equal = specs(&make_shards(dir.path(), &[10; 6], |_| Fault::None));
    let keys_of = |shards: &[String], rank, policy| {
        let l = builder(shards.to_vec()).rank(rank).world_size(3).epoch_size(policy).seed(3).build().unwrap();
        let batches: Vec<_> = collect(&l);
        (batches.len(), batches.into_iter().flat_map(|b| b.0).collect::<Vec<_>>())
    };
    let per: Vec<_> = (0..3).map(|r| keys_of(&equal, r, EpochSize::Auto)).collect();
    assert!(
        per.iter().all(|(n, _)| *n == per[0].0),
        "equal batch counts: {:?}",
        per.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    let mut all: Vec<String> = per.iter().flat_map(|p| p.1.clone()).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no sample on two ranks");
    assert_eq!(n, 60, "the union is the whole set");

    let dir2 = tempfile::tempdir().unwrap();
    let unequal = specs(&make_shards(dir2.path(), &[10, 3, 25, 7, 12], |_| Fault::None));
    for policy in [EpochSize::DropRemainder, EpochSize::RepeatRemainder, EpochSize::Batches(5)] {
        let counts: Vec<usize> = (0..3).map(|r| keys_of(&unequal, r, policy).0).collect();
        assert!(counts.iter().all(|&c| c == counts[0] && c > 0), "{policy:?}: {counts:?}");
    }
}

#[test]
fn limit_stops_early_with_exact_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[30], |_| Fault::None));
    let l = builder(shards).limit(10).build().unwrap();
    let mut it = l.iter().unwrap();
    let n: usize = it.by_ref().map(|b| b.unwrap().len()).sum();
    assert_eq!(n, 10);
    assert_eq!(it.summary().read, 10);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Any split of shards over ranks and any shuffle buffer: each rank's batches are a permutation of its
    /// shards' samples, and a resume at any batch reproduces the rest.
    #[test]
    fn shuffle_and_resume_invariants(
        sizes in proptest::collection::vec(1usize..12, 1..5),
        buffer in 0usize..20,
        seed in 0u64..1000,
        stop_frac in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shards = specs(&make_shards(dir.path(), &sizes, |_| Fault::None));
        let l = builder(shards.clone()).seed(seed).shuffle_buffer(buffer).build().unwrap();
        let full = collect(&l);
        let mut keys: Vec<String> = full.iter().flat_map(|b| b.0.clone()).collect();
        keys.sort();
        let total: usize = sizes.iter().sum();
        prop_assert_eq!(keys.len(), total);
        keys.dedup();
        prop_assert_eq!(keys.len(), total);
        let stop = ((full.len() as f64) * stop_frac) as usize;
        resume_case_seeded(&shards, buffer, seed, stop, &full)?;
    }
}

fn resume_case_seeded(
    shards: &[String],
    buffer: usize,
    seed: u64,
    stop: usize,
    full: &[(Vec<String>, Vec<f32>)],
) -> Result<(), TestCaseError> {
    let a = builder(shards.to_vec()).seed(seed).shuffle_buffer(buffer).build().unwrap();
    let mut it = a.iter().unwrap();
    for _ in 0..stop {
        it.next().unwrap().unwrap();
    }
    let st = it.state().clone();
    drop(it);
    let b = builder(shards.to_vec()).seed(seed).shuffle_buffer(buffer).build().unwrap();
    b.resume(st).unwrap();
    let rest = collect(&b);
    prop_assert!(rest == full[stop..]);
    Ok(())
}

/// Open file descriptors and threads of this process (Linux `/proc/self`).
#[cfg(target_os = "linux")]
fn fds_and_threads() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").map(Iterator::count).unwrap_or(0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let threads =
        status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    (fds, threads)
}

/// Names of this process's threads (Linux `/proc/self/task/*/comm`), sorted.
#[cfg(target_os = "linux")]
fn thread_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Drops the iterator after a random number of batches (0 to all), 20 times, or `JUICER_SOAK_DROPS` times
/// (`benches/soak.sh`: 1,000, this test alone in its process): every stage thread joins each time. Run alone,
/// the process also returns (within 2 s: rayon pools end their threads asynchronously) to exactly the open
/// descriptors and threads it had after a first full epoch (no shard file, pipe or thread leaks); among the
/// other tests of the binary those counts move with them.
#[cfg(target_os = "linux")]
#[test]
fn dropping_the_iterator_anywhere_joins_every_thread_and_leaks_no_descriptor() {
    let soak = std::env::var("JUICER_SOAK_DROPS").ok().and_then(|v| v.parse::<u64>().ok());
    let rounds = soak.unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let paths = make_shards(dir.path(), &[9, 7, 8], |_| Fault::None);
    let loader = crate::util::small_loader(specs(&paths)).shuffle_buffer(5).reader_workers(2).build().unwrap();
    let mut rng = juicer::rng::SplitMix64::new(7);
    // A whole epoch first: every lazily started pool (rayon, the tokenizer) exists before the baseline.
    assert_eq!(loader.iter().unwrap().map(|b| b.unwrap().len()).sum::<usize>(), 24);
    let baseline = fds_and_threads();
    for round in 0..rounds {
        let stop = rng.next_u64() % 8;
        let mut it = loader.iter().unwrap();
        let gauge = it.thread_gauge();
        for _ in 0..stop {
            if it.next().is_none() {
                break;
            }
        }
        drop(it);
        assert_eq!(gauge.load(std::sync::atomic::Ordering::SeqCst), 0, "round {round}: threads left after drop");
        if soak.is_some() {
            // The graph's threads are joined (the gauge says so); a model replica's rayon pool only signals its
            // threads to stop when dropped, so they may take a moment to go. A leak never goes.
            let settled = std::time::Instant::now();
            while fds_and_threads() != baseline && settled.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let now = fds_and_threads();
            assert_eq!(
                now,
                baseline,
                "round {round} (stopped after {stop} batches): (fds, threads) changed; threads {:?}",
                thread_names()
            );
        }
    }
    if soak.is_some() {
        eprintln!("{rounds} drops: (fds, threads) stayed at {baseline:?}");
    }
}

/// A batcher that fails on its third batch: keys only, so the test needs no device.
struct FailsOnThird(std::sync::atomic::AtomicUsize);

impl burn::data::dataloader::batcher::Batcher<juicer::JuicedSample, Vec<String>> for FailsOnThird {
    fn batch(&self, items: Vec<juicer::JuicedSample>, _: &burn::tensor::Device) -> Vec<String> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 2 {
            panic!("no room for {} samples", items.len());
        }
        items.into_iter().map(|s| s.key).collect()
    }
}

#[test]
fn collators_keep_the_order_and_a_failing_batcher_is_an_error_naming_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[40, 40], |_| Fault::None));
    let keys = |collate: usize, batcher| {
        let loader = builder(shards.clone()).batch_size(4).collate_workers(collate).build_with(batcher).unwrap();
        loader.iter().unwrap().collect::<Vec<_>>()
    };
    // Counting from 3, it never reaches its failing third call.
    let never_fails = || FailsOnThird(std::sync::atomic::AtomicUsize::new(3));
    // Order: the same batches with the batcher on the sink's thread and on 1 or 4 collators.
    let inline: Vec<Vec<String>> = keys(0, never_fails()).into_iter().map(Result::unwrap).collect();
    assert_eq!(inline.len(), 20);
    for collate in [1, 4] {
        let got: Vec<Vec<String>> = keys(collate, never_fails()).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, inline, "{collate} collators");
    }
    // A panicking batcher: the batches before it, then an error naming the stage and the batch's samples.
    let out = keys(2, FailsOnThird(std::sync::atomic::AtomicUsize::new(0)));
    assert!(out[0].is_ok() && out[1].is_ok(), "{:?}", out.iter().map(Result::is_ok).collect::<Vec<_>>());
    let err = out[2].as_ref().unwrap_err().to_string();
    assert!(err.contains("`collate`") && err.contains("no room for 4 samples"), "{err}");
    assert!(err.contains(&inline[2][0]) && err.contains(&inline[2][3]), "names the first and last sample: {err}");
}
