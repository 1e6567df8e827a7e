//! What a caption already names, in WordNet's terms: every noun of the caption, lemmatised, mapped to the
//! hierarchy concepts at and above its senses.
//!
//! # Why
//! The ImageNet hierarchy ([`crate::vision::hierarchy`]) knows the 1000 classes and the 860 WordNet nodes
//! above them, so from the hierarchy alone a caption that says "moose" (not an ImageNet class) does not name
//! "animal", and an enrichment "Pictured: an animal." after "the moose" spends tokens on nothing. WordNet's full
//! noun hierarchy knows that a moose is a ruminant, a mammal and an animal: this module carries it, cut down to
//! what the enrich stage asks: for each noun lemma, the concepts its senses are, or are kinds of.
//!
//! # The data
//! `fixtures/classes/wordnet_nouns.tsv.gz` (embedded, 0.57 MB; generated from Debian's `wordnet-base` 3.0 by
//! `fixtures/classes/make_nouns.py`; WordNet's licence, `fixtures/classes/LICENSE-wordnet`, ships with it):
//! - `L<TAB>lemma<TAB>wnid …`: 83,163 noun lemmas, each with the *nearest* hierarchy concepts met on the way up
//!   from any of its senses (hypernym and instance-hypernym pointers; the concepts above those are the
//!   hierarchy's ancestors). All senses count, rare ones included ("cat" also names the tracked vehicle): the
//!   table decides what a caption already says, and saying too much there only leaves a concept out, never
//!   writes a wrong one. Lemmas that reach nothing below the root's first levels are left out.
//! - `X<TAB>form<TAB>lemma`: WordNet's irregular noun forms (`noun.exc`: "geese" → "goose", "mice" → "mouse").
//!
//! # Matching
//! Text is split into the enrich stage's words (lowercase runs of letters and digits, [`crate::text::phrase::words`]);
//! lemmas are split the same way when loaded, so "chain-link fence" matches "chain link fence" and
//! "carpenter's kit" its own spelling. Scanning left to right, the longest lemma that starts at a word wins and
//! its words are consumed ("hot dog" is a food, not a dog). The last word of a lemma is matched in every form
//! WordNet's morphology (`morphy`) would reduce to it: itself, the irregular forms, and the regular detachments
//! `-s`, `-ses`, `-xes`, `-zes`, `-ches`, `-shes`, `-men`, `-ies` (so "cows" → "cow", "boxes" → "box",
//! "firemen" → "fireman", "puppies" → "puppy"). A form that is a lemma of its own ("glasses") counts with every
//! lemma it reduces to ("glass") too.
//!
//! # Cost
//! [`Nouns::wordnet`] parses once per process (about 40 ms, about 10 MB). [`Nouns::named`] costs a few hash
//! lookups per word of the caption.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::text::phrase::words;
use crate::vision::hierarchy::{ConceptId, Hierarchy};

/// The embedded table (see the module docs).
static WORDNET_NOUNS: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/classes/wordnet_nouns.tsv.gz"));

/// The first line's tag: the format the parser reads.
pub const FORMAT: &str = "wordnet-nouns/1";

/// Regular plural endings WordNet's morphology removes from nouns: (ending, replacement).
const DETACH: [(&str, &str); 8] =
    [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y")];

/// The noun lemmas of WordNet with the hierarchy concepts they name.
#[derive(Debug)]
pub struct Nouns {
    /// Lemma (its words joined by one space) → the nearest concepts its senses are or are kinds of.
    lemmas: HashMap<String, Box<[ConceptId]>>,
    /// First word of a lemma → the most words a lemma starting with it has.
    longest: HashMap<String, usize>,
    /// Irregular form → its lemmas.
    irregular: HashMap<String, Vec<String>>,
}

/// One lemma found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<'a> {
    /// Index of its first word among the text's words.
    pub start: usize,
    /// How many words it spans.
    pub len: usize,
    /// The concepts it names directly (the hierarchy's ancestors of these are named too).
    pub concepts: Vec<&'a [ConceptId]>,
}

impl Nouns {
    /// The embedded WordNet table over the embedded ImageNet hierarchy, parsed on first use and kept for the
    /// process. An error means the embedded files are broken (a build problem); it is returned, never cached.
    pub fn wordnet() -> Result<&'static Nouns> {
        static CELL: OnceLock<Nouns> = OnceLock::new();
        if let Some(nouns) = CELL.get() {
            return Ok(nouns);
        }
        let parsed = Nouns::parse(WORDNET_NOUNS, Hierarchy::imagenet()?)?;
        Ok(CELL.get_or_init(|| parsed))
    }

    /// Parses a gzip-compressed table (module docs) whose WordNet ids are concepts of `hierarchy`. Fails with
    /// [`Error::Config`] naming the line of an unknown WordNet id, a malformed line or a wrong format tag.
    pub fn parse(gz: &[u8], hierarchy: &Hierarchy) -> Result<Self> {
        let what = "WordNet noun table";
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|source| Error::Io { context: format!("{what}: not gzip-compressed UTF-8"), source })?;
        let bad = |n: usize, why: String| Error::Config(vec![format!("{what}, line {}: {why}", n + 1)]);
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, first)) if first.starts_with(&format!("# {FORMAT}:")) => {}
            _ => return Err(bad(0, format!("expected the format tag `# {FORMAT}:`"))),
        }
        let mut nouns = Self { lemmas: HashMap::new(), longest: HashMap::new(), irregular: HashMap::new() };
        for (n, line) in lines {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let mut fields = line.split('\t');
            let (Some(kind), Some(lemma), Some(value), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(n, format!("expected 3 tab-separated fields: `{line}`")));
            };
            let key = normalise(lemma);
            if key.is_empty() {
                return Err(bad(n, format!("lemma `{lemma}` has no words")));
            }
            match kind {
                "L" => {
                    let mut ids = Vec::new();
                    for wnid in value.split(' ') {
                        ids.push(
                            hierarchy
                                .by_wnid(wnid)
                                .ok_or_else(|| bad(n, format!("`{wnid}` (for `{lemma}`) is not in the hierarchy")))?,
                        );
                    }
                    let first = key.split(' ').next().unwrap_or_default().to_string();
                    let len = key.split(' ').count();
                    let longest = nouns.longest.entry(first).or_default();
                    *longest = (*longest).max(len);
                    // Two spellings that split into the same words ("chain-link", "chain link") share a key.
                    let entry = nouns.lemmas.entry(key).or_default();
                    let mut merged: Vec<ConceptId> = entry.iter().copied().chain(ids).collect();
                    merged.sort_unstable();
                    merged.dedup();
                    *entry = merged.into_boxed_slice();
                }
                "X" => nouns.irregular.entry(key).or_default().push(normalise(value)),
                _ => return Err(bad(n, format!("unknown line kind `{kind}`"))),
            }
        }
        Ok(nouns)
    }

    /// How many lemmas the table has.
    pub fn len(&self) -> usize {
        self.lemmas.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.lemmas.is_empty()
    }

    /// The nearest concepts of one lemma given as words joined by single spaces (`None` when it is not a lemma
    /// of the table).
    pub fn lemma(&self, lemma: &str) -> Option<&[ConceptId]> {
        self.lemmas.get(lemma).map(|ids| &**ids)
    }

    /// The lemmas a word can be a form of that the table has (module docs): itself, its irregular lemmas, its
    /// regular detachments. Lowercase input.
    pub fn base_forms(&self, word: &str) -> Vec<String> {
        let mut out = vec![word.to_string()];
        if let Some(lemmas) = self.irregular.get(word) {
            out.extend(lemmas.iter().cloned());
        }
        for (ending, replacement) in DETACH {
            if let Some(stem) = word.strip_suffix(ending)
                && !stem.is_empty()
            {
                out.push(format!("{stem}{replacement}"));
            }
        }
        out.dedup();
        out
    }

    /// The lemmas in a sequence of lowercase words, longest first at each word, left to right (module docs).
    pub fn named<'a>(&'a self, words: &[&str]) -> Vec<Named<'a>> {
        let mut found = Vec::new();
        let mut at = 0;
        while at < words.len() {
            let longest = self.longest.get(words[at]).copied().unwrap_or(0).min(words.len() - at);
            let hit = (1..=longest).rev().find_map(|len| {
                let init = words[at..at + len - 1].join(" ");
                let concepts: Vec<&[ConceptId]> = self
                    .base_forms(words[at + len - 1])
                    .iter()
                    .filter_map(|last| {
                        let key = if init.is_empty() { last.clone() } else { format!("{init} {last}") };
                        self.lemma(&key)
                    })
                    .collect();
                (!concepts.is_empty()).then_some(Named { start: at, len, concepts })
            });
            // A word that starts no lemma as written can still be a form of one ("geese", "mice").
            let hit = hit.or_else(|| {
                let concepts: Vec<&[ConceptId]> =
                    self.base_forms(words[at]).iter().filter_map(|w| self.lemma(w)).collect();
                (!concepts.is_empty()).then_some(Named { start: at, len: 1, concepts })
            });
            match hit {
                Some(named) => {
                    at += named.len;
                    found.push(named);
                }
                None => at += 1,
            }
        }
        found
    }

    /// Every concept a text names: the concepts of its lemmas and all their ancestors in `hierarchy`.
    pub fn concepts_named(&self, hierarchy: &Hierarchy, text: &str) -> HashSet<ConceptId> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = words(&lower).collect();
        let mut out = HashSet::new();
        for named in self.named(&words) {
            for &id in named.concepts.iter().flat_map(|ids| ids.iter()) {
                out.insert(id);
                out.extend(hierarchy.ancestors(id).iter().copied());
            }
        }
        out
    }
}

/// A lemma as the enrich stage's words joined by single spaces, lowercase.
fn normalise(lemma: &str) -> String {
    let lower = lemma.to_lowercase();
    words(&lower).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nouns() -> &'static Nouns {
        Nouns::wordnet().unwrap()
    }

    fn id(wnid: &str) -> ConceptId {
        Hierarchy::imagenet().unwrap().by_wnid(wnid).unwrap()
    }

    const ANIMAL: &str = "n00015388";
    const MAMMAL: &str = "n01861778";
    const BIRD: &str = "n01503061";
    const DOG: &str = "n02084071";

    fn names(text: &str, wnid: &str) -> bool {
        nouns().concepts_named(Hierarchy::imagenet().unwrap(), text).contains(&id(wnid))
    }

    #[test]
    fn the_table_is_whole() {
        let n = nouns();
        assert_eq!(n.len(), 83_015, "distinct lemmas after splitting into words");
        assert_eq!(n.irregular.len(), 994, "irregular forms of lemmas in the table");
    }

    #[test]
    fn hyponyms_outside_imagenet_name_their_hypernyms() {
        assert!(names("the moose has to stand on its hind legs", ANIMAL));
        assert!(names("the moose has to stand on its hind legs", MAMMAL));
        assert!(names("Cows graze on the hillside", MAMMAL));
        assert!(names("a hen and her chicks", BIRD));
        assert!(names("two geese on a pond", BIRD));
        assert!(!names("a bridge over the river", ANIMAL));
        assert!(!names("an old stone viaduct", DOG));
    }

    #[test]
    fn synonyms_name_the_class() {
        // ImageNet 334 "porcupine, hedgehog".
        assert!(nouns().concepts_named(Hierarchy::imagenet().unwrap(), "A hedgehog in the leaves").contains(&334));
    }

    #[test]
    fn longest_lemma_wins_and_consumes_its_words() {
        let n = nouns();
        let words = ["a", "hot", "dog", "stand"];
        let found = n.named(&words);
        assert!(found.iter().any(|f| f.start == 1 && f.len == 2), "{found:?}");
        assert!(!names("a hot dog stand", DOG));
        assert!(names("a dog at the stand", DOG));
    }

    #[test]
    fn forms_reduce_to_lemmas() {
        let n = nouns();
        assert!(n.base_forms("geese").contains(&"goose".to_string()));
        assert!(n.base_forms("boxes").contains(&"box".to_string()));
        assert!(n.base_forms("puppies").contains(&"puppy".to_string()));
        assert!(n.base_forms("firemen").contains(&"fireman".to_string()));
        assert!(names("puppies playing", DOG));
        assert!(names("Chain-link fences", "n03327234"), "chain-link fence is a fence");
    }

    #[test]
    fn a_broken_table_is_an_error_naming_the_line() {
        let h = Hierarchy::imagenet().unwrap();
        let gz = |s: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, s.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let err = Nouns::parse(&gz("# wordnet-nouns/1: x\nL\tfoo\tn99999999\n"), h).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("n99999999"), "{err}");
        let err = Nouns::parse(&gz("nothing\n"), h).unwrap_err().to_string();
        assert!(err.contains("format tag"), "{err}");
        let err = Nouns::parse(b"not gzip", h).unwrap_err().to_string();
        assert!(err.contains("WordNet noun table"), "{err}");
        assert!(Nouns::parse(&gz("# wordnet-nouns/1: x\nL\tfoo\n"), h).is_err());
    }
}
