//! The vision branch: score every patch, keep the salient ones, extract the classes the kept pixels show.
//!
//! One file per stage, each with its configuration beside its runtime:
//! - [`score`]: the `score` stage ([`ScorerSpec`]; `cam`, `attention`, `random`, `none` scorers) and the
//!   [`Classifier`] ([`ClassifierSpec`]: MobileNetV2, whose forward feeds both saliency and classes, or an
//!   EfficientNet-Lite as a stronger class head);
//! - [`prune`]: the keep policies ([`prune::PruneConfig`]) and the `prune` stage;
//! - [`extract`]: the extract rules ([`ExtractRule`]: the tree rule [`select_concepts`], the flat rule
//!   [`select_classes`]) and the `extract` stage ([`Extract`]);
//! - [`vocabulary`]: what the classes and their hypernyms are called and which words name them ([`Vocabulary`]),
//!   shared with the text branch; [`hierarchy`]: the WordNet is-a tree over the ImageNet classes;
//! - [`labels`]: hand labels of what photos show, and the precision of extracted concepts against them;
//! - [`cam`]: class-activation-map maths on the host; [`cache`]: the on-disk score cache.
//!
//! [`VisionConfig`] gathers the branch's settings. The items each stage passes on ([`Scored`], [`Pruned`],
//! [`Candidate`]) live in [`crate::sample`] with the rest of the sample lifecycle.

pub mod cache;
pub mod cam;
pub mod extract;
pub mod hierarchy;
pub mod labels;
pub mod prune;
pub mod score;
pub mod vocabulary;

use std::path::PathBuf;

pub use crate::sample::{Candidate, Pruned, Scored};
pub use extract::{Extract, ExtractRule, select_classes, select_concepts};
use prune::PruneConfig;
pub use prune::PruneStage;
pub use score::{AttentionScorer, CamScorer, Classifier, ClassifierSpec, PlainScorer, ScorerSpec};
pub use vocabulary::Vocabulary;

/// Settings of the vision branch.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    /// The saliency scorer.
    pub scorer: ScorerSpec,
    /// MobileNetV2 safetensors for the cam scorer and the classifier (`None`: the embedded weights).
    pub classifier_weights: Option<PathBuf>,
    /// The classifier that names the classes (default MobileNetV2, the scorer's own forward).
    pub classifier: ClassifierSpec,
    /// Keep policy.
    pub prune: PruneConfig,
    /// How concepts are chosen (default: the tree rule at summed probability 0.7).
    pub extract: ExtractRule,
    /// Candidate classes per image of the flat rule (default 3).
    pub top_k: usize,
    /// Minimum full-image probability of a candidate of the flat rule (default 0.15).
    pub min_prob: f32,
    /// Summed probability a second, unrelated concept needs under the tree rule (default `None`: one concept at
    /// most; see [`extract`]).
    pub second_threshold: Option<f32>,
    /// Classes whose maps make up the cam saliency (default 5).
    pub cam_top: usize,
    /// Share of the way from the kept fraction to 1 a class's evidence must reach (default 0.25).
    pub margin: f32,
    /// Optional vocabulary file restricting and renaming classes.
    pub vocabulary: Option<PathBuf>,
    /// Items per model micro-batch. 0 (the default) chooses when the loader is built ([`auto_micro_batch`]): 4 on
    /// the CPU, 16 on a GPU.
    pub micro_batch: usize,
    /// Longest wait for a micro-batch to fill (default 20 ms).
    pub max_wait: std::time::Duration,
    /// Model threads per model stage, each with its own replica of the model on the device. 0 (the default)
    /// chooses when the loader is built ([`auto_model_workers`]): 2 on a CPU device with at least 2 cores (one
    /// forward does not keep two cores busy: 1.28× samples/s measured on 2 cores), 2 on a GPU, so that one
    /// replica's host work (stacking, upload, read-back, the host CAM) overlaps the other's kernels (on an H200
    /// the whole graph gave 390 samples/s with one replica, 492 with 4, 530 with 8). The metrics table
    /// (`juicer bench`, `juicer run`) shows the workers chosen.
    pub model_workers: usize,
    /// Side of the `cam` scorer's input (`None`: the model input, [`crate::decode::DecodeConfig::image_size`]).
    /// A smaller side downscales each decoded image for the scorer only (antialiased, [`cam::downscale_planes`]);
    /// the batches keep the full crop. The CAM is coarse anyway (7×7 at 224 px, 5×5 at 160); the README gives
    /// the measured speed and agreement at 224, 192 and 160.
    pub score_size: Option<usize>,
    /// CPU threads each model replica runs its kernels on ([`crate::device::IntraOp`]). 0 (the default) chooses
    /// when the loader is built: the cores shared out among the replicas (1 each with 2 replicas on 2 cores); the
    /// GPU backend does not use them.
    pub intra_op_threads: usize,
    /// On-disk cache of the scorer's outputs (`cam`, `attention`), so later epochs skip the scoring model.
    pub score_cache: Option<cache::ScoreCacheConfig>,
}

/// The model workers [`VisionConfig::model_workers`] = 0 stands for on `device`, with `cores` CPU cores.
pub fn auto_model_workers(device: &burn::tensor::Device, cores: usize) -> usize {
    if *device == burn::tensor::Device::flex() && cores < 2 { 1 } else { 2 }
}

/// The micro-batch [`VisionConfig::micro_batch`] = 0 stands for on `device`. On the CPU a forward's cost per image
/// grows with the batch once the activations leave the caches (measured with burn's depthwise layers, before the
/// host kernel: MobileNetV2 on one thread 26.9 ms per image at 1, 28.4 at 4, 35.5 at 16; the whole graph on 2
/// cores 1.26× faster at 4 than at 16 with 0.45× the peak RSS; with the host kernel 1, 2 and 4 are within noise),
/// so small micro-batches win there; a GPU wants larger ones.
pub fn auto_micro_batch(device: &burn::tensor::Device) -> usize {
    if *device == burn::tensor::Device::flex() { 4 } else { 16 }
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            scorer: ScorerSpec::Cam,
            classifier_weights: None,
            classifier: ClassifierSpec::MobileNetV2,
            prune: PruneConfig::default(),
            extract: ExtractRule::default(),
            top_k: 3,
            min_prob: 0.15,
            second_threshold: None,
            cam_top: 5,
            margin: 0.25,
            vocabulary: None,
            micro_batch: 0,
            max_wait: std::time::Duration::from_millis(20),
            model_workers: 0,
            intra_op_threads: 0,
            score_size: None,
            score_cache: None,
        }
    }
}

impl VisionConfig {
    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.prune.problems();
        p.extend(self.extract.problems());
        if let Some(t) = self.second_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            p.push(format!("second threshold {t} is outside (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_prob) {
            p.push(format!("min_prob {} is outside [0, 1]", self.min_prob));
        }
        if !(0.0..=1.0).contains(&self.margin) {
            p.push(format!("margin {} is outside [0, 1]", self.margin));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_workers_default_to_two_but_one_on_a_single_core_cpu() {
        let cpu = burn::tensor::Device::flex();
        assert_eq!(auto_model_workers(&cpu, 2), 2);
        assert_eq!(auto_model_workers(&cpu, 16), 2);
        assert_eq!(auto_model_workers(&cpu, 1), 1);
        #[cfg(feature = "wgpu")]
        {
            // A wgpu device is only a name until first used: no adapter is needed to ask for its default.
            let gpu = burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
            assert_eq!(auto_model_workers(&gpu, 1), 2, "two replicas on a GPU overlap host work with kernels");
        }
        assert_eq!(VisionConfig::default().model_workers, 0, "0 = chosen at build");
        assert!(VisionConfig::default().problems().is_empty());
    }
}
