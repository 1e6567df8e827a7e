//! torchvision's MobileNetV2 (ImageNet-1k) in burn, loading torchvision's `state_dict` key names from safetensors.
//!
//! The module tree mirrors torchvision's exactly, so the tensor paths of [`MobileNetV2`] *are* torchvision's key
//! names (`features.0.0.weight`, `features.3.conv.1.1.running_var`, `classifier.1.bias`, ...) and loading needs no
//! key remapping:
//! - `features.0` and `features.18` are `Conv2dNormActivation` (conv `0`, BatchNorm `1`, ReLU6): a [`ConvBn`] tuple
//!   inside [`Feature::ConvBnRelu6`];
//! - `features.1` ... `features.17` are [`InvertedResidual`] blocks whose `conv` Sequential is an
//!   [`InvertedResidualConv`] tuple (the enum variant names are skipped in the paths when loading);
//! - `classifier` is `(Dropout(0.2), Linear(1280 → 1000))`.
//!
//! Every conv has no bias and is followed by BatchNorm (eps 1e-5, running statistics); padding is `(k-1)/2`.
//!
//! # Inference preparation
//! [`MobileNetV2::fold_batch_norms`] folds every BatchNorm into its convolution once the weights are loaded:
//! `W' = W · γ/√(σ²+ε)` per output channel and a bias `b' = β − μ · γ/√(σ²+ε)`, which is the same affine map with
//! one elementwise pass less per layer (exact up to float rounding). A conv that carries a bias is a folded one
//! (torchvision's convs here have none), so the forward skips its BatchNorm; the tree and its key names stay
//! torchvision's. ReLU6 runs as `relu` then `clamp_max`, which vectorise on the CPU backend (burn's `clamp` runs a
//! scalar loop there, 13× slower per element). On the CPU backend all of `features` then runs on host memory as
//! [`HostFeatures`], kept in [`MobileNetV2::host`]: the depthwise layers with their ReLU6 (and the expansion's,
//! fused into the input copy) as one kernel each ([`super::depthwise`]; 2.6× faster than burn's, measured), the
//! 1×1 convolutions and the stem (after an im2col) as GEMMs with the bias and the residual fused
//! ([`super::pointwise`]): one host copy in and one out per forward instead of a tensor op per pass.
//!
//! Loading ([`load`], [`load_bytes`], [`embedded`]) is strict: before any tensor is read, the safetensors header is
//! checked against the tensors the model expects (names, shapes, `F32` dtype, byte ranges inside the file), and any
//! missing, extra, misshaped, wrongly typed or truncated tensor fails with [`Error::Weights`] naming the file and
//! the tensor. The weights are then applied with burn-store's [`SafetensorsStore`](burn::store::SafetensorsStore)
//! and [`PyTorchToBurnAdapter`](burn::store::PyTorchToBurnAdapter) (which transposes the Linear weight and maps
//! BatchNorm `weight`/`bias` to `gamma`/`beta`).
//!
//! The embedded weights are torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` (BSD-3-Clause, see
//! `fixtures/mobilenet_v2/LICENSE-torchvision`).

use std::path::Path;
use std::sync::{Arc, LazyLock};

use burn::config::Config;
use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::depthwise::HostDepthwise;
use super::pointwise::{HostPointwise, expand_if_any, im2col_3x3};
use super::safetensors;
use crate::error::{Error, Result};

/// Number of channels of the feature map returned by [`MobileNetV2::forward_features`].
pub const FEATURE_CHANNELS: usize = 1280;

/// Number of ImageNet-1k classes of the pretrained classifier.
pub const NUM_CLASSES: usize = 1000;

/// Side of the input the pretrained model expects (the 224×224 centre crop).
pub const INPUT_SIZE: usize = 224;

/// Total stride of [`MobileNetV2::forward_features`]: a 224×224 input gives a 7×7 feature map.
pub const STRIDE: usize = 32;

/// The ImageNet normalisation (`(x/255 - mean) / std`) the pretrained weights expect; one copy, in
/// [`crate::decode`].
pub use crate::decode::{IMAGENET_MEAN, IMAGENET_STD};

/// The `file` reported in errors for the weights embedded by [`embedded`].
pub const EMBEDDED_WEIGHTS_NAME: &str = "<embedded> fixtures/mobilenet_v2/mobilenet_v2.safetensors";

/// The `file` reported in errors for weights given to [`load_bytes`].
pub const BYTES_WEIGHTS_NAME: &str = "<in-memory safetensors>";

/// torchvision's `IMAGENET1K_V1` MobileNetV2 weights (262 `F32` tensors, 14 MB), embedded in the binary.
static EMBEDDED_WEIGHTS: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mobilenet_v2/mobilenet_v2.safetensors"));

/// The bytes of the embedded weights (for fingerprints: the score cache keys its entries by them).
pub fn embedded_weights() -> &'static [u8] {
    EMBEDDED_WEIGHTS
}

/// The 1000 ImageNet class names, one a line, in class-index order.
static IMAGENET_CLASSES_TXT: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mobilenet_v2/imagenet_classes.txt"));

static IMAGENET_CLASSES: LazyLock<Vec<&'static str>> = LazyLock::new(|| IMAGENET_CLASSES_TXT.lines().collect());

/// The 1000 ImageNet-1k class names in class-index order (`imagenet_classes()[388] == "giant panda"`), as
/// torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]`.
pub fn imagenet_classes() -> &'static [&'static str] {
    &IMAGENET_CLASSES
}

/// The inverted residual settings of torchvision's MobileNetV2 (width multiplier 1.0): expansion `t`, output
/// channels `c`, repeats `n`, stride of the first repeat `s`.
const INVERTED_RESIDUAL_SETTING: [(usize, usize, usize, usize); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

/// Output channels of `features.0`.
const STEM_CHANNELS: usize = 32;

/// A convolution (no bias) followed by BatchNorm: torchvision's `Conv2dNormActivation` minus its (weightless)
/// activation. The tuple indices are torchvision's Sequential indices: `0` is the conv, `1` the BatchNorm.
pub type ConvBn = (Conv2d, BatchNorm);

/// Configuration of a [`MobileNetV2`], created with [`MobileNetV2Config::new`] and built with
/// [`MobileNetV2Config::init`]. The defaults are torchvision's `mobilenet_v2()`.
#[derive(Config, Debug)]
pub struct MobileNetV2Config {
    /// Number of output classes of the classifier.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// BatchNorm epsilon.
    #[config(default = 1e-5)]
    pub bn_epsilon: f64,
    /// Dropout probability before the classifier (identity in inference).
    #[config(default = 0.2)]
    pub dropout: f64,
}

/// One entry of `features`: either a conv-BN-ReLU6 (`features.0`, `features.18`) or an inverted residual block.
#[derive(Module, Debug)]
// burn has no `Module` for `Box`, and the 19 entries are built once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Feature {
    /// torchvision's `Conv2dNormActivation` with ReLU6.
    ConvBnRelu6(ConvBn),
    /// torchvision's `InvertedResidual`.
    InvertedResidual(InvertedResidual),
}

/// The `conv` Sequential of an [`InvertedResidual`]; the tuple indices are torchvision's.
#[derive(Module, Debug)]
// burn has no `Module` for `Box`, and the 19 entries are built once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum InvertedResidualConv {
    /// Expansion 1 (`features.1`): `0` depthwise 3×3 conv-BN-ReLU6, `1` projection 1×1 conv, `2` its BatchNorm.
    Depthwise((ConvBn, Conv2d, BatchNorm)),
    /// Expansion > 1: `0` expansion 1×1 conv-BN-ReLU6, `1` depthwise 3×3 conv-BN-ReLU6, `2` projection 1×1 conv,
    /// `3` its BatchNorm.
    Expanded((ConvBn, ConvBn, Conv2d, BatchNorm)),
}

/// torchvision's `InvertedResidual`: (expand →) depthwise → linear projection, plus the input when the block keeps
/// the stride at 1 and the channel count unchanged.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    /// The block's layers, under torchvision's name `conv`.
    pub conv: InvertedResidualConv,
    /// Whether the block input is added to its output (stride 1 and as many input as output channels).
    pub use_residual: bool,
}

/// torchvision's MobileNetV2: `features` (stride 32, 1280 channels, values in [0, 6]), then the mean over H×W, then
/// `classifier` (Dropout, Linear → logits).
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// `features.0` ... `features.18`.
    pub features: Vec<Feature>,
    /// `classifier.0` (Dropout) and `classifier.1` (Linear 1280 → `num_classes`, weight stored `[1280, classes]`).
    pub classifier: (Dropout, Linear),
    /// `features`, folded, as host-memory kernels: set by [`MobileNetV2::fold_batch_norms`] on the CPU backend and
    /// then used by [`MobileNetV2::forward_features`] (module docs, *Inference preparation*).
    #[module(skip)]
    pub host: Option<Arc<HostFeatures>>,
}

/// The folded `features` of a [`MobileNetV2`] on host memory (module docs, *Inference preparation*): the stem's
/// 3×3 conv + ReLU6 as im2col + GEMM; per block the expansion 1×1 conv, the depthwise 3×3 conv + ReLU6 (the
/// expansion's ReLU6 fused into its input copy), the projection 1×1 conv with the residual fused; then the last
/// 1×1 conv + ReLU6.
#[derive(Debug, Clone)]
pub struct HostFeatures {
    /// `features.0`: weights `[32, 3·9]` (the taps in [`im2col_3x3`]'s row order), ReLU6.
    stem: HostPointwise,
    stem_stride: usize,
    blocks: Vec<HostBlock>,
    last: HostPointwise,
}

/// One inverted residual block of [`HostFeatures`].
#[derive(Debug, Clone)]
struct HostBlock {
    expand: Option<HostPointwise>,
    depthwise: HostDepthwise,
    project: HostPointwise,
    residual: bool,
}

impl HostFeatures {
    /// Builds the host kernels from folded `features`, when their weights live on the CPU backend; `None` on a
    /// GPU, before folding, or if a weight cannot be read as f32.
    fn new(features: &[Feature]) -> Option<Self> {
        let (last, blocks) = features.split_last()?;
        let (stem, blocks) = blocks.split_first()?;
        let Feature::ConvBnRelu6((stem, _)) = stem else { return None };
        let stem_stride = stem.stride[0];
        let stem = host_conv(stem, 3, true)?;
        let mut host = Vec::with_capacity(blocks.len());
        for feature in blocks {
            let Feature::InvertedResidual(block) = feature else { return None };
            let (expand, dw, project) = match &block.conv {
                InvertedResidualConv::Depthwise(((dw, _), project, _)) => (None, dw, project),
                InvertedResidualConv::Expanded(((expand, _), (dw, _), project, _)) => (Some(expand), dw, project),
            };
            host.push(HostBlock {
                expand: match expand {
                    Some(conv) => Some(host_conv(conv, 1, false)?),
                    None => None,
                },
                depthwise: host_depthwise(dw, expand.is_some())?,
                project: host_conv(project, 1, false)?,
                residual: block.use_residual,
            });
        }
        let Feature::ConvBnRelu6((last, _)) = last else { return None };
        Some(Self { stem, stem_stride, blocks: host, last: host_conv(last, 1, true)? })
    }

    /// `features` on `x`.
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, 1280, ceil(height / 32), ceil(width / 32)]`
    ///
    /// # Panics
    /// If `x` does not have 3 channels or is not f32.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let device = x.device();
        let [n, c, h, w] = x.dims();
        assert_eq!(c * 9, self.stem.cin(), "MobileNetV2 input channels");
        #[allow(clippy::expect_used)] // the model only ever builds f32 activations
        let input: Vec<f32> = x.into_data().try_into_vec().expect("f32 activations");
        // On one thread, one image at a time through the whole network: a layer's activations for one image stay
        // in cache where the micro-batch's would not (block 2's expansion alone is 4.8 MB an image). With more
        // threads, layer by layer with the images in parallel. An image's values are the same either way.
        let (out, (oh, ow)) = if rayon::current_num_threads() == 1 && n > 1 {
            let mut out = Vec::new();
            let mut size = (0, 0);
            for image in input.chunks_exact(c * h * w) {
                let (one, s) = self.run(image, 1, c, h, w);
                out.extend_from_slice(&one);
                size = s;
            }
            (out, size)
        } else {
            self.run(&input, n, c, h, w)
        };
        Tensor::from_data(TensorData::new(out, [n, self.last.cout(), oh, ow]), &device)
    }

    /// The network on `n` images `[n, c, h, w]` in host memory, layer by layer: `[n, 1280, oh, ow]` and `(oh, ow)`.
    fn run(&self, input: &[f32], n: usize, c: usize, h: usize, w: usize) -> (Vec<f32>, (usize, usize)) {
        let (cols, (mut h, mut w)) = im2col_3x3(input, n, c, h, w, self.stem_stride);
        let mut cur = self.stem.apply(&cols, n, h * w, None);
        drop(cols);
        for block in &self.blocks {
            let input = expand_if_any(block.expand.as_ref(), &cur, n, h * w);
            let hidden = block.depthwise.apply(&input, n, block.depthwise.bias.len(), h, w);
            (h, w) = block.depthwise.output_size(h, w);
            let residual = block.residual.then_some(&cur[..]);
            cur = block.project.apply(&hidden, n, h * w, residual);
        }
        (self.last.apply(&cur, n, h * w, None), (h, w))
    }
}

/// A `k`×`k` conv (padding `(k-1)/2`, no bias) with BatchNorm.
fn conv_bn(cin: usize, cout: usize, kernel: usize, stride: usize, groups: usize, eps: f64, device: &Device) -> ConvBn {
    let pad = (kernel - 1) / 2;
    let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device);
    (conv, BatchNormConfig::new(cout).with_epsilon(eps).init(device))
}

/// A conv then its BatchNorm; just the conv once the BatchNorm is folded into it (it then has a bias).
pub(super) fn conv_then_bn(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let y = conv.forward(x);
    if conv.bias.is_some() { y } else { bn.forward(y) }
}

/// Applies a [`ConvBn`] then ReLU6.
fn conv_bn_relu6(layer: &ConvBn, x: Tensor<4>) -> Tensor<4> {
    relu6(conv_then_bn(&layer.0, &layer.1, x))
}

/// ReLU6 as `min(max(x, 0), 6)` in two passes: the same values as burn's `relu6` (one `clamp`), NaN included, but
/// both passes vectorise on the CPU backend, where its `clamp` runs a scalar loop (13× slower per element,
/// measured: a quarter of the whole forward).
pub(super) fn relu6(x: Tensor<4>) -> Tensor<4> {
    relu(x).clamp_max(6.0)
}

/// A folded conv's weights (`[cout, cin/groups, kh, kw]` flattened) and bias on the host, when the model lives on the
/// CPU backend, where the host kernels are faster than burn's (module docs); `None` on a GPU, before folding (no
/// bias yet), or if the weights cannot be read as f32.
pub(super) fn host_weights(conv: &Conv2d) -> Option<([usize; 4], Vec<f32>, Vec<f32>)> {
    let weight = conv.weight.val();
    if weight.device() != Device::flex() {
        return None;
    }
    let dims = weight.dims();
    let bias = conv.bias.as_ref()?.val().into_data().try_to_vec::<f32>().ok()?;
    let weight = weight.into_data().try_to_vec::<f32>().ok()?;
    Some((dims, weight, bias))
}

/// A folded depthwise 3×3 conv as the host kernel ([`host_weights`]); `input_relu6` when the expansion's ReLU6 is
/// to be fused into it.
fn host_depthwise(conv: &Conv2d, input_relu6: bool) -> Option<HostDepthwise> {
    let (_, weight, bias) = host_weights(conv)?;
    (weight.len() == 9 * bias.len()).then(|| HostDepthwise { weight, bias, stride: conv.stride[0], input_relu6 })
}

/// A folded `kernel`×`kernel` conv as a host GEMM with weights `[cout, cin·kernel²]` ([`host_weights`];
/// `relu6`: apply ReLU6 to its output); `None` for another kernel size or a grouped conv.
pub(super) fn host_conv(conv: &Conv2d, kernel: usize, relu6: bool) -> Option<HostPointwise> {
    let ([cout, cin, kh, kw], weight, bias) = host_weights(conv)?;
    (conv.groups == 1 && kh == kernel && kw == kernel && weight.len() == cout * cin * kernel * kernel)
        .then_some(HostPointwise { weight, bias, relu6 })
}

/// Folds `bn` into `conv` (module docs): the returned conv alone computes `bn(conv(x))`.
pub(super) fn fold(conv: &mut Conv2d, bn: &BatchNorm) {
    if conv.bias.is_some() {
        return; // folded already
    }
    let scale = bn.gamma.val() / bn.running_var.value().add_scalar(bn.epsilon).sqrt(); // [cout]
    let [cout, ..] = conv.weight.dims();
    let weight = conv.weight.val() * scale.clone().reshape([cout, 1, 1, 1]);
    let bias = bn.beta.val() - bn.running_mean.value() * scale;
    conv.weight = Param::initialized(ParamId::new(), weight);
    conv.bias = Some(Param::initialized(ParamId::new(), bias));
}

/// The head MobileNetV2 and EfficientNet-Lite share: mean over H×W (`adaptive_avg_pool2d(·, 1)`), Dropout
/// (identity in inference), then `linear` as one vector-matrix product per sample: one `[batch, C] × [C, classes]`
/// product would change its summation order with the batch size (GEMV for one row, GEMM for several), so a
/// sample's logits would depend on what it is batched with; this way they are bit-identical, like its features.
///
/// # Shapes
/// - `features`: `[batch, C, height, width]` (`linear`'s weight is `[C, classes]`)
/// - output: `[batch, classes]`
pub(super) fn linear_head(features: Tensor<4>, dropout: &Dropout, linear: &Linear) -> Tensor<2> {
    let [batch, channels, _, _] = features.dims();
    let pooled: Tensor<3> = dropout.forward(features.mean_dims(&[2, 3]).reshape([batch, 1, channels]));
    let weight = linear.weight.val();
    let [_, classes] = weight.dims();
    let logits = pooled.matmul(weight.unsqueeze::<3>().expand([batch, channels, classes])).reshape([batch, classes]);
    match &linear.bias {
        Some(bias) => logits + bias.val().unsqueeze::<2>(),
        None => logits,
    }
}

impl MobileNetV2Config {
    /// Builds a randomly initialised [`MobileNetV2`] on `device` (use [`load`] or [`embedded`] for the pretrained
    /// weights).
    pub fn init(&self, device: &Device) -> MobileNetV2 {
        let eps = self.bn_epsilon;
        let mut features = Vec::with_capacity(19);
        features.push(Feature::ConvBnRelu6(conv_bn(3, STEM_CHANNELS, 3, 2, 1, eps, device)));
        let mut cin = STEM_CHANNELS;
        for (t, c, n, s) in INVERTED_RESIDUAL_SETTING {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                features.push(Feature::InvertedResidual(InvertedResidual::new(cin, c, stride, t, eps, device)));
                cin = c;
            }
        }
        features.push(Feature::ConvBnRelu6(conv_bn(cin, FEATURE_CHANNELS, 1, 1, 1, eps, device)));
        let classifier = (
            DropoutConfig::new(self.dropout).init(),
            LinearConfig::new(FEATURE_CHANNELS, self.num_classes).init(device),
        );
        MobileNetV2 { features, classifier, host: None }
    }
}

impl InvertedResidual {
    /// A block `cin` → `cout` with the given stride of its depthwise conv and expansion ratio.
    fn new(cin: usize, cout: usize, stride: usize, expand: usize, eps: f64, device: &Device) -> Self {
        let hidden = cin * expand;
        let conv = if expand == 1 {
            let (project, bn) = conv_bn(hidden, cout, 1, 1, 1, eps, device);
            InvertedResidualConv::Depthwise((conv_bn(hidden, hidden, 3, stride, hidden, eps, device), project, bn))
        } else {
            let (project, bn) = conv_bn(hidden, cout, 1, 1, 1, eps, device);
            InvertedResidualConv::Expanded((
                conv_bn(cin, hidden, 1, 1, 1, eps, device),
                conv_bn(hidden, hidden, 3, stride, hidden, eps, device),
                project,
                bn,
            ))
        };
        Self { conv, use_residual: stride == 1 && cin == cout }
    }

    /// Applies the block.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, height / stride, width / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_observed(x, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), calling `after` with each layer's kind and output as it is computed
    /// (expansion, depthwise, then the projection with the residual added).
    pub fn forward_observed(&self, x: Tensor<4>, after: &mut dyn FnMut(LayerKind, &Tensor<4>)) -> Tensor<4> {
        let (hidden, project, bn) = match &self.conv {
            InvertedResidualConv::Depthwise((dw, project, bn)) => (conv_bn_relu6(dw, x.clone()), project, bn),
            InvertedResidualConv::Expanded((expand, dw, project, bn)) => {
                let expanded = conv_bn_relu6(expand, x.clone());
                after(LayerKind::Expand, &expanded);
                (conv_bn_relu6(dw, expanded), project, bn)
            }
        };
        after(LayerKind::Depthwise, &hidden);
        let y = conv_then_bn(project, bn, hidden);
        let y = if self.use_residual { y + x } else { y };
        after(LayerKind::Project, &y);
        y
    }
}

/// The kinds of layer in MobileNetV2's `features`, as [`MobileNetV2::forward_features_observed`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    /// `features.0`: 3×3 conv, stride 2, 3 → 32 channels, ReLU6.
    Stem,
    /// A block's expansion: 1×1 conv to 6× the channels, ReLU6 (16 of them).
    Expand,
    /// A block's depthwise 3×3 conv (one filter per channel), ReLU6 (17 of them).
    Depthwise,
    /// A block's projection: 1×1 conv, no activation, plus the block input where the block keeps its shape (17).
    Project,
    /// `features.18`: 1×1 conv 320 → 1280, ReLU6.
    Head,
}

impl LayerKind {
    /// Every kind, in network order.
    pub const ALL: [LayerKind; 5] =
        [LayerKind::Stem, LayerKind::Expand, LayerKind::Depthwise, LayerKind::Project, LayerKind::Head];

    /// A short name for tables (`stem`, `expand 1x1`, `depthwise 3x3`, `project 1x1`, `head 1x1`).
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Stem => "stem 3x3",
            LayerKind::Expand => "expand 1x1",
            LayerKind::Depthwise => "depthwise 3x3",
            LayerKind::Project => "project 1x1",
            LayerKind::Head => "head 1x1",
        }
    }
}

impl Feature {
    /// Applies this entry of `features`.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, height / stride, width / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Feature::ConvBnRelu6(layer) => conv_bn_relu6(layer, x),
            Feature::InvertedResidual(block) => block.forward(x),
        }
    }
}

impl MobileNetV2 {
    /// Folds every BatchNorm into its convolution (module docs, *Inference preparation*): same outputs up to
    /// float rounding, fewer passes per forward. Call it once the weights are loaded; the model is then for
    /// inference only (the BatchNorm parameters are no longer used).
    pub fn fold_batch_norms(mut self) -> Self {
        for feature in &mut self.features {
            match feature {
                Feature::ConvBnRelu6((conv, bn)) => fold(conv, bn),
                Feature::InvertedResidual(block) => match &mut block.conv {
                    InvertedResidualConv::Depthwise(((dw, dw_bn), project, bn)) => {
                        fold(dw, dw_bn);
                        fold(project, bn);
                    }
                    InvertedResidualConv::Expanded(((expand, expand_bn), (dw, dw_bn), project, bn)) => {
                        fold(expand, expand_bn);
                        fold(dw, dw_bn);
                        fold(project, bn);
                    }
                },
            }
        }
        self.host = HostFeatures::new(&self.features).map(Arc::new);
        self
    }

    /// torchvision's `model.features(x)`: the last feature map, after the final ReLU6 (values in [0, 6]).
    ///
    /// `x` is RGB, `/255`, normalised with [`IMAGENET_MEAN`] / [`IMAGENET_STD`].
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, height, width]` (`[N, 3, 224, 224]` for the pretrained model)
    /// - output: `[batch, 1280, ceil(height / 32), ceil(width / 32)]` (`[N, 1280, 7, 7]`)
    ///
    /// # Panics
    /// If `x` does not have 3 channels.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.host {
            Some(host) => host.forward(x),
            None => self.forward_features_observed(x, &mut |_, _| {}),
        }
    }

    /// `features` layer by layer through burn's tensor ops (the path every non-CPU device runs; on the CPU
    /// backend [`forward_features`](Self::forward_features) runs the host kernels instead), calling `after`
    /// with each layer's kind and output as it is computed: the hook a per-layer profile syncs the device in.
    ///
    /// # Shapes
    /// As [`forward_features`](Self::forward_features).
    pub fn forward_features_observed(&self, x: Tensor<4>, after: &mut dyn FnMut(LayerKind, &Tensor<4>)) -> Tensor<4> {
        let last = self.features.len().saturating_sub(1);
        self.features.iter().enumerate().fold(x, |x, (i, feature)| match feature {
            Feature::ConvBnRelu6(layer) => {
                let y = conv_bn_relu6(layer, x);
                after(if i == last { LayerKind::Head } else { LayerKind::Stem }, &y);
                y
            }
            Feature::InvertedResidual(block) => block.forward_observed(x, after),
        })
    }

    /// The head: mean over H×W, flatten, Dropout (identity in inference), Linear, one vector-matrix product per sample.
    ///
    /// # Shapes
    /// - `features`: `[batch, 1280, height, width]`
    /// - output: `[batch, num_classes]` logits
    ///
    /// # Panics
    /// If `features` does not have 1280 channels.
    pub fn classify(&self, features: Tensor<4>) -> Tensor<2> {
        linear_head(features, &self.classifier.0, &self.classifier.1)
    }

    /// [`forward_features`](Self::forward_features) then [`classify`](Self::classify).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, 224, 224]`
    /// - output: (`features` `[batch, 1280, 7, 7]`, `logits` `[batch, num_classes]`)
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<2>) {
        let features = self.forward_features(x);
        let logits = self.classify(features.clone());
        (features, logits)
    }

    /// The classifier weight in torchvision's layout, `W = classifier.1.weight`.
    ///
    /// # Shapes
    /// - output: `[num_classes, 1280]`
    pub fn classifier_weight(&self) -> Tensor<2> {
        self.classifier.1.weight.val().transpose()
    }

    /// The classifier bias `b = classifier.1.bias`, or zeros if the Linear has none.
    ///
    /// # Shapes
    /// - output: `[num_classes]`
    pub fn classifier_bias(&self) -> Tensor<1> {
        let weight = self.classifier.1.weight.val();
        let [_, classes] = weight.dims();
        match &self.classifier.1.bias {
            Some(bias) => bias.val(),
            None => Tensor::zeros([classes], &weight.device()),
        }
    }

    /// Raw class activation maps: `cam[n, j, h, w] = Σ_k W[classes[j], k] · features[n, k, h, w]` with
    /// `W = classifier.1.weight` (no bias, ReLU, normalisation or upsampling; the reference's `cam_top5`). Since
    /// the head is mean-pool then Linear, `mean_hw(cam[n, j]) + b[classes[j]] == logits[n, classes[j]]`.
    ///
    /// # Shapes
    /// - `features`: `[batch, 1280, height, width]` (from [`forward_features`](Self::forward_features))
    /// - output: `[batch, classes.len(), height, width]`
    ///
    /// # Errors
    /// [`Error::Config`] naming the class id when one is not below `num_classes`.
    pub fn class_activation_maps(&self, features: Tensor<4>, classes: &[usize]) -> Result<Tensor<4>> {
        let [batch, channels, height, width] = features.dims();
        let weight = self.classifier.1.weight.val(); // [1280, num_classes]
        let [_, num_classes] = weight.dims();
        if let Some(bad) = classes.iter().find(|&&c| c >= num_classes) {
            return Err(Error::Config(vec![format!(
                "class_activation_maps: class id {bad} is out of range (the classifier has {num_classes} classes)"
            )]));
        }
        let device = weight.device();
        let ids: Vec<i64> = classes.iter().map(|&c| c as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [classes.len()]), &device);
        let selected = weight.select(1, ids).transpose(); // [J, 1280]
        let flat: Tensor<3> = features.reshape([batch, channels, height * width]);
        let cams = selected.unsqueeze::<3>().expand([batch, classes.len(), channels]).matmul(flat);
        Ok(cams.reshape([batch, classes.len(), height, width]))
    }
}

/// Loads the pretrained weights from a safetensors file with torchvision's key names into a [`MobileNetV2`] (default
/// config, inference mode) on `device`.
///
/// # Errors
/// [`Error::Weights`] (naming `path` and, where there is one, the tensor) if the file cannot be read, is truncated
/// or corrupt, lacks a tensor, has an extra one, or has one of the wrong shape or of a dtype other than `F32`.
pub fn load(path: &Path, device: &Device) -> Result<MobileNetV2> {
    let file = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|e| Error::Weights { file: file.clone(), detail: format!("cannot read: {e}") })?;
    load_named(bytes, &file, device)
}

/// Like [`load`], from the bytes of a safetensors file (errors report the file as [`BYTES_WEIGHTS_NAME`]).
///
/// # Errors
/// As [`load`].
pub fn load_bytes(bytes: &[u8], device: &Device) -> Result<MobileNetV2> {
    load_named(bytes.to_vec(), BYTES_WEIGHTS_NAME, device)
}

/// The pretrained torchvision weights embedded in the binary (`fixtures/mobilenet_v2/mobilenet_v2.safetensors`).
///
/// # Errors
/// As [`load`]; only possible if the embedded file was replaced by a broken one at build time.
pub fn embedded(device: &Device) -> Result<MobileNetV2> {
    load_named(EMBEDDED_WEIGHTS.to_vec(), EMBEDDED_WEIGHTS_NAME, device)
}

/// Validates `bytes` against the default model's tensors, then applies them.
fn load_named(bytes: Vec<u8>, file: &str, device: &Device) -> Result<MobileNetV2> {
    let mut model = MobileNetV2Config::new().init(device);
    safetensors::load_strict(&mut model, bytes, "MobileNetV2", str::to_string, |s| s.skip_enum_variants(true))
        .map_err(|detail| Error::Weights { file: file.to_string(), detail })?;
    Ok(model.valid())
}
