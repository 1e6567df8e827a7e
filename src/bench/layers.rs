//! Where the `cam` scorer's time goes on one device, layer kind by layer kind: `juicer bench --layers`.
//!
//! One round runs what the scorer runs for one micro-batch, in its order, with a device sync after every step
//! and the wall-clock time between two syncs charged to the step:
//! 1. `upload`: the micro-batch stacked on the host and sent to the device (`[B, 3, 224, 224]` f32);
//! 2. `features`, layer by layer ([`MobileNetV2::forward_features_observed`]): the stem, the 16 expansion 1×1
//!    convolutions, the 17 depthwise 3×3, the 17 projection 1×1 (with their residual adds) and the head 1×1,
//!    each with its folded BatchNorm bias and ReLU6;
//! 3. `classifier`: mean over H×W and the Linear layer (logits);
//! 4. `read back`: features `[B, 1280, 7, 7]` and logits `[B, 1000]` copied to the host;
//! 5. `host CAM`: softmax, the top-5 classes and their activation maps resampled to the 14×14 patch grid.
//!
//! A sync after every layer keeps the device from overlapping one layer with the next, so the rows add up to
//! more than the scorer spends: the report also times the scorer's own `classify` on the same micro-batch
//! without any sync in between (`end to end`), the figure the rows divide up. On the CPU backend the scorer
//! runs its host kernels ([`crate::model::depthwise`], [`crate::model::pointwise`]), not burn's ops: the rows
//! then describe burn's path and only `end to end` what runs.
//!
//! Kernel dispatches per forward are what CubeCL's profiling log lists (`CUBECL_DEBUG_LOG=FILE
//! CUBECL_DEBUG_OPTION=profile juicer bench --layers --layer-rounds 1 --layer-warmup 0`): one line per kernel.
//!
//! Like the rest of the harness this is measurement only: no test asserts a duration.
//!
//! [`MobileNetV2::forward_features_observed`]: crate::model::mobilenet_v2::MobileNetV2::forward_features_observed

use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde::Serialize;

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::model::mobilenet_v2::{INPUT_SIZE, LayerKind};
use crate::rng::SplitMix64;
use crate::vision::auto_micro_batch;
use crate::vision::score::{Classifier, read_back, stack_images};

/// Version of the JSON layout of [`LayerProfile`].
pub const SCHEMA: u32 = 1;

/// Classes whose activation maps the host CAM step computes (the scorer's `cam_top` default).
const CAM_TOP: usize = 5;

/// The patch grid the maps are resampled to (224 / 16).
const GRID: (usize, usize) = (14, 14);

/// One row of the profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRow {
    /// `upload`, a [`LayerKind::name`], `classifier`, `read back` or `host CAM`.
    pub name: String,
    /// Layers of this kind in one forward (1 for the steps that are not layers).
    pub layers: usize,
    /// Milliseconds per micro-batch (median over the rounds).
    pub ms_per_batch: f64,
    /// `ms_per_batch` divided by the micro-batch size.
    pub ms_per_image: f64,
    /// Share of the synced total.
    pub share: f64,
}

/// What `juicer bench --layers` measures (module docs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerProfile {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The device as asked for (`wgpu:0`, `cpu`, ...).
    pub device: String,
    /// Images per micro-batch.
    pub micro_batch: usize,
    /// Measured rounds (each one micro-batch); rows are medians over them.
    pub rounds: usize,
    /// Untimed rounds before them (kernel compilation, autotuning, allocator warm-up).
    pub warmup: usize,
    /// The rows, in the order the scorer runs them.
    pub rows: Vec<LayerRow>,
    /// Sum of the rows per micro-batch: everything, with a sync after every step.
    pub synced_ms_per_batch: f64,
    /// The scorer's own `classify` on the same micro-batch, no sync in between (median over the rounds).
    pub end_to_end_ms_per_batch: f64,
    /// `end_to_end_ms_per_batch` per image.
    pub end_to_end_ms_per_image: f64,
}

/// Profiles the embedded MobileNetV2 on `spec` with micro-batches of `micro_batch` images (0: the pipeline's
/// default on that device, [`auto_micro_batch`]): `warmup` untimed rounds, then `rounds` timed ones (module
/// docs).
///
/// # Errors
/// [`Error::Device`] when the device cannot be opened or fails a sync; [`Error::Config`] for zero `rounds`.
pub fn profile(spec: DeviceSpec, micro_batch: usize, rounds: usize, warmup: usize) -> Result<LayerProfile> {
    if rounds == 0 {
        return Err(Error::Config(vec!["--layers needs a round count above 0".into()]));
    }
    let device = spec.resolve()?;
    let micro_batch = if micro_batch == 0 { auto_micro_batch(&device) } else { micro_batch };
    let classifier = Classifier::load(None, &device)?;
    let model = classifier
        .mobilenet()
        .ok_or_else(|| Error::Config(vec!["--layers profiles MobileNetV2, the cam scorer's model".into()]))?;
    let images = random_images(micro_batch);
    let slices: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
    let sync = |device: &Device| {
        device.sync().map_err(|e| Error::Device { device: spec.to_string(), detail: format!("sync failed: {e:?}") })
    };

    let steps = 4 + LayerKind::ALL.len(); // upload, the kinds, classifier, read back, host CAM
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); steps];
    let mut end_to_end = Vec::with_capacity(rounds);
    let mut counts = [0usize; LayerKind::ALL.len()];
    for round in 0..warmup + rounds {
        let timed = round >= warmup;
        let mut per = vec![Duration::ZERO; steps];
        let mut kinds = [0usize; LayerKind::ALL.len()];
        sync(&device)?;
        let mut mark = Instant::now();
        let mut lap = |slot: usize, per: &mut Vec<Duration>, device: &Device| -> Result<()> {
            sync(device)?;
            let now = Instant::now();
            per[slot] += now - mark;
            mark = now;
            Ok(())
        };

        let x = stack_images(slices.iter().copied(), INPUT_SIZE, &device);
        lap(0, &mut per, &device)?;
        let mut failed = None;
        let features = model.forward_features_observed(x, &mut |kind, _| {
            let k = kind as usize;
            kinds[k] += 1;
            if failed.is_none()
                && let Err(e) = lap(1 + k, &mut per, &device)
            {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let logits = model.classify(features.clone());
        lap(steps - 3, &mut per, &device)?;
        let host = read_back(features, logits).map_err(|e| device_error(spec, e))?;
        lap(steps - 2, &mut per, &device)?;
        std::hint::black_box(classifier.candidates(&host, GRID, CAM_TOP));
        lap(steps - 1, &mut per, &device)?;

        let t = Instant::now();
        classifier.classify(&slices, INPUT_SIZE, GRID, CAM_TOP).map_err(|e| device_error(spec, e))?;
        let whole = t.elapsed();
        if timed {
            for (s, d) in samples.iter_mut().zip(per) {
                s.push(d);
            }
            end_to_end.push(whole);
            counts = kinds;
        }
    }

    let mut names = vec![("upload".to_string(), 1)];
    names.extend(LayerKind::ALL.iter().map(|k| (k.name().to_string(), counts[*k as usize])));
    names.extend([("classifier".to_string(), 1), ("read back".to_string(), 1), ("host CAM".to_string(), 1)]);
    let medians: Vec<f64> = samples.iter_mut().map(|s| median_ms(s)).collect();
    let total: f64 = medians.iter().sum();
    let rows = names
        .into_iter()
        .zip(&medians)
        .map(|((name, layers), &ms)| LayerRow {
            name,
            layers,
            ms_per_batch: ms,
            ms_per_image: ms / micro_batch as f64,
            share: if total > 0.0 { ms / total } else { 0.0 },
        })
        .collect();
    let e2e = median_ms(&mut end_to_end);
    Ok(LayerProfile {
        schema: SCHEMA,
        device: spec.to_string(),
        micro_batch,
        rounds,
        warmup,
        rows,
        synced_ms_per_batch: total,
        end_to_end_ms_per_batch: e2e,
        end_to_end_ms_per_image: e2e / micro_batch as f64,
    })
}

fn device_error(spec: DeviceSpec, detail: String) -> Error {
    Error::Device { device: spec.to_string(), detail }
}

/// `n` images of ImageNet-normalised noise (the kernels' cost does not depend on the pixels).
fn random_images(n: usize) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(0x1a7e_5eed);
    (0..n).map(|_| (0..3 * INPUT_SIZE * INPUT_SIZE).map(|_| (rng.unit_f64() * 4.0 - 2.0) as f32).collect()).collect()
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// The profile as a text table.
pub fn render(p: &LayerProfile) -> String {
    let mut out = format!(
        "MobileNetV2 forward on {} by layer kind: micro-batch {}, median of {} rounds after {} warm-up, a device \
         sync after every step\n",
        p.device, p.micro_batch, p.rounds, p.warmup
    );
    out.push_str(&format!("{:<16} {:>6} {:>12} {:>12} {:>7}\n", "step", "layers", "ms/batch", "ms/image", "share"));
    for r in &p.rows {
        out.push_str(&format!(
            "{:<16} {:>6} {:>12.3} {:>12.3} {:>6.1}%\n",
            r.name,
            r.layers,
            r.ms_per_batch,
            r.ms_per_image,
            r.share * 100.0
        ));
    }
    out.push_str(&format!(
        "{:<16} {:>6} {:>12.3} {:>12.3}\n",
        "synced total",
        "",
        p.synced_ms_per_batch,
        p.synced_ms_per_batch / p.micro_batch as f64
    ));
    out.push_str(&format!(
        "{:<16} {:>6} {:>12.3} {:>12.3}   (the scorer's classify, no syncs)\n",
        "end to end", "", p.end_to_end_ms_per_batch, p.end_to_end_ms_per_image
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_of_the_network_is_charged_to_its_kind() {
        let p = profile(DeviceSpec::Cpu, 1, 1, 0).unwrap();
        let layers: Vec<(&str, usize)> = p.rows.iter().map(|r| (r.name.as_str(), r.layers)).collect();
        assert_eq!(
            layers,
            [
                ("upload", 1),
                ("stem 3x3", 1),
                ("expand 1x1", 16),
                ("depthwise 3x3", 17),
                ("project 1x1", 17),
                ("head 1x1", 1),
                ("classifier", 1),
                ("read back", 1),
                ("host CAM", 1)
            ]
        );
        let shares: f64 = p.rows.iter().map(|r| r.share).sum();
        assert!((shares - 1.0).abs() < 1e-9, "shares add up to the synced total: {shares}");
        assert!(p.rows.iter().all(|r| r.ms_per_batch > 0.0), "every step is timed: {p:?}");
        assert!(render(&p).contains("depthwise 3x3"));
        assert!(profile(DeviceSpec::Cpu, 1, 0, 0).is_err());
        assert_eq!(profile(DeviceSpec::Cpu, 0, 1, 0).unwrap().micro_batch, 4, "0: the CPU's default micro-batch");
    }
}
