//! What pruning buys downstream: one ViT-Ti training step on full vs pruned batches, and the break-even juicing
//! budget.
//!
//! ```text
//! cargo bench --bench step                                   # B = 8, 10 rounds, CPU (flex)
//! cargo bench --bench step -- --batch 32 --rounds 20 --device wgpu --json step.json
//! STEP_BATCH=16 STEP_ROUNDS=5 STEP_DEVICE=cpu cargo bench --bench step
//! ```
//!
//! The model is juicer's [`VisionTower`] at [`VisionTowerConfig::vit_tiny`] (width 192, 12 layers, 3 heads,
//! MLP 768) for 224-pixel images in 16-pixel patches (a 14 × 14 grid, 196 patches), trained with CLIP's
//! contrastive loss against fixed random text embeddings (so there is a loss and a backward pass through every
//! layer) and AdamW. A *step* is forward, backward and the optimizer update, timed to the device's
//! completion (`Device::sync`).
//!
//! Batches are synthetic: `B` samples of `K = round(196 · keep)` random patches at distinct random grid
//! positions (what juicer's batcher yields for a fixed budget: no padding), for keep ratios 1.0, 0.75, 0.5 and
//! 0.25. After `--warmup` rounds, the configurations run round-robin for `--rounds` rounds, so all of them see
//! the same machine state; the table gives per configuration the median step time (and the 10th/90th
//! percentiles), the median forward+backward alone, the ratio to the full batch, and
//! `saving/sample = (t_full − t_keep) / B`: the time pruning saves per sample, i.e. how much the juicing of one
//! sample may cost before it costs more than it saves (when it runs on the same device, serially with the
//! step; juicing that overlaps the step on otherwise idle cores or another device is free up to the step time).
//!
//! Options (flags, or environment variables for `cargo bench` runs): `--batch` / `STEP_BATCH` (8), `--rounds`
//! / `STEP_ROUNDS` (10), `--warmup` / `STEP_WARMUP` (2), `--device` / `STEP_DEVICE` (`cpu`, `wgpu`, `wgpu:N`,
//! `auto`), `--keeps 1,0.75,0.5,0.25`, `--json FILE`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use juicer::DeviceSpec;
use juicer::model::clip::{VisionTower, VisionTowerConfig, contrastive_loss};
use juicer::rng::{SplitMix64, derive};
use serde::Serialize;

const IMAGE: usize = 224;
const PATCH: usize = 16;
const GRID: usize = IMAGE / PATCH;

struct Options {
    batch: usize,
    rounds: usize,
    warmup: usize,
    device: DeviceSpec,
    keeps: Vec<f64>,
    json: Option<String>,
}

fn parse() -> Result<Options> {
    let env = |k: &str| std::env::var(k).ok();
    let mut o = Options {
        batch: env("STEP_BATCH").map(|v| v.parse()).transpose().context("STEP_BATCH")?.unwrap_or(8),
        rounds: env("STEP_ROUNDS").map(|v| v.parse()).transpose().context("STEP_ROUNDS")?.unwrap_or(10),
        warmup: env("STEP_WARMUP").map(|v| v.parse()).transpose().context("STEP_WARMUP")?.unwrap_or(2),
        device: env("STEP_DEVICE").map(|v| v.parse()).transpose()?.unwrap_or(DeviceSpec::Cpu),
        keeps: vec![1.0, 0.75, 0.5, 0.25],
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--batch" => o.batch = value()?.parse().context("--batch")?,
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--warmup" => o.warmup = value()?.parse().context("--warmup")?,
            "--device" => o.device = value()?.parse()?,
            "--keeps" => {
                o.keeps =
                    value()?.split(',').map(|k| k.trim().parse::<f64>()).collect::<Result<_, _>>().context("--keeps")?
            }
            "--json" => o.json = Some(value()?),
            // `cargo bench` passes `--bench`; a name filter may follow it.
            "--bench" => {}
            other if !other.starts_with('-') => {}
            other => bail!("unknown option {other} (--batch, --rounds, --warmup, --device, --keeps, --json)"),
        }
    }
    ensure!(o.batch >= 2 && o.rounds >= 1, "--batch must be at least 2 and --rounds at least 1");
    ensure!(o.keeps.iter().all(|k| *k > 0.0 && *k <= 1.0), "keep ratios must be in (0, 1]");
    if !o.keeps.contains(&1.0) {
        o.keeps.insert(0, 1.0); // the reference
    }
    Ok(o)
}

/// One synthetic batch: `b` samples of `k` distinct random positions with random patch values.
struct Batch {
    patches: Tensor<3>,
    positions: Tensor<2, Int>,
    mask: Tensor<2, Bool>,
}

fn batch(b: usize, k: usize, seed: u64, device: &Device) -> Batch {
    let dim = 3 * PATCH * PATCH;
    let mut rng = SplitMix64::new(seed);
    let patches: Vec<f32> = (0..b * k * dim).map(|_| (rng.unit_f64() * 4.0 - 2.0) as f32).collect();
    let mut positions = Vec::with_capacity(b * k);
    for _ in 0..b {
        let mut all: Vec<i64> = (0..(GRID * GRID) as i64).collect();
        rng.shuffle(&mut all);
        let mut kept = all[..k].to_vec();
        kept.sort_unstable();
        positions.extend(kept);
    }
    Batch {
        patches: Tensor::from_data(TensorData::new(patches, [b, k, dim]), device),
        positions: Tensor::from_data(TensorData::new(positions, [b, k]), device),
        mask: Tensor::from_data(TensorData::new(vec![true; b * k], [b, k]), device),
    }
}

struct Trainer {
    model: VisionTower,
    optim: ModuleOptimizer,
    text: Tensor<2>,
    device: Device,
}

impl Trainer {
    /// One step; returns (forward + backward, whole step).
    fn step(&mut self, batch: &Batch) -> Result<(Duration, Duration)> {
        let start = Instant::now();
        let image = self.model.forward(batch.patches.clone(), batch.positions.clone(), batch.mask.clone());
        let image = image.clone() / (image.powi_scalar(2).sum_dim(1) + 1e-12).sqrt();
        let loss = contrastive_loss(image.matmul(self.text.clone().transpose()) * 14.0);
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.device.sync().map_err(|e| anyhow::anyhow!("sync: {e:?}"))?;
        let forward_backward = start.elapsed();
        self.model = self.optim.step(1e-4, self.model.clone(), grads);
        self.device.sync().map_err(|e| anyhow::anyhow!("sync: {e:?}"))?;
        Ok((forward_backward, start.elapsed()))
    }
}

#[derive(Serialize)]
struct Row {
    keep: f64,
    tokens: usize,
    median_ms: f64,
    p10_ms: f64,
    p90_ms: f64,
    forward_backward_ms: f64,
    ratio_to_full: f64,
    saving_per_sample_ms: f64,
}

#[derive(Serialize)]
struct Report {
    model: &'static str,
    device: String,
    threads: usize,
    batch: usize,
    rounds: usize,
    warmup: usize,
    image: usize,
    patch: usize,
    rows: Vec<Row>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn main() -> Result<()> {
    let o = parse()?;
    let device = o.device.resolve()?;
    let train = device.clone().autodiff();
    train.seed(7);
    let config = VisionTowerConfig::vit_tiny(GRID, PATCH);
    let model = config.init(&train)?;
    let mut rng = SplitMix64::new(derive(7, &[1]));
    let text: Vec<f32> = (0..o.batch * config.embed_dim).map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32).collect();
    let text = Tensor::<2>::from_data(TensorData::new(text, [o.batch, config.embed_dim]), &device);
    let text = text.clone() / text.powi_scalar(2).sum_dim(1).sqrt();
    let mut trainer = Trainer { model, optim: AdamWConfig::new().init(), text, device: device.clone() };

    let tokens: Vec<usize> = o.keeps.iter().map(|k| ((GRID * GRID) as f64 * k).round().max(1.0) as usize).collect();
    let batches: Vec<Batch> =
        tokens.iter().enumerate().map(|(i, &k)| batch(o.batch, k, derive(11, &[i as u64]), &device)).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!(
        "step bench: ViT-Ti (192 wide, 12 layers) on {} ({threads} threads), B = {}, {} warm-up + {} rounds × {} configs",
        o.device,
        o.batch,
        o.warmup,
        o.rounds,
        batches.len()
    );
    for _ in 0..o.warmup {
        for b in &batches {
            trainer.step(b)?;
        }
    }
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); batches.len()];
    for round in 0..o.rounds {
        for (i, b) in batches.iter().enumerate() {
            let (fb, step) = trainer.step(b)?;
            times[i].push((fb.as_secs_f64() * 1e3, step.as_secs_f64() * 1e3));
        }
        if std::io::stderr().is_terminal() {
            eprint!("\rround {}/{}", round + 1, o.rounds);
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }

    let sorted = |i: usize, f: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = times[i].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let full = o.keeps.iter().position(|&k| k == 1.0).unwrap_or(0);
    let t_full = quantile(&sorted(full, |t| t.1), 0.5);
    let rows: Vec<Row> = (0..batches.len())
        .map(|i| {
            let steps = sorted(i, |t| t.1);
            let t = quantile(&steps, 0.5);
            Row {
                keep: o.keeps[i],
                tokens: tokens[i],
                median_ms: t,
                p10_ms: quantile(&steps, 0.1),
                p90_ms: quantile(&steps, 0.9),
                forward_backward_ms: quantile(&sorted(i, |t| t.0), 0.5),
                ratio_to_full: t / t_full,
                saving_per_sample_ms: (t_full - t) / o.batch as f64,
            }
        })
        .collect();

    println!(
        "ViT-Ti training step (fwd + bwd + AdamW), {} patches of {PATCH} px, B = {}, {}, median of {} rounds",
        GRID * GRID,
        o.batch,
        o.device,
        o.rounds
    );
    println!(
        "{:>5} {:>7} {:>11} {:>19} {:>11} {:>9} {:>20}",
        "keep", "tokens", "step ms", "p10-p90 ms", "fwd+bwd ms", "vs full", "saving/sample ms"
    );
    for r in &rows {
        println!(
            "{:>5.2} {:>7} {:>11.1} {:>9.1}-{:<9.1} {:>11.1} {:>8.2}x {:>20.2}",
            r.keep,
            r.tokens + 1,
            r.median_ms,
            r.p10_ms,
            r.p90_ms,
            r.forward_backward_ms,
            r.ratio_to_full,
            r.saving_per_sample_ms
        );
    }
    println!(
        "tokens include [CLS]; saving/sample = (t_full - t_keep) / B = the juicing budget per sample at break-even"
    );
    if let Some(path) = &o.json {
        let report = Report {
            model: "vit_tiny",
            device: o.device.to_string(),
            threads,
            batch: o.batch,
            rounds: o.rounds,
            warmup: o.warmup,
            image: IMAGE,
            patch: PATCH,
            rows,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {path}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
