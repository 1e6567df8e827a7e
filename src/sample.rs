//! The sample lifecycle: what an item is at each edge of the stage graph.
//!
//! [`RawSample`] (read from a shard) → [`Decoded`] (pixels) → [`Scored`] (patch scores, class candidates) →
//! [`Pruned`] (kept patch indices) → [`JuicedSample`] (kept patches, scores, classes, tokens: what the batcher
//! sees). Each type is what one edge of the stage graph carries; the stages that produce them live in
//! [`crate::decode`], [`crate::vision`] and [`crate::text`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::patch::patchify;

/// Token context of a CLIP text encoder, `<|startoftext|>` and `<|endoftext|>` included: the length of every
/// token row in a batch, and the budget the enrich stage fits captions into.
pub const CONTEXT: usize = 77;

/// Where a sample sits in the read order of one rank's epoch.
///
/// The read order is: pass after pass over the rank's shards (a pass is one sweep of the rank's shard list in
/// its (seed, epoch, pass) order), each shard's samples in file order. Positions are what a checkpoint stores
/// to rebuild the shuffle buffer exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourcePos {
    /// Sweep over the rank's shard list (0 for the first; more only when an epoch wraps around).
    pub pass: u32,
    /// Index of the shard in this pass's shard order.
    pub shard: u32,
    /// Index of the sample inside the shard, in file order.
    pub index: u32,
}

/// [`SourcePos::index`] of a whole-shard failure (a shard that could not be opened or listed) instead of a
/// sample: the readers emit it, and the checkpoint plan recognises it when it replays a trace.
pub const SHARD_FAILED: u32 = u32::MAX;

/// A sample as read from a source, before any decoding.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// WebDataset key (`dir/name` without extension) or folder entry key.
    pub key: String,
    /// Encoded image bytes (JPEG, PNG or WebP).
    pub image: Bytes,
    /// Extension of the image member, lower-case (`jpg`, `jpeg`, `png`, `webp`), used as a format hint.
    pub image_ext: String,
    /// Caption text (`KEY.txt`), when present.
    pub caption: Option<String>,
    /// Metadata (`KEY.json`), when present.
    pub meta: Option<serde_json::Value>,
}

impl RawSample {
    /// A sample that did not come from a shard (see [`crate::Juicer::juice`]): the image format is read from
    /// its bytes; no metadata.
    pub fn in_memory(key: impl Into<String>, image: impl Into<Bytes>, caption: Option<String>) -> Self {
        Self { key: key.into(), image: image.into(), image_ext: String::new(), caption, meta: None }
    }
}

/// A decoded sample: normalised pixels at model resolution.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Sample key.
    pub key: String,
    /// Normalised pixels, channel-major `[3, size, size]`.
    pub pixels: Vec<f32>,
    /// Side of the square model input, in pixels.
    pub size: usize,
    /// Original image size `(width, height)` before resizing.
    pub orig_size: (u32, u32),
    /// Caption text, when present.
    pub caption: Option<String>,
    /// Metadata, when present.
    pub meta: Option<serde_json::Value>,
}

/// An object concept extracted from an image: an ImageNet class, or a WordNet hypernym of classes ("lizard")
/// when the tree rule collapses uncertain alternatives into it. Serialised as `{"id", "wnid", "name", "prob"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    /// Class index in the classifier's label space (ImageNet-1k for the embedded MobileNetV2); `None` for a
    /// hypernym.
    pub id: Option<u32>,
    /// WordNet 3.0 noun synset id (`"n########"`); empty when the vocabulary has no hierarchy.
    pub wnid: String,
    /// Display name (torchvision's category name for a class, WordNet's first lemma for a hypernym, or the
    /// vocabulary's name).
    pub name: String,
    /// Full-image probability: a class's softmax probability, a hypernym's summed probability of the classes
    /// under it.
    pub prob: f32,
}

/// One sample as the batcher receives it.
///
/// `patches` holds the kept patches only, each flattened channel-major as `[3, P, P]` (the layout a
/// `Conv2d` patch embedding with kernel = stride = P flattens to), and `positions` their row-major index in
/// the `grid`.
#[derive(Debug, Clone)]
pub struct JuicedSample {
    /// Sample key.
    pub key: String,
    /// Patch grid `(rows, cols)` of the model input.
    pub grid: (usize, usize),
    /// Patch side P in pixels.
    pub patch: usize,
    /// Kept patches, `[K, 3·P·P]` row-major.
    pub patches: Vec<f32>,
    /// Row-major grid index of each kept patch, sorted ascending, `len() == K`.
    pub positions: Vec<u32>,
    /// Raw saliency score of every patch, row-major over the grid (empty for the `none` scorer).
    pub scores: Vec<f32>,
    /// Classes extracted from the kept patches.
    pub classes: Vec<Class>,
    /// Original caption, when present.
    pub caption: Option<String>,
    /// The caption the model trains on: enriched with the classes the caption does not mention, or the original
    /// when `mix` drew it (empty when there is neither caption nor class).
    pub enriched: String,
    /// Classes actually added to the caption.
    pub added: Vec<Class>,
    /// CLIP tokens of `enriched`, `<|startoftext|>` … `<|endoftext|>` inclusive, at most 77, no padding.
    pub tokens: Vec<u32>,
    /// Metadata, when present.
    pub meta: Option<serde_json::Value>,
}

impl JuicedSample {
    /// Number of kept patches K.
    pub fn kept(&self) -> usize {
        self.positions.len()
    }
}

/// A class candidate with its activation map on the patch grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Class id.
    pub id: u32,
    /// Full-image probability.
    pub prob: f32,
    /// Class activation map resampled to the patch grid, row-major.
    pub map: Vec<f32>,
}

/// A decoded sample with its patch scores.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The decoded sample (pixels kept for the classifier when it still has to run).
    pub sample: Decoded,
    /// Patch grid.
    pub grid: (usize, usize),
    /// Patch side.
    pub patch: usize,
    /// Raw scores, row-major.
    pub scores: Vec<f32>,
    /// Full-image probability of every class when the scorer's forward already produced them (cam); empty
    /// otherwise.
    pub probs: Vec<f32>,
    /// The most probable classes with their maps when the scorer's forward already produced them (cam).
    pub candidates: Option<Vec<Candidate>>,
}

/// A scored sample with its kept patch indices.
#[derive(Debug, Clone)]
pub struct Pruned {
    /// The scored sample.
    pub scored: Scored,
    /// Kept patch indices, sorted.
    pub kept: Vec<u32>,
}

impl Pruned {
    /// Keeps every patch of a scored sample.
    pub fn keep_all(scored: Scored) -> Self {
        let kept = (0..(scored.grid.0 * scored.grid.1) as u32).collect();
        Pruned { scored, kept }
    }

    /// The sample the batcher sees: the kept patches cut from the pixels, with `classes`; caption enrichment and
    /// tokens are still to come.
    pub fn into_juiced(self, classes: Vec<Class>) -> JuicedSample {
        let Pruned { scored, kept } = self;
        let d = scored.sample;
        JuicedSample {
            patches: patchify(&d.pixels, d.size, scored.patch, &kept),
            positions: kept,
            key: d.key,
            grid: scored.grid,
            patch: scored.patch,
            scores: scored.scores,
            classes,
            caption: d.caption,
            enriched: String::new(),
            added: Vec::new(),
            tokens: Vec::new(),
            meta: d.meta,
        }
    }
}
