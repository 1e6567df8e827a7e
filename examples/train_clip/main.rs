//! Trains a tiny CLIP (juicer's [`juicer::model::clip`]) on juiced batches: the image tower sees only the
//! patches juicer kept, at their original grid positions (FLIP-style token dropping chosen by saliency), the
//! text tower reads the enriched captions' CLIP tokens, and the loss is CLIP's symmetric contrastive loss.
//!
//! ```text
//! cargo run --release --example train_clip -- --steps 20
//! cargo run --release --example train_clip -- --steps 200 --device wgpu --batch-size 32
//! cargo run --release --example train_clip -- --steps 40 --checkpoint /tmp/ckpt --save-every 10
//! cargo run --release --example train_clip -- --steps 80 --checkpoint /tmp/ckpt --resume /tmp/ckpt
//! ```
//!
//! Every step prints the loss, samples/s and how long the step waited for the loader (`data wait`): when it
//! stays near zero the juicing keeps up with the trainer. The loop itself is in `trainer.rs`, shared with the
//! integration tests (`tests/train.rs`); its docs describe the checkpoint layout and how resume works.

mod trainer;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use juicer::{DeviceSpec, ScorerSpec};

use trainer::{FIXTURE_SHARDS, TrainOptions};

/// Train a tiny CLIP on juiced image-text pairs.
#[derive(Debug, Parser)]
#[command(name = "train_clip")]
struct Args {
    /// Shard specifications (paths, globs, brace ranges, URLs).
    #[arg(default_value = FIXTURE_SHARDS)]
    shards: Vec<String>,
    /// Train until this global step.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Samples per batch (at least 2).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Seed of the loader, the model initialisation and the FLIP drop.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, wgpu, wgpu:N, cuda, cuda:N (built with --features cuda) or auto.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Share of the patches juicer keeps.
    #[arg(long, default_value_t = 0.5)]
    keep_ratio: f32,
    /// Saliency scorer: cam, random or none.
    #[arg(long, default_value = "cam")]
    scorer: String,
    /// FLIP's extra random drop of the kept patches, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    flip_drop: f32,
    /// Model input side in pixels.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 16)]
    patch_size: usize,
    /// Checkpoint root directory (written every --save-every steps and at the end).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// Resume from a checkpoint (its root or a step-* directory).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Only print the summary.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.device == DeviceSpec::Cpu && std::env::var_os("BURN_DEVICE").is_none() {
        // burn restores optimizer state on `Device::default()` (wgpu in this build): keep it on the CPU backend.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    }
    let opts = TrainOptions {
        shards: args.shards,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
        device: args.device,
        keep_ratio: args.keep_ratio,
        scorer: ScorerSpec::parse(&args.scorer, None)?,
        flip_drop: args.flip_drop,
        image_size: args.image_size,
        patch_size: args.patch_size,
        decode_workers: None,
        checkpoint: args.checkpoint,
        save_every: args.save_every,
        resume: args.resume,
        verbose: !args.quiet,
    };
    let report = trainer::train(&opts, &mut |_, _| {})?;
    let n = report.steps.len();
    if n == 0 {
        println!("nothing to do: the run is already at step {}", report.start_step);
        return Ok(());
    }
    let samples: usize = report.steps.iter().map(|s| s.samples).sum();
    let wait: f64 = report.steps.iter().map(|s| s.wait_ms).sum();
    let compute: f64 = report.steps.iter().map(|s| s.compute_ms).sum();
    let k = n.min(5);
    println!(
        "steps {}..={}: loss {:.4} (first {k}) → {:.4} (last {k}); {:.1} samples/s; data wait {:.0} ms total ({:.0}%), compute {:.0} ms",
        report.start_step + 1,
        report.start_step + n as u64,
        report.mean_loss(0..k),
        report.mean_loss(n - k..n),
        samples as f64 / report.elapsed.as_secs_f64().max(1e-9),
        wait,
        100.0 * wait / (wait + compute).max(1e-9),
        compute
    );
    if let Some(last) = report.checkpoints.last() {
        println!("checkpoint: {}", last.display());
    }
    Ok(())
}
