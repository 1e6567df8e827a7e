//! The sample lifecycle: what an item is at each edge of the stage graph.
//!
//! [`RawSample`] (read from a shard) → [`Decoded`] (pixels) → `Scored` → `Pruned` (see [`crate::vision`]) →
//! [`JuicedSample`] (kept patches, scores, classes: what the batcher sees).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

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

/// An object class extracted from an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    /// Class index in the classifier's label space (ImageNet-1k for the embedded MobileNetV2).
    pub id: u32,
    /// Class name (the first synonym of the ImageNet label, or the vocabulary's name).
    pub name: String,
    /// Softmax probability on the full image.
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
