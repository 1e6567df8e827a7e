//! The `extract` stage: the object classes the kept patches show.
//!
//! # The rule
//! A candidate class (top-k by probability, at least `min_prob`) is kept when its own activation map puts
//! clearly more of its positive mass inside the kept patches than the kept fraction alone would:
//! with `ρ = kept / patches` and `f` = the class map's positive mass inside the kept patches over its total,
//! the class is kept when `f ≥ ρ + margin·(1 − ρ)` (default margin 0.25: at keep 0.5 a class needs 62.5 % of its
//! evidence inside, at 0.25 it needs 43.75 %, at 1.0 every class with any positive evidence passes). The
//! threshold sits a fixed share of the way from chance (`ρ`) to certainty (1), so it scales with the keep
//! ratio. Masking the dropped patches and classifying again would cost a second forward and, measured on
//! labelled photos, loses about 4 points of top-3 accuracy at keep 0.5 (26 at keep 0.25).
//!
//! # Where the candidates come from
//! On the cam path the scorer's forward already produced them ([`Scored::candidates`]) and extract is plain
//! CPU work on the decode pool ([`Stage`]). After the other scorers the classifier runs here, micro-batched on
//! a model thread ([`BatchStage`]), on the full image re-normalised to ImageNet's statistics when the scorer's
//! preprocessing differed.

use std::collections::BTreeMap;

use super::score::{Classifier, failed_all};
use super::vocabulary::Vocabulary;
use crate::decode::{IMAGENET_MEAN, IMAGENET_STD};
use crate::error::SampleError;
use crate::sample::{Candidate, Class, JuicedSample, Pruned};
use crate::stage::{BatchStage, Stage};

/// Applies the extract rule (module docs) to candidates, most probable first.
pub fn select_classes(
    candidates: &[Candidate],
    kept: &[u32],
    n_patches: usize,
    top_k: usize,
    min_prob: f32,
    margin: f32,
    vocabulary: &Vocabulary,
) -> Vec<Class> {
    let rho = if n_patches == 0 { 1.0 } else { kept.len() as f32 / n_patches as f32 };
    let need = rho + margin * (1.0 - rho);
    candidates
        .iter()
        .filter(|c| c.prob >= min_prob)
        .filter_map(|c| vocabulary.name(c.id).map(|name| (c, name)))
        .take(top_k)
        .filter(|(c, _)| {
            let total: f32 = c.map.iter().map(|v| v.max(0.0)).sum();
            let inside: f32 = kept.iter().filter_map(|&i| c.map.get(i as usize)).map(|v| v.max(0.0)).sum();
            total > 0.0 && inside / total >= need - 1e-6
        })
        .map(|(c, name)| Class { id: c.id, name, prob: c.prob })
        .collect()
}

/// The extract stage: classes for the kept patches, then the sample the batcher sees. Runs the classifier
/// only for samples whose scorer did not (attention, random, none).
#[derive(Clone)]
pub struct Extract {
    /// Classifier for samples without candidates (`None` on the cam path, where every sample has them).
    pub classifier: Option<Classifier>,
    /// Candidate count.
    pub top_k: usize,
    /// Minimum probability.
    pub min_prob: f32,
    /// Evidence margin.
    pub margin: f32,
    /// Class names.
    pub vocabulary: Vocabulary,
    /// Mean/std of the decoded pixels, when they differ from ImageNet's (attention preprocessing): the
    /// classifier input is re-normalised.
    pub input_norm: Option<([f32; 3], [f32; 3])>,
}

impl Extract {
    fn finish(&self, p: Pruned, candidates: &[Candidate]) -> JuicedSample {
        let n = p.scored.grid.0 * p.scored.grid.1;
        let classes = select_classes(candidates, &p.kept, n, self.top_k, self.min_prob, self.margin, &self.vocabulary);
        p.into_juiced(classes)
    }

    fn imagenet_input<'a>(&self, pixels: &'a [f32], size: usize) -> std::borrow::Cow<'a, [f32]> {
        match self.input_norm {
            None => std::borrow::Cow::Borrowed(pixels),
            Some((mean, std)) => {
                let plane = size * size;
                pixels
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let c = (i / plane).min(2);
                        (x * std[c] + mean[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
                    })
                    .collect()
            }
        }
    }
}

impl Stage for Extract {
    type In = Pruned;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "extract"
    }

    /// The cam path: candidates came with the scores.
    fn process(&self, mut p: Pruned) -> std::result::Result<JuicedSample, SampleError> {
        let candidates = p.scored.candidates.take().unwrap_or_default();
        Ok(self.finish(p, &candidates))
    }
}

impl BatchStage for Extract {
    type In = Pruned;
    type Out = JuicedSample;

    fn process_batch(&mut self, items: Vec<Pruned>) -> Vec<std::result::Result<JuicedSample, SampleError>> {
        let need: Vec<usize> =
            items.iter().enumerate().filter(|(_, p)| p.scored.candidates.is_none()).map(|(i, _)| i).collect();
        let mut found: BTreeMap<usize, Vec<Candidate>> = BTreeMap::new();
        if let (Some(classifier), Some(&first)) = (&self.classifier, need.first()) {
            let size = items[first].scored.sample.size;
            let g = items[first].scored.grid;
            let inputs: Vec<std::borrow::Cow<'_, [f32]>> =
                need.iter().map(|&i| self.imagenet_input(&items[i].scored.sample.pixels, size)).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_ref()).collect();
            match classifier.classify(&refs, size, g, self.top_k) {
                Ok(c) => {
                    for (&i, c) in need.iter().zip(c) {
                        found.insert(i, c);
                    }
                }
                Err(e) => return failed_all(items.into_iter().map(|p| p.scored.sample.key), &e),
            }
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                let candidates = found.remove(&i).or_else(|| p.scored.candidates.take()).unwrap_or_default();
                Ok(self.finish(p, &candidates))
            })
            .collect()
    }
}
