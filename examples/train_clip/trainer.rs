//! The training loop of the `train_clip` example. `tests/train.rs` includes this very file
//! (`#[path = "../examples/train_clip/trainer.rs"] mod trainer;`), so the tests run the CLI's code path.
//!
//! A plain burn loop, epoch after epoch over juicer's loader ([`Juicer`], burn's `DataLoader`): take a batch,
//! forward both towers, `backward()`, `GradientsParams::from_grads`, `AdamW` step. Per step it logs the loss,
//! samples/s and how long the step waited for data. Juicer's inherent `iter()` is used rather than the
//! `DataLoader::iter()` trait method (same batches) because its iterator hands out the checkpoint state.
//!
//! # Checkpoints
//! `--checkpoint DIR` writes `DIR/step-NNNNNNNN/` every `--save-every` steps and at the end:
//! - `model.bpk`: the model in burn's burnpack format (`Module::save_file`); it keeps each parameter's id, which
//!   the optimizer state is keyed by;
//! - `optimizer.bpk`: AdamW's moments and step counts (`ModuleOptimizer::save`);
//! - `trainer.json`: step, epoch, seed, model config and juicer's [`LoaderState`] taken after the last batch the
//!   step consumed (`JuicerIter::state()`).
//!
//! Each step directory is written under a temporary name and renamed into place, then `DIR/latest` (the name of
//! the newest one) is replaced by a rename too, so a crash never leaves a half-written checkpoint visible.
//! `--resume DIR` (the root, or one `step-*` directory) loads all three and calls [`Juicer::resume`]: the run
//! continues mid-epoch, or with the next epoch when the checkpoint was taken at an epoch's end, and sees exactly
//! the batches the uninterrupted run would have seen.
//!
//! burn's `ModuleOptimizer::load_record` materialises the state on `Device::default()`, which is wgpu when
//! juicer is built with its default `wgpu` feature; the CLI therefore sets `BURN_DEVICE=flex` for `--device cpu`
//! before anything else runs. The state moves to the parameters' device on the next step either way. Should the
//! default device fail to start, the run continues with fresh AdamW moments and says so
//! ([`Report::optimizer_restored`]); model and loader state are restored regardless.

#![allow(dead_code)] // The test binary uses a part of the surface.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::tensor::Device;
use juicer::model::clip::{Clip, ClipConfig, random_token_drop};
use juicer::rng::derive;
use juicer::{DeviceSpec, EpochSize, JuicedBatch, JuicerBuilder, LoaderState, ScorerSpec};
use serde::{Deserialize, Serialize};

/// The fixture shards: 73 photo-caption pairs in 3 shards.
pub const FIXTURE_SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");

/// Serialises seeding + initialisation across runs in one process (the tests run several at once).
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Version of `trainer.json`.
const CHECKPOINT_VERSION: u32 = 1;

/// Everything a run is configured with (the CLI's flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Shard specifications.
    pub shards: Vec<String>,
    /// Train until this global step (a resumed run continues up to it).
    pub steps: u64,
    /// Samples per batch (the contrastive loss needs at least 2).
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Seed of the loader (shuffle, random scorer, caption mix), of the model's initialisation and of the
    /// FLIP drop.
    pub seed: u64,
    /// Device for juicer's models, the batches and the trained model.
    pub device: DeviceSpec,
    /// Share of the patches juicer keeps.
    pub keep_ratio: f32,
    /// Juicer's saliency scorer.
    pub scorer: ScorerSpec,
    /// FLIP's extra random drop of the kept patches, in `[0, 1)`.
    pub flip_drop: f32,
    /// Model input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Decode workers of the loader (`None`: juicer's default, the core count).
    pub decode_workers: Option<usize>,
    /// Checkpoint root directory.
    pub checkpoint: Option<PathBuf>,
    /// Save a checkpoint every this many steps (besides the final one).
    pub save_every: Option<u64>,
    /// Resume from this checkpoint (root or `step-*` directory).
    pub resume: Option<PathBuf>,
    /// Print one line per step.
    pub verbose: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            shards: vec![FIXTURE_SHARDS.to_string()],
            steps: 20,
            batch_size: 16,
            lr: 1e-3,
            weight_decay: 0.01,
            seed: 0,
            device: DeviceSpec::Cpu,
            keep_ratio: 0.5,
            scorer: ScorerSpec::Cam,
            flip_drop: 0.0,
            image_size: 224,
            patch_size: 16,
            decode_workers: None,
            checkpoint: None,
            save_every: None,
            resume: None,
            verbose: true,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    /// Global step, from 1.
    pub step: u64,
    /// Loader epoch the batch came from.
    pub epoch: u64,
    /// Samples in the batch.
    pub samples: usize,
    /// Patches per sample the image tower saw (`K` after padding and the FLIP drop).
    pub tokens: usize,
    /// Contrastive loss.
    pub loss: f32,
    /// Time `next()` blocked waiting for the batch, ms.
    pub wait_ms: f64,
    /// Forward, backward and optimizer step, ms.
    pub compute_ms: f64,
    /// `samples / (wait + compute)`.
    pub samples_per_s: f64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Step the run started from (0, or the checkpoint's).
    pub start_step: u64,
    /// Whether a resumed run restored AdamW's state (false for a fresh run).
    pub optimizer_restored: bool,
    /// Steps run by this call, in order.
    pub steps: Vec<StepLog>,
    /// Loader state after the last batch consumed.
    pub state: Option<LoaderState>,
    /// Checkpoint directories written, in order.
    pub checkpoints: Vec<PathBuf>,
    /// Wall time of the loop.
    pub elapsed: Duration,
}

impl Report {
    /// Mean loss of the steps with index range `range` (into [`Report::steps`]).
    pub fn mean_loss(&self, range: std::ops::Range<usize>) -> f32 {
        let s = &self.steps[range];
        s.iter().map(|l| l.loss).sum::<f32>() / s.len().max(1) as f32
    }
}

/// `trainer.json`: the counters and the loader state of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version.
    pub version: u32,
    /// Global steps done.
    pub step: u64,
    /// Loader epoch of the last batch.
    pub epoch: u64,
    /// Run seed.
    pub seed: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Model configuration (checked on resume).
    pub model: serde_json::Value,
    /// Juicer's iterator state after the last batch consumed.
    pub loader: LoaderState,
}

/// The model configuration for these options: the example's small CLIP over the full patch grid.
pub fn model_config(opts: &TrainOptions) -> ClipConfig {
    ClipConfig::small(opts.image_size / opts.patch_size.max(1), opts.patch_size)
}

/// Trains as `opts` says, calling `observer` after every step with its log and the batch it trained on.
pub fn train(opts: &TrainOptions, observer: &mut dyn FnMut(&StepLog, &JuicedBatch)) -> Result<Report> {
    ensure!(opts.batch_size >= 2, "the contrastive loss needs batches of at least 2 samples");
    ensure!((0.0..1.0).contains(&opts.flip_drop), "--flip-drop must be in [0, 1)");
    ensure!(opts.save_every.is_none() || opts.checkpoint.is_some(), "--save-every needs --checkpoint DIR");
    let device = opts.device.resolve()?;
    let mut builder = JuicerBuilder::new(opts.shards.iter().cloned())
        .batch_size(opts.batch_size)
        .seed(opts.seed)
        .device(opts.device)
        .scorer(opts.scorer.clone())
        .keep_ratio(opts.keep_ratio)
        .image_size(opts.image_size)
        .patch_size(opts.patch_size)
        // Full batches only: an epoch's last, partial batch could hold a single pair (no negatives).
        .epoch_size(EpochSize::DropRemainder);
    if let Some(w) = opts.decode_workers {
        builder = builder.decode_workers(w);
    }
    let loader = builder.build()?;

    // The model trains on the autodiff view of the device; batches join its graph as constants.
    let train_device = device.clone().autodiff();
    let config = model_config(opts);
    let mut model: Clip = {
        // The generator is per backend and process-wide: seed and draw without another run in between.
        let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        train_device.seed(opts.seed);
        config.init(&train_device)?
    };
    let new_optimizer = || AdamWConfig::new().with_weight_decay(opts.weight_decay).init();
    let mut optim = new_optimizer();
    let mut optimizer_restored = false;
    let config_json = serde_json::to_value(&config)?;

    let mut step = 0u64;
    if let Some(dir) = &opts.resume {
        let dir = checkpoint_dir(dir)?;
        let state: TrainerState = serde_json::from_str(
            &fs::read_to_string(dir.join("trainer.json")).with_context(|| format!("reading {}", dir.display()))?,
        )
        .with_context(|| format!("parsing {}/trainer.json", dir.display()))?;
        ensure!(
            state.version == CHECKPOINT_VERSION,
            "checkpoint version {} (expected {CHECKPOINT_VERSION})",
            state.version
        );
        ensure!(state.model == config_json, "the checkpoint's model config differs from this run's");
        ensure!(
            state.batch_size == opts.batch_size,
            "checkpoint batch size {} (this run: {})",
            state.batch_size,
            opts.batch_size
        );
        model = model
            .try_load_file(dir.join("model.bpk"))
            .map_err(|e| anyhow!("loading {}/model.bpk: {e}", dir.display()))?;
        (optim, optimizer_restored) = load_optimizer(new_optimizer, &dir.join("optimizer.bpk"))?;
        loader.resume(state.loader)?;
        step = state.step;
        if opts.verbose {
            println!("resumed from {} at step {step} (epoch {})", dir.display(), state.epoch);
        }
    }

    let started = Instant::now();
    let mut report = Report {
        start_step: step,
        optimizer_restored,
        steps: Vec::new(),
        state: None,
        checkpoints: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut empty_epochs = 0;
    let mut last_saved = step;
    while step < opts.steps {
        let mut epoch = loader.iter()?;
        let mut yielded = false;
        while step < opts.steps {
            let waiting = Instant::now();
            let Some(batch) = epoch.next() else { break };
            let batch = batch?;
            let wait = waiting.elapsed();
            yielded = true;
            let computing = Instant::now();
            let (patches, positions, patch_mask) = if opts.flip_drop > 0.0 {
                random_token_drop(
                    batch.patches.clone(),
                    batch.positions.clone(),
                    batch.patch_mask.clone(),
                    opts.flip_drop,
                    derive(opts.seed, &[0x464c_4950, step]),
                )?
            } else {
                (batch.patches.clone(), batch.positions.clone(), batch.patch_mask.clone())
            };
            let tokens = patches.dims()[1];
            let out = model.forward(patches, positions, patch_mask, batch.tokens.clone(), batch.token_mask.clone());
            let loss: f32 = out.loss.clone().try_into_scalar().map_err(|e| anyhow!("reading the loss: {e:?}"))?;
            ensure!(loss.is_finite(), "the loss diverged at step {}: {loss}", step + 1);
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            model = optim.step(opts.lr, model, grads);
            let compute = computing.elapsed();
            step += 1;
            let total = (wait + compute).as_secs_f64();
            let log = StepLog {
                step,
                epoch: epoch.state().epoch,
                samples: batch.len(),
                tokens,
                loss,
                wait_ms: wait.as_secs_f64() * 1e3,
                compute_ms: compute.as_secs_f64() * 1e3,
                samples_per_s: if total > 0.0 { batch.len() as f64 / total } else { 0.0 },
            };
            if opts.verbose {
                println!(
                    "step {:>5}  epoch {:>2}  loss {:.4}  {:>6.1} samples/s  data wait {:>7.1} ms  compute {:>7.1} ms  tokens {}",
                    log.step, log.epoch, log.loss, log.samples_per_s, log.wait_ms, log.compute_ms, log.tokens
                );
            }
            observer(&log, &batch);
            report.steps.push(log);
            report.state = Some(epoch.state().clone());
            if let (Some(root), Some(every)) = (&opts.checkpoint, opts.save_every)
                && every > 0
                && step.is_multiple_of(every)
            {
                let state = trainer_state(opts, step, epoch.state(), &config_json);
                report.checkpoints.push(save_checkpoint(root, &model, &optim, &state)?);
                last_saved = step;
            }
        }
        // An epoch whose end was reached (also an empty, resumed one) leaves a state that resumes the next.
        report.state = Some(epoch.state().clone());
        empty_epochs = if yielded { 0 } else { empty_epochs + 1 };
        if empty_epochs >= 2 {
            bail!("the loader yields no batches (fewer than {} samples per epoch?)", opts.batch_size);
        }
    }
    if let (Some(root), Some(state)) = (&opts.checkpoint, &report.state)
        && (last_saved != step || report.checkpoints.is_empty())
    {
        let state = trainer_state(opts, step, state, &config_json);
        report.checkpoints.push(save_checkpoint(root, &model, &optim, &state)?);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn trainer_state(opts: &TrainOptions, step: u64, loader: &LoaderState, model: &serde_json::Value) -> TrainerState {
    TrainerState {
        version: CHECKPOINT_VERSION,
        step,
        epoch: loader.epoch,
        seed: opts.seed,
        batch_size: opts.batch_size,
        model: model.clone(),
        loader: loader.clone(),
    }
}

/// Loads AdamW's state. burn materialises it on `Device::default()` first (see the module docs); should that
/// device fail to start (a wgpu build on a machine without any adapter), the run goes on with fresh moments
/// rather than not at all, and says so: `Ok((optimizer, false))`.
fn load_optimizer(fresh: impl Fn() -> ModuleOptimizer, path: &Path) -> Result<(ModuleOptimizer, bool)> {
    let record = OptimizerRecord::load(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    let optim = fresh();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || optim.load_record(record))) {
        Ok(optim) => Ok((optim, true)),
        Err(_) => {
            eprintln!(
                "warning: burn could not restore the optimizer state on its default device {:?}; \
                 continuing with fresh AdamW moments (set BURN_DEVICE to the training backend)",
                Device::default()
            );
            Ok((fresh(), false))
        }
    }
}

/// The checkpoint directory `path` names: a `step-*` directory itself, or the one `path/latest` names.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join("trainer.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    let name = fs::read_to_string(&latest).with_context(|| format!("{} is not a checkpoint", path.display()))?;
    let dir = path.join(name.trim());
    ensure!(
        dir.join("trainer.json").is_file(),
        "{} names {}, which holds no checkpoint",
        latest.display(),
        dir.display()
    );
    Ok(dir)
}

/// Writes `root/step-NNNNNNNN/` atomically and points `root/latest` at it; returns the directory.
pub fn save_checkpoint(root: &Path, model: &Clip, optim: &ModuleOptimizer, state: &TrainerState) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    model.clone().save_file(tmp.join("model.bpk")).map_err(|e| anyhow!("saving the model: {e}"))?;
    optim.save(tmp.join("optimizer.bpk")).map_err(|e| anyhow!("saving the optimizer: {e}"))?;
    write_synced(&tmp.join("trainer.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    let dir = root.join(&name);
    if dir.exists() {
        // Re-saving a step (a resumed run that stops where it started): replace it.
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    let latest_tmp = root.join(format!(".latest.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&latest_tmp, root.join("latest")).with_context(|| format!("updating {}/latest", root.display()))?;
    Ok(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}
