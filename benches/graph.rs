//! Graph-runtime overhead: how many items per second the stage graph moves when the stages do nothing.
//!
//! ```text
//! cargo bench --bench graph
//! ```
//!
//! Each measured run builds a [`Graph`], a source emitting `N` `u64`s through [`Graph::source`], a chain of
//! `k` no-op [`Stage`]s (`k` = 1, 2, 4) on `w` workers each (`w` = 1, 4), and an ordered sink
//! ([`SinkLogic`]) that counts the items and checks their order. Criterion reports items/s per
//! configuration (setup and teardown of the threads included, as a real epoch pays them once).
//!
//! After the criterion groups, a short extra pass prints the cost of one hop: the slope of wall time and of
//! process CPU time per item over the number of stages (a hop is one stage plus its outgoing bounded edge).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use juicer::error::{Error, SampleError};
use juicer::graph::{Completion, Envelope, Graph, SinkLogic, SinkStep};
use juicer::stage::Stage;

/// Items per run.
const N: u64 = 20_000;
/// Slots per edge (the pipeline's default).
const CAPACITY: usize = 16;
/// Stage chain lengths.
const DEPTHS: [usize; 3] = [1, 2, 4];
/// Workers per stage.
const WORKERS: [usize; 2] = [1, 4];

/// A stage that passes its item through.
struct Noop;

impl Stage for Noop {
    type In = u64;
    type Out = u64;

    fn name(&self) -> &'static str {
        "noop"
    }

    fn process(&self, item: u64) -> Result<u64, SampleError> {
        Ok(item)
    }
}

/// Counts items arriving in order; reports the count once the input ends.
struct Count {
    n: u64,
    in_order: bool,
}

impl SinkLogic for Count {
    type In = u64;
    type Meta = ();
    type Out = (u64, bool);

    fn accept(&mut self, item: Envelope<u64, ()>) -> SinkStep<(u64, bool)> {
        self.in_order &= item.body.is_ok_and(|x| x == self.n);
        self.n += 1;
        SinkStep::Continue(Vec::new())
    }

    fn finish(&mut self, failure: Option<Error>) -> Vec<(u64, bool)> {
        vec![(self.n, self.in_order && failure.is_none())]
    }
}

/// One run: source → `depth` no-op stages × `workers` → ordered counting sink. Returns the items counted.
fn run(n: u64, depth: usize, workers: usize) -> u64 {
    let mut graph = Graph::new(CAPACITY);
    // The window bounds the items between source and sink; make it large enough never to be the limit.
    let window = (depth + 1) * (CAPACITY + workers) + 1;
    let source = graph.stage("source", 1);
    let (mut edge, credits) = graph
        .source(source, window, move |em| {
            for i in 0..n {
                if !em.emit((), Ok(i)) {
                    return Ok(());
                }
            }
            Ok(())
        })
        .expect("source thread");
    let stage = Arc::new(Noop);
    for _ in 0..depth {
        edge = graph.map(edge, stage.clone(), workers).expect("stage threads");
    }
    let mut out =
        graph.sink(edge, credits, Count { n: 0, in_order: true }, Completion::identity()).expect("sink thread");
    let (count, in_order) = out.blocking_recv().expect("the sink reports its count");
    assert!(in_order && count == n, "sink saw {count} items (in order: {in_order})");
    count
}

fn bench_graph(c: &mut Criterion) {
    for workers in WORKERS {
        let mut group = c.benchmark_group(format!("graph_noop_{workers}w"));
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements(N));
        for depth in DEPTHS {
            group.bench_with_input(BenchmarkId::new("stages", depth), &depth, |b, &depth| {
                b.iter(|| black_box(run(N, depth, workers)))
            });
        }
        group.finish();
    }
    per_hop();
}

/// Process CPU time (user + system, every thread, finished ones included) from `/proc/self/stat`, in
/// seconds; `None` off Linux. Resolution is one clock tick (10 ms), so callers measure many runs at once.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Least-squares line through `points`: `(slope, intercept)`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let slope = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>()
        / points.iter().map(|(x, _)| (x - mx).powi(2)).sum::<f64>();
    (slope, my - slope * mx)
}

/// Prints wall and CPU ns per item for each depth and the per-hop slopes over the depths.
///
/// Wall time per item is set by the slowest thread of the pipeline (stages overlap), so its slope over `k`
/// is small while cores are free; the CPU slope is what each extra hop really costs the machine.
fn per_hop() {
    const RUNS: u64 = 10;
    println!("\nper-hop cost ({RUNS} runs of {N} items per point; a hop = one stage + its outgoing edge):");
    for workers in WORKERS {
        let mut wall = Vec::new();
        let mut cpu = Vec::new();
        for depth in DEPTHS {
            let (t, c) = (Instant::now(), cpu_seconds());
            for _ in 0..RUNS {
                black_box(run(N, depth, workers));
            }
            let items = (RUNS * N) as f64;
            wall.push((depth as f64, t.elapsed().as_nanos() as f64 / items));
            if let (Some(c0), Some(c1)) = (c, cpu_seconds()) {
                cpu.push((depth as f64, (c1 - c0) * 1e9 / items));
            }
        }
        let line = |name: &str, points: &[(f64, f64)]| {
            let per: Vec<String> = points.iter().map(|(d, ns)| format!("k={d}: {ns:>5.0}")).collect();
            let (slope, base) = fit(points);
            println!(
                "  {workers}w {name:<4} ns/item  {}   per hop ≈ {slope:>4.0} ns, fixed ≈ {base:>4.0} ns",
                per.join("  ")
            );
        };
        line("wall", &wall);
        if cpu.len() == DEPTHS.len() {
            line("cpu", &cpu);
        }
    }
}

criterion_group!(benches, bench_graph);
criterion_main!(benches);
