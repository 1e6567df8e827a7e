//! The class vocabulary: the one place that says what a classifier's class ids are called and which words
//! name them. The extract stage takes names from it; the enrich stage takes the synonyms it checks captions
//! against from the same value, handed over when the loader is built, so a restricted or renamed vocabulary
//! reaches both branches alike.
//!
//! - [`Vocabulary::imagenet`]: the 1000 ImageNet-1k classes under torchvision's category names (the embedded
//!   MobileNetV2's label space); each name is also the class's one synonym.
//! - [`Vocabulary::restrict_with`]: a JSON file `{"<class id>": "<name>"}` or `{"<class id>": ["<name>",
//!   "<synonym>", ...]}` keeps only the listed classes, under the given name. The synonyms of a listed class are
//!   the names given, then the class's synonyms before the restriction (a caption that names the class the old
//!   way still mentions it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::mobilenet_v2;

/// Class names and synonyms by class id, optionally restricted to a subset of the ids.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// Display name and synonyms per class id (the name is the first synonym).
    table: Arc<Vec<Vec<String>>>,
    /// The classes that may be extracted, when restricted.
    allowed: Option<Arc<BTreeMap<u32, ()>>>,
}

/// One entry of a vocabulary file: a name, or a name followed by synonyms.
#[derive(Deserialize)]
#[serde(untagged)]
enum Entry {
    Name(String),
    Names(Vec<String>),
}

impl Vocabulary {
    /// ImageNet-1k names (torchvision's category names; the first synonym of a comma-separated label:
    /// "tabby, tabby cat" → "tabby"), each label's comma-separated parts as its synonyms.
    pub fn imagenet() -> Self {
        Self::from_table(mobilenet_v2::imagenet_classes().iter().map(|label| split_label(label)).collect())
    }

    /// A vocabulary from a synonym table (index: class id; the first synonym is the class's name). Ids past the
    /// table's end have no name and no synonyms.
    pub fn from_table(table: Vec<Vec<String>>) -> Self {
        Self { table: Arc::new(table), allowed: None }
    }

    /// Restricts and renames classes with a JSON object `{"<class id>": "<name>" | ["<name>", "<synonym>", ...]}`:
    /// only the listed classes can be extracted, under the given names (module docs).
    pub fn restrict_with(self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading vocabulary {}", path.display()), e))?;
        let map: BTreeMap<String, Entry> = serde_json::from_str(&text).map_err(|e| Error::Json {
            context: format!(
                "vocabulary {} (expected {{\"id\": \"name\"}} or {{\"id\": [\"name\", ...]}})",
                path.display()
            ),
            source: e,
        })?;
        let mut table = (*self.table).clone();
        let mut allowed = BTreeMap::new();
        let mut problems = Vec::new();
        for (id, entry) in map {
            let names = match entry {
                Entry::Name(n) => vec![n],
                Entry::Names(n) => n,
            };
            let names: Vec<String> =
                names.into_iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
            match id.parse::<u32>() {
                Ok(i) if (i as usize) < table.len() && !names.is_empty() => {
                    let old = std::mem::take(&mut table[i as usize]);
                    table[i as usize] = names.into_iter().chain(old).collect();
                    allowed.insert(i, ());
                }
                Ok(i) if (i as usize) < table.len() => {
                    problems.push(format!("vocabulary {}: class {id} has no name", path.display()))
                }
                _ => problems.push(format!(
                    "vocabulary {}: `{id}` is not a class id below {}",
                    path.display(),
                    table.len()
                )),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        Ok(Self { table: Arc::new(table), allowed: Some(Arc::new(allowed)) })
    }

    /// The name of class `id`, or `None` when the vocabulary excludes it.
    pub fn name(&self, id: u32) -> Option<String> {
        if self.allowed.as_ref().is_some_and(|a| !a.contains_key(&id)) {
            return None;
        }
        self.table.get(id as usize).and_then(|s| s.first()).cloned()
    }

    /// Every word that names class `id` (its name first), whether or not the vocabulary lets it be extracted;
    /// empty for an id past the table.
    pub fn synonyms(&self, id: u32) -> &[String] {
        self.table.get(id as usize).map_or(&[], Vec::as_slice)
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
        let v = Vocabulary::imagenet();
        assert_eq!(v.name(388).as_deref(), Some("giant panda"));
        assert_eq!(v.synonyms(388), ["giant panda"]);
        assert_eq!(v.name(1000), None);
        assert!(v.synonyms(1000).is_empty());
        assert_eq!(split_label("tabby, tabby cat"), ["tabby", "tabby cat"]);
    }

    #[test]
    fn a_restriction_renames_excludes_and_keeps_old_synonyms() {
        let f = file(r#"{"281": "kitty", "388": ["panda bear", "panda"]}"#);
        let v = Vocabulary::imagenet().restrict_with(f.path()).unwrap();
        assert_eq!(v.name(281).as_deref(), Some("kitty"));
        assert_eq!(v.synonyms(281), ["kitty", "tabby"]);
        assert_eq!(v.synonyms(388), ["panda bear", "panda", "giant panda"]);
        assert_eq!(v.name(282), None);
        assert_eq!(v.synonyms(282), ["tiger cat"]);
    }

    #[test]
    fn a_bad_restriction_names_the_problem() {
        let f = file(r#"{"1000": "x", "5": [], "cat": "y"}"#);
        let Err(Error::Config(p)) = Vocabulary::imagenet().restrict_with(f.path()) else { panic!("accepted") };
        assert_eq!(p.len(), 3, "{p:?}");
        let f = file("[1, 2]");
        assert!(matches!(Vocabulary::imagenet().restrict_with(f.path()), Err(Error::Json { .. })));
    }
}
