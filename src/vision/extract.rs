//! The `extract` stage: the object concepts the kept patches show.
//!
//! # The tree rule (default, [`ExtractRule::Tree`])
//! ImageNet-1k classes are mutually exclusive, so a classifier unsure which lizard it sees spreads its
//! probability over several lizards, and the top 3 are three guesses for one object. The tree rule sums the class
//! probabilities up the WordNet is-a tree ([`Hierarchy::tree_probs`]) and names the most specific *nameable*
//! concept whose summed probability reaches the threshold ([`Hierarchy::select`]): uncertain alternatives
//! collapse into a correct common word ("lizard", "dog", "car"), a confident class stays specific ("African
//! chameleon"), and where nothing reaches the threshold nothing is named: a missing word costs less than a wrong
//! one.
//!
//! The probabilities are **calibrated** first ([`calibrate`], softmax temperature `t`): a classifier trained
//! with cross-entropy is overconfident, most of all on photos unlike its training set (monuments, for ImageNet),
//! where it gives a wrong class 0.9 as readily as a right one. Softening with `t > 1` lets only the classes the
//! network is confident about by a wide logit margin reach a threshold alone; the rest spread out and either sum
//! into a hypernym or name nothing. The defaults, temperature [`DEFAULT_TEMPERATURE`] and threshold
//! [`DEFAULT_THRESHOLD`], were chosen on the 73 hand-labelled fixture photos (`fixtures/labels`) as the point of
//! a plateau where precision is at least 0.9 with the most recall; the README's "Scorers and the extract rule"
//! has the whole sweep (with `t = 1`, no threshold reaches 0.8 precision on those photos). Over 1000 classes a
//! temperature also lifts the long tail, so a class the classifier gives at least [`DEFAULT_CONFIDENT`] before
//! calibration is named as itself (a giant panda at 0.999 stays "giant panda" rather than "mammal"). A record's
//! `prob` is the calibrated summed probability, or that uncalibrated probability for such a class.
//!
//! # What is kept
//! A concept is emitted only when the kept patches hold its evidence. Its map is the probability-weighted class
//! activation map of the classes under it (`CAM(v) = Σ p[c]·CAM(c) / Σ p[c]` over the scorer's top candidates
//! under `v`; a CAM is linear in the classifier weights), and with `ρ = kept / patches` and `f` = the map's
//! positive mass inside the kept patches over its total, it passes when `f ≥ ρ + margin·(1 − ρ)` (default margin
//! 0.25: at keep 0.5 a concept needs 62.5 % of its evidence inside, at 0.25 it needs 43.75 %, at 1.0 any positive
//! evidence passes). The bar sits a fixed share of the way from chance (`ρ`) to certainty, so it scales with the
//! keep ratio.
//!
//! # A second object
//! Off by default ([`VisionConfig::second_threshold`](super::VisionConfig)). When set, a further concept is
//! emitted only with evidence of a second object: it reaches that (lower) threshold, is neither an ancestor, a
//! descendant nor a close relative of the first ([`Hierarchy::related`]), passes the evidence test, and most of
//! its map's positive mass lies outside the first concept's region (the smallest set of patches holding three
//! quarters of the first concept's positive mass).
//!
//! # The flat rule ([`ExtractRule::Flat`])
//! The rule juicer had first, kept as an explicit mode: the top `top_k` classes with probability at least
//! `min_prob`, each passing the evidence test on its own map.
//!
//! # Where the candidates come from
//! On the cam path the scorer's forward already produced the probabilities and the top candidates with their maps
//! ([`Scored::probs`], [`Scored::candidates`]) and extract is plain CPU work on the decode pool ([`Stage`]). After
//! the other scorers, or with a class head of its own (`--classifier efficientnet-lite0`), the classifier runs here, micro-batched on a model thread ([`BatchStage`]), on the full image
//! re-normalised to ImageNet's statistics when the scorer's preprocessing differed.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::hierarchy::{ConceptId, Hierarchy};
use super::score::{Classified, Classifier, ClassifierSpec, failed_all};
use super::vocabulary::Vocabulary;
use crate::decode::{IMAGENET_MEAN, IMAGENET_STD, renormalise};
use crate::error::SampleError;
use crate::model::efficientnet_lite::LiteVariant;
use crate::sample::{Candidate, Class, JuicedSample, Pruned, Scored};
use crate::stage::{BatchStage, Stage};

/// The tree rule's default threshold on the calibrated summed probability (module docs).
pub const DEFAULT_THRESHOLD: f32 = 0.5;
/// The tree rule's default calibration temperature (module docs).
pub const DEFAULT_TEMPERATURE: f32 = 2.5;

/// The tree rule's default probability at which a class is named as itself, calibration aside (module docs).
pub const DEFAULT_CONFIDENT: f32 = 0.98;

/// The tree rule calibrated for `classifier`: temperature and threshold fitted per classifier, because their
/// probabilities differ in kind (the EfficientNet-Lite checkpoints were trained with label smoothing, so they are
/// rarely sure of anything and the MobileNetV2 temperature of 2.5 spreads them below every threshold). The Lite
/// values are `examples/extract_eval --logits` fits on the calibration photos (the calibration half of
/// `fixtures/heldout` with the 73 fixture photos): the highest recall with precision ≥ 0.90 and at most 5 % of
/// captions wrong. MobileNetV2 keeps [`DEFAULT_TEMPERATURE`] and [`DEFAULT_THRESHOLD`]: no setting reaches those
/// bounds for it on the same photos (README, "Scorers and the extract rule").
pub fn calibrated_rule(classifier: &ClassifierSpec) -> ExtractRule {
    let (temperature, threshold) = match classifier {
        ClassifierSpec::MobileNetV2 => (DEFAULT_TEMPERATURE, DEFAULT_THRESHOLD),
        ClassifierSpec::EfficientNetLite(LiteVariant::Lite0, _) => (1.5, 0.5),
        ClassifierSpec::EfficientNetLite(LiteVariant::Lite1 | LiteVariant::Lite2, _) => (1.5, 0.4),
    };
    ExtractRule::Tree { threshold, temperature, confident: DEFAULT_CONFIDENT }
}

/// Classes with a map that the tree rule weighs into a concept's evidence map (the scorer's top candidates).
pub const TREE_CANDIDATES: usize = 10;

/// How the extract stage chooses what to name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExtractRule {
    /// The most specific nameable concept whose summed probability reaches `threshold` (module docs).
    Tree {
        /// Summed (calibrated) probability a concept needs, in `(0, 1]` (default 0.5).
        threshold: f32,
        /// Softmax temperature the class probabilities are calibrated with before they are summed, at least 1
        /// (default 2.5; 1 leaves them as the classifier gave them).
        temperature: f32,
        /// A class the classifier gives at least this (uncalibrated) probability is named as itself (default
        /// 0.98).
        confident: f32,
    },
    /// The top `top_k` classes with probability at least `min_prob` (the first rule; module docs).
    Flat,
}

impl Default for ExtractRule {
    fn default() -> Self {
        ExtractRule::Tree {
            threshold: DEFAULT_THRESHOLD,
            temperature: DEFAULT_TEMPERATURE,
            confident: DEFAULT_CONFIDENT,
        }
    }
}

impl ExtractRule {
    /// Short name for summaries.
    pub fn name(&self) -> &'static str {
        match self {
            ExtractRule::Tree { .. } => "tree",
            ExtractRule::Flat => "flat",
        }
    }

    /// Classes with maps the classifier hands over for this rule (`top_k` is the flat rule's).
    pub fn candidates(&self, top_k: usize) -> usize {
        match self {
            ExtractRule::Tree { .. } => TREE_CANDIDATES.max(top_k),
            ExtractRule::Flat => top_k,
        }
    }

    /// Every problem with the rule's settings.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let ExtractRule::Tree { threshold, temperature, confident } = *self {
            if !(confident > 0.0 && confident <= 1.0) {
                p.push(format!("class confident probability {confident} is outside (0, 1]"));
            }
            if !(threshold > 0.0 && threshold <= 1.0) {
                p.push(format!("class threshold {threshold} is outside (0, 1]"));
            }
            if !(temperature >= 1.0 && temperature.is_finite()) {
                p.push(format!("class temperature {temperature} is below 1 (or not finite)"));
            }
        }
        p
    }
}

/// The positive mass of `map` inside `kept` over its total positive mass; `None` for a map without any (no
/// evidence anywhere, which no share can stand for).
fn evidence_inside(map: &[f32], kept: &[u32]) -> Option<f32> {
    let total: f32 = map.iter().map(|v| v.max(0.0)).sum();
    let inside: f32 = kept.iter().filter_map(|&i| map.get(i as usize)).map(|v| v.max(0.0)).sum();
    (total > 0.0).then(|| inside / total)
}

/// The evidence a concept needs inside the kept patches (module docs).
fn evidence_needed(kept: usize, n_patches: usize, margin: f32) -> f32 {
    let rho = if n_patches == 0 { 1.0 } else { kept as f32 / n_patches as f32 };
    rho + margin * (1.0 - rho) - 1e-6
}

/// Applies the flat rule (module docs) to candidates, most probable first.
pub fn select_classes(
    candidates: &[Candidate],
    kept: &[u32],
    n_patches: usize,
    top_k: usize,
    min_prob: f32,
    margin: f32,
    vocabulary: &Vocabulary,
) -> Vec<Class> {
    let need = evidence_needed(kept.len(), n_patches, margin);
    candidates
        .iter()
        .filter(|c| c.prob >= min_prob)
        .filter_map(|c| vocabulary.class(c.id, c.prob).map(|class| (c, class)))
        .take(top_k)
        .filter(|(c, _)| evidence_inside(&c.map, kept).is_some_and(|f| f >= need))
        .map(|(_, class)| class)
        .collect()
}

/// The evidence map of concept `v`: the probability-weighted maps of the candidates under it (empty when no
/// candidate is under it).
fn concept_map(h: &Hierarchy, v: ConceptId, candidates: &[Candidate]) -> Vec<f32> {
    let under = h.classes_under(v);
    let mut map: Vec<f32> = Vec::new();
    let mut weight = 0f32;
    for c in candidates.iter().filter(|c| under.binary_search(&c.id).is_ok()) {
        if map.is_empty() {
            map = vec![0.0; c.map.len()];
        }
        for (m, x) in map.iter_mut().zip(&c.map) {
            *m += c.prob * x;
        }
        weight += c.prob;
    }
    if weight > 0.0 {
        map.iter_mut().for_each(|m| *m /= weight);
    }
    map
}

/// The smallest set of patches holding at least three quarters of `map`'s positive mass (the concept's region),
/// as a membership mask.
fn core_region(map: &[f32]) -> Vec<bool> {
    let total: f32 = map.iter().map(|v| v.max(0.0)).sum();
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| map[b].total_cmp(&map[a]).then(a.cmp(&b)));
    let mut mask = vec![false; map.len()];
    let mut acc = 0.0;
    for i in order {
        if acc >= 0.75 * total || map[i] <= 0.0 {
            break;
        }
        mask[i] = true;
        acc += map[i];
    }
    mask
}

/// Class probabilities calibrated with a softmax temperature: `softmax(log p / t)`, i.e. `p^(1/t)` renormalised
/// (the same as `softmax(logits / t)`). `t = 1` returns them unchanged, without a copy.
pub fn calibrate(probs: &[f32], temperature: f32) -> Cow<'_, [f32]> {
    if temperature == 1.0 {
        return Cow::Borrowed(probs);
    }
    let inv = 1.0 / f64::from(temperature);
    let powered: Vec<f64> = probs.iter().map(|&p| f64::from(p.max(0.0)).powf(inv)).collect();
    let total: f64 = powered.iter().sum();
    if total > 0.0 { powered.iter().map(|&p| (p / total) as f32).collect() } else { Cow::Borrowed(probs) }
}

/// Settings of the tree rule for [`select_concepts`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TreeSettings {
    /// Summed calibrated probability the first concept needs.
    pub threshold: f32,
    /// Calibration temperature ([`calibrate`]).
    pub temperature: f32,
    /// Uncalibrated probability at which the most probable class is named as itself.
    pub confident: f32,
    /// Summed probability a second concept needs (`None`: no second concept).
    pub second_threshold: Option<f32>,
    /// Evidence margin.
    pub margin: f32,
}

/// Applies the tree rule (module docs): at most one concept, or two with `second_threshold` and evidence of a
/// second object. `probs` are the full-image class probabilities, `candidates` the top classes with maps.
pub fn select_concepts(
    probs: &[f32],
    candidates: &[Candidate],
    kept: &[u32],
    n_patches: usize,
    settings: TreeSettings,
    vocabulary: &Vocabulary,
) -> Vec<Class> {
    let Some(h) = vocabulary.hierarchy() else { return Vec::new() };
    let allowed = |c: ConceptId| vocabulary.allows(c);
    let top = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(c, &p)| (c as ConceptId, p));
    let confident = top.filter(|&(c, p)| p >= settings.confident && allowed(c));
    let calibrated = calibrate(probs, settings.temperature);
    let probs = calibrated.as_ref();
    let need = evidence_needed(kept.len(), n_patches, settings.margin);
    let Some((first, p)) = confident.or_else(|| h.select(probs, settings.threshold, &allowed)) else {
        return Vec::new();
    };
    let first_map = concept_map(h, first, candidates);
    let mut out = Vec::new();
    if evidence_inside(&first_map, kept).is_some_and(|f| f >= need)
        && let Some(class) = vocabulary.class(first, p)
    {
        out.push(class);
    }
    let Some(t2) = settings.second_threshold else { return out };
    let unrelated = |c: ConceptId| allowed(c) && !h.related(c, first);
    let Some((second, p2)) = h.select(probs, t2, &unrelated) else { return out };
    let map = concept_map(h, second, candidates);
    let core = core_region(&first_map);
    let inside_first: Vec<u32> = (0..core.len() as u32).filter(|&i| core[i as usize]).collect();
    let apart = evidence_inside(&map, &inside_first).is_some_and(|f| 1.0 - f > 0.5);
    if apart
        && evidence_inside(&map, kept).is_some_and(|f| f >= need)
        && let Some(class) = vocabulary.class(second, p2)
    {
        out.push(class);
    }
    out
}

/// The extract stage: concepts for the kept patches, then the sample the batcher sees. Runs the classifier
/// for samples whose scorer did not (attention, random, none), or for every sample when the class head is not
/// the scorer's model ([`Extract::reclassify`]).
#[derive(Clone)]
pub struct Extract {
    /// Classifier for samples without candidates (`None` on the cam path, where every sample has them).
    pub classifier: Option<Classifier>,
    /// Classify every sample, replacing the scorer's candidates: the class head is another model than the
    /// scorer's (`--classifier efficientnet-lite0` after the cam scorer).
    pub reclassify: bool,
    /// Tree or flat.
    pub rule: ExtractRule,
    /// Candidate count of the flat rule.
    pub top_k: usize,
    /// Minimum probability of the flat rule.
    pub min_prob: f32,
    /// Evidence margin.
    pub margin: f32,
    /// Summed probability a second concept needs under the tree rule (`None`: one concept at most).
    pub second_threshold: Option<f32>,
    /// Names, synonyms and the concept hierarchy.
    pub vocabulary: Vocabulary,
    /// Mean/std of the decoded pixels, when they differ from ImageNet's (attention preprocessing): the
    /// classifier input is re-normalised.
    pub input_norm: Option<([f32; 3], [f32; 3])>,
}

impl Extract {
    fn finish(&self, p: Pruned, probs: &[f32], candidates: &[Candidate]) -> JuicedSample {
        let n = p.scored.grid.0 * p.scored.grid.1;
        let classes = match self.rule {
            ExtractRule::Flat => {
                select_classes(candidates, &p.kept, n, self.top_k, self.min_prob, self.margin, &self.vocabulary)
            }
            ExtractRule::Tree { threshold, temperature, confident } => {
                let settings = TreeSettings {
                    threshold,
                    temperature,
                    confident,
                    second_threshold: self.second_threshold,
                    margin: self.margin,
                };
                select_concepts(probs, candidates, &p.kept, n, settings, &self.vocabulary)
            }
        };
        p.into_juiced(classes)
    }

    fn imagenet_input<'a>(&self, pixels: &'a [f32]) -> Cow<'a, [f32]> {
        match self.input_norm {
            None => Cow::Borrowed(pixels),
            Some(from) => Cow::Owned(renormalise(pixels, from, (IMAGENET_MEAN, IMAGENET_STD))),
        }
    }
}

/// Takes the classifier outputs a scorer left on the sample.
fn take_outputs(s: &mut Scored) -> Classified {
    (std::mem::take(&mut s.probs), s.candidates.take().unwrap_or_default())
}

impl Stage for Extract {
    type In = Pruned;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "extract"
    }

    /// The cam path: probabilities and candidates came with the scores.
    fn process(&self, mut p: Pruned) -> std::result::Result<JuicedSample, SampleError> {
        let (probs, candidates) = take_outputs(&mut p.scored);
        Ok(self.finish(p, &probs, &candidates))
    }
}

impl BatchStage for Extract {
    type In = Pruned;
    type Out = JuicedSample;

    fn process_batch(&mut self, items: Vec<Pruned>) -> Vec<std::result::Result<JuicedSample, SampleError>> {
        let need: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, p)| self.reclassify || p.scored.candidates.is_none())
            .map(|(i, _)| i)
            .collect();
        let mut found: BTreeMap<usize, Classified> = BTreeMap::new();
        if let (Some(classifier), Some(&first)) = (&self.classifier, need.first()) {
            let size = items[first].scored.sample.size;
            let g = items[first].scored.grid;
            let inputs: Vec<Cow<'_, [f32]>> =
                need.iter().map(|&i| self.imagenet_input(&items[i].scored.sample.pixels)).collect();
            let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_ref()).collect();
            match classifier.classify(&refs, size, g, self.rule.candidates(self.top_k)) {
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
                let (probs, candidates) = found.remove(&i).unwrap_or_else(|| take_outputs(&mut p.scored));
                Ok(self.finish(p, &probs, &candidates))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAMELEON: usize = 47;
    const ALLIGATOR_LIZARD: usize = 44;
    const AGAMA: usize = 42;
    const CUP: usize = 968;
    const EGGNOG: usize = 969;

    fn probs(pairs: &[(usize, f32)]) -> Vec<f32> {
        let rest = 1.0 - pairs.iter().map(|p| p.1).sum::<f32>();
        let mut p = vec![rest / 1000.0; 1000];
        for &(c, v) in pairs {
            p[c] = v;
        }
        p
    }

    /// A candidate whose map is 1 on the first `inside` of 16 patches and `outside` elsewhere.
    fn candidate(id: usize, prob: f32, inside: usize, outside: f32) -> Candidate {
        Candidate { id: id as u32, prob, map: (0..16).map(|i| if i < inside { 1.0 } else { outside }).collect() }
    }

    fn settings(threshold: f32) -> TreeSettings {
        TreeSettings { threshold, temperature: 1.0, confident: 1.0, second_threshold: None, margin: 0.25 }
    }

    fn vocabulary() -> Vocabulary {
        Vocabulary::imagenet().unwrap()
    }

    #[test]
    fn sibling_guesses_collapse_to_their_common_hypernym() {
        let p = probs(&[(CHAMELEON, 0.43), (ALLIGATOR_LIZARD, 0.19), (AGAMA, 0.18)]);
        let cands = [candidate(CHAMELEON, 0.43, 8, 0.0), candidate(ALLIGATOR_LIZARD, 0.19, 8, 0.0)];
        let all: Vec<u32> = (0..16).collect();
        let out = select_concepts(&p, &cands, &all, 16, settings(0.7), &vocabulary());
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].id, out[0].wnid.as_str(), out[0].name.as_str()), (None, "n01674464", "lizard"));
        assert!(out[0].prob >= 0.8 && out[0].prob <= 1.0, "{out:?}");
    }

    /// Softmax of logits that are 0 but for `pairs`.
    fn from_logits(pairs: &[(usize, f32)]) -> Vec<f32> {
        let mut l = vec![0f32; 1000];
        for &(c, v) in pairs {
            l[c] = v;
        }
        let total: f32 = l.iter().map(|x| x.exp()).sum();
        l.iter().map(|x| x.exp() / total).collect()
    }

    #[test]
    fn a_confident_class_stays_specific() {
        let p = from_logits(&[(CHAMELEON, 20.0), (AGAMA, 11.0)]);
        let cands = [candidate(CHAMELEON, 0.93, 8, 0.0)];
        let all: Vec<u32> = (0..16).collect();
        let out = select_concepts(&p, &cands, &all, 16, settings(0.7), &vocabulary());
        assert_eq!(out.iter().map(|c| (c.id, c.name.as_str())).collect::<Vec<_>>(), [(Some(47), "African chameleon")]);
        // Calibrated with t = 2.5 a logit lead of 20 over the other 999 classes still holds most of the mass.
        let calibrated = TreeSettings { temperature: 2.5, threshold: 0.5, ..settings(0.5) };
        let out = select_concepts(&p, &cands, &all, 16, calibrated, &vocabulary());
        assert_eq!(out.first().map(|c| c.name.as_str()), Some("African chameleon"));
        // A lead of 10: calibrated, the 999 other classes outweigh it, but at 0.99 uncalibrated it is named.
        let p = from_logits(&[(CHAMELEON, 11.5)]);
        assert!(p[CHAMELEON] > 0.98);
        let defaults = TreeSettings { temperature: 2.5, threshold: 0.5, confident: 0.98, ..settings(0.5) };
        let out = select_concepts(&p, &cands, &all, 16, defaults, &vocabulary());
        assert_eq!(out.first().map(|c| (c.name.as_str(), c.prob)), Some(("African chameleon", p[CHAMELEON])));
        let strict = TreeSettings { confident: 1.0, ..defaults };
        let out = select_concepts(&p, &cands, &all, 16, strict, &vocabulary());
        assert_ne!(out.first().map(|c| c.name.as_str()), Some("African chameleon"), "{out:?}");
    }

    #[test]
    fn nothing_is_named_below_the_threshold() {
        let p = probs(&[(CHAMELEON, 0.3), (CUP, 0.3)]);
        let all: Vec<u32> = (0..16).collect();
        assert!(select_concepts(&p, &[], &all, 16, settings(0.7), &vocabulary()).is_empty());
    }

    #[test]
    fn cup_and_plate_lift_no_food_or_drink_hypernym() {
        let all: Vec<u32> = (0..16).collect();
        let p = probs(&[(CUP, 0.45), (EGGNOG, 0.45)]);
        let cands = [candidate(CUP, 0.45, 16, 0.0), candidate(EGGNOG, 0.45, 16, 0.0)];
        for threshold in [0.5, 0.7, 0.85] {
            for c in select_concepts(&p, &cands, &all, 16, settings(threshold), &vocabulary()) {
                assert!(!["punch", "mixed drink", "beverage", "food"].contains(&c.name.as_str()), "{c:?}");
            }
        }
        let p = probs(&[(923, 0.5), (963, 0.4)]); // plate, pizza
        for c in select_concepts(&p, &[], &all, 16, settings(0.8), &vocabulary()) {
            assert!(!["food", "course", "dish"].contains(&c.name.as_str()), "{c:?}");
        }
    }

    #[test]
    fn the_evidence_test_applies_to_the_emitted_concept() {
        let p = probs(&[(CHAMELEON, 0.5), (ALLIGATOR_LIZARD, 0.4)]);
        let half: Vec<u32> = (0..8).collect();
        // Both lizards' maps sit in the kept half: the concept "lizard" has all its evidence inside.
        let inside = [candidate(CHAMELEON, 0.5, 8, 0.0), candidate(ALLIGATOR_LIZARD, 0.4, 8, 0.0)];
        let out = select_concepts(&p, &inside, &half, 16, settings(0.7), &vocabulary());
        assert_eq!(out.first().map(|c| c.name.as_str()), Some("lizard"));
        // Maps spread evenly over the grid: 50 % inside is less than the 62.5 % keep 0.5 asks for.
        let spread = [candidate(CHAMELEON, 0.5, 8, 1.0), candidate(ALLIGATOR_LIZARD, 0.4, 8, 1.0)];
        assert!(select_concepts(&p, &spread, &half, 16, settings(0.7), &vocabulary()).is_empty());
    }

    #[test]
    fn a_second_concept_needs_its_own_region_and_no_kinship() {
        let all: Vec<u32> = (0..16).collect();
        let panda = 388;
        let bamboo_free = |second_inside: usize, outside: f32| {
            let p = probs(&[(CHAMELEON, 0.6), (panda, 0.35)]);
            let cands = [candidate(CHAMELEON, 0.6, 8, 0.0), {
                // The panda's map: high on the last `second_inside` patches.
                let mut c = candidate(panda, 0.35, 0, outside);
                for m in c.map.iter_mut().skip(16 - second_inside) {
                    *m = 1.0;
                }
                c
            }];
            let s = TreeSettings { second_threshold: Some(0.3), ..settings(0.5) };
            select_concepts(&p, &cands, &all, 16, s, &vocabulary()).into_iter().map(|c| c.name).collect::<Vec<_>>()
        };
        assert_eq!(bamboo_free(8, 0.0), ["African chameleon", "giant panda"]);
        // Same evidence region as the first concept: no second concept.
        let p = probs(&[(CHAMELEON, 0.6), (panda, 0.35)]);
        let cands = [candidate(CHAMELEON, 0.6, 8, 0.0), candidate(panda, 0.35, 8, 0.0)];
        let s = TreeSettings { second_threshold: Some(0.3), ..settings(0.5) };
        let names: Vec<String> =
            select_concepts(&p, &cands, &all, 16, s, &vocabulary()).into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["African chameleon"]);
        // A close relative (another lizard) is never a second object.
        let p = probs(&[(CHAMELEON, 0.6), (AGAMA, 0.35)]);
        let cands = [candidate(CHAMELEON, 0.6, 8, 0.0), candidate(AGAMA, 0.35, 0, 0.0)];
        let names: Vec<String> =
            select_concepts(&p, &cands, &all, 16, s, &vocabulary()).into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["African chameleon"]);
    }

    #[test]
    fn calibration_flattens_and_keeps_the_order() {
        let p = [0.9, 0.09, 0.01];
        assert_eq!(*calibrate(&p, 1.0), p);
        let c = calibrate(&p, 2.0);
        assert!((c.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(c[0] < 0.9 && c[0] > c[1] && c[1] > c[2], "{c:?}");
        assert!(ExtractRule::Tree { threshold: 0.5, temperature: 0.5, confident: 0.9 }.problems().len() == 1);
        assert!(ExtractRule::Tree { threshold: 0.0, temperature: 1.0, confident: 0.9 }.problems().len() == 1);
        assert!(ExtractRule::default().problems().is_empty());
    }
}
