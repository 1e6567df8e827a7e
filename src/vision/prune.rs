//! Which patches to keep, given one saliency score per patch.
//!
//! Three policies, all clamped to `[min_keep, max_keep]` (and to the patch count), all deterministic: scores
//! are ranked high to low and equal scores rank the lower patch index first. The result is always sorted
//! ascending, unique and inside the grid.
//! - [`KeepPolicy::Ratio`]: the top `round(ratio · n)` patches (the default, ratio 0.5).
//! - [`KeepPolicy::Threshold`]: patches whose min-max normalised score is at least `t` (all patches when every
//!   score is equal).
//! - [`KeepPolicy::Mass`]: the smallest top set whose softmax probabilities sum to at least `m`.
//!
//! [`PruneStage`] is the graph's `prune` stage: [`PruneConfig::keep`] applied to each [`Scored`] sample.

use serde::{Deserialize, Serialize};

use crate::error::SampleError;
use crate::sample::{Pruned, Scored};
use crate::stage::Stage;

/// How many patches to keep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", content = "value")]
pub enum KeepPolicy {
    /// Keep this fraction of the patches, in `[0, 1]`.
    Ratio(f32),
    /// Keep patches whose min-max normalised score is at least this, in `[0, 1]`.
    Threshold(f32),
    /// Keep the smallest top set holding this fraction of the softmax mass, in `[0, 1]`.
    Mass(f32),
}

impl Default for KeepPolicy {
    fn default() -> Self {
        KeepPolicy::Ratio(0.5)
    }
}

/// A keep policy with its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PruneConfig {
    /// The policy.
    pub policy: KeepPolicy,
    /// Never keep fewer patches than this (default 1).
    pub min_keep: usize,
    /// Never keep more patches than this (default: no limit).
    pub max_keep: Option<usize>,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self { policy: KeepPolicy::default(), min_keep: 1, max_keep: None }
    }
}

impl PruneConfig {
    /// Every problem with this configuration.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let (name, v) = match self.policy {
            KeepPolicy::Ratio(v) => ("keep ratio", v),
            KeepPolicy::Threshold(v) => ("keep threshold", v),
            KeepPolicy::Mass(v) => ("keep mass", v),
        };
        if !(0.0..=1.0).contains(&v) {
            p.push(format!("{name} {v} is outside [0, 1]"));
        }
        if let Some(m) = self.max_keep
            && m < self.min_keep
        {
            p.push(format!("max_keep {m} is below min_keep {}", self.min_keep));
        }
        p
    }

    /// The kept patch indices for `scores` (row-major over the grid), sorted ascending.
    pub fn keep(&self, scores: &[f32]) -> Vec<u32> {
        let n = scores.len();
        if n == 0 {
            return Vec::new();
        }
        // Rank: score descending, NaN last, ties by lower index.
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| {
            let (sa, sb) = (scores[a as usize], scores[b as usize]);
            match (sa.is_nan(), sb.is_nan()) {
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                _ => sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)),
            }
        });
        let count = match self.policy {
            KeepPolicy::Ratio(r) => (f64::from(r) * n as f64).round() as usize,
            KeepPolicy::Threshold(t) => {
                let finite = scores.iter().copied().filter(|s| s.is_finite());
                let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), s| (l.min(s), h.max(s)));
                if hi > lo { scores.iter().filter(|&&s| s.is_finite() && (s - lo) / (hi - lo) >= t).count() } else { n }
            }
            KeepPolicy::Mass(m) => {
                let max = scores.iter().copied().filter(|s| s.is_finite()).fold(f32::NEG_INFINITY, f32::max);
                let w: Vec<f64> = order
                    .iter()
                    .map(|&i| {
                        let s = scores[i as usize];
                        if s.is_finite() { f64::from(s - max).exp() } else { 0.0 }
                    })
                    .collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                let mut k = 0;
                for x in &w {
                    if total <= 0.0 || acc / total >= f64::from(m) {
                        break;
                    }
                    acc += x;
                    k += 1;
                }
                k
            }
        };
        let upper = self.max_keep.unwrap_or(n).min(n);
        let count = count.max(self.min_keep).min(upper);
        let mut kept = order[..count].to_vec();
        kept.sort_unstable();
        kept
    }
}

/// The `prune` stage: applies the keep policy to each scored sample (per item, on the decode pool).
pub struct PruneStage(pub PruneConfig);

impl Stage for PruneStage {
    type In = Scored;
    type Out = Pruned;

    fn name(&self) -> &'static str {
        "prune"
    }

    fn process(&self, scored: Scored) -> std::result::Result<Pruned, SampleError> {
        let kept = self.0.keep(&scored.scores);
        Ok(Pruned { scored, kept })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(policy: KeepPolicy) -> PruneConfig {
        PruneConfig { policy, ..PruneConfig::default() }
    }

    #[test]
    fn ratio_keeps_the_top_scores_and_breaks_ties_by_index() {
        let s = [0.1, 0.9, 0.5, 0.9, 0.2, 0.5];
        assert_eq!(cfg(KeepPolicy::Ratio(0.5)).keep(&s), vec![1, 2, 3]);
        assert_eq!(cfg(KeepPolicy::Ratio(0.0)).keep(&s), vec![1], "min_keep 1");
        assert_eq!(cfg(KeepPolicy::Ratio(1.0)).keep(&s), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn threshold_and_mass() {
        let s = [0.0, 10.0, 5.0, 7.5];
        assert_eq!(cfg(KeepPolicy::Threshold(0.5)).keep(&s), vec![1, 2, 3]);
        assert_eq!(cfg(KeepPolicy::Threshold(0.9)).keep(&s), vec![1]);
        assert_eq!(cfg(KeepPolicy::Threshold(0.9)).keep(&[3.0; 4]), vec![0, 1, 2, 3], "flat scores keep all");
        // softmax of [0, 10, 5, 7.5]: 10 holds ~92 %, 10 and 7.5 ~99.3 %.
        assert_eq!(cfg(KeepPolicy::Mass(0.9)).keep(&s), vec![1]);
        assert_eq!(cfg(KeepPolicy::Mass(0.95)).keep(&s), vec![1, 3]);
    }

    #[test]
    fn bounds_and_nan() {
        let c = PruneConfig { policy: KeepPolicy::Ratio(0.9), min_keep: 2, max_keep: Some(3) };
        assert_eq!(c.keep(&[1.0, f32::NAN, 3.0, 2.0, 0.0]), vec![0, 2, 3]);
        assert!(!PruneConfig { policy: KeepPolicy::Ratio(1.5), ..PruneConfig::default() }.problems().is_empty());
    }

    fn policy() -> impl Strategy<Value = KeepPolicy> {
        prop_oneof![
            (0.0f32..=1.0).prop_map(KeepPolicy::Ratio),
            (0.0f32..=1.0).prop_map(KeepPolicy::Threshold),
            (0.0f32..=1.0).prop_map(KeepPolicy::Mass),
        ]
    }

    proptest! {
        #[test]
        fn kept_is_sorted_unique_in_grid_and_bounded(
            scores in proptest::collection::vec(-5.0f32..5.0, 1..300),
            policy in policy(),
            min_keep in 0usize..20,
            extra in proptest::option::of(0usize..200),
        ) {
            let c = PruneConfig { policy, min_keep, max_keep: extra.map(|e| min_keep + e) };
            let kept = c.keep(&scores);
            let n = scores.len();
            prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(kept.iter().all(|&i| (i as usize) < n));
            prop_assert!(kept.len() >= min_keep.min(n));
            if let Some(m) = c.max_keep { prop_assert!(kept.len() <= m.max(min_keep.min(n)).min(n)); }
            // Every kept score is at least every dropped score.
            let min_kept = kept.iter().map(|&i| scores[i as usize]).fold(f32::INFINITY, f32::min);
            let max_dropped = (0..n as u32).filter(|i| kept.binary_search(i).is_err())
                .map(|i| scores[i as usize]).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(min_kept >= max_dropped);
        }

        #[test]
        fn ratio_is_monotone(scores in proptest::collection::vec(-5.0f32..5.0, 1..300), a in 0.0f32..=1.0, b in 0.0f32..=1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let small = cfg(KeepPolicy::Ratio(lo)).keep(&scores);
            let large = cfg(KeepPolicy::Ratio(hi)).keep(&scores);
            prop_assert!(small.len() <= large.len());
            prop_assert!(small.iter().all(|i| large.binary_search(i).is_ok()), "a larger ratio keeps a superset");
        }
    }
}
