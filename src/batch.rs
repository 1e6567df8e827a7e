//! Collating samples into burn tensors: [`JuicedBatch`] and its [`JuicedBatcher`].
//!
//! The default batcher pads every sample's kept patches to `K = max kept in the batch` (or a fixed budget)
//! and marks real patches in `patch_mask`. Users who want another layout plug their own
//! `burn::data::dataloader::batcher::Batcher<JuicedSample, O>` into the builder instead.
//!
//! Until the text branch lands the batch carries no caption tokens, only the caption strings on the host side.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::sample::{Class, JuicedSample};

/// A batch of juiced samples on the target device.
#[derive(Debug, Clone)]
pub struct JuicedBatch {
    /// Kept patches, padded with zeros: `[B, K, 3·P·P]`.
    pub patches: Tensor<3>,
    /// Row-major grid index of each kept patch (for positional embeddings), padding 0: `[B, K]`.
    pub positions: Tensor<2, Int>,
    /// True where `patches` holds a real patch: `[B, K]`.
    pub patch_mask: Tensor<2, Bool>,
    /// Sample keys, host side.
    pub keys: Vec<String>,
    /// Original captions, host side.
    pub captions: Vec<Option<String>>,
    /// Raw patch scores per sample, host side.
    pub scores: Vec<Vec<f32>>,
    /// Kept patch indices per sample (unpadded `positions`), host side.
    pub kept: Vec<Vec<u32>>,
    /// Extracted classes per sample, host side.
    pub classes: Vec<Vec<Class>>,
    /// Patch grid `(rows, cols)` shared by the batch.
    pub grid: (usize, usize),
    /// Patch side P in pixels.
    pub patch: usize,
}

impl JuicedBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The default batcher: pads to the batch's max kept count, or to a fixed `budget` when set (samples with
/// more kept patches than the budget keep their first `budget` patches in index order).
#[derive(Debug, Clone, Copy, Default)]
pub struct JuicedBatcher {
    /// Fixed K for every batch (`None`: the max kept count of each batch).
    pub budget: Option<usize>,
}

impl Batcher<JuicedSample, JuicedBatch> for JuicedBatcher {
    fn batch(&self, items: Vec<JuicedSample>, device: &Device) -> JuicedBatch {
        let b = items.len();
        let (grid, patch) = items.first().map(|s| (s.grid, s.patch)).unwrap_or(((0, 0), 0));
        let dim = 3 * patch * patch;
        let k = self.budget.unwrap_or_else(|| items.iter().map(JuicedSample::kept).max().unwrap_or(0));
        let mut patches = vec![0f32; b * k * dim];
        let mut positions = vec![0i64; b * k];
        let mut mask = vec![false; b * k];
        let mut keys = Vec::with_capacity(b);
        let mut captions = Vec::with_capacity(b);
        let mut scores = Vec::with_capacity(b);
        let mut kept = Vec::with_capacity(b);
        let mut classes = Vec::with_capacity(b);
        for (i, s) in items.into_iter().enumerate() {
            let n = s.kept().min(k);
            patches[i * k * dim..(i * k + n) * dim].copy_from_slice(&s.patches[..n * dim]);
            for (j, &p) in s.positions.iter().take(n).enumerate() {
                positions[i * k + j] = i64::from(p);
                mask[i * k + j] = true;
            }
            keys.push(s.key);
            captions.push(s.caption);
            scores.push(s.scores);
            kept.push(s.positions);
            classes.push(s.classes);
        }
        JuicedBatch {
            patches: Tensor::from_data(TensorData::new(patches, [b, k, dim]), device),
            positions: Tensor::from_data(TensorData::new(positions, [b, k]), device),
            patch_mask: Tensor::from_data(TensorData::new(mask, [b, k]), device),
            keys,
            captions,
            scores,
            kept,
            classes,
            grid,
            patch,
        }
    }
}
