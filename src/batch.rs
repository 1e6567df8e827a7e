//! Collating samples into burn tensors: [`JuicedBatch`] and its [`JuicedBatcher`].
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
        // Built by appending: each sample's patches, then zeros only for its padding (a zero-filled
        // `[B, K, D]` buffer would be written twice, 19 MB per batch of 32 uncut 224-px samples).
        let mut patches = Vec::with_capacity(b * k * dim);
        let mut positions = vec![0i64; b * k];
        let mut mask = vec![false; b * k];
        let ctx = CONTEXT;
        let mut tokens = vec![0i64; b * ctx];
        let mut token_mask = vec![false; b * ctx];
        let mut enriched = Vec::with_capacity(b);
        let mut added = Vec::with_capacity(b);
        let mut token_ids = Vec::with_capacity(b);
        let mut keys = Vec::with_capacity(b);
        let mut captions = Vec::with_capacity(b);
        let mut scores = Vec::with_capacity(b);
        let mut kept = Vec::with_capacity(b);
        let mut classes = Vec::with_capacity(b);
        for (i, s) in items.into_iter().enumerate() {
            let n = s.kept().min(k);
            patches.extend_from_slice(&s.patches[..n * dim]);
            patches.resize((i + 1) * k * dim, 0.0);
            for (j, &p) in s.positions.iter().take(n).enumerate() {
                positions[i * k + j] = i64::from(p);
                mask[i * k + j] = true;
            }
            for (j, &t) in s.tokens.iter().take(ctx).enumerate() {
                tokens[i * ctx + j] = i64::from(t);
                token_mask[i * ctx + j] = true;
            }
            enriched.push(s.enriched);
            added.push(s.added);
            token_ids.push(s.tokens);
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
            tokens: Tensor::from_data(TensorData::new(tokens, [b, ctx]), device),
            token_mask: Tensor::from_data(TensorData::new(token_mask, [b, ctx]), device),
            enriched,
            added,
            token_ids,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &str, kept: &[u32], dim: usize) -> JuicedSample {
        JuicedSample {
            key: key.into(),
            grid: (2, 2),
            patch: 1,
            patches: kept.iter().flat_map(|&p| vec![p as f32 + 1.0; dim]).collect(),
            positions: kept.to_vec(),
            scores: Vec::new(),
            classes: Vec::new(),
            caption: None,
            enriched: String::new(),
            added: Vec::new(),
            tokens: vec![49406, 320, 49407],
            meta: None,
        }
    }

    #[test]
    fn pads_to_the_largest_kept_count_or_cuts_to_the_budget() {
        let device = Device::flex();
        let items = || vec![sample("a", &[0, 3], 3), sample("b", &[2], 3), sample("c", &[], 3)];
        let batch = JuicedBatcher::default().batch(items(), &device);
        assert_eq!(batch.patches.dims(), [3, 2, 3]);
        let patches = batch.patches.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(patches, [[1.0; 3], [4.0; 3], [3.0; 3], [0.0; 3], [0.0; 3], [0.0; 3]].concat());
        let positions: Vec<i64> = batch.positions.into_data().iter::<i64>().collect();
        assert_eq!(positions, [0, 3, 2, 0, 0, 0]);
        let mask: Vec<bool> = batch.patch_mask.into_data().iter::<bool>().collect();
        assert_eq!(mask, [true, true, true, false, false, false]);
        let tokens: Vec<i64> = batch.tokens.into_data().iter::<i64>().collect();
        assert_eq!(&tokens[..4], &[49406, 320, 49407, 0]);

        let cut = JuicedBatcher { budget: Some(1) }.batch(items(), &device);
        assert_eq!(cut.patches.into_data().try_to_vec::<f32>().unwrap(), [[1.0; 3], [3.0; 3], [0.0; 3]].concat());
        assert_eq!(cut.kept[0], [0, 3], "the host side keeps every kept index");
    }
}
