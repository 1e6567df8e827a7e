//! A Vision Transformer for HuggingFace folders as `save_pretrained` writes them: the `CLIPVisionModel` layout
//! (the vision tower of OpenAI CLIP and open_clip conversions) and the `ViTModel` layout (HF ViT, DINO).
//!
//! [`load_dir`] reads `config.json` ([`ViTConfig`]), `preprocessor_config.json` ([`Preprocess`], optional) and
//! `model.safetensors`, checks every tensor against the config (name, shape, dtype, file integrity) and builds a
//! [`ViT`] on the given device. Keys may carry the `vision_model.` (CLIP, including full `CLIPModel` checkpoints,
//! whose text tower is ignored) or `vit.` (ViT classification checkpoints, whose `classifier.*` is ignored)
//! prefix.
//!
//! [`ViT::forward`] is the eager forward pass of transformers 5.x: it returns the last hidden state, the pooled
//! output, the last layer's attention probabilities and the DataJuicer saliency score (arXiv 2503.14559): the
//! last layer's \[CLS\]-query × patch-key logits `(q_cls · k_patchᵀ) / √d_head`, averaged over heads.
//! [`ViT::cls_patch_logits`] computes that score alone, skipping the last layer's values and MLP.
//!
//! Images whose patch grid differs from the pretrained one get bicubically interpolated position embeddings, as
//! transformers' `interpolate_pos_encoding=True` does (`align_corners=False`, output *size* `gh × gw`, A = −0.75,
//! border clamp, no antialias; identical for both layouts since transformers 4.45).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, PaddingConfig2d};
use burn::tensor::activation::{gelu, gelu_approximate, relu, sigmoid, silu, softmax};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData, bf16, f16};
use serde_json::Value;

use super::safetensors;
use crate::error::{Error, Result};

/// OpenAI CLIP's normalisation (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` in transformers); one copy, in
/// [`crate::decode`].
pub use crate::decode::{CLIP_MEAN, CLIP_STD};
/// `ViTImageProcessor`'s default mean and standard deviation (`IMAGENET_STANDARD_MEAN` / `_STD`).
pub const VIT_MEAN_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// Which HuggingFace architecture (and therefore which tensor names and block order) a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `CLIPVisionModel`: no patch bias, `pre_layrnorm` before the encoder, no final norm on the sequence,
    /// pooled output `post_layernorm(h[:, 0])`.
    Clip,
    /// `ViTModel` (HF ViT, DINO): patch bias, final `layernorm` on the sequence, optional pooler
    /// `tanh(dense(h[:, 0]))`.
    Vit,
}

/// An activation function named in `config.json` (`hidden_act`, `pooler_act`), as transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x · σ(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `gelu`, `gelu_python`: exact `x · Φ(x)` with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu`, `swish`: `x · σ(x)`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl Activation {
    /// Parses a transformers activation name; `None` when it is not supported.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }

    /// Applies the activation element-wise.
    ///
    /// # Shapes
    ///
    /// - input: any
    /// - output: same as the input
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
            Activation::Gelu => gelu(x),
            Activation::GeluTanh => gelu_approximate(x),
            Activation::Relu => relu(x),
            Activation::Silu => silu(x),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// The architecture hyper-parameters read from a HuggingFace `config.json`.
///
/// Accepted: `model_type` `"clip_vision_model"` (a `CLIPVisionModel` / `CLIPVisionConfig`), `"clip"` (a full
/// `CLIPModel` config; its `vision_config` is used) and `"vit"` (`ViTModel`, DINO). Fields absent from the file
/// take the transformers class defaults, as `from_pretrained` does.
#[derive(Debug, Clone, PartialEq)]
pub struct ViTConfig {
    /// Tensor names and block order.
    pub layout: Layout,
    /// Width `D` of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Number of encoder layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Number of attention heads (`num_attention_heads`); divides `hidden_size`.
    pub num_heads: usize,
    /// Width of the MLP's hidden layer (`intermediate_size`).
    pub intermediate_size: usize,
    /// Side `P` of a square patch in pixels (`patch_size`).
    pub patch_size: usize,
    /// Side of the square pretraining image (`image_size`); the pretrained grid is `image_size / patch_size`.
    pub image_size: usize,
    /// Input channels (`num_channels`).
    pub num_channels: usize,
    /// Epsilon of every LayerNorm (`layer_norm_eps`).
    pub layer_norm_eps: f64,
    /// MLP activation (`hidden_act`).
    pub hidden_act: Activation,
    /// Whether query, key and value projections have biases (`qkv_bias`; always true for CLIP).
    pub qkv_bias: bool,
    /// ViT pooler width (`pooler_output_size`, default `hidden_size`); unused for CLIP.
    pub pooler_output_size: usize,
    /// ViT pooler activation (`pooler_act`, default tanh); unused for CLIP.
    pub pooler_act: Activation,
}

/// Reads one field of a config object, naming the field (with its path) and the file when it is wrong.
struct Fields<'a> {
    obj: &'a serde_json::Map<String, Value>,
    path: &'a str,
    file: &'a str,
}

impl Fields<'_> {
    fn error(&self, field: &str, detail: impl std::fmt::Display) -> Error {
        Error::Weights { file: self.file.to_string(), detail: format!("field `{}{field}`: {detail}", self.path) }
    }

    fn usize(&self, field: &str, default: usize) -> Result<usize> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > 0 => Ok(n),
                _ => Err(self.error(field, format_args!("expected a positive integer, found {v}"))),
            },
        }
    }

    fn f64(&self, field: &str, default: f64) -> Result<f64> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(self.error(field, format_args!("expected a non-negative number, found {v}"))),
            },
        }
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.error(field, format_args!("expected true or false, found {v}"))),
        }
    }

    fn activation(&self, field: &str, default: Activation) -> Result<Activation> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Activation::from_hf_name(s).ok_or_else(|| {
                self.error(
                    field,
                    format_args!(
                        "unsupported activation \"{s}\" (supported: quick_gelu, gelu, gelu_python, gelu_new, \
                         gelu_pytorch_tanh, gelu_fast, relu, silu, swish, tanh)"
                    ),
                )
            }),
            Some(v) => Err(self.error(field, format_args!("expected an activation name, found {v}"))),
        }
    }
}

fn weights_error(file: &Path, detail: impl Into<String>) -> Error {
    Error::Weights { file: file.display().to_string(), detail: detail.into() }
}

impl ViTConfig {
    /// Reads and parses a `config.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Weights`] naming the file (and the field) when it cannot be read, is not JSON, has an unknown
    /// `model_type` or `hidden_act`, or a value out of range.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| weights_error(path, format!("cannot read: {e}")))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    ///
    /// # Errors
    ///
    /// As [`ViTConfig::from_file`].
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let err = |detail: String| Error::Weights { file: file.to_string(), detail };
        let root: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Some(root) = root.as_object() else {
            return Err(err("expected a JSON object".into()));
        };
        let model_type = match root.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(err(format!("field `model_type`: expected a string, found {v}"))),
            None => {
                return Err(err(
                    "field `model_type` is missing (expected \"clip_vision_model\", \"clip\" or \"vit\")".into()
                ));
            }
        };
        match model_type {
            "clip_vision_model" => Self::parse(Fields { obj: root, path: "", file }, Layout::Clip),
            "clip" => match root.get("vision_config") {
                Some(Value::Object(vision)) => {
                    Self::parse(Fields { obj: vision, path: "vision_config.", file }, Layout::Clip)
                }
                Some(v) => Err(err(format!("field `vision_config`: expected an object, found {v}"))),
                None => Err(err("field `vision_config` is missing (model_type \"clip\")".into())),
            },
            "vit" => Self::parse(Fields { obj: root, path: "", file }, Layout::Vit),
            other => Err(err(format!(
                "field `model_type`: unsupported model type \"{other}\" (supported: \"clip_vision_model\", \"clip\", \"vit\")"
            ))),
        }
    }

    fn parse(f: Fields<'_>, layout: Layout) -> Result<Self> {
        // transformers' CLIPVisionConfig and ViTConfig defaults.
        let (hidden, inter, patch, image, eps, act) = match layout {
            Layout::Clip => (768, 3072, 32, 224, 1e-5, Activation::QuickGelu),
            Layout::Vit => (768, 3072, 16, 224, 1e-12, Activation::Gelu),
        };
        let hidden_size = f.usize("hidden_size", hidden)?;
        let num_heads = f.usize("num_attention_heads", 12)?;
        if hidden_size % num_heads != 0 {
            return Err(f.error(
                "num_attention_heads",
                format_args!("{num_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        let qkv_bias = match layout {
            Layout::Clip => true,
            Layout::Vit => f.bool("qkv_bias", true)?,
        };
        Ok(ViTConfig {
            layout,
            hidden_size,
            num_layers: f.usize("num_hidden_layers", 12)?,
            num_heads,
            intermediate_size: f.usize("intermediate_size", inter)?,
            patch_size: f.usize("patch_size", patch)?,
            image_size: f.usize("image_size", image)?,
            num_channels: f.usize("num_channels", 3)?,
            layer_norm_eps: f.f64("layer_norm_eps", eps)?,
            hidden_act: f.activation("hidden_act", act)?,
            qkv_bias,
            pooler_output_size: f.usize("pooler_output_size", hidden_size)?,
            pooler_act: f.activation("pooler_act", Activation::Tanh)?,
        })
        .and_then(|c| {
            if c.image_size < c.patch_size {
                Err(f.error("image_size", format_args!("{} is smaller than patch_size {}", c.image_size, c.patch_size)))
            } else {
                Ok(c)
            }
        })
    }

    /// Side of the pretrained patch grid, `image_size / patch_size`.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Width of one attention head, `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// How images must be prepared for the model, from `preprocessor_config.json`.
///
/// Pixels are scaled to `[0, 1]`, resized (and, for CLIP, centre-cropped) to `image_size × image_size`, then
/// normalised per channel: `(x - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Per-channel mean (`image_mean`; zeros when `do_normalize` is false).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (`image_std`; ones when `do_normalize` is false).
    pub std: [f32; 3],
    /// Side of the square model input in pixels (`crop_size`, else `size`).
    pub image_size: usize,
}

impl Preprocess {
    /// The processor defaults of a layout, for folders without `preprocessor_config.json`: CLIP's OpenAI
    /// mean/std, or `ViTImageProcessor`'s 0.5/0.5; the size is the config's `image_size`.
    pub fn default_for(config: &ViTConfig) -> Self {
        let (mean, std) = match config.layout {
            Layout::Clip => (CLIP_MEAN, CLIP_STD),
            Layout::Vit => (VIT_MEAN_STD, VIT_MEAN_STD),
        };
        Preprocess { mean, std, image_size: config.image_size }
    }

    /// Reads a `preprocessor_config.json`; fields it lacks come from [`Preprocess::default_for`].
    ///
    /// # Errors
    ///
    /// [`Error::Weights`] naming the file and the field when it cannot be read or a value is malformed (a mean
    /// or std without exactly 3 values, a zero std, a non-square size).
    pub fn from_file(path: &Path, config: &ViTConfig) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| weights_error(path, format!("cannot read: {e}")))?;
        let root: Value =
            serde_json::from_str(&text).map_err(|e| weights_error(path, format!("not valid JSON: {e}")))?;
        let Some(root) = root.as_object() else {
            return Err(weights_error(path, "expected a JSON object"));
        };
        let field_err = |field: &str, detail: String| weights_error(path, format!("field `{field}`: {detail}"));
        let mut out = Preprocess::default_for(config);

        let triple = |field: &str| -> Result<Option<[f32; 3]>> {
            match root.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut v = [0.0f32; 3];
                    for (slot, x) in v.iter_mut().zip(a) {
                        *slot = x
                            .as_f64()
                            .filter(|x| x.is_finite())
                            .ok_or_else(|| field_err(field, format!("expected numbers, found {x}")))?
                            as f32;
                    }
                    Ok(Some(v))
                }
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some([x as f32; 3])),
                    _ => Err(field_err(field, format!("expected 3 numbers, found {n}"))),
                },
                Some(v) => Err(field_err(field, format!("expected 3 numbers, found {v}"))),
            }
        };
        if let Some(mean) = triple("image_mean")? {
            out.mean = mean;
        }
        if let Some(std) = triple("image_std")? {
            if std.iter().any(|s| *s <= 0.0) {
                return Err(field_err("image_std", format!("every value must be positive, found {std:?}")));
            }
            out.std = std;
        }
        if root.get("do_normalize").and_then(Value::as_bool) == Some(false) {
            out.mean = [0.0; 3];
            out.std = [1.0; 3];
        }

        let side = |field: &str, v: &Value| -> Result<usize> {
            let positive = |x: &Value| x.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|n| *n > 0);
            match v {
                Value::Number(_) => positive(v).ok_or_else(|| field_err(field, format!("expected a size, found {v}"))),
                Value::Object(o) => match (o.get("height"), o.get("width"), o.get("shortest_edge")) {
                    (Some(h), Some(w), _) => match (positive(h), positive(w)) {
                        (Some(h), Some(w)) if h == w => Ok(h),
                        _ => Err(field_err(field, format!("expected a square size, found {v}"))),
                    },
                    (None, None, Some(s)) => positive(s).ok_or_else(|| field_err(field, format!("bad size {v}"))),
                    _ => Err(field_err(field, format!("expected height and width or shortest_edge, found {v}"))),
                },
                _ => Err(field_err(field, format!("expected a size, found {v}"))),
            }
        };
        let crop = root.get("do_center_crop").and_then(Value::as_bool) != Some(false);
        match (root.get("crop_size").filter(|v| crop && !v.is_null()), root.get("size").filter(|v| !v.is_null())) {
            (Some(c), _) => out.image_size = side("crop_size", c)?,
            (None, Some(s)) => out.image_size = side("size", s)?,
            (None, None) => {}
        }
        Ok(out)
    }
}

/// A parsed safetensors file: the header entries, not yet converted.
struct SafeTensors {
    file: String,
    bytes: Vec<u8>,
    /// Start of the data section (8 + header length).
    data_start: usize,
    /// Stripped name → entry.
    entries: BTreeMap<String, Entry>,
    /// Stripped names consumed by the model.
    used: BTreeSet<String>,
    /// Everything wrong, in model order.
    problems: Vec<String>,
    device: Device,
}

struct Entry {
    /// The key as stored in the file.
    key: String,
    dtype: String,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

impl SafeTensors {
    /// Reads and validates the container: header, offsets and sizes of every tensor (not their dtypes, which
    /// only matter for the tensors the model uses).
    fn open(path: &Path, layout: Layout, device: &Device) -> Result<Self> {
        let file = path.display().to_string();
        let bad = |detail: String| Error::Weights { file: file.clone(), detail };
        let bytes = fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let safetensors::Container { header, data, data_start } = safetensors::split(&bytes).map_err(bad)?;
        let data_len = data.len();
        let prefix = match layout {
            Layout::Clip => "vision_model.",
            Layout::Vit => "vit.",
        };
        let mut entries = BTreeMap::new();
        let mut problems = Vec::new();
        for (key, info) in &header {
            if key == "__metadata__" {
                continue;
            }
            let entry = Self::parse_entry(key, info).map_err(|d| bad(format!("tensor `{key}`: {d}")))?;
            if entry.end > data_len {
                return Err(bad(format!(
                    "file is truncated: tensor `{key}` needs data bytes {}..{} but the file has only {data_len} \
                     after the header",
                    entry.begin, entry.end
                )));
            }
            let name = key.strip_prefix(prefix).unwrap_or(key);
            if Self::ignored(layout, key, name) {
                continue;
            }
            if let Some(previous) = entries.insert(name.to_string(), entry) {
                problems.push(format!("tensor `{name}` is stored twice (as `{}` and `{key}`)", previous.key));
            }
        }
        Ok(SafeTensors { file, bytes, data_start, entries, used: BTreeSet::new(), problems, device: device.clone() })
    }

    fn parse_entry(key: &str, info: &Value) -> std::result::Result<Entry, String> {
        let t = safetensors::TensorInfo::parse(info)?;
        if let Some(size) = safetensors::dtype_size(&t.dtype)
            && t.numel().checked_mul(size) != Some(t.end - t.begin)
        {
            return Err(format!(
                "{} data bytes for shape {:?} of {} ({} expected)",
                t.end - t.begin,
                t.shape,
                t.dtype,
                t.numel().saturating_mul(size)
            ));
        }
        Ok(Entry { key: key.to_string(), dtype: t.dtype, shape: t.shape, begin: t.begin, end: t.end })
    }

    /// Tensors of other parts of a checkpoint that this model never uses.
    fn ignored(layout: Layout, key: &str, name: &str) -> bool {
        match layout {
            Layout::Clip => {
                ["text_model.", "visual_projection.", "text_projection."].iter().any(|p| key.starts_with(p))
                    || key == "logit_scale"
                    || name == "embeddings.position_ids"
            }
            Layout::Vit => key.starts_with("classifier.") || name == "embeddings.mask_token",
        }
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name` (without prefix) as f32 values of `shape`, or `None` after recording the problem.
    fn values(&mut self, name: &str, shape: &[usize]) -> Option<Vec<f32>> {
        let Some(entry) = self.entries.get(name) else {
            self.problems.push(format!("missing tensor `{name}` (shape {shape:?})"));
            return None;
        };
        self.used.insert(name.to_string());
        if entry.shape != shape {
            self.problems
                .push(format!("tensor `{}` has shape {:?}, config.json implies {shape:?}", entry.key, entry.shape));
            return None;
        }
        let raw = &self.bytes[self.data_start + entry.begin..self.data_start + entry.end];
        let values: Vec<f32> = match entry.dtype.as_str() {
            "F32" => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            "F16" => raw.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
            "BF16" => raw.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
            "F64" => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            other => {
                self.problems.push(format!(
                    "tensor `{}` has dtype {other}, expected a float (F32, F16, BF16 or F64)",
                    entry.key
                ));
                return None;
            }
        };
        Some(values)
    }

    /// The tensor stored as `stored` (a shape with the same element count as `shape`) as a tensor of `shape` on
    /// the device; on a problem, a 1-element placeholder (the load then fails).
    fn tensor<const D: usize>(&mut self, name: &str, stored: &[usize], shape: [usize; D]) -> Tensor<D> {
        match self.values(name, stored) {
            Some(v) => Tensor::from_data(TensorData::new(v, shape), &self.device),
            None => Tensor::zeros([1; D], &self.device),
        }
    }

    fn param<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Param<Tensor<D>> {
        Param::initialized(ParamId::new(), self.tensor(name, &shape, shape))
    }

    /// A PyTorch Linear (`weight` [out, in], `bias` [out]) as a burn [`Linear`] (weight [in, out]).
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Linear {
        let weight = match self.values(&format!("{prefix}.weight"), &[d_out, d_in]) {
            Some(w) => {
                let mut t = vec![0.0f32; w.len()];
                for (o, row) in w.chunks_exact(d_in).enumerate() {
                    for (i, x) in row.iter().enumerate() {
                        t[i * d_out + o] = *x;
                    }
                }
                Tensor::from_data(TensorData::new(t, [d_in, d_out]), &self.device)
            }
            None => Tensor::zeros([1, 1], &self.device),
        };
        let bias = bias.then(|| self.param(&format!("{prefix}.bias"), [d_out]));
        Linear { weight: Param::initialized(ParamId::new(), weight), bias }
    }

    fn layer_norm(&mut self, prefix: &str, d: usize, eps: f64) -> LayerNorm {
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(&self.device);
        norm.gamma = self.param(&format!("{prefix}.weight"), [d]);
        norm.beta = Some(self.param(&format!("{prefix}.bias"), [d]));
        norm
    }

    /// Fails with every recorded problem and every tensor the model did not use.
    fn finish(self, layout: Layout, config_file: &Path) -> Result<()> {
        let mut problems = self.problems;
        let unused: Vec<&str> =
            self.entries.iter().filter(|(name, _)| !self.used.contains(*name)).map(|(_, e)| e.key.as_str()).collect();
        if !unused.is_empty() {
            let model = match layout {
                Layout::Clip => "CLIPVisionModel",
                Layout::Vit => "ViTModel",
            };
            problems.push(format!(
                "unexpected tensor{} `{}` (not part of the {model} that {} describes)",
                if unused.len() > 1 { "s" } else { "" },
                unused.join("`, `"),
                config_file.display()
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 12;
        let mut detail = problems.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
        if problems.len() > SHOWN {
            detail.push_str(&format!("; and {} more problems", problems.len() - SHOWN));
        }
        Err(Error::Weights { file: self.file, detail })
    }
}

/// One pre-LN encoder layer: `h += attn(LN1(h))`, `h += fc2(act(fc1(LN2(h))))`.
#[derive(Module, Debug)]
pub struct EncoderLayer {
    /// LayerNorm before attention (CLIP `layer_norm1`, ViT `layernorm_before`).
    pub norm1: LayerNorm,
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Attention output projection (CLIP `out_proj`, ViT `attention.output.dense`).
    pub out: Linear,
    /// LayerNorm before the MLP (CLIP `layer_norm2`, ViT `layernorm_after`).
    pub norm2: LayerNorm,
    /// MLP input layer (CLIP `mlp.fc1`, ViT `intermediate.dense`).
    pub fc1: Linear,
    /// MLP output layer (CLIP `mlp.fc2`, ViT `output.dense`).
    pub fc2: Linear,
    /// Number of attention heads.
    pub num_heads: usize,
    /// MLP activation.
    #[module(skip)]
    pub act: Activation,
}

/// What the last layer's attention yields besides the new hidden state.
struct Attention {
    /// Pre-softmax logits `[B, heads, T, T]`.
    logits: Tensor<4>,
    /// Softmax probabilities `[B, heads, T, T]`.
    probs: Tensor<4>,
}

impl EncoderLayer {
    /// `[B, T, D]` → `[B, heads, T, d_head]`.
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, self.num_heads, d / self.num_heads]).swap_dims(1, 2)
    }

    /// Applies the layer.
    ///
    /// # Shapes
    ///
    /// - h: `[B, T, D]`
    /// - output: `[B, T, D]`
    pub fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        self.forward_with_attention(h).0
    }

    fn forward_with_attention(&self, h: Tensor<3>) -> (Tensor<3>, Attention) {
        let [b, t, d] = h.dims();
        let a = self.norm1.forward(h.clone());
        let q = self.split_heads(self.query.forward(a.clone()));
        let k = self.split_heads(self.key.forward(a.clone()));
        let v = self.split_heads(self.value.forward(a));
        let scale = 1.0 / ((d / self.num_heads) as f64).sqrt();
        let logits = q.matmul(k.swap_dims(2, 3)) * scale;
        let probs = softmax(logits.clone(), 3);
        let context = probs.clone().matmul(v).swap_dims(1, 2).reshape([b, t, d]);
        let h = h + self.out.forward(context);
        let m = self.fc2.forward(self.act.apply(self.fc1.forward(self.norm2.forward(h.clone()))));
        (h + m, Attention { logits, probs })
    }

    /// The \[CLS\]-query × patch-key logits of this layer, averaged over heads: `[B, T-1]`.
    fn cls_patch_logits(&self, h: Tensor<3>) -> Tensor<2> {
        let [b, t, d] = h.dims();
        let a = self.norm1.forward(h);
        let q = self.split_heads(self.query.forward(a.clone().narrow(1, 0, 1)));
        let k = self.split_heads(self.key.forward(a.narrow(1, 1, t - 1)));
        let scale = 1.0 / ((d / self.num_heads) as f64).sqrt();
        // [B, heads, 1, T-1] → mean over heads.
        (q.matmul(k.swap_dims(2, 3)) * scale).mean_dim(1).reshape([b, t - 1])
    }
}

/// A ViT in the CLIP or HF-ViT layout; build it with [`load_dir`].
#[derive(Module, Debug)]
pub struct ViT {
    /// Patch embedding: a `P × P` convolution with stride `P` (no bias for CLIP).
    pub patch_embed: Conv2d,
    /// The \[CLS\] token `[D]` (CLIP `class_embedding`, ViT `cls_token`).
    pub cls_token: Param<Tensor<1>>,
    /// Pretrained position embeddings `[1 + g·g, D]`, \[CLS\] first, patches row-major.
    pub pos_embed: Param<Tensor<2>>,
    /// CLIP's `pre_layrnorm` on the embeddings; `None` for ViT.
    pub pre_norm: Option<LayerNorm>,
    /// Encoder layers.
    pub layers: Vec<EncoderLayer>,
    /// ViT `layernorm` (applied to the whole sequence) or CLIP `post_layernorm` (applied to the pooled token).
    pub final_norm: LayerNorm,
    /// ViT `pooler.dense`; `None` for CLIP and for ViT checkpoints saved without a pooler (DINO).
    pub pooler: Option<Linear>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: ViTConfig,
}

/// Everything [`ViT::forward`] computes.
#[derive(Debug, Clone)]
pub struct ViTOutput {
    /// `[N, T, D]` with `T = 1 + gh·gw`: CLIP's last residual stream (no final norm), or ViT's `layernorm` of it.
    pub last_hidden_state: Tensor<3>,
    /// `[N, D]` (ViT: `[N, pooler_output_size]`): CLIP `post_layernorm(h[:, 0])`, ViT `act(dense(h[:, 0]))`;
    /// `None` for a ViT checkpoint without pooler weights.
    pub pooler_output: Option<Tensor<2>>,
    /// `[N, heads, T, T]`: the last layer's softmax attention probabilities (eager attention).
    pub last_layer_attentions: Tensor<4>,
    /// `[N, gh·gw]`: the last layer's \[CLS\]-query × patch-key logits `(q_cls · k_patchᵀ) / √d_head`, averaged
    /// over heads, patches row-major (the DataJuicer saliency score).
    pub cls_patch_logits: Tensor<2>,
    /// The patch grid `[gh, gw]` of this input.
    pub grid: [usize; 2],
}

impl ViT {
    /// Embeds the pixels and runs every layer but the last.
    ///
    /// # Shapes
    ///
    /// - pixels: `[N, C, H, W]`
    /// - output: `[N, 1 + gh·gw, D]`, the input of the last layer; and `[gh, gw]`
    fn before_last_layer(&self, pixels: Tensor<4>) -> (Tensor<3>, [usize; 2]) {
        let [n, c, h, w] = pixels.dims();
        let p = self.config.patch_size;
        assert!(
            c == self.config.num_channels && h >= p && w >= p,
            "ViT input must be [N, {}, H, W] with H, W >= {p}, got [{n}, {c}, {h}, {w}]",
            self.config.num_channels
        );
        let d = self.config.hidden_size;
        let patches = self.patch_embed.forward(pixels); // [N, D, gh, gw]
        let [_, _, gh, gw] = patches.dims();
        let patches = patches.reshape([n, d, gh * gw]).swap_dims(1, 2);
        let cls = self.cls_token.val().reshape([1, 1, d]).expand([n, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1) + self.position_embeddings(gh, gw).unsqueeze::<3>();
        let mut x = match &self.pre_norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        let last = self.layers.len().saturating_sub(1);
        for layer in &self.layers[..last] {
            x = layer.forward(x);
        }
        (x, [gh, gw])
    }

    /// The position embeddings for a `gh × gw` grid: the pretrained ones, or their patch part resized bicubically
    /// (PyTorch `interpolate(size=(gh, gw), mode="bicubic", align_corners=False)`) with the \[CLS\] one unchanged.
    ///
    /// # Shapes
    ///
    /// - output: `[1 + gh·gw, D]`
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Tensor<2> {
        let pos = self.pos_embed.val();
        let g = self.config.grid();
        if gh == g && gw == g {
            return pos;
        }
        let d = self.config.hidden_size;
        let cls = pos.clone().narrow(0, 0, 1);
        let grid = pos.narrow(0, 1, g * g).swap_dims(0, 1).reshape([1, d, g, g]);
        let options =
            InterpolateOptions::new(InterpolateMode::Bicubic).with_align_corners(false).with_output_size([gh, gw]);
        let patches = interpolate(grid, options).reshape([d, gh * gw]).swap_dims(0, 1);
        Tensor::cat(vec![cls, patches], 0)
    }

    /// The full forward pass.
    ///
    /// # Shapes
    ///
    /// - pixels: `[N, C, H, W]`, normalised as [`Preprocess`] says; `gh = H / P`, `gw = W / P` (floored),
    ///   `T = 1 + gh·gw`
    /// - output: see [`ViTOutput`]
    ///
    /// # Panics
    ///
    /// If `C` is not the config's `num_channels` or `H` or `W` is smaller than the patch size.
    pub fn forward(&self, pixels: Tensor<4>) -> ViTOutput {
        let (x, grid) = self.before_last_layer(pixels);
        let [n, t, _] = x.dims();
        let mut last_hidden_state = x;
        let mut attention = None;
        if let Some(layer) = self.layers.last() {
            let (h, att) = layer.forward_with_attention(last_hidden_state);
            last_hidden_state = h;
            attention = Some(att);
        }
        let heads = self.config.num_heads;
        let Attention { logits, probs } = attention.unwrap_or_else(|| {
            let device = last_hidden_state.device();
            Attention {
                logits: Tensor::zeros([n, heads, t, t], &device),
                probs: Tensor::zeros([n, heads, t, t], &device),
            }
        });
        let cls_patch_logits = logits.narrow(2, 0, 1).narrow(3, 1, t - 1).mean_dim(1).reshape([n, t - 1]);
        let d = self.config.hidden_size;
        let (last_hidden_state, pooler_output) = match self.config.layout {
            Layout::Clip => {
                let cls = last_hidden_state.clone().narrow(1, 0, 1).reshape([n, d]);
                (last_hidden_state, Some(self.final_norm.forward(cls)))
            }
            Layout::Vit => {
                let h = self.final_norm.forward(last_hidden_state);
                let pooled = self.pooler.as_ref().map(|dense| {
                    let cls = h.clone().narrow(1, 0, 1).reshape([n, d]);
                    self.config.pooler_act.apply(dense.forward(cls))
                });
                (h, pooled)
            }
        };
        ViTOutput { last_hidden_state, pooler_output, last_layer_attentions: probs, cls_patch_logits, grid }
    }

    /// The saliency score alone: the last layer's \[CLS\]-query × patch-key logits averaged over heads, as
    /// [`ViTOutput::cls_patch_logits`], without the last layer's values, attention probabilities and MLP.
    ///
    /// # Shapes
    ///
    /// - pixels: `[N, C, H, W]` as in [`ViT::forward`]
    /// - output: `[N, gh·gw]`, patches row-major
    ///
    /// # Panics
    ///
    /// As [`ViT::forward`].
    pub fn cls_patch_logits(&self, pixels: Tensor<4>) -> Tensor<2> {
        let (x, _) = self.before_last_layer(pixels);
        match self.layers.last() {
            Some(layer) => layer.cls_patch_logits(x),
            None => {
                let [n, t, _] = x.dims();
                Tensor::zeros([n, t - 1], &x.device())
            }
        }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ViTConfig {
        &self.config
    }
}

/// Builds the model from a checked weights file.
fn build(config: &ViTConfig, w: &mut SafeTensors) -> ViT {
    let c = config;
    let (d, p, ch, g) = (c.hidden_size, c.patch_size, c.num_channels, c.grid());
    let eps = c.layer_norm_eps;
    let clip = c.layout == Layout::Clip;
    let (patch_w, patch_b, cls, pos) = if clip {
        (
            "embeddings.patch_embedding.weight",
            None,
            "embeddings.class_embedding",
            "embeddings.position_embedding.weight",
        )
    } else {
        (
            "embeddings.patch_embeddings.projection.weight",
            Some("embeddings.patch_embeddings.projection.bias"),
            "embeddings.cls_token",
            "embeddings.position_embeddings",
        )
    };
    let patch_embed = Conv2d {
        weight: w.param(patch_w, [d, ch, p, p]),
        bias: patch_b.map(|b| w.param(b, [d])),
        stride: [p, p],
        kernel_size: [p, p],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Valid,
    };
    // ViT stores both with leading unit axes: [1, 1, D] and [1, T, D].
    let (cls_stored, pos_stored) =
        if clip { (vec![d], vec![1 + g * g, d]) } else { (vec![1, 1, d], vec![1, 1 + g * g, d]) };
    let cls_token = Param::initialized(ParamId::new(), w.tensor(cls, &cls_stored, [d]));
    let pos_embed = Param::initialized(ParamId::new(), w.tensor(pos, &pos_stored, [1 + g * g, d]));
    let pre_norm = clip.then(|| w.layer_norm("pre_layrnorm", d, eps));
    let layers = (0..c.num_layers)
        .map(|i| {
            let (names, qkv_bias) = if clip {
                let l = format!("encoder.layers.{i}");
                (
                    [
                        format!("{l}.layer_norm1"),
                        format!("{l}.self_attn.q_proj"),
                        format!("{l}.self_attn.k_proj"),
                        format!("{l}.self_attn.v_proj"),
                        format!("{l}.self_attn.out_proj"),
                        format!("{l}.layer_norm2"),
                        format!("{l}.mlp.fc1"),
                        format!("{l}.mlp.fc2"),
                    ],
                    true,
                )
            } else {
                let l = format!("encoder.layer.{i}");
                (
                    [
                        format!("{l}.layernorm_before"),
                        format!("{l}.attention.attention.query"),
                        format!("{l}.attention.attention.key"),
                        format!("{l}.attention.attention.value"),
                        format!("{l}.attention.output.dense"),
                        format!("{l}.layernorm_after"),
                        format!("{l}.intermediate.dense"),
                        format!("{l}.output.dense"),
                    ],
                    c.qkv_bias,
                )
            };
            let [n1, q, k, v, o, n2, f1, f2] = &names;
            EncoderLayer {
                norm1: w.layer_norm(n1, d, eps),
                query: w.linear(q, d, d, qkv_bias),
                key: w.linear(k, d, d, qkv_bias),
                value: w.linear(v, d, d, qkv_bias),
                out: w.linear(o, d, d, true),
                norm2: w.layer_norm(n2, d, eps),
                fc1: w.linear(f1, d, c.intermediate_size, true),
                fc2: w.linear(f2, c.intermediate_size, d, true),
                num_heads: c.num_heads,
                act: c.hidden_act,
            }
        })
        .collect();
    let final_norm = w.layer_norm(if clip { "post_layernorm" } else { "layernorm" }, d, eps);
    // DINO checkpoints have no pooler: it is loaded when either of its tensors is present.
    let pooler = (!clip && (w.has("pooler.dense.weight") || w.has("pooler.dense.bias")))
        .then(|| w.linear("pooler.dense", d, c.pooler_output_size, true));
    ViT { patch_embed, cls_token, pos_embed, pre_norm, layers, final_norm, pooler, config: config.clone() }
}

/// Loads a HuggingFace folder (`config.json`, `model.safetensors`, optional `preprocessor_config.json`) onto
/// `device`.
///
/// # Errors
///
/// [`Error::Weights`] naming the file, and the field or tensor, when the config is unreadable or unsupported,
/// the preprocessor config is malformed, or the weights do not fit the config: a missing, unexpected, misshaped
/// or non-float tensor, a truncated file, or a config whose sizes disagree with the tensors'. Every problem found
/// in the weights is listed (up to 12).
pub fn load_dir(dir: &Path, device: &Device) -> Result<(ViT, Preprocess)> {
    let config_path = dir.join("config.json");
    let config = ViTConfig::from_file(&config_path)?;
    let pre_path = dir.join("preprocessor_config.json");
    let preprocess =
        if pre_path.exists() { Preprocess::from_file(&pre_path, &config)? } else { Preprocess::default_for(&config) };
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        let detail = if dir.join("model.safetensors.index.json").exists() {
            "not found (sharded checkpoints, model.safetensors.index.json, are not supported)"
        } else {
            "not found (only model.safetensors is supported)"
        };
        return Err(weights_error(&weights_path, detail));
    }
    let mut weights = SafeTensors::open(&weights_path, config.layout, device)?;
    let model = build(&config, &mut weights);
    weights.finish(config.layout, &config_path)?;
    Ok((model, preprocess))
}
