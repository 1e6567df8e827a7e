//! The class vocabulary: the one place that says what a classifier's outputs are called, how they relate and
//! which words name them. The extract stage takes names and the concept hierarchy from it; the enrich stage takes
//! the words it checks captions against from the same value, handed over when the loader is built, so a
//! restricted or renamed vocabulary reaches both branches alike.
//!
//! - [`Vocabulary::imagenet`] (the default): the 1000 ImageNet-1k classes under torchvision's category names
//!   (the embedded MobileNetV2's label space), with the WordNet 3.0 is-a hierarchy above them
//!   ([`super::hierarchy`]): hypernyms, their names, which of them may be written into a caption.
//! - [`Vocabulary::restrict_with`]: a JSON file whose keys are class ids or WordNet ids and whose values are a
//!   name or a list `["<name>", "<synonym>", ...]`: `{"281": "kitty", "n01674464": ["lizard", "lizards"]}`. Only
//!   the listed concepts can be extracted, under the given names; a listed concept's words are the names given,
//!   then its words before the restriction (a caption that names it the old way still mentions it).
//! - [`Vocabulary::from_table`]: a bare synonym table by class id, without a hierarchy (flat extraction only).
//!
//! # Mention terms
//! [`Vocabulary::mention_terms`] gives, for an extracted concept, the words whose presence in a caption means the
//! caption already names it, in two groups: **own** (its names and synonyms, and every name of a concept below
//! it: "agama" names a lizard) and **above** (the names of its nameable hypernyms: "lizard" names an agama, but
//! only coarsely). The enrich stage decides what each group suppresses, and keeps what it builds from them per
//! concept (a broad concept such as "animal" has over a thousand terms).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::hierarchy::{ConceptId, Hierarchy};
use crate::error::{Error, Result};
use crate::model::mobilenet_v2;
use crate::sample::Class;

/// Words that name a concept in a caption (module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MentionTerms {
    /// The concept's own names and synonyms and the names of everything below it.
    pub own: Vec<String>,
    /// The names of its nameable hypernyms, most specific first.
    pub above: Vec<String>,
}

/// Class names, synonyms and the concept hierarchy, optionally restricted to a subset of the concepts.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// The is-a hierarchy over the classes (`None` for a bare synonym table).
    hierarchy: Option<&'static Hierarchy>,
    /// Display name and synonyms per class id (the name is the first).
    table: Arc<Vec<Vec<String>>>,
    /// Names given to hypernym nodes by a restriction (the display name first).
    renamed: Arc<HashMap<ConceptId, Vec<String>>>,
    /// The concepts that may be extracted, when restricted (class ids and node ids).
    allowed: Option<Arc<BTreeSet<ConceptId>>>,
}

/// One entry of a vocabulary file: a name, or a name followed by synonyms.
#[derive(Deserialize)]
#[serde(untagged)]
enum Entry {
    Name(String),
    Names(Vec<String>),
}

impl Vocabulary {
    /// ImageNet-1k with its WordNet hierarchy: each class named by the hierarchy's display name (see
    /// [`Hierarchy`]), with torchvision's category name, its WordNet lemmas and curated short name as synonyms.
    pub fn imagenet() -> Result<Self> {
        let h = Hierarchy::imagenet()?;
        let table = mobilenet_v2::imagenet_classes()
            .iter()
            .enumerate()
            .map(|(i, label)| {
                let mut names = Vec::new();
                let concept = h.concept(i as ConceptId);
                let display = concept.map(|c| c.name.clone()).into_iter();
                let labels = display.chain(split_label(label));
                for s in labels.chain(concept.into_iter().flat_map(|c| c.synonyms.iter().cloned())) {
                    if !names.iter().any(|n: &String| n.eq_ignore_ascii_case(&s)) {
                        names.push(s);
                    }
                }
                names
            })
            .collect();
        Ok(Self { hierarchy: Some(h), ..Self::from_table(table) })
    }

    /// A vocabulary from a synonym table (index: class id; the first synonym is the class's name), without a
    /// hierarchy. Ids past the table's end have no name and no synonyms.
    pub fn from_table(table: Vec<Vec<String>>) -> Self {
        Self { hierarchy: None, table: Arc::new(table), renamed: Arc::default(), allowed: None }
    }

    /// Restricts and renames concepts with a JSON object `{"<class id or wnid>": "<name>" | ["<name>", ...]}`:
    /// only the listed concepts can be extracted, under the given names (module docs).
    pub fn restrict_with(self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading vocabulary {}", path.display()), e))?;
        let map: std::collections::BTreeMap<String, Entry> = serde_json::from_str(&text).map_err(|e| Error::Json {
            context: format!(
                "vocabulary {} (expected {{\"id\": \"name\"}} or {{\"id\": [\"name\", ...]}})",
                path.display()
            ),
            source: e,
        })?;
        let mut table = (*self.table).clone();
        let mut renamed = (*self.renamed).clone();
        let mut allowed = BTreeSet::new();
        let mut problems = Vec::new();
        for (key, entry) in map {
            let names = match entry {
                Entry::Name(n) => vec![n],
                Entry::Names(n) => n,
            };
            let names: Vec<String> =
                names.into_iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
            let id = match key.parse::<u32>() {
                Ok(i) if (i as usize) < table.len() => Some(i),
                Ok(_) => None,
                Err(_) => self.hierarchy.and_then(|h| h.by_wnid(&key)),
            };
            let Some(id) = id else {
                problems.push(format!(
                    "vocabulary {}: `{key}` is not a class id below {} nor a WordNet id of the hierarchy",
                    path.display(),
                    table.len()
                ));
                continue;
            };
            if names.is_empty() {
                problems.push(format!("vocabulary {}: `{key}` has no name", path.display()));
                continue;
            }
            if (id as usize) < table.len() {
                let old = std::mem::take(&mut table[id as usize]);
                table[id as usize] = names.into_iter().chain(old).collect();
            } else {
                renamed.insert(id, names);
            }
            allowed.insert(id);
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        Ok(Self {
            hierarchy: self.hierarchy,
            table: Arc::new(table),
            renamed: Arc::new(renamed),
            allowed: Some(Arc::new(allowed)),
        })
    }

    /// The hierarchy, when the vocabulary has one.
    pub fn hierarchy(&self) -> Option<&'static Hierarchy> {
        self.hierarchy
    }

    /// Whether concept `id` (a class id or a hierarchy node) may be extracted.
    pub fn allows(&self, id: ConceptId) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(&id))
    }

    /// The name of class `id`, or `None` when the vocabulary excludes it.
    pub fn name(&self, id: u32) -> Option<String> {
        if !self.allows(id) {
            return None;
        }
        self.table.get(id as usize).and_then(|s| s.first()).cloned()
    }

    /// Every word that names class `id` (its name first), whether or not the vocabulary lets it be extracted;
    /// empty for an id past the table.
    pub fn synonyms(&self, id: u32) -> &[String] {
        self.table.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The record of concept `id` with probability `prob`: class index (or `None` for a hypernym), WordNet id
    /// (empty without a hierarchy), display name. `None` when the vocabulary excludes it or does not know it.
    pub fn class(&self, id: ConceptId, prob: f32) -> Option<Class> {
        if !self.allows(id) {
            return None;
        }
        let concept = self.hierarchy.and_then(|h| h.concept(id));
        let name = match self.table.get(id as usize) {
            Some(names) => names.first().cloned(),
            None => self.renamed.get(&id).and_then(|n| n.first().cloned()).or_else(|| concept.map(|c| c.name.clone())),
        }?;
        let is_class = (id as usize) < self.table.len();
        Some(Class {
            id: is_class.then_some(id),
            wnid: concept.map(|c| c.wnid.clone()).unwrap_or_default(),
            name,
            prob,
        })
    }

    /// The concept a record names: by WordNet id when the vocabulary has a hierarchy, else by class id.
    pub fn concept_of(&self, class: &Class) -> Option<ConceptId> {
        match self.hierarchy {
            Some(h) if !class.wnid.is_empty() => h.by_wnid(&class.wnid),
            _ => class.id,
        }
    }

    /// The words that mean a caption already names `class` (module docs). Computed afresh: callers keep what they
    /// build from them.
    pub fn mention_terms(&self, class: &Class) -> MentionTerms {
        match self.concept_of(class) {
            Some(id) => self.compute_terms(id),
            None => MentionTerms { own: vec![class.name.clone()], above: Vec::new() },
        }
    }

    fn compute_terms(&self, id: ConceptId) -> MentionTerms {
        // Each list without case-insensitive repeats; `seen` holds the lowercased terms of both.
        let (mut own, mut above) = (Vec::new(), Vec::new());
        let (mut seen_own, mut seen_above) = (HashSet::new(), HashSet::new());
        let push = |list: &mut Vec<String>, seen: &mut HashSet<String>, s: &str| {
            if !s.trim().is_empty() && seen.insert(s.to_lowercase()) {
                list.push(s.to_string());
            }
        };
        for s in self.own_names(id) {
            push(&mut own, &mut seen_own, s);
        }
        if let Some(h) = self.hierarchy {
            let mut ancestors: Vec<ConceptId> =
                h.ancestors(id).iter().copied().filter(|&a| h.concept(a).is_some_and(|c| c.nameable)).collect();
            ancestors.sort_by_key(|&a| h.concept(a).map_or(u32::MAX, |c| c.n));
            for &a in &ancestors {
                for s in self.own_names(a) {
                    push(&mut above, &mut seen_above, s);
                }
            }
            for s in h.mention_terms(id) {
                if !seen_above.contains(&s.to_lowercase()) {
                    push(&mut own, &mut seen_own, s);
                }
            }
            for &c in h.classes_under(id) {
                for s in self.synonyms(c) {
                    push(&mut own, &mut seen_own, s);
                }
            }
        }
        MentionTerms { own, above }
    }

    /// The names a restriction gave concept `id`, else its table synonyms (a class) or hierarchy name (a node).
    fn own_names(&self, id: ConceptId) -> Vec<&str> {
        if let Some(names) = self.table.get(id as usize) {
            return names.iter().map(String::as_str).collect();
        }
        let mut out: Vec<&str> =
            self.renamed.get(&id).map(|n| n.iter().map(String::as_str).collect()).unwrap_or_default();
        if let Some(c) = self.hierarchy.and_then(|h| h.concept(id)) {
            out.push(&c.name);
        }
        out
    }
}

/// Synonyms of a comma-separated label ("tabby, tabby cat" → ["tabby", "tabby cat"]).
fn split_label(label: &str) -> Vec<String> {
    label.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn imagenet_names_and_synonyms() {
        let v = Vocabulary::imagenet().unwrap();
        assert_eq!(v.name(388).as_deref(), Some("giant panda"));
        assert_eq!(v.synonyms(388)[0], "giant panda");
        assert!(v.synonyms(388).iter().any(|s| s == "panda"), "{:?}", v.synonyms(388));
        assert_eq!(v.name(1000), None);
        assert!(v.synonyms(1000).is_empty());
        assert_eq!(split_label("tabby, tabby cat"), ["tabby", "tabby cat"]);
    }

    #[test]
    fn a_restriction_renames_excludes_and_keeps_old_synonyms() {
        let f = file(r#"{"281": "kitty", "388": ["panda bear", "panda"]}"#);
        let v = Vocabulary::imagenet().unwrap().restrict_with(f.path()).unwrap();
        assert_eq!(v.name(281).as_deref(), Some("kitty"));
        assert_eq!(v.synonyms(281)[..3], ["kitty", "tabby cat", "tabby"]);
        assert_eq!(v.synonyms(388)[..3], ["panda bear", "panda", "giant panda"]);
        assert_eq!(v.name(282), None);
        assert_eq!(v.synonyms(282)[0], "tiger cat");
    }

    #[test]
    fn a_bad_restriction_names_the_problem() {
        let f = file(r#"{"1000": "x", "5": [], "cat": "y"}"#);
        let Err(Error::Config(p)) = Vocabulary::imagenet().unwrap().restrict_with(f.path()) else { panic!("accepted") };
        assert_eq!(p.len(), 3, "{p:?}");
        let f = file("[1, 2]");
        assert!(matches!(Vocabulary::imagenet().unwrap().restrict_with(f.path()), Err(Error::Json { .. })));
    }
}
