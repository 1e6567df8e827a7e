//! The blocking iterator: one epoch over the fixture shards, then an exact resume from a checkpoint.
//!
//! ```text
//! cargo run --release --example iter            # CPU (burn's flex backend)
//! cargo run --release --example iter -- auto    # a hardware GPU when wgpu finds one, else the CPU
//! ```
//!
//! It prints every batch's patch tensor shape `[B, K, 3·P·P]` and keys, the epoch summary
//! (`read = emitted + dropped`) and a mid-epoch checkpoint as JSON. A second loader, built as a restarted
//! process would build it, then resumes from that JSON and must yield exactly the batches the first run
//! yielded after the checkpoint.

use anyhow::{Context, ensure};
use juicer::{DeviceSpec, JuicedBatch, Juicer, LoaderState};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");

/// Batches taken before the checkpoint.
const CHECKPOINT_AFTER: usize = 2;

fn loader(device: DeviceSpec) -> anyhow::Result<Juicer<JuicedBatch>> {
    Ok(JuicedBatch::builder([SHARDS]).batch_size(16).seed(7).shuffle_buffer(16).device(device).build()?)
}

/// Short list of keys for printing: the first three, then how many more.
fn short(keys: &[String]) -> String {
    let head = keys.iter().take(3).map(String::as_str).collect::<Vec<_>>().join(", ");
    if keys.len() > 3 { format!("{head}, … (+{})", keys.len() - 3) } else { head }
}

fn main() -> anyhow::Result<()> {
    let device: DeviceSpec = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => DeviceSpec::Cpu,
    };
    let juicer = loader(device)?;
    println!(
        "{} shards on {:?}, {} samples per epoch",
        juicer.shards().len(),
        juicer.device(),
        juicer.epoch_samples(0)?
    );

    let mut it = juicer.iter()?;
    let mut checkpoint = None;
    let mut after_checkpoint: Vec<Vec<String>> = Vec::new();
    let mut n = 0;
    while let Some(batch) = it.next() {
        let batch = batch?;
        n += 1;
        println!("batch {n}: patches {:?}  keys [{}]", batch.patches.dims(), short(&batch.keys));
        if checkpoint.is_some() {
            after_checkpoint.push(batch.keys.clone());
        }
        if n == CHECKPOINT_AFTER {
            // What a trainer saves next to its model weights: small, the shuffle buffer is only positions.
            checkpoint = Some(serde_json::to_string(it.state())?);
        }
    }
    let summary = it.summary();
    drop(it);
    println!(
        "summary: epoch {}  read {} = emitted {} + dropped {}  ({} batches, {:.2} s)",
        summary.epoch,
        summary.read,
        summary.emitted,
        summary.dropped_total(),
        summary.batches,
        summary.elapsed.as_secs_f64()
    );
    ensure!(summary.read == summary.emitted + summary.dropped_total(), "accounting does not add up");

    let json = checkpoint.context("the epoch had fewer batches than the checkpoint needs")?;
    println!("checkpoint after batch {CHECKPOINT_AFTER} ({} bytes of JSON):\n{json}", json.len());

    // A restarted process: a new loader with the same sources and settings, resumed from the JSON.
    let state: LoaderState = serde_json::from_str(&json)?;
    let restarted = loader(device)?;
    restarted.resume(state)?;
    let mut resumed = restarted.iter()?;
    let mut keys = Vec::new();
    for batch in resumed.by_ref() {
        let batch = batch?;
        println!("resumed batch: patches {:?}  keys [{}]", batch.patches.dims(), short(&batch.keys));
        keys.push(batch.keys);
    }
    let s = resumed.summary();
    println!(
        "resumed summary: read {} = emitted {} + dropped {}  ({} batches in the epoch)",
        s.read,
        s.emitted,
        s.dropped_total(),
        s.batches
    );
    ensure!(keys == after_checkpoint, "the resumed run differs from the original after the checkpoint");
    println!("resume check: the {} batches after the checkpoint are identical", keys.len());
    Ok(())
}
