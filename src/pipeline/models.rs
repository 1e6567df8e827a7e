//! Model loading for a loader: the classifier, the ViT of the attention scorer, the tokenizer, the vocabulary
//! and the enricher it is handed to, and the score cache with its namespace. Everything here is loaded and
//! checked once, when the loader is built; each epoch's model threads clone it.

use std::sync::Arc;

use burn::tensor::Device;

use super::Config;
use crate::error::{Error, Result};
use crate::model::vit::{self, ViT};
use crate::text::enrich::Enricher;
use crate::text::tokenizer::ClipTokenizer;
use crate::vision::cache::{ScoreCache, fingerprint};
use crate::vision::prune::KeepPolicy;
use crate::vision::{Classifier, ClassifierSpec, ScorerSpec, Vocabulary};

/// Models loaded (and checked) at build time, cloned into each epoch's model threads.
#[derive(Clone)]
pub(crate) struct Models {
    /// MobileNetV2: the cam scorer's model, and the class head unless another is configured.
    pub(super) cam: Classifier,
    /// The class head (`--classifier`); a clone of `cam` for MobileNetV2.
    pub(super) classifier: Classifier,
    pub(super) tokenizer: &'static ClipTokenizer,
    pub(super) enricher: Enricher,
    pub(super) vit: Option<ViT>,
    pub(super) vocabulary: Vocabulary,
    /// Mean/std of the decoded pixels when they are not ImageNet's (attention preprocessing).
    pub(super) input_norm: Option<([f32; 3], [f32; 3])>,
    /// The scorer's output cache, when configured.
    pub(super) score_cache: Option<Arc<ScoreCache>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models").field("classifier", &self.classifier).field("vit", &self.vit.is_some()).finish()
    }
}

impl Models {
    /// Loads the classifier and, for the attention scorer, the ViT; adapts the decode settings to the scorer's
    /// preprocessing (ViT mean/std and input size, patch size).
    pub(crate) fn load(config: &mut Config, device: &Device) -> Result<Self> {
        let v = &config.vision;
        let cam = Classifier::load(v.classifier_weights.as_deref(), device)?.with_intra_op_threads(v.intra_op_threads);
        let classifier = match &v.classifier {
            ClassifierSpec::MobileNetV2 => cam.clone(),
            spec => Classifier::load_spec(spec, None, device)?
                .with_intra_op_threads(v.intra_op_threads)
                .sharing_forwards_of(&cam),
        };
        let mut vocabulary = Vocabulary::imagenet()?;
        if let Some(path) = &v.vocabulary {
            vocabulary = vocabulary.restrict_with(path)?;
        }
        let (vit, input_norm) = match &v.scorer {
            ScorerSpec::Attention(dir) => {
                let (vit, pre) = vit::load_dir(dir, device)?;
                config.decode.mean = pre.mean;
                config.decode.std = pre.std;
                config.decode.image_size = pre.image_size;
                config.patch_size = vit.config().patch_size;
                (Some(vit), Some((pre.mean, pre.std)))
            }
            _ => (None, None),
        };
        if config.vision.scorer == ScorerSpec::None {
            config.vision.prune.policy = KeepPolicy::Ratio(1.0);
        }
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let tokenizer = ClipTokenizer::shared()?;
        let enricher = Enricher::with_vocabulary_of(config.text.clone(), config.seed, vocabulary.clone())?;
        let score_cache = match &config.vision.score_cache {
            Some(c) if matches!(config.vision.scorer, ScorerSpec::Cam | ScorerSpec::Attention(_)) => {
                Some(Arc::new(ScoreCache::open_with(c, &cache_namespace(config)?, &config.read)?))
            }
            _ => None,
        };
        Ok(Self { cam, classifier, tokenizer, enricher, vit, vocabulary, input_norm, score_cache })
    }
}

/// Everything that changes a scorer's output, as a string: the score cache's namespace.
fn cache_namespace(config: &Config) -> Result<String> {
    let v = &config.vision;
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| Error::io(format!("reading `{}`", p.display()), e));
    let weights = match &v.scorer {
        ScorerSpec::Attention(dir) => {
            let mut h = fingerprint(&read(&dir.join("model.safetensors"))?);
            h ^= fingerprint(&read(&dir.join("config.json"))?).rotate_left(1);
            h
        }
        _ => match &v.classifier_weights {
            Some(p) => fingerprint(&read(p)?),
            None => fingerprint(crate::model::mobilenet_v2::embedded_weights()),
        },
    };
    // The class head is part of the key too: a cached entry records which classifier's classes it carries.
    let classifier = match &v.classifier {
        ClassifierSpec::MobileNetV2 => ClassifierSpec::MobileNetV2.name().to_string(),
        spec @ ClassifierSpec::EfficientNetLite(_, path) => {
            format!("{}:{:016x}", spec.name(), fingerprint(&read(path)?))
        }
    };
    let d = &config.decode;
    Ok(format!(
        "juicer score cache v3; scorer={}; weights={weights:016x}; classifier={classifier}; image_size={}; \
         resize_size={:?}; mean={:?}; std={:?}; patch={}; cam_top={}; candidates={}; score_size={:?}",
        v.scorer.name(),
        d.image_size,
        d.resize_size,
        d.mean,
        d.std,
        config.patch_size,
        v.cam_top,
        v.extract.candidates(v.top_k),
        v.score_size
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::efficientnet_lite::LiteVariant;

    /// The score cache's key names the class head and fingerprints its weights: another classifier, or other
    /// weights for it, never reads a cached entry.
    #[test]
    fn cache_namespace_includes_the_classifier_and_its_weights() {
        let mut config = Config::default();
        let mobilenet = cache_namespace(&config).unwrap();
        assert!(mobilenet.contains("classifier=mobilenet-v2;"), "{mobilenet}");
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        std::fs::write(&a, b"weights a").unwrap();
        std::fs::write(&b, b"weights b").unwrap();
        config.vision.classifier = ClassifierSpec::EfficientNetLite(LiteVariant::Lite0, a);
        let lite_a = cache_namespace(&config).unwrap();
        config.vision.classifier = ClassifierSpec::EfficientNetLite(LiteVariant::Lite0, b);
        let lite_b = cache_namespace(&config).unwrap();
        assert!(lite_a.contains("classifier=efficientnet-lite0:"), "{lite_a}");
        assert_ne!(lite_a, lite_b);
        assert_ne!(lite_a, mobilenet);
        config.vision.classifier = ClassifierSpec::EfficientNetLite(LiteVariant::Lite0, dir.path().join("missing"));
        assert!(cache_namespace(&config).unwrap_err().to_string().contains("missing"));
    }
}
