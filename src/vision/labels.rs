//! Hand labels of what photos show, and the precision of the concepts juicer emits measured against them.
//!
//! A labels file (`juicer-labels/1`, e.g. `fixtures/labels/gcompris.json`) lists per sample key the most specific
//! WordNet concepts the photo really shows (`accept`), and optionally the half of an evaluation it belongs to
//! (`split`: `calibration` or `test`, as in `fixtures/heldout/labels.json`). An emitted concept is **correct** when it is one of them or
//! an ancestor of one in the [`Hierarchy`] ("lizard" is correct for a photo labelled "agamid"); anything else,
//! including a more specific concept than the label vouches for, is wrong.
//!
//! [`Tally`] adds up, over a run: recall (images with at least one correct concept), precision (correct emitted
//! concepts over all emitted), the share of captions that gained at least one wrong concept, and concepts per
//! image: the table in the README's "Scorers and the extract rule".

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hierarchy::{ConceptId, Hierarchy};
use crate::error::{Error, Result};
use crate::sample::Class;

/// The format string of a labels file.
pub const FORMAT: &str = "juicer-labels/1";

#[derive(Deserialize)]
struct File {
    format: String,
    labels: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    accept: Vec<Accept>,
    #[serde(default)]
    split: Option<String>,
}

#[derive(Deserialize)]
struct Accept {
    wnid: String,
}

/// Accepted concepts per sample key.
#[derive(Debug, Clone)]
pub struct Labels {
    accept: BTreeMap<String, Vec<ConceptId>>,
    split: BTreeMap<String, String>,
    hierarchy: &'static Hierarchy,
}

impl Labels {
    /// Reads a labels file; every wnid must be a concept of the embedded hierarchy.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading labels {}", path.display()), e))?;
        let file: File = serde_json::from_str(&text)
            .map_err(|e| Error::Json { context: format!("labels {}", path.display()), source: e })?;
        let hierarchy = Hierarchy::imagenet()?;
        let mut problems = Vec::new();
        if file.format != FORMAT {
            problems.push(format!("labels {}: format `{}`, expected `{FORMAT}`", path.display(), file.format));
        }
        let mut accept = BTreeMap::new();
        let mut split = BTreeMap::new();
        for (key, entry) in file.labels {
            if let Some(s) = entry.split {
                split.insert(key.clone(), s);
            }
            let mut ids = Vec::new();
            for a in entry.accept {
                match hierarchy.by_wnid(&a.wnid) {
                    Some(id) => ids.push(id),
                    None => {
                        problems.push(format!("labels {}: `{key}` accepts unknown wnid {}", path.display(), a.wnid))
                    }
                }
            }
            accept.insert(key, ids);
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        Ok(Self { accept, split, hierarchy })
    }

    /// Adds `other`'s labels; a key labelled in both is an error naming it.
    pub fn merge(mut self, other: Labels) -> Result<Self> {
        let twice: Vec<String> = other.accept.keys().filter(|k| self.accept.contains_key(*k)).cloned().collect();
        if !twice.is_empty() {
            return Err(Error::Config(vec![format!("labels given twice for {}", twice.join(", "))]));
        }
        self.accept.extend(other.accept);
        self.split.extend(other.split);
        Ok(self)
    }

    /// Every labelled key, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.accept.keys().map(String::as_str)
    }

    /// The key's `split` (`calibration`, `test`), when its file gives one.
    pub fn split(&self, key: &str) -> Option<&str> {
        self.split.get(key).map(String::as_str)
    }

    /// Number of labelled samples.
    pub fn len(&self) -> usize {
        self.accept.len()
    }

    /// True when nothing is labelled.
    pub fn is_empty(&self) -> bool {
        self.accept.is_empty()
    }

    /// Whether `concept` is correct for `key`: accepted, or an ancestor of an accepted concept. `None` when the
    /// key is not labelled or the concept has no known wnid.
    pub fn correct(&self, key: &str, concept: &Class) -> Option<bool> {
        let accept = self.accept.get(key)?;
        let id = self.hierarchy.by_wnid(&concept.wnid)?;
        Some(accept.iter().any(|&a| a == id || self.hierarchy.is_ancestor(id, a)))
    }
}

/// What one run emitted, scored against [`Labels`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Labelled images seen.
    pub images: u64,
    /// Images with at least one correct concept.
    pub with_correct: u64,
    /// Concepts emitted.
    pub emitted: u64,
    /// Correct concepts emitted.
    pub correct: u64,
    /// Captions that gained at least one wrong concept.
    pub wrong_captions: u64,
}

impl Tally {
    /// Adds one sample: its emitted concepts and those added to its caption. Unlabelled keys are skipped.
    pub fn add(&mut self, labels: &Labels, key: &str, emitted: &[Class], added: &[Class]) {
        if !labels.accept.contains_key(key) {
            return;
        }
        let ok = |c: &Class| labels.correct(key, c).unwrap_or(false);
        self.images += 1;
        let correct = emitted.iter().filter(|c| ok(c)).count() as u64;
        self.emitted += emitted.len() as u64;
        self.correct += correct;
        self.with_correct += u64::from(correct > 0);
        self.wrong_captions += u64::from(added.iter().any(|c| !ok(c)));
    }

    /// Images with at least one correct concept over images.
    pub fn recall(&self) -> f64 {
        ratio(self.with_correct, self.images)
    }

    /// Correct concepts over emitted concepts (1 when nothing was emitted).
    pub fn precision(&self) -> f64 {
        if self.emitted == 0 { 1.0 } else { ratio(self.correct, self.emitted) }
    }

    /// Share of captions that gained a wrong concept.
    pub fn wrong_caption_share(&self) -> f64 {
        ratio(self.wrong_captions, self.images)
    }

    /// Concepts emitted per image.
    pub fn per_image(&self) -> f64 {
        ratio(self.emitted, self.images)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}
