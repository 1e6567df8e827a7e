//! The async `Stream`: a tokio consumer takes a few batches and drops the stream early.
//!
//! ```text
//! cargo run --release --example stream
//! ```
//!
//! The stage graph runs on its own threads; the stream only awaits the last edge, so the tokio workers never
//! block on decoding. Dropping the stream mid-epoch stops the graph and joins every thread of it, which the
//! example shows with the graph's thread gauge.

use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::StreamExt;
use juicer::{DeviceSpec, JuicedBatch};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");

/// Batches consumed before the stream is dropped.
const TAKE: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let juicer = JuicedBatch::builder([SHARDS]).batch_size(8).seed(1).device(DeviceSpec::Cpu).build()?;

    // `juicer.stream()` is the one-liner; going through `iter()` keeps a handle on the thread gauge.
    let it = juicer.iter()?;
    let live = it.thread_gauge();
    let mut stream = Box::pin(it.into_stream());

    let started = Instant::now();
    let mut seen = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        seen += 1;
        println!(
            "batch {seen}: patches {:?}  first key {}  ({:.0} ms)",
            batch.patches.dims(),
            batch.keys.first().map_or("-", String::as_str),
            started.elapsed().as_secs_f64() * 1e3
        );
        // Other async work interleaves freely with the loader.
        tokio::task::yield_now().await;
        if seen == TAKE {
            break;
        }
    }
    println!("stopping early after {seen} batches; graph threads running: {}", live.load(Ordering::SeqCst));
    let t = Instant::now();
    drop(stream);
    println!(
        "stream dropped: graph threads running: {} (joined in {:.1} ms)",
        live.load(Ordering::SeqCst),
        t.elapsed().as_secs_f64() * 1e3
    );
    anyhow::ensure!(live.load(Ordering::SeqCst) == 0, "graph threads still running after the drop");

    // The loader itself is reusable: the next stream runs the next epoch.
    let n = juicer.stream()?.take(2).count().await;
    println!("next epoch: took {n} more batches from a fresh stream, dropped it too");
    Ok(())
}
