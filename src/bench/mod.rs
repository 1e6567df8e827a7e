//! The throughput harness behind `juicer bench`: how fast a pipeline feeds a trainer, what it costs in CPU and
//! memory, and which stage limits it.
//!
//! A run consumes batches as fast as they come (the consumer does nothing else), so the slowest stage sets the
//! pace and the graph's counters show it: that stage is busy nearly all the time, the stages before it are
//! blocked on their full output edges, the stages after it starve for input. [`measure`] takes one pipeline
//! through a warm-up (model threads started, kernels compiled, edges filled) and then a measured window; the
//! per-stage fractions are differences of the graph's cumulative counters between the window's two ends.
//! [`run`] measures one pipeline per device at the same time, each as one rank of a world of that many.
//!
//! Everything here is measurement: no test asserts a duration (the brief's rule), and the numbers only compare
//! with numbers from the same machine and the same run.

pub mod layers;
pub mod plot;
pub mod probe;
pub mod synthetic;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::batch::JuicedBatch;
use crate::error::{Error, Result};
use crate::graph::StageSnapshot;
use crate::pipeline::{Config, Juicer};

/// Version of the JSON report layout ([`BenchReport`]); bumped on any incompatible change.
pub const SCHEMA: u32 = 1;

/// When the measured window starts and ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Samples emitted before the window opens (whole batches: it opens at the first batch that reaches it).
    pub warmup: u64,
    /// Close the window after this many samples (`None`: at the end of the data).
    pub samples: Option<u64>,
    /// Close the window after this many seconds (`None`: no time limit).
    pub seconds: Option<f64>,
    /// Epochs measured one after the other, each with its own warm-up and window (a score cache filled in
    /// epoch 1 serves epoch 2).
    pub epochs: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self { warmup: 16, samples: None, seconds: None, epochs: 1 }
    }
}

/// One stage over the measured window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    /// Stage name (`read`, `shuffle`, `decode`, `score`, `prune`, `extract`, `enrich`, `finish`, `batch`).
    pub name: String,
    /// Worker threads.
    pub workers: usize,
    /// Items the stage took in during the window.
    pub items: u64,
    /// Worker time per item in milliseconds (busy time summed over workers / items).
    pub ms_per_item: Option<f64>,
    /// Share of the window the workers spent working (0–1, averaged over workers).
    pub busy: f64,
    /// Share spent waiting on a full output edge (downstream is slower).
    pub blocked: f64,
    /// Share spent waiting for input (upstream is slower).
    pub starved: f64,
}

/// A point of a pipeline's timeline, taken as each batch arrives (warm-up included).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tick {
    /// Seconds since the pipeline started (the iterator was created).
    pub t: f64,
    /// Samples emitted so far.
    pub samples: u64,
    /// Resident memory of the process now, in bytes (Linux).
    pub rss_bytes: Option<u64>,
    /// Cumulative busy seconds per stage, in [`PipelineReport::stages`] order.
    pub busy: Vec<f64>,
}

/// One pipeline (one device, one rank) over its window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineReport {
    /// The device the models ran on and the batches were made on.
    pub device: String,
    /// Rank of this pipeline in the world of [`run`]'s pipelines.
    pub rank: usize,
    /// Epoch measured (each of `--epochs N` gets its own report).
    pub epoch: u64,
    /// Pipelines measured together.
    pub world_size: usize,
    /// Seconds the window lasted.
    pub seconds: f64,
    /// Seconds the pipeline needed before the window opened (start-up + warm-up).
    pub warmup_seconds: f64,
    /// Seconds from starting the epoch (`Juicer::iter`: sample counts when needed, graph start, shard opens)
    /// to its first batch: what a trainer waits before step 1 (after the loader, and its models, are built).
    pub first_batch_seconds: f64,
    /// Samples emitted in the window.
    pub samples: u64,
    /// Batches in the window.
    pub batches: u64,
    /// Samples dropped in the window (bad input).
    pub dropped: u64,
    /// Kept patches in the window's samples.
    pub kept_patches: u64,
    /// Patches of the window's samples, kept or not.
    pub total_patches: u64,
    /// Caption tokens (unpadded) in the window's samples.
    pub tokens: u64,
    /// `samples / seconds`.
    pub samples_per_s: f64,
    /// `kept_patches / seconds`: the image tokens a trainer receives per second.
    pub kept_patches_per_s: f64,
    /// `tokens / seconds`: the text tokens a trainer receives per second.
    pub tokens_per_s: f64,
    /// True when the data ended before `Window::samples`/`seconds` were reached.
    pub exhausted: bool,
    /// Per-stage fractions over the window, in graph order.
    pub stages: Vec<StageReport>,
    /// The stage with the highest busy share: the one to speed up (or give more workers).
    pub bottleneck: Option<String>,
    /// Process CPU seconds (all threads) at the window's start and end.
    pub cpu_seconds: Option<(f64, f64)>,
    /// One point when the pipeline started, then one per batch.
    pub timeline: Vec<Tick>,
    /// Score cache counters at the window's end (since the loader was built), when a cache is configured.
    pub score_cache: Option<crate::vision::cache::CacheStats>,
}

/// The pipeline settings a report was measured with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setup {
    /// Last stage that ran (`decode`, `score`, `prune`, `extract`, `enrich`).
    pub stages: String,
    /// Saliency scorer.
    pub scorer: String,
    /// Keep policy, as written in the configuration.
    pub keep: String,
    /// Samples per batch.
    pub batch_size: usize,
    /// Model input side.
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Slots per graph edge.
    pub capacity: usize,
    /// Reader workers.
    pub reader_workers: usize,
    /// Per-item stage workers (decode, prune, extract, enrich).
    pub workers: usize,
    /// Model micro-batch.
    pub micro_batch: usize,
    /// Model replicas per model stage (as chosen at build).
    pub model_workers: usize,
    /// CPU threads per model replica (as chosen at build; 0: the global pool).
    pub intra_op_threads: usize,
    /// Shuffle buffer.
    pub shuffle_buffer: usize,
    /// Shards read (all ranks together).
    pub shards: usize,
}

impl Setup {
    /// The settings of `config` over `shards` shards.
    pub fn of(config: &Config, shards: usize) -> Self {
        Self {
            stages: config.last_stage.name().to_string(),
            scorer: config.vision.scorer.name().to_string(),
            keep: format!("{:?}", config.vision.prune.policy),
            batch_size: config.batch_size,
            image_size: config.decode.image_size,
            patch_size: config.patch_size,
            capacity: config.capacity,
            reader_workers: config.reader_workers,
            workers: config.decode_workers,
            micro_batch: config.vision.micro_batch,
            model_workers: config.vision.model_workers,
            intra_op_threads: config.vision.intra_op_threads,
            shuffle_buffer: config.shuffle_buffer,
            shards,
        }
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// Logical cores available to the process.
    pub cores: usize,
    /// `std::env::consts::OS`.
    pub os: String,
    /// `std::env::consts::ARCH`.
    pub arch: String,
}

impl Machine {
    /// This machine.
    pub fn here() -> Self {
        Self {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        }
    }
}

/// All pipelines of the last epoch measured together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Total {
    /// Sum of the pipelines' samples/s.
    pub samples_per_s: f64,
    /// Sum of the pipelines' kept patches/s.
    pub kept_patches_per_s: f64,
    /// Sum of the pipelines' tokens/s.
    pub tokens_per_s: f64,
    /// Process CPU seconds per sample over the windows (all threads, all pipelines).
    pub cpu_seconds_per_sample: Option<f64>,
    /// Process CPU seconds over wall seconds over cores: 1.0 means every core busy for the whole window.
    pub cpu_utilisation: Option<f64>,
    /// Peak resident memory of the process, in bytes (since it started: models, warm-up and window).
    pub peak_rss_bytes: Option<u64>,
    /// With several epochs: samples/s of the last epoch over the first (what a score cache buys).
    pub epoch_speedup: Option<f64>,
}

/// The whole report, as `juicer bench --json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// juicer's version.
    pub version: String,
    /// Seconds since the Unix epoch when the run finished.
    pub unix_time: u64,
    /// Where it ran.
    pub machine: Machine,
    /// What ran.
    pub setup: Setup,
    /// The warm-up and window asked for.
    pub warmup_samples: u64,
    /// Per pipeline (one per device).
    pub pipelines: Vec<PipelineReport>,
    /// Sums over the pipelines and process-wide readings.
    pub total: Total,
}

/// The per-stage fractions between two snapshots of the same graph `dt` seconds apart.
pub fn stage_reports(start: &[StageSnapshot], end: &[StageSnapshot], dt: f64) -> Vec<StageReport> {
    end.iter()
        .zip(start)
        .map(|(e, s)| {
            let denom = (dt * e.workers.max(1) as f64).max(1e-9);
            let d = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64();
            let busy = d(e.busy, s.busy);
            let items = e.items_in.saturating_sub(s.items_in);
            StageReport {
                name: e.name.clone(),
                workers: e.workers,
                items,
                ms_per_item: (items > 0).then(|| 1000.0 * busy / items as f64),
                busy: (busy / denom).min(1.0),
                blocked: (d(e.blocked, s.blocked) / denom).min(1.0),
                starved: (d(e.starved, s.starved) / denom).min(1.0),
            }
        })
        .collect()
}

/// The stage with the highest busy share (ties: the later stage, which is nearer the consumer).
pub fn bottleneck(stages: &[StageReport]) -> Option<String> {
    stages.iter().filter(|s| s.items > 0).max_by(|a, b| a.busy.total_cmp(&b.busy)).map(|s| s.name.clone())
}

/// Measures one pipeline: an epoch from `loader` (or what `window` allows of it).
///
/// Fails if the data ends before the warm-up does (lower the warm-up or give more data), and on a pipeline
/// error; dropped samples are counted, not errors.
pub fn measure(loader: &Juicer<JuicedBatch>, window: &Window) -> Result<PipelineReport> {
    let world = loader.world();
    let started = Instant::now();
    let mut it = loader.iter()?;
    let mut emitted = 0u64;
    let mut open: Option<(Instant, Vec<StageSnapshot>, Option<Duration>, u64)> = None;
    let (mut samples, mut batches, mut kept, mut total, mut tokens) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut timeline = Timeline::new(
        Tick {
            t: 0.0,
            samples: 0,
            rss_bytes: probe::current_rss(),
            busy: it.metrics().iter().map(|m| m.busy.as_secs_f64()).collect(),
        },
        epoch_ticks(window.epochs),
    );
    let mut exhausted = true;
    let mut last: Option<(Instant, Vec<StageSnapshot>)> = None;
    let mut first_batch: Option<f64> = None;
    while let Some(item) = it.next() {
        let batch = item?;
        let now = Instant::now();
        first_batch.get_or_insert_with(|| now.duration_since(started).as_secs_f64());
        let metrics = it.metrics();
        emitted += batch.len() as u64;
        timeline.push(Tick {
            t: now.duration_since(started).as_secs_f64(),
            samples: emitted,
            rss_bytes: probe::current_rss(),
            busy: metrics.iter().map(|m| m.busy.as_secs_f64()).collect(),
        });
        match &open {
            None => {
                if emitted >= window.warmup {
                    let dropped = it.summary().dropped_total();
                    open = Some((now, metrics.clone(), probe::cpu_time(), dropped));
                    last = Some((now, metrics));
                }
                continue;
            }
            Some((t0, ..)) => {
                samples += batch.len() as u64;
                batches += 1;
                kept += batch.kept.iter().map(|k| k.len() as u64).sum::<u64>();
                total += (batch.len() * batch.grid.0 * batch.grid.1) as u64;
                tokens += batch.token_ids.iter().map(|t| t.len() as u64).sum::<u64>();
                last = Some((now, metrics));
                let elapsed = now.duration_since(*t0).as_secs_f64();
                if window.samples.is_some_and(|n| samples >= n) || window.seconds.is_some_and(|s| elapsed >= s) {
                    exhausted = false;
                    break;
                }
            }
        }
    }
    let Some((t0, m0, cpu0, dropped0)) = open else {
        return Err(Error::Config(vec![format!(
            "the data ended after {emitted} samples, before the warm-up of {} was done: lower the warm-up or add data",
            window.warmup
        )]));
    };
    let cpu1 = probe::cpu_time();
    let summary = it.summary();
    let dropped = summary.dropped_total().saturating_sub(dropped0);
    drop(it);
    let (t1, m1) = last.unwrap_or((t0, m0.clone()));
    let seconds = t1.duration_since(t0).as_secs_f64();
    let stages = stage_reports(&m0, &m1, seconds);
    let rate = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    Ok(PipelineReport {
        device: format!("{:?}", loader.device()),
        rank: world.rank,
        epoch: summary.epoch,
        world_size: world.world_size,
        seconds,
        warmup_seconds: t0.duration_since(started).as_secs_f64(),
        first_batch_seconds: first_batch.unwrap_or(0.0),
        samples,
        batches,
        dropped,
        kept_patches: kept,
        total_patches: total,
        tokens,
        samples_per_s: rate(samples),
        kept_patches_per_s: rate(kept),
        tokens_per_s: rate(tokens),
        exhausted,
        bottleneck: bottleneck(&stages),
        stages,
        cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| (a.as_secs_f64(), b.as_secs_f64())),
        timeline: timeline.finish(),
        score_cache: summary.score_cache,
    })
}

/// Most points one pipeline's timelines keep, over all its epochs. When an epoch's timeline is full, every other
/// point goes and later batches are sampled at twice the stride, so a bench of any length holds a bounded
/// timeline of evenly spaced points plus the last one: 2,048 to 4,096 for one epoch, and with `--epochs N` each
/// epoch gets `MAX_TICKS / N` (at least [`MIN_TICKS`]), so that a soak of 100 epochs does not grow with its
/// reports (it did, by about 60 KB an epoch).
const MAX_TICKS: usize = 4096;

/// Fewest points an epoch's timeline may be bounded to.
const MIN_TICKS: usize = 64;

/// A timeline under construction, bounded by `max` points (see [`MAX_TICKS`]).
struct Timeline {
    ticks: Vec<Tick>,
    /// Most points kept.
    max: usize,
    /// Every `stride`-th tick is kept.
    stride: u64,
    /// Ticks offered so far (the first one excluded).
    seen: u64,
    /// The latest tick when it was not kept: it closes the timeline.
    latest: Option<Tick>,
}

impl Timeline {
    fn new(first: Tick, max: usize) -> Self {
        Self { ticks: vec![first], max: max.max(2), stride: 1, seen: 0, latest: None }
    }

    fn push(&mut self, tick: Tick) {
        self.seen += 1;
        if !self.seen.is_multiple_of(self.stride) {
            self.latest = Some(tick);
            return;
        }
        if self.ticks.len() >= self.max {
            let mut i = 0usize;
            self.ticks.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride *= 2;
        }
        self.ticks.push(tick);
        self.latest = None;
    }

    fn finish(mut self) -> Vec<Tick> {
        self.ticks.extend(self.latest);
        self.ticks.shrink_to_fit();
        self.ticks
    }
}

/// Points each epoch's timeline keeps when a pipeline measures `epochs` epochs (see [`MAX_TICKS`]).
fn epoch_ticks(epochs: u64) -> usize {
    let epochs = usize::try_from(epochs.max(1)).unwrap_or(usize::MAX);
    (MAX_TICKS / epochs).max(MIN_TICKS)
}

/// Measures every loader at once, one thread each (one pipeline per device), and sums them up.
///
/// The loaders are meant to be the ranks of one world (`rank i of n`), so that they read disjoint shards.
pub fn run(loaders: &[Juicer<JuicedBatch>], window: &Window) -> Result<BenchReport> {
    let first = loaders.first().ok_or_else(|| Error::Config(vec!["bench: no pipeline to measure".into()]))?;
    let results: Vec<Result<PipelineReport>> = std::thread::scope(|scope| {
        let handles: Vec<_> = loaders
            .iter()
            .map(|l| scope.spawn(move || (0..window.epochs.max(1)).map(|_| measure(l, window)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(Error::Stage { stage: "bench".into(), detail: "panicked".into() })])
            })
            .collect()
    });
    let mut pipelines = results.into_iter().collect::<Result<Vec<_>>>()?;
    pipelines.sort_by_key(|p| (p.epoch, p.rank));
    let machine = Machine::here();
    let epoch_total = |e: u64| pipelines.iter().filter(|p| p.epoch == e).map(|p| p.samples_per_s).sum::<f64>();
    let (first_epoch, last_epoch) =
        (pipelines.iter().map(|p| p.epoch).min().unwrap_or(0), pipelines.iter().map(|p| p.epoch).max().unwrap_or(0));
    let epoch_speedup = (last_epoch > first_epoch && epoch_total(first_epoch) > 0.0)
        .then(|| epoch_total(last_epoch) / epoch_total(first_epoch));
    let cur: Vec<&PipelineReport> = pipelines.iter().filter(|p| p.epoch == last_epoch).collect();
    let samples: u64 = cur.iter().map(|p| p.samples).sum();
    let cpu = cur.iter().map(|p| p.cpu_seconds).collect::<Option<Vec<_>>>().and_then(|c| {
        let start = c.iter().map(|c| c.0).reduce(f64::min)?;
        let end = c.iter().map(|c| c.1).reduce(f64::max)?;
        Some(end - start)
    });
    let wall = cur.iter().map(|p| p.seconds).fold(0.0, f64::max);
    let total = Total {
        samples_per_s: cur.iter().map(|p| p.samples_per_s).sum(),
        kept_patches_per_s: cur.iter().map(|p| p.kept_patches_per_s).sum(),
        tokens_per_s: cur.iter().map(|p| p.tokens_per_s).sum(),
        cpu_seconds_per_sample: cpu.filter(|_| samples > 0).map(|c| c / samples as f64),
        cpu_utilisation: cpu.filter(|_| wall > 0.0).map(|c| c / wall / machine.cores as f64),
        peak_rss_bytes: probe::peak_rss(),
        epoch_speedup,
    };
    Ok(BenchReport {
        schema: SCHEMA,
        version: env!("CARGO_PKG_VERSION").to_string(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        machine,
        setup: Setup::of(first.config(), first.shards().len()),
        warmup_samples: window.warmup,
        pipelines,
        total,
    })
}

/// The report as the terminal table `juicer bench` prints.
pub fn render(report: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let set = &report.setup;
    let m = &report.machine;
    let _ = writeln!(
        s,
        "juicer bench: stages decode..{}, scorer {}, keep {}, batch {}, image {}/{}, model {}×{} thread(s), {} shard(s), \
         {} core(s) {}/{}",
        set.stages,
        set.scorer,
        set.keep,
        set.batch_size,
        set.image_size,
        set.patch_size,
        set.model_workers,
        set.intra_op_threads.max(1),
        set.shards,
        m.cores,
        m.os,
        m.arch
    );
    let _ = writeln!(
        s,
        "\n  {:<22} {:>9} {:>8} {:>10} {:>14} {:>11} {:>12} {:>9}",
        "pipeline", "samples", "seconds", "samples/s", "kept patches/s", "tokens/s", "first batch", "bottleneck"
    );
    for p in &report.pipelines {
        let _ = writeln!(
            s,
            "  {:<22} {:>9} {:>8.2} {:>10.1} {:>14.0} {:>11.0} {:>10.2} s {:>9}{}",
            if report.pipelines.iter().any(|q| q.epoch != p.epoch) {
                format!("{} r{}/{} epoch {}", short_device(&p.device), p.rank, p.world_size, p.epoch)
            } else {
                format!("{} (rank {}/{})", short_device(&p.device), p.rank, p.world_size)
            },
            p.samples,
            p.seconds,
            p.samples_per_s,
            p.kept_patches_per_s,
            p.tokens_per_s,
            p.first_batch_seconds,
            p.bottleneck.as_deref().unwrap_or("-"),
            if p.exhausted { "  (data ended)" } else { "" }
        );
    }
    let t = &report.total;
    let ranks = report.pipelines.iter().map(|p| p.rank).max().unwrap_or(0) + 1;
    if ranks > 1 {
        let _ = writeln!(
            s,
            "  {:<22} {:>9} {:>8} {:>10.1} {:>14.0} {:>11.0}",
            "total",
            report.pipelines.iter().map(|p| p.samples).sum::<u64>(),
            "",
            t.samples_per_s,
            t.kept_patches_per_s,
            t.tokens_per_s
        );
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if let Some(x) = t.epoch_speedup {
        let _ = writeln!(s, "\n  last epoch / first epoch: {x:.2}x samples/s");
    }
    for p in report.pipelines.iter().filter(|p| p.rank == 0) {
        if let Some(c) = &p.score_cache {
            let _ = writeln!(
                s,
                "  score cache after epoch {}: {} hits, {} misses, {} stored, {} evicted, {:.1} MiB",
                p.epoch,
                c.hits,
                c.misses,
                c.stored,
                c.evicted,
                mib(c.bytes)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n  CPU {} per sample ({} of {} core(s) busy)   peak RSS {}",
        t.cpu_seconds_per_sample.map_or("n/a".into(), |c| format!("{:.1} ms", 1000.0 * c)),
        t.cpu_utilisation.map_or("n/a".into(), |u| format!("{:.0} %", 100.0 * u)),
        m.cores,
        t.peak_rss_bytes.map_or("n/a".into(), |b| format!("{:.0} MiB", mib(b)))
    );
    for p in &report.pipelines {
        let _ = writeln!(
            s,
            "\n  {:<10} {:>7} {:>9} {:>11} {:>7} {:>9} {:>9}   [{}]",
            "stage",
            "workers",
            "items",
            "ms/item",
            "busy",
            "blocked",
            "starved",
            short_device(&p.device)
        );
        for st in &p.stages {
            let mark = if p.bottleneck.as_deref() == Some(st.name.as_str()) { "  <- bottleneck" } else { "" };
            let _ = writeln!(
                s,
                "  {:<10} {:>7} {:>9} {:>11} {:>6.1}% {:>8.1}% {:>8.1}%{mark}",
                st.name,
                st.workers,
                st.items,
                st.ms_per_item.map_or("-".into(), |v| format!("{v:.3}")),
                100.0 * st.busy,
                100.0 * st.blocked,
                100.0 * st.starved,
            );
        }
    }
    s
}

/// `Flex` → `cpu`, `Wgpu(DiscreteGpu(0))` → `wgpu(DiscreteGpu(0))`: short enough for a table cell.
fn short_device(debug: &str) -> String {
    let d = debug.to_ascii_lowercase();
    if d.contains("flex") { "cpu".into() } else { d.chars().take(22).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_timeline_stays_bounded_evenly_spaced_and_ends_on_the_last_batch() {
        let tick = |n: u64| Tick { t: n as f64, samples: n, rss_bytes: None, busy: vec![0.0; 8] };
        for batches in [10u64, 4096, 4097, 100_000] {
            let mut timeline = Timeline::new(tick(0), MAX_TICKS);
            for n in 1..=batches {
                timeline.push(tick(n));
            }
            let ticks = timeline.finish();
            assert!(ticks.len() <= MAX_TICKS + 1, "{batches}: {} points", ticks.len());
            assert_eq!((ticks[0].samples, ticks[ticks.len() - 1].samples), (0, batches));
            let gaps: Vec<u64> = ticks.windows(2).map(|w| w[1].samples - w[0].samples).collect();
            // One stride between kept points; the closing point may come sooner.
            let (last, body) = gaps.split_last().unwrap();
            assert!(body.iter().all(|&g| g == body[0]) && body.first().is_none_or(|&g| *last <= g), "{batches}");
            if batches > MAX_TICKS as u64 {
                assert!(ticks.len() > MAX_TICKS / 2, "{batches}: only {} points", ticks.len());
            }
        }
    }

    #[test]
    fn the_epochs_of_a_long_bench_share_one_bound() {
        assert_eq!(epoch_ticks(0), MAX_TICKS);
        assert_eq!(epoch_ticks(1), MAX_TICKS);
        assert_eq!(epoch_ticks(4), MAX_TICKS / 4);
        assert_eq!(epoch_ticks(100), MIN_TICKS);
        let tick = |n: u64| Tick { t: n as f64, samples: n, rss_bytes: None, busy: vec![0.0; 8] };
        let mut timeline = Timeline::new(tick(0), epoch_ticks(100));
        for n in 1..=313 {
            timeline.push(tick(n));
        }
        let ticks = timeline.finish();
        assert!(ticks.len() <= MIN_TICKS + 1 && ticks.len() > MIN_TICKS / 2, "{} points", ticks.len());
        assert_eq!(ticks.capacity(), ticks.len());
        assert_eq!(ticks[ticks.len() - 1].samples, 313);
    }

    fn snap(name: &str, workers: usize, items: u64, busy: f64, blocked: f64, starved: f64) -> StageSnapshot {
        StageSnapshot {
            name: name.into(),
            workers,
            items_in: items,
            items_out: items,
            calls: items,
            busy: Duration::from_secs_f64(busy),
            blocked: Duration::from_secs_f64(blocked),
            starved: Duration::from_secs_f64(starved),
            queue_depth: 0,
            waiting_output: 0,
            waiting_input: 0,
        }
    }

    #[test]
    fn fractions_are_window_differences_per_worker() {
        let a = [snap("decode", 2, 10, 1.0, 0.5, 0.0), snap("score", 1, 10, 2.0, 0.0, 0.1)];
        let b = [snap("decode", 2, 30, 3.0, 5.5, 0.0), snap("score", 1, 30, 6.0, 0.0, 0.6)];
        let r = stage_reports(&a, &b, 5.0);
        assert_eq!(r[0].items, 20);
        assert!((r[0].busy - 0.2).abs() < 1e-9, "{r:?}");
        assert!((r[0].blocked - 0.5).abs() < 1e-9);
        assert!((r[0].ms_per_item.unwrap() - 100.0).abs() < 1e-9);
        assert!((r[1].busy - 0.8).abs() < 1e-9);
        assert!((r[1].starved - 0.1).abs() < 1e-9);
        assert_eq!(bottleneck(&r).as_deref(), Some("score"));
        let idle = [snap("x", 1, 5, 1.0, 0.0, 0.0)];
        assert_eq!(bottleneck(&stage_reports(&idle, &idle, 1.0)), None, "a stage without items is no bottleneck");
    }
}
