//! burn training code takes a juicer unchanged: it is a `burn::data::dataloader::DataLoader`.
//!
//! ```text
//! cargo run --release --example burn_dataloader
//! ```
//!
//! [`train_epochs`] is written only against burn's traits, the way burn-train's `Learner` drives its loaders:
//! `to_device` once, then per epoch `num_items()`, `iter()`, and `progress()` after every batch. It is called
//! twice:
//! 1. with `Arc::new(juicer)` where the juicer yields the default [`JuicedBatch`] (padded patches + mask);
//! 2. with a juicer built by `JuicerBuilder::build_with` around a user batcher, [`PooledBatcher`], that
//!    mean-pools each sample's patches into one feature vector ([`PooledBatch`]).
//!
//! The "model" is a fixed linear probe: enough to touch every batch's tensors on the device without an
//! optimiser.

use std::sync::Arc;
use std::time::Instant;

use anyhow::ensure;
use burn::data::dataloader::DataLoader;
use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Tensor, TensorData};
use juicer::{DeviceSpec, JuicedBatch, JuicedSample, JuicerBuilder};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");

/// What the training loop needs from a batch: per-sample features `[B, F]` and the batch size.
trait TrainBatch: Send + 'static {
    /// Features `[B, F]` on the batch's device.
    fn features(&self) -> Tensor<2>;
    /// Samples in the batch.
    fn size(&self) -> usize;
}

impl TrainBatch for JuicedBatch {
    /// Masked mean over the kept patches: `[B, K, D]` → `[B, D]`.
    fn features(&self) -> Tensor<2> {
        let mask = self.patch_mask.clone().float().unsqueeze_dim::<3>(2); // [B, K, 1]
        let sum = (self.patches.clone() * mask.clone()).sum_dim(1); // [B, 1, D]
        let count = mask.sum_dim(1).clamp_min(1.0); // [B, 1, 1]
        (sum / count).squeeze_dim::<2>(1)
    }

    fn size(&self) -> usize {
        self.len()
    }
}

/// A user batch: one mean-pooled patch vector per sample, plus the keys.
#[derive(Debug, Clone)]
struct PooledBatch {
    /// Mean of each sample's kept patches, `[B, 3·P·P]`.
    pooled: Tensor<2>,
    /// Sample keys.
    keys: Vec<String>,
}

impl TrainBatch for PooledBatch {
    fn features(&self) -> Tensor<2> {
        self.pooled.clone()
    }

    fn size(&self) -> usize {
        self.keys.len()
    }
}

/// A user-supplied burn `Batcher` over juicer's samples.
#[derive(Debug, Clone, Copy)]
struct PooledBatcher;

impl Batcher<JuicedSample, PooledBatch> for PooledBatcher {
    fn batch(&self, items: Vec<JuicedSample>, device: &Device) -> PooledBatch {
        let mut rows = Vec::with_capacity(items.len());
        let mut keys = Vec::with_capacity(items.len());
        for s in items {
            let (k, dim) = (s.kept(), 3 * s.patch * s.patch);
            let patches = Tensor::<2>::from_data(TensorData::new(s.patches, [k, dim]), device);
            rows.push(patches.mean_dim(0)); // [1, dim]
            keys.push(s.key);
        }
        PooledBatch { pooled: Tensor::cat(rows, 0), keys }
    }
}

/// A training loop written only against burn's `DataLoader`, as burn-train's `Learner` drives one.
fn train_epochs<O: TrainBatch>(loader: Arc<dyn DataLoader<O>>, epochs: usize, device: &Device) -> anyhow::Result<()> {
    let loader = loader.to_device(device);
    let mut probe: Option<Tensor<2>> = None;
    for epoch in 0..epochs {
        let started = Instant::now();
        let total = loader.num_items();
        let mut iterator = loader.iter();
        let (mut steps, mut samples, mut loss_sum) = (0usize, 0usize, 0f64);
        while let Some(item) = iterator.next() {
            let batch = item?;
            let x = batch.features(); // [B, F]
            let [b, f] = x.dims();
            let w = probe.get_or_insert_with(|| Tensor::ones([f, 1], device) / f as f64);
            let loss: f32 = x.matmul(w.clone()).powi_scalar(2).mean().into_scalar();
            steps += 1;
            samples += b;
            loss_sum += f64::from(loss);
            let progress = iterator.progress();
            if steps == 1 || progress.is_completed() {
                println!(
                    "  epoch {}/{epochs} step {steps:>2}: batch {b:>2}×{f}  loss {loss:.4}  progress {}/{} {}",
                    epoch + 1,
                    progress.items_processed,
                    progress.items_total,
                    progress.unit.as_deref().unwrap_or("")
                );
            }
            ensure!(b == batch.size(), "features and batch disagree on the batch size");
        }
        println!(
            "  epoch {}/{epochs}: {steps} steps, {samples}/{total} samples, mean loss {:.4}, {:.2} s",
            epoch + 1,
            loss_sum / steps.max(1) as f64,
            started.elapsed().as_secs_f64()
        );
        ensure!(samples == total, "num_items() promised {total} samples, the epoch gave {samples}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let device = DeviceSpec::Cpu.resolve()?;
    let builder = JuicerBuilder::new([SHARDS]).batch_size(16).seed(3).device(DeviceSpec::Cpu);

    println!("default JuicedBatch, 2 epochs:");
    let juicer = builder.clone().build()?;
    train_epochs(Arc::new(juicer), 2, &device)?;

    println!("user Batcher<JuicedSample, PooledBatch> via build_with, 1 epoch:");
    let pooled = builder.build_with(PooledBatcher)?;
    let first = pooled.iter()?.next().transpose()?;
    if let Some(b) = &first {
        println!(
            "  first PooledBatch: pooled {:?}, keys [{}, …]",
            b.pooled.dims(),
            b.keys.first().map_or("-", String::as_str)
        );
    }
    // The loader's epoch 0 was started above, so `DataLoader::iter` runs its epoch 1: the same samples in the
    // same order as epoch 1 of the default loader (same seed), hence the same probe losses.
    train_epochs(Arc::new(pooled.clone()), 1, &device)?;

    // burn's `slice` gives a sub-loader over epoch positions, e.g. a quick validation pass.
    let valid = Arc::new(pooled).slice(0, 20);
    let n: usize = valid.iter().map(|b| b.map(|b| b.size())).sum::<Result<_, _>>()?;
    println!("slice(0, 20): {n} samples, num_items() = {}", valid.num_items());
    Ok(())
}
