//! A small CLIP in burn that trains on juiced batches: a ViT image tower over the *kept* patches, a causal text
//! transformer over the CLIP tokens, and the symmetric contrastive loss.
//!
//! The image tower never sees the pruned patches. Each kept patch `[3·P·P]` is embedded by a linear layer (a
//! `P × P` convolution with stride `P` applied to one patch is exactly that), then gets the positional
//! embedding of its *original* place in the full grid, gathered from a learned `grid²`-row table by the
//! batch's `positions`. The padding that [`JuicedBatch`](crate::JuicedBatch) adds to reach `K` patches per
//! sample is a key-padding mask in every attention layer, so the pooled \[CLS\] feature depends only on the
//! real patches and not on their order (the encoder is permutation-equivariant and pooling reads \[CLS\]).
//! This is FLIP's token dropping (Li et al., *Scaling Language-Image Pre-training via Masking*, 2023), with
//! juicer's saliency pruning choosing the tokens; [`random_token_drop`] adds FLIP's random drop on top.
//!
//! - [`VisionTowerConfig`] / [`VisionTower`]: linear patch embedding, positional table gathered by position,
//!   \[CLS\], pre-norm transformer blocks with a key-padding mask, \[CLS\] → LayerNorm → projection.
//!   [`VisionTowerConfig::vit_tiny`] is ViT-Ti (width 192, 12 layers, 3 heads, MLP 768).
//! - [`TextTowerConfig`] / [`TextTower`]: token + positional embedding over CLIP's 77-token context, causal
//!   pre-norm transformer, the feature at the last real token (`<|endoftext|>`), projection.
//! - [`ClipConfig`] / [`Clip`]: both towers, a learnable logit scale (CLIP's `ln(1/0.07)` start, clamped at
//!   `ln 100`), [`Clip::forward`] → [`ClipOutput`] with [`contrastive_loss`].
//!
//! Shapes follow [`JuicedBatch`](crate::JuicedBatch): patches `[B, K, 3·P·P]`, positions `[B, K]` (row-major
//! grid indices), patch mask `[B, K]` (true = real patch), tokens and token mask `[B, 77]`.

use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::rng::{SplitMix64, derive};

/// Size of the OpenAI CLIP BPE vocabulary (the ids [`JuicedBatch::tokens`](crate::JuicedBatch) holds).
pub const CLIP_VOCAB: usize = 49_408;

/// Standard deviation of the learned embeddings' initialisation (CLIP's 0.02).
const EMBED_STD: f64 = 0.02;

/// `Ok` when there is no problem, else every problem as one [`Error::Config`].
fn valid(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() { Ok(()) } else { Err(Error::Config(problems)) }
}

/// Every transformer problem in a width/heads pair, for `validate`.
fn transformer_problems(what: &str, d_model: usize, n_heads: usize, d_ff: usize, out: &mut Vec<String>) {
    if d_model == 0 || n_heads == 0 || d_ff == 0 {
        out.push(format!("{what}: d_model, n_heads and d_ff must be positive"));
    } else if !d_model.is_multiple_of(n_heads) {
        out.push(format!("{what}: d_model {d_model} is not a multiple of n_heads {n_heads}"));
    }
}

/// The pre-norm transformer both towers use (no dropout: the towers are deterministic).
fn encoder_config(d_model: usize, d_ff: usize, n_heads: usize, n_layers: usize, eps: f64) -> TransformerEncoderConfig {
    TransformerEncoderConfig::new(d_model, d_ff, n_heads, n_layers)
        .with_dropout(0.0)
        .with_norm_first(true)
        .with_layer_norm_eps(eps)
}

/// Configuration of a [`VisionTower`]; build one with [`VisionTowerConfig::init`].
#[derive(Config, Debug)]
pub struct VisionTowerConfig {
    /// Side of the square patch grid: positions index a `grid · grid` table, row-major.
    pub grid: usize,
    /// Patch side `P` in pixels; a patch has `3 · P · P` features.
    pub patch_size: usize,
    /// Width of the residual stream.
    #[config(default = 64)]
    pub d_model: usize,
    /// Number of transformer blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// Number of attention heads; divides `d_model`.
    #[config(default = 4)]
    pub n_heads: usize,
    /// Width of the MLP's hidden layer.
    #[config(default = 256)]
    pub d_ff: usize,
    /// Width of the joint image-text embedding space.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Epsilon of every LayerNorm.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

impl VisionTowerConfig {
    /// ViT-Ti (Touvron et al., DeiT): width 192, 12 layers, 3 heads, MLP 768, projected to a 512-wide
    /// embedding (CLIP ViT-B's). `vit_tiny(14, 16)` is the 224/16 model.
    pub fn vit_tiny(grid: usize, patch_size: usize) -> Self {
        Self::new(grid, patch_size)
            .with_d_model(192)
            .with_n_layers(12)
            .with_n_heads(3)
            .with_d_ff(768)
            .with_embed_dim(512)
    }

    /// Every problem with this configuration (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.grid == 0 || self.patch_size == 0 || self.embed_dim == 0 || self.n_layers == 0 {
            p.push("vision tower: grid, patch_size, embed_dim and n_layers must be positive".into());
        }
        transformer_problems("vision tower", self.d_model, self.n_heads, self.d_ff, &mut p);
        p
    }

    /// Initialises a [`VisionTower`] on `device`, drawing its random weights from the device's generator now
    /// (see [`ClipConfig::init`]).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem of [`VisionTowerConfig::problems`].
    pub fn init(&self, device: &Device) -> Result<VisionTower> {
        valid(self.problems())?;
        let d = self.d_model;
        let normal = Initializer::Normal { mean: 0.0, std: EMBED_STD };
        let tower = VisionTower {
            patch_embed: LinearConfig::new(3 * self.patch_size * self.patch_size, d).init(device),
            pos_embed: normal.init([self.grid * self.grid, d], device),
            cls_token: normal.init([d], device),
            pre_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
            encoder: encoder_config(d, self.d_ff, self.n_heads, self.n_layers, self.layer_norm_eps).init(device),
            post_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
            proj: LinearConfig::new(d, self.embed_dim).with_bias(false).init(device),
            grid: self.grid,
            patch_size: self.patch_size,
        };
        tower.visit(&mut Materialize);
        Ok(tower)
    }
}

/// A ViT image tower over kept patches; build it with [`VisionTowerConfig::init`].
#[derive(Module, Debug)]
pub struct VisionTower {
    /// Patch embedding `[3·P·P] → [D]` (a stride-`P` convolution applied to one patch).
    pub patch_embed: Linear,
    /// Learned positional embeddings of the full grid `[grid², D]`, row-major.
    pub pos_embed: Param<Tensor<2>>,
    /// The \[CLS\] token `[D]` (its positional embedding folded in).
    pub cls_token: Param<Tensor<1>>,
    /// LayerNorm on the embedded sequence (CLIP's `ln_pre`).
    pub pre_norm: LayerNorm,
    /// Pre-norm transformer blocks.
    pub encoder: TransformerEncoder,
    /// LayerNorm on the pooled \[CLS\] feature (CLIP's `ln_post`).
    pub post_norm: LayerNorm,
    /// Projection into the joint embedding space (no bias).
    pub proj: Linear,
    /// Side of the patch grid the positional table covers.
    pub grid: usize,
    /// Patch side `P` in pixels.
    pub patch_size: usize,
}

impl VisionTower {
    /// Embeds a batch of kept patches.
    ///
    /// # Shapes
    ///
    /// - patches: `[B, K, 3·P·P]`, zero padded
    /// - positions: `[B, K]`, row-major grid indices `< grid²` (any valid index where padded)
    /// - patch_mask: `[B, K]`, true where `patches` holds a real patch
    /// - output: `[B, embed_dim]`, not normalised
    ///
    /// # Panics
    ///
    /// If the feature width is not `3·P·P`, the shapes disagree, or a position is outside the grid.
    pub fn forward(&self, patches: Tensor<3>, positions: Tensor<2, Int>, patch_mask: Tensor<2, Bool>) -> Tensor<2> {
        let [b, k, f] = patches.dims();
        let p = self.patch_size;
        assert_eq!(f, 3 * p * p, "vision tower: patches must be [B, K, 3·{p}·{p}], got [{b}, {k}, {f}]");
        assert_eq!(positions.dims(), [b, k], "vision tower: positions must be [B, K] like the patches");
        assert_eq!(patch_mask.dims(), [b, k], "vision tower: patch_mask must be [B, K] like the patches");
        let device = patches.device();
        let x = self.patch_embed.forward(patches); // [B, K, D]
        let [_, _, d] = x.dims();
        let pos = self.pos_embed.val().select(0, positions.reshape([b * k])).reshape([b, k, d]);
        let cls = self.cls_token.val().reshape([1, 1, d]).expand([b, 1, d]);
        let x = self.pre_norm.forward(Tensor::cat(vec![cls, x + pos], 1)); // [B, 1 + K, D]
        // burn's key-padding mask is true where a key is ignored; [CLS] is never padding. (Built through Int:
        // flex stores some Bool tensors as u8, and `cat` refuses mixed storages.)
        let real = Tensor::cat(vec![Tensor::<2, Int>::ones([b, 1], &device), patch_mask.int()], 1);
        let pad = real.equal_elem(0);
        let x = self.encoder.forward(TransformerEncoderInput::new(x).mask_pad(pad));
        let cls = x.narrow(1, 0, 1).reshape([b, d]);
        self.proj.forward(self.post_norm.forward(cls))
    }
}

/// Configuration of a [`TextTower`]; build one with [`TextTowerConfig::init`].
#[derive(Config, Debug)]
pub struct TextTowerConfig {
    /// Vocabulary size (OpenAI CLIP's BPE by default).
    #[config(default = 49_408)]
    pub vocab_size: usize,
    /// Context length in tokens (CLIP's 77 by default).
    #[config(default = 77)]
    pub context: usize,
    /// Width of the residual stream.
    #[config(default = 64)]
    pub d_model: usize,
    /// Number of transformer blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// Number of attention heads; divides `d_model`.
    #[config(default = 4)]
    pub n_heads: usize,
    /// Width of the MLP's hidden layer.
    #[config(default = 256)]
    pub d_ff: usize,
    /// Width of the joint image-text embedding space.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Epsilon of every LayerNorm.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
}

impl TextTowerConfig {
    /// Every problem with this configuration (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.vocab_size == 0 || self.context == 0 || self.embed_dim == 0 || self.n_layers == 0 {
            p.push("text tower: vocab_size, context, embed_dim and n_layers must be positive".into());
        }
        transformer_problems("text tower", self.d_model, self.n_heads, self.d_ff, &mut p);
        p
    }

    /// Initialises a [`TextTower`] on `device`, drawing its random weights from the device's generator now (see
    /// [`ClipConfig::init`]).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem of [`TextTowerConfig::problems`].
    pub fn init(&self, device: &Device) -> Result<TextTower> {
        valid(self.problems())?;
        let d = self.d_model;
        let normal = Initializer::Normal { mean: 0.0, std: EMBED_STD };
        let tower = TextTower {
            token_embed: EmbeddingConfig::new(self.vocab_size, d).with_initializer(normal.clone()).init(device),
            pos_embed: normal.init([self.context, d], device),
            encoder: encoder_config(d, self.d_ff, self.n_heads, self.n_layers, self.layer_norm_eps).init(device),
            final_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
            proj: LinearConfig::new(d, self.embed_dim).with_bias(false).init(device),
            context: self.context,
        };
        tower.visit(&mut Materialize);
        Ok(tower)
    }
}

/// A causal text transformer over CLIP tokens; build it with [`TextTowerConfig::init`].
#[derive(Module, Debug)]
pub struct TextTower {
    /// Token embedding `[vocab, D]`.
    pub token_embed: Embedding,
    /// Learned positional embeddings `[context, D]`.
    pub pos_embed: Param<Tensor<2>>,
    /// Pre-norm transformer blocks with a causal mask.
    pub encoder: TransformerEncoder,
    /// LayerNorm on the sequence (CLIP's `ln_final`).
    pub final_norm: LayerNorm,
    /// Projection into the joint embedding space (no bias).
    pub proj: Linear,
    /// Context length the positional table covers.
    pub context: usize,
}

impl TextTower {
    /// Embeds a batch of token sequences; the feature is read at each sequence's last real token, which for
    /// juicer's tokens is `<|endoftext|>` (CLIP reads it at the argmax id, the same place).
    ///
    /// # Shapes
    ///
    /// - tokens: `[B, T]` with `T <= context`, zero padded
    /// - token_mask: `[B, T]`, true on the real tokens (a prefix of each row)
    /// - output: `[B, embed_dim]`, not normalised
    ///
    /// # Panics
    ///
    /// If `T` exceeds the context, the shapes disagree, or a token id is outside the vocabulary.
    pub fn forward(&self, tokens: Tensor<2, Int>, token_mask: Tensor<2, Bool>) -> Tensor<2> {
        let [b, t] = tokens.dims();
        assert!(t <= self.context, "text tower: {t} tokens exceed the context of {}", self.context);
        assert_eq!(token_mask.dims(), [b, t], "text tower: token_mask must be [B, T] like the tokens");
        let device = tokens.device();
        let x = self.token_embed.forward(tokens); // [B, T, D]
        let [_, _, d] = x.dims();
        let x = x + self.pos_embed.val().narrow(0, 0, t).unsqueeze::<3>();
        let causal = generate_autoregressive_mask(b, t, &device);
        let x = self.final_norm.forward(self.encoder.forward(TransformerEncoderInput::new(x).mask_attn(causal)));
        // Row index of each sequence's last real token in the flattened [B·T, D] sequence.
        let last = (token_mask.int().sum_dim(1).reshape([b]) - 1).clamp_min(0);
        let rows = Tensor::<1, Int>::arange(0..b as i64, &device) * t as i64 + last;
        let feature = x.reshape([b * t, d]).select(0, rows); // [B, D]
        self.proj.forward(feature)
    }
}

/// Configuration of a [`Clip`]; build one with [`ClipConfig::init`].
#[derive(Config, Debug)]
pub struct ClipConfig {
    /// The image tower.
    pub vision: VisionTowerConfig,
    /// The text tower.
    pub text: TextTowerConfig,
    /// Initial value of the learnable log logit scale (CLIP: `ln(1 / 0.07)`).
    #[config(default = 2.659_260_036_932_778)]
    pub init_logit_scale: f64,
    /// Upper bound of the log logit scale (CLIP: `ln 100`).
    #[config(default = 4.605_170_185_988_092)]
    pub max_logit_scale: f64,
}

impl ClipConfig {
    /// The small CLIP of the `train_clip` example for a `grid × grid` patch grid of `patch_size` pixels: both
    /// towers width 64, 2 layers, 4 heads, MLP 256, a 64-wide joint embedding.
    pub fn small(grid: usize, patch_size: usize) -> Self {
        Self::new(VisionTowerConfig::new(grid, patch_size), TextTowerConfig::new())
    }

    /// Every problem with this configuration (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.vision.problems();
        p.extend(self.text.problems());
        if self.vision.embed_dim != self.text.embed_dim {
            p.push(format!(
                "the towers' embed_dim differ: vision {}, text {}",
                self.vision.embed_dim, self.text.embed_dim
            ));
        }
        if !self.init_logit_scale.is_finite() || !self.max_logit_scale.is_finite() {
            p.push("logit scales must be finite".into());
        }
        p
    }

    /// Initialises a [`Clip`] on `device` with random weights from the device's generator, drawn eagerly (not
    /// on first use as burn's layers do), so `device.seed(s)` right before `init` gives a reproducible model.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem of [`ClipConfig::problems`].
    pub fn init(&self, device: &Device) -> Result<Clip> {
        valid(self.problems())?;
        let clip = Clip {
            vision: self.vision.init(device)?,
            text: self.text.init(device)?,
            logit_scale: Initializer::Constant { value: self.init_logit_scale }.init([1], device),
            max_logit_scale: self.max_logit_scale,
        };
        // burn initialises parameters lazily, on first use; the towers drew theirs already, in module order, so
        // a `device.seed(..)` just before `init` fixes the model whatever else uses the generator later.
        clip.visit(&mut Materialize);
        Ok(clip)
    }
}

/// Reads every float parameter once, which initialises the lazy ones.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Image tower, text tower and a learnable temperature; build it with [`ClipConfig::init`].
#[derive(Module, Debug)]
pub struct Clip {
    /// The image tower.
    pub vision: VisionTower,
    /// The text tower.
    pub text: TextTower,
    /// Learnable log logit scale `[1]`.
    pub logit_scale: Param<Tensor<1>>,
    /// Upper bound of the log logit scale.
    pub max_logit_scale: f64,
}

/// Everything [`Clip::forward`] computes.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// L2-normalised image embeddings `[B, E]`.
    pub image_embeds: Tensor<2>,
    /// L2-normalised text embeddings `[B, E]`.
    pub text_embeds: Tensor<2>,
    /// `scale · image_embeds · text_embedsᵀ`: row `i` scores image `i` against every caption, `[B, B]`.
    pub logits_per_image: Tensor<2>,
    /// The symmetric contrastive loss of [`contrastive_loss`], `[1]`.
    pub loss: Tensor<1>,
}

/// Divides each row by its L2 norm.
fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = (x.clone().powi_scalar(2).sum_dim(1) + 1e-12).sqrt(); // [B, 1]
    x / norm
}

impl Clip {
    /// L2-normalised image embeddings.
    ///
    /// # Shapes
    ///
    /// As [`VisionTower::forward`]; output `[B, embed_dim]` with unit rows.
    pub fn encode_image(
        &self,
        patches: Tensor<3>,
        positions: Tensor<2, Int>,
        patch_mask: Tensor<2, Bool>,
    ) -> Tensor<2> {
        l2_normalize(self.vision.forward(patches, positions, patch_mask))
    }

    /// L2-normalised text embeddings.
    ///
    /// # Shapes
    ///
    /// As [`TextTower::forward`]; output `[B, embed_dim]` with unit rows.
    pub fn encode_text(&self, tokens: Tensor<2, Int>, token_mask: Tensor<2, Bool>) -> Tensor<2> {
        l2_normalize(self.text.forward(tokens, token_mask))
    }

    /// The current logit scale `exp(min(logit_scale, max))`, `[1]`.
    pub fn scale(&self) -> Tensor<1> {
        self.logit_scale.val().clamp_max(self.max_logit_scale).exp()
    }

    /// Both towers, the image-to-text logits and the loss.
    ///
    /// # Shapes
    ///
    /// - patches, positions, patch_mask: as [`VisionTower::forward`]
    /// - tokens, token_mask: as [`TextTower::forward`], same `B`
    /// - output: see [`ClipOutput`]
    ///
    /// # Panics
    ///
    /// As the towers' `forward`, or if the batch sizes differ.
    pub fn forward(
        &self,
        patches: Tensor<3>,
        positions: Tensor<2, Int>,
        patch_mask: Tensor<2, Bool>,
        tokens: Tensor<2, Int>,
        token_mask: Tensor<2, Bool>,
    ) -> ClipOutput {
        let image_embeds = self.encode_image(patches, positions, patch_mask);
        let text_embeds = self.encode_text(tokens, token_mask);
        assert_eq!(image_embeds.dims()[0], text_embeds.dims()[0], "clip: image and text batch sizes differ");
        let scale = self.scale().unsqueeze::<2>(); // [1, 1]
        let logits_per_image = image_embeds.clone().matmul(text_embeds.clone().transpose()) * scale;
        let loss = contrastive_loss(logits_per_image.clone());
        ClipOutput { image_embeds, text_embeds, logits_per_image, loss }
    }
}

/// CLIP's symmetric contrastive loss: the mean of the image→text and text→image cross-entropies over the
/// `B × B` logits, the matching pair of row `i` being column `i`. `ln B` for uninformative logits.
///
/// # Shapes
///
/// - logits_per_image: `[B, B]`
/// - output: `[1]`
pub fn contrastive_loss(logits_per_image: Tensor<2>) -> Tensor<1> {
    let [b, _] = logits_per_image.dims();
    let eye = Tensor::<2>::eye(b, &logits_per_image.device());
    let image_to_text = (log_softmax(logits_per_image.clone(), 1) * eye.clone()).sum();
    let text_to_image = (log_softmax(logits_per_image, 0) * eye).sum();
    (image_to_text + text_to_image) * (-0.5 / b.max(1) as f64)
}

/// FLIP's random token drop on top of juicer's pruning: each sample keeps a random `1 − ratio` share (at
/// least one) of its real patches, chosen by `seed` alone (derive it from the run seed and the step for a
/// reproducible, resumable run). The kept patches keep their positions; `K` shrinks to the largest kept
/// count and the rest is padding, as in [`JuicedBatch`](crate::JuicedBatch).
///
/// # Shapes
///
/// - patches `[B, K, F]`, positions `[B, K]`, patch_mask `[B, K]`
/// - output: `[B, K', F]`, `[B, K']`, `[B, K']` with `K' <= K`
///
/// # Errors
///
/// [`Error::Config`] when `ratio` is not in `[0, 1)` or the shapes disagree; [`Error::Device`] when the
/// mask or positions cannot be read back from the device.
pub fn random_token_drop(
    patches: Tensor<3>,
    positions: Tensor<2, Int>,
    patch_mask: Tensor<2, Bool>,
    ratio: f32,
    seed: u64,
) -> Result<(Tensor<3>, Tensor<2, Int>, Tensor<2, Bool>)> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::Config(vec![format!("token drop ratio {ratio} is not in [0, 1)")]));
    }
    let [b, k, f] = patches.dims();
    if positions.dims() != [b, k] || patch_mask.dims() != [b, k] {
        return Err(Error::Config(vec![format!(
            "token drop: patches [{b}, {k}, {f}], positions {:?} and mask {:?} disagree",
            positions.dims(),
            patch_mask.dims()
        )]));
    }
    let device = patches.device();
    let read_error = |e: String| Error::Device { device: format!("{device:?}"), detail: format!("reading back: {e}") };
    let mask: Vec<bool> = patch_mask
        .try_into_data()
        .map_err(|e| read_error(format!("{e:?}")))?
        .try_into_vec_as::<bool>()
        .map_err(|e| read_error(format!("{e:?}")))?;
    let pos: Vec<i64> = positions
        .try_into_data()
        .map_err(|e| read_error(format!("{e:?}")))?
        .try_into_vec_as::<i64>()
        .map_err(|e| read_error(format!("{e:?}")))?;
    let kept: Vec<Vec<usize>> = (0..b)
        .map(|i| {
            let mut real: Vec<usize> = (0..k).filter(|&j| mask[i * k + j]).collect();
            let n = real.len();
            let keep = if n == 0 { 0 } else { ((n as f64 * (1.0 - f64::from(ratio))).round() as usize).clamp(1, n) };
            SplitMix64::new(derive(seed, &[i as u64])).shuffle(&mut real);
            real.truncate(keep);
            real.sort_unstable();
            real
        })
        .collect();
    let k2 = kept.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows = vec![0i64; b * k2];
    let mut new_pos = vec![0i64; b * k2];
    let mut new_mask = vec![false; b * k2];
    for (i, ks) in kept.iter().enumerate() {
        for slot in 0..k2 {
            // Padding slots repeat the sample's first row (masked out anyway).
            let j = ks.get(slot).copied().unwrap_or(0);
            rows[i * k2 + slot] = (i * k + j) as i64;
            if slot < ks.len() {
                new_pos[i * k2 + slot] = pos[i * k + j];
                new_mask[i * k2 + slot] = true;
            }
        }
    }
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [b * k2]), &device);
    let patches = patches.reshape([b * k, f]).select(0, rows).reshape([b, k2, f]);
    let positions = Tensor::<2, Int>::from_data(TensorData::new(new_pos, [b, k2]), &device);
    let patch_mask = Tensor::<2, Bool>::from_data(TensorData::new(new_mask, [b, k2]), &device);
    Ok((patches, positions, patch_mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        let d = Device::flex();
        d.seed(11);
        d
    }

    fn tiny_vision(device: &Device) -> VisionTower {
        VisionTowerConfig::new(4, 2)
            .with_d_model(16)
            .with_n_heads(2)
            .with_d_ff(32)
            .with_embed_dim(8)
            .init(device)
            .unwrap()
    }

    fn floats(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + x.abs()), "element {i}: {x} vs {y}");
        }
    }

    /// A batch of 2 samples with 3 and 2 real patches (features 3·2·2 = 12), padded to `k`.
    fn batch(k: usize, device: &Device) -> (Tensor<3>, Tensor<2, Int>, Tensor<2, Bool>) {
        let real: [&[(i64, f32)]; 2] = [&[(0, 0.5), (5, -1.0), (15, 0.25)], &[(3, 1.5), (9, -0.75)]];
        let mut patches = vec![0f32; 2 * k * 12];
        let mut positions = vec![0i64; 2 * k];
        let mut mask = vec![false; 2 * k];
        for (i, sample) in real.iter().enumerate() {
            for (j, &(p, v)) in sample.iter().enumerate() {
                for c in 0..12 {
                    patches[(i * k + j) * 12 + c] = v * (c as f32 + 1.0) / 12.0 + p as f32 * 0.01;
                }
                positions[i * k + j] = p;
                mask[i * k + j] = true;
            }
            // Padding holds junk: the mask must hide it.
            for j in sample.len()..k {
                for c in 0..12 {
                    patches[(i * k + j) * 12 + c] = 7.0 + c as f32;
                }
                positions[i * k + j] = (j % 16) as i64;
            }
        }
        (
            Tensor::from_data(TensorData::new(patches, [2, k, 12]), device),
            Tensor::from_data(TensorData::new(positions, [2, k]), device),
            Tensor::from_data(TensorData::new(mask, [2, k]), device),
        )
    }

    #[test]
    fn shapes() {
        let device = device();
        let clip = ClipConfig::new(
            VisionTowerConfig::new(4, 2).with_d_model(16).with_n_heads(2).with_d_ff(32).with_embed_dim(8),
            TextTowerConfig::new().with_d_model(16).with_n_heads(2).with_d_ff(32).with_embed_dim(8),
        )
        .init(&device)
        .unwrap();
        let (patches, positions, mask) = batch(3, &device);
        let mut tokens = vec![0i64; 2 * 77];
        let mut token_mask = vec![false; 2 * 77];
        for (i, ids) in [[49406i64, 320, 1929, 49407].as_slice(), &[49406, 49407]].iter().enumerate() {
            for (j, &t) in ids.iter().enumerate() {
                tokens[i * 77 + j] = t;
                token_mask[i * 77 + j] = true;
            }
        }
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [2, 77]), &device);
        let token_mask = Tensor::<2, Bool>::from_data(TensorData::new(token_mask, [2, 77]), &device);
        let out = clip.forward(patches, positions, mask, tokens, token_mask);
        assert_eq!(out.image_embeds.dims(), [2, 8]);
        assert_eq!(out.text_embeds.dims(), [2, 8]);
        assert_eq!(out.logits_per_image.dims(), [2, 2]);
        assert_eq!(out.loss.dims(), [1]);
        let norms = floats(out.image_embeds.powi_scalar(2).sum_dim(1));
        assert_close(&norms, &[1.0, 1.0], 1e-5);
        let loss: f32 = out.loss.into_scalar();
        assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
        // ViT-Ti's sizes.
        let ti = VisionTowerConfig::vit_tiny(14, 16);
        assert_eq!((ti.d_model, ti.n_layers, ti.n_heads, ti.d_ff), (192, 12, 3, 768));
        assert!(ti.problems().is_empty());
        assert!(VisionTowerConfig::new(4, 2).with_n_heads(3).init(&device).is_err(), "64 is not a multiple of 3");
        assert!(
            ClipConfig::new(VisionTowerConfig::new(4, 2).with_embed_dim(8), TextTowerConfig::new())
                .init(&device)
                .is_err()
        );
    }

    #[test]
    fn contrastive_loss_is_ln_b_for_uniform_logits_and_small_for_matching_pairs() {
        let device = device();
        let uniform: f32 = contrastive_loss(Tensor::zeros([4, 4], &device)).into_scalar();
        assert!((uniform - 4f32.ln()).abs() < 1e-5, "{uniform}");
        let matched: f32 = contrastive_loss(Tensor::<2>::eye(4, &device) * 20.0).into_scalar();
        assert!(matched < 1e-6, "{matched}");
    }

    #[test]
    fn padding_patches_do_not_change_the_output() {
        let device = device();
        let tower = tiny_vision(&device);
        let reference = floats(tower.forward(batch(3, &device).0, batch(3, &device).1, batch(3, &device).2));
        for k in [4, 7] {
            let (p, pos, m) = batch(k, &device);
            assert_close(&floats(tower.forward(p, pos, m)), &reference, 1e-5);
        }
        // Without the mask the junk in the padding would change the features: the test can fail.
        let (p, pos, m) = batch(7, &device);
        let unmasked = floats(tower.forward(p, pos, m.clone().bool_or(m.bool_not())));
        assert!(unmasked.iter().zip(&reference).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn permuting_patches_with_their_positions_does_not_change_the_output() {
        let device = device();
        let tower = tiny_vision(&device);
        let (p, pos, m) = batch(4, &device);
        let reference = floats(tower.forward(p.clone(), pos.clone(), m.clone()));
        // Reverse each sample's K slots (real patches, padding and positions move together).
        let order = Tensor::<1, Int>::from_data(TensorData::new(vec![7i64, 6, 5, 4, 3, 2, 1, 0], [8]), &device);
        let p2 = p.reshape([8, 12]).select(0, order.clone()).reshape([2, 4, 12]);
        let pos2 = pos.reshape([8]).select(0, order.clone()).reshape([2, 4]);
        let m2 = m.reshape([8]).select(0, order).reshape([2, 4]);
        // The reversal also swapped the samples: swap the rows back.
        let out = floats(tower.forward(p2, pos2, m2));
        let swapped: Vec<f32> = out[8..].iter().chain(&out[..8]).copied().collect();
        assert_close(&swapped, &reference, 1e-5);
        // Moving patches without their positions changes the output (positions matter).
        let (p, pos, m) = batch(4, &device);
        let swap_first_two =
            Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0, 2, 3, 4, 5, 6, 7], [8]), &device);
        let moved = floats(tower.forward(p, pos.reshape([8]).select(0, swap_first_two).reshape([2, 4]), m));
        assert!(moved.iter().zip(&reference).any(|(a, b)| (a - b).abs() > 1e-4));
    }

    #[test]
    fn random_token_drop_keeps_a_seeded_subset_with_positions() {
        let device = device();
        let (p, pos, m) = batch(4, &device);
        let (p2, pos2, m2) = random_token_drop(p.clone(), pos.clone(), m.clone(), 0.5, 3).unwrap();
        // 3 real → 2 kept, 2 real → 1 kept: K' = 2.
        assert_eq!(p2.dims(), [2, 2, 12]);
        let mask: Vec<bool> = m2.into_data().try_into_vec_as::<bool>().unwrap();
        assert_eq!(mask, vec![true, true, true, false]);
        let kept_pos: Vec<i64> = pos2.into_data().try_into_vec_as::<i64>().unwrap();
        let patches = p2.into_data().try_into_vec::<f32>().unwrap();
        for (slot, &keep) in mask.iter().enumerate() {
            if keep {
                let i = slot / 2;
                assert!([[0i64, 5, 15].as_slice(), &[3, 9]][i].contains(&kept_pos[slot]));
                // The patch moved with its position (patch values encode the position).
                let v = patches[slot * 12];
                assert!(((v - kept_pos[slot] as f32 * 0.01) * 12.0).abs() <= 1.51, "{v}");
            }
        }
        let again = random_token_drop(p.clone(), pos.clone(), m.clone(), 0.5, 3).unwrap().1;
        assert_eq!(again.into_data().try_into_vec_as::<i64>().unwrap(), kept_pos);
        let full = random_token_drop(p, pos, m, 0.0, 3).unwrap().0;
        assert_eq!(full.dims(), [2, 3, 12]);
        let (p, pos, m) = batch(4, &device);
        assert!(random_token_drop(p, pos, m, 1.0, 0).is_err());
    }
}
