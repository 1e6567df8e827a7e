//! Collating samples: [`HostBatch::collate`] into host buffers, then burn tensors ([`JuicedBatch`], built by
//! [`JuicedBatcher`]); [`ArrayBatcher`] stops at the host buffers.
//!
//! The default batcher pads every sample's kept patches to `K = max kept in the batch` (or a fixed budget)
//! and marks real patches in `patch_mask`. Users who want another layout plug their own
//! `burn::data::dataloader::batcher::Batcher<JuicedSample, O>` into the builder instead.
//!
//! Caption tokens are padded to CLIP's context of 77 with zeros; `token_mask` marks the real ones.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::sample::{CONTEXT, Class, JuicedSample};

/// A batch of juiced samples on the target device.
#[derive(Debug, Clone)]
pub struct JuicedBatch {
    /// Kept patches, padded with zeros: `[B, K, 3·P·P]`.
    pub patches: Tensor<3>,
    /// Row-major grid index of each kept patch (for positional embeddings), padding 0: `[B, K]`.
    pub positions: Tensor<2, Int>,
    /// True where `patches` holds a real patch: `[B, K]`.
    pub patch_mask: Tensor<2, Bool>,
    /// CLIP tokens of the enriched captions, zero padded: `[B, 77]`.
    pub tokens: Tensor<2, Int>,
    /// True where `tokens` holds a real token (`<|startoftext|>` to `<|endoftext|>`): `[B, 77]`.
    pub token_mask: Tensor<2, Bool>,
    /// Sample keys, host side.
    pub keys: Vec<String>,
    /// Original captions, host side.
    pub captions: Vec<Option<String>>,
    /// Enriched captions (what `tokens` encode), host side.
    pub enriched: Vec<String>,
    /// Classes added to each caption, host side.
    pub added: Vec<Vec<Class>>,
    /// Unpadded tokens per sample, host side.
    pub token_ids: Vec<Vec<u32>>,
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

/// A batch collated on the host: the same layout as [`JuicedBatch`], in plain row-major buffers a caller hands
/// to another framework without a copy (the Python package wraps these `Vec`s as numpy arrays).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostBatch {
    /// Kept patches, padded with zeros: `[B, K, 3·P·P]`, row-major.
    pub patches: Vec<f32>,
    /// Row-major grid index of each kept patch, padding 0: `[B, K]`.
    pub positions: Vec<i64>,
    /// True where `patches` holds a real patch: `[B, K]`.
    pub patch_mask: Vec<bool>,
    /// CLIP tokens of the enriched captions, zero padded: `[B, 77]`.
    pub tokens: Vec<i64>,
    /// True where `tokens` holds a real token: `[B, 77]`.
    pub token_mask: Vec<bool>,
    /// `(B, K, 3·P·P)`.
    pub shape: (usize, usize, usize),
    /// Sample keys.
    pub keys: Vec<String>,
    /// Original captions.
    pub captions: Vec<Option<String>>,
    /// Enriched captions (what `tokens` encode).
    pub enriched: Vec<String>,
    /// Classes added to each caption.
    pub added: Vec<Vec<Class>>,
    /// Unpadded tokens per sample.
    pub token_ids: Vec<Vec<u32>>,
    /// Raw patch scores per sample.
    pub scores: Vec<Vec<f32>>,
    /// Kept patch indices per sample (unpadded `positions`).
    pub kept: Vec<Vec<u32>>,
    /// Extracted classes per sample.
    pub classes: Vec<Vec<Class>>,
    /// Patch grid `(rows, cols)` shared by the batch.
    pub grid: (usize, usize),
    /// Patch side P in pixels.
    pub patch: usize,
}

impl HostBatch {
    /// Collates samples: pads every sample's kept patches to `K = budget`, or to the batch's max kept count when
    /// `budget` is `None` (a sample with more kept patches than the budget keeps its first `budget` in index
    /// order); tokens are padded to CLIP's context of 77.
    pub fn collate(items: Vec<JuicedSample>, budget: Option<usize>) -> Self {
        let b = items.len();
        let (grid, patch) = items.first().map(|s| (s.grid, s.patch)).unwrap_or(((0, 0), 0));
        let dim = 3 * patch * patch;
        let k = budget.unwrap_or_else(|| items.iter().map(JuicedSample::kept).max().unwrap_or(0));
        // Built by appending: each sample's patches, then zeros only for its padding (a zero-filled
        // `[B, K, D]` buffer would be written twice, 19 MB per batch of 32 uncut 224-px samples).
        let mut out = HostBatch {
            patches: Vec::with_capacity(b * k * dim),
            positions: vec![0; b * k],
            patch_mask: vec![false; b * k],
            tokens: vec![0; b * CONTEXT],
            token_mask: vec![false; b * CONTEXT],
            shape: (b, k, dim),
            grid,
            patch,
            ..Default::default()
        };
        for (i, s) in items.into_iter().enumerate() {
            let n = s.kept().min(k);
            out.patches.extend_from_slice(&s.patches[..n * dim]);
            out.patches.resize((i + 1) * k * dim, 0.0);
            for (j, &p) in s.positions.iter().take(n).enumerate() {
                out.positions[i * k + j] = i64::from(p);
                out.patch_mask[i * k + j] = true;
            }
            for (j, &t) in s.tokens.iter().take(CONTEXT).enumerate() {
                out.tokens[i * CONTEXT + j] = i64::from(t);
                out.token_mask[i * CONTEXT + j] = true;
            }
            out.enriched.push(s.enriched);
            out.added.push(s.added);
            out.token_ids.push(s.tokens);
            out.keys.push(s.key);
            out.captions.push(s.caption);
            out.scores.push(s.scores);
            out.kept.push(s.positions);
            out.classes.push(s.classes);
        }
        out
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Moves the buffers into tensors on `device`.
    pub fn into_tensors(self, device: &Device) -> JuicedBatch {
        let (b, k, dim) = self.shape;
        JuicedBatch {
            patches: Tensor::from_data(TensorData::new(self.patches, [b, k, dim]), device),
            positions: Tensor::from_data(TensorData::new(self.positions, [b, k]), device),
            patch_mask: Tensor::from_data(TensorData::new(self.patch_mask, [b, k]), device),
            tokens: Tensor::from_data(TensorData::new(self.tokens, [b, CONTEXT]), device),
            token_mask: Tensor::from_data(TensorData::new(self.token_mask, [b, CONTEXT]), device),
            enriched: self.enriched,
            added: self.added,
            token_ids: self.token_ids,
            keys: self.keys,
            captions: self.captions,
            scores: self.scores,
            kept: self.kept,
            classes: self.classes,
            grid: self.grid,
            patch: self.patch,
        }
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
        HostBatch::collate(items, self.budget).into_tensors(device)
    }
}

/// The host-side batcher: [`HostBatch`]es, no device involved (`JuicedBatch::builder(..).build_with(ArrayBatcher
/// { budget: None })`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ArrayBatcher {
    /// Fixed K for every batch (`None`: the max kept count of each batch).
    pub budget: Option<usize>,
}

impl Batcher<JuicedSample, HostBatch> for ArrayBatcher {
    fn batch(&self, items: Vec<JuicedSample>, _device: &Device) -> HostBatch {
        HostBatch::collate(items, self.budget)
    }
}
