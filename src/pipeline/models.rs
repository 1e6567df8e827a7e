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
use crate::vision::{Classifier, ScorerSpec, Vocabulary};

/// Models loaded (and checked) at build time, cloned into each epoch's model threads.
#[derive(Clone)]
pub(crate) struct Models {
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
        let classifier =
            Classifier::load(v.classifier_weights.as_deref(), device)?.with_intra_op_threads(v.intra_op_threads);
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
        Ok(Self { classifier, tokenizer, enricher, vit, vocabulary, input_norm, score_cache })
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
    let d = &config.decode;
    Ok(format!(
        "juicer score cache v2; scorer={}; weights={weights:016x}; image_size={}; resize_size={:?}; mean={:?}; \
         std={:?}; patch={}; cam_top={}; candidates={}; score_size={:?}",
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
