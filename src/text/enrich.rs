//! The enrich stage: fold the object classes extracted from the kept patches into the caption (DataJuicer).
//!
//! # Rules
//!
//! For one sample (key, caption, extracted classes), [`Enricher::enrich`] does, in order:
//!
//! 1. **Draw.** With probability [`EnrichConfig::mix`] the enriched text is used, else the original caption.
//!    The draw is `SplitMix64::new(derive(seed, &[epoch, hash_str(key)])).unit_f64() < mix`, so it depends on
//!    (seed, epoch, key) only: reruns and resumes draw the same, and an epoch draws afresh. `mix = 0` turns
//!    enrichment off (every text is the original caption byte for byte, `""` when there is none); `mix = 1`
//!    always enriches.
//! 2. **Dedupe.** Classes are taken in the order given (the extract stage's order, most probable first),
//!    skipping a class whose id or whose (trimmed, lowercased) name came earlier, and classes with a blank name.
//!    **Generic concepts** ([`crate::vision::hierarchy::GENERIC_NODES`]: animal, mammal, domestic animal,
//!    container) are never added: true of almost anything the classifier sees, they tell a reader nothing.
//! 3. **Already mentioned.** A class is dropped when the caption already mentions it: when any of its synonyms
//!    (its name, plus every synonym of the class in the loader's [`Vocabulary`]: the ImageNet labels by
//!    default) appears in the caption as whole words, case-insensitively (Unicode lowercase). Words are runs
//!    of alphanumeric characters (combining marks included); everything else separates words, so "cat" is
//!    found in "the cat's toy" and "Cats!" but not in "category", "bobcat" or "catfish". A multi-word synonym
//!    matches as a phrase of consecutive words ("tiger cat" matches "Tiger cats", not "tiger and cat").
//!    The last word of a synonym also matches its plural forms: `-s`; `-es` after s, x, z, ch, sh, o; `-y` →
//!    `-ies` after a consonant; `-f`/`-fe` → `-ves`; and irregular plurals (mouse/mice, louse/lice,
//!    goose/geese, foot/feet, tooth/teeth, man/men and -man/-men, child/children, person/people, ox/oxen,
//!    die/dice, cactus/cacti, fungus/fungi, octopus/octopi; sheep, fish, deer, … are their own plural).
//!    The caption is lowercased and split into words once; the synonyms are looked up in a hash map keyed by
//!    their first word, so the scan is linear in the caption's length. The map is built once per concept and
//!    kept by the enricher.
//!    With a hierarchy (the ImageNet vocabulary), a class is also mentioned when a noun of the caption is it,
//!    a synonym of it or a kind of it in **WordNet's full noun hierarchy** ([`crate::text::nouns`]): "the moose"
//!    names "animal" and "mammal", "cows" names "mammal", "a hen" names "bird", though none of moose, cow or
//!    hen is an ImageNet class. Nouns are lemmatised (WordNet's irregular forms and regular endings: "geese",
//!    "puppies").
//! 4. **Render.** The remaining classes are joined as "a", "a and b", "a, b and c" and put into
//!    [`EnrichConfig::template`] (default `"{caption}, with {classes}"`; the caption is inserted with its
//!    leading and trailing whitespace removed). A missing or blank caption uses
//!    [`EnrichConfig::empty_template`] (default `"a photo of {classes}"`); with no classes either the text is
//!    the original (`""` for a missing caption). When no class is left to add, the text is the original
//!    caption, unchanged. Templates are rendered in one pass: a caption or a class name containing
//!    `{classes}` or `{caption}` is inserted literally.
//! 5. **Names.** The stage then renames each extracted class its caption names by one of the class's own
//!    synonyms to that synonym ([`Enricher::name_as_caption`]): the record of a hedgehog photo captioned
//!    "hedgehog" says "hedgehog", not ImageNet's "porcupine".
//!
//! # Context overflow policy
//!
//! A CLIP text encoder sees `context` tokens (77) including `<|startoftext|>` and `<|endoftext|>`, and the
//! tokenizer truncates the rest. Appended classes are the first thing such truncation would cut, silently. So
//! the enriched text must fit: `count_tokens(text) + 2 <= context`, where `count_tokens` counts the text's
//! tokens without the two special tokens. The caption's tail yields to the classes, but only at a clean cut:
//!
//! 1. The whole caption with every class fits: done.
//! 2. Else the caption is **cut cleanly**: at the end of a sentence or a clause, never inside a phrase. The
//!    cut points are right after a sentence end (`. ! ? …`; not the full stop of an initial or an
//!    abbreviation such as "Dr.") or a clause mark (`, ; : — –`, a spaced hyphen), followed by whitespace, and
//!    outside brackets and double quotes; CJK sentence and clause marks allow a cut without the space
//!    (`clause_cuts`). The longest such prefix with which the template and every class fit is kept; its
//!    trailing clause mark and whitespace are removed, a sentence end stays (and picks the sentence
//!    template). The text still starts with a prefix of the caption, and every class is in it.
//! 3. Else (no clean cut leaves room for the classes) the text is the original caption, unchanged, and every
//!    class counts as truncated ([`Enriched::truncated_classes`]): a caption is never cut mid-phrase, and never
//!    replaced.
//! 4. A sample without a caption gets the `empty_template` with as many classes as fit, most probable first;
//!    the rest count as truncated (none fits: a tiny context, the text stays `""`).
//!
//! The record says what happened: [`Enriched::added`] lists the classes that are in the text, in order, and
//! [`Enriched::truncated_classes`] how many were left out for lack of room. The prefix search gallops then
//! bisects over the cut points, so a 1 MB caption costs one full count plus a few counts of short prefixes.
//! A caption that overflows on its own with nothing to add is left to the tokenizer's truncation.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::nouns::Nouns;
use super::phrase::{self, words};
use crate::error::{Error, Result};
use crate::rng::{SplitMix64, derive, hash_str};
use crate::sample::Class;
use crate::vision::Vocabulary;
use crate::vision::hierarchy::is_generic;

/// The caption placeholder in templates.
const CAPTION: &str = "{caption}";
/// The class-list placeholder in templates.
const CLASSES: &str = "{classes}";
/// Tokens the text encoder adds around every text (`<|startoftext|>`, `<|endoftext|>`).
const SPECIAL_TOKENS: usize = 2;

/// Settings of the enrich stage.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichConfig {
    /// Template for a sample whose caption does not end a sentence; must contain `{caption}` and `{classes}`.
    /// Default `"{caption}, with {classes}"`.
    pub template: String,
    /// Template for a sample whose caption ends a sentence (`.`, `!`, `?`, ...); must contain `{caption}` and
    /// `{classes}`. Default `"{caption} Pictured: {classes}."`.
    pub sentence_template: String,
    /// Template for a sample without a (non-blank) caption; must contain `{classes}` and not `{caption}`.
    /// Default `"a photo of {classes}"`.
    pub empty_template: String,
    /// Probability in `[0, 1]` of emitting the enriched text rather than the original caption. Default 1.
    pub mix: f32,
    /// Token context of the text encoder, special tokens included (CLIP: 77). The enriched text is fitted into
    /// it (see the module docs). Default 77.
    pub context: usize,
    /// A class at least this probable is still added when the caption names it only by a broader word ("a
    /// lizard on a branch" gains "an African chameleon"); a less probable class, or a hypernym, named that way is
    /// not. Default 0.7 (the tree rule's default threshold).
    pub specific_prob: f32,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            template: "{caption}, with {classes}".into(),
            sentence_template: "{caption} Pictured: {classes}.".into(),
            empty_template: "a photo of {classes}".into(),
            mix: 1.0,
            context: crate::sample::CONTEXT,
            specific_prob: 0.7,
        }
    }
}

impl EnrichConfig {
    /// Every problem with these settings.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, t) in [("template", &self.template), ("sentence_template", &self.sentence_template)] {
            if !t.contains(CLASSES) {
                p.push(format!("enrich {name} `{t}` has no {CLASSES}"));
            }
            if !t.contains(CAPTION) {
                p.push(format!("enrich {name} `{t}` has no {CAPTION}"));
            }
        }
        if !self.empty_template.contains(CLASSES) {
            p.push(format!("enrich empty_template `{}` has no {CLASSES}", self.empty_template));
        }
        if self.empty_template.contains(CAPTION) {
            p.push(format!(
                "enrich empty_template `{}` has {CAPTION}, but it is used when there is no caption",
                self.empty_template
            ));
        }
        if !(0.0..=1.0).contains(&self.mix) {
            p.push(format!("enrich mix {} is outside [0, 1]", self.mix));
        }
        if !(0.0..=1.0).contains(&self.specific_prob) {
            p.push(format!("enrich specific_prob {} is outside [0, 1]", self.specific_prob));
        }
        if self.context <= SPECIAL_TOKENS {
            p.push(format!("enrich context {} leaves no room for text (the special tokens take 2)", self.context));
        }
        p
    }
}

/// The outcome of enriching one caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Enriched {
    /// The text to tokenize: the enriched caption, or the original caption (`""` when there is none).
    pub text: String,
    /// The classes that are in `text`, in order (empty when `text` is the original).
    pub added: Vec<Class>,
    /// Whether `text` is the enriched text (the draw chose enrichment and at least one class was added).
    pub mixed: bool,
    /// Classes that were to be added but did not fit in the context (see the module docs).
    pub truncated_classes: usize,
}

/// The enrich stage's logic: settings, the vocabulary whose synonyms decide what a caption already mentions,
/// and the seed of the `mix` draw.
#[derive(Debug, Clone)]
pub struct Enricher {
    config: EnrichConfig,
    /// Synonyms per class id (the ImageNet labels by default; the loader hands over its own vocabulary).
    vocabulary: Vocabulary,
    seed: u64,
    /// WordNet's noun lemmas: what a caption names beyond the vocabulary's own words (module docs, rule 3).
    nouns: &'static Nouns,
    /// The mention matchers built so far, one per concept (at most one per concept of the vocabulary), shared
    /// by the stage's workers: the terms of a broad concept are many, and building its patterns per sample would
    /// cost more than the scan.
    mentions: Arc<Mutex<HashMap<MentionKey, Arc<Mentions>>>>,
}

/// What identifies a concept's mention terms: class id, WordNet id, name.
type MentionKey = (Option<u32>, String, String);

/// The words that name one concept, compiled for the caption scan.
#[derive(Debug)]
struct Mentions {
    /// Each of its own names (the vocabulary's synonyms of a class; the name of anything else), compiled alone:
    /// the caption's word for it becomes the record's display name.
    names: Vec<(String, Patterns)>,
    /// Its own words and those of every concept below it.
    own: Patterns,
    /// The names of its nameable hypernyms.
    above: Patterns,
}

/// Lowercase word sequences (the last word in each of its plural forms), indexed by their first word so that a
/// scan is linear in the caption's length.
#[derive(Debug, Default)]
struct Patterns(HashMap<String, Vec<Vec<String>>>);

impl Patterns {
    fn new<'a>(terms: impl Iterator<Item = &'a str>) -> Self {
        let mut by_first: HashMap<String, Vec<Vec<String>>> = HashMap::new();
        for term in terms {
            let lower = term.to_lowercase();
            let words: Vec<&str> = words(&lower).collect();
            let Some((last, init)) = words.split_last() else { continue };
            for form in plural_forms(last) {
                let mut pattern: Vec<String> = init.iter().map(|w| w.to_string()).collect();
                pattern.push(form);
                by_first.entry(pattern[0].clone()).or_default().push(pattern);
            }
        }
        Self(by_first)
    }

    /// Whether `caption_words` (lowercased) contain one of the patterns as consecutive whole words.
    fn found_in(&self, caption_words: &[&str]) -> bool {
        caption_words.iter().enumerate().any(|(at, word)| {
            self.0.get(*word).is_some_and(|patterns| {
                let rest = &caption_words[at..];
                patterns.iter().any(|p| rest.len() >= p.len() && p.iter().zip(rest).all(|(a, b)| a == b))
            })
        })
    }
}

impl Enricher {
    /// An enricher with the ImageNet-1k labels as the synonym table; fails when the settings have problems.
    pub fn new(config: EnrichConfig, seed: u64) -> Result<Self> {
        Self::with_vocabulary_of(config, seed, Vocabulary::imagenet()?)
    }

    /// An enricher that checks captions against `vocabulary` (the one the extract stage names concepts with);
    /// fails when the settings have problems.
    pub fn with_vocabulary_of(config: EnrichConfig, seed: u64, vocabulary: Vocabulary) -> Result<Self> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        Ok(Self { config, vocabulary, seed, nouns: Nouns::wordnet()?, mentions: Arc::default() })
    }

    /// Replaces the synonym table (index: class id) for a custom vocabulary. A class's own name always counts
    /// as a synonym; ids past the table's end have no other synonyms.
    pub fn with_synonyms(mut self, synonyms: Vec<Vec<String>>) -> Self {
        self.vocabulary = Vocabulary::from_table(synonyms);
        self.mentions = Arc::default();
        self
    }

    /// Takes the synonyms from `vocabulary`: the one the extract stage names classes with, so that a restricted
    /// or renamed vocabulary decides mentions too.
    pub fn with_vocabulary(mut self, vocabulary: Vocabulary) -> Self {
        self.vocabulary = vocabulary;
        self.mentions = Arc::default();
        self
    }

    /// The settings.
    pub fn config(&self) -> &EnrichConfig {
        &self.config
    }

    /// The synonyms of class `id` in the table (empty for an unknown id).
    pub fn synonyms(&self, id: u32) -> &[String] {
        self.vocabulary.synonyms(id)
    }

    /// Whether the `mix` draw for (epoch, key) chooses the enriched text.
    pub fn draws_enriched(&self, key: &str, epoch: u64) -> bool {
        let mut rng = SplitMix64::new(derive(self.seed, &[epoch, hash_str(key)]));
        rng.unit_f64() < f64::from(self.config.mix)
    }

    /// Enriches one caption with the classes it does not mention (see the module docs for the rules).
    ///
    /// `count_tokens` counts the tokens of a text without the start and end tokens; it decides what fits in
    /// [`EnrichConfig::context`].
    pub fn enrich(
        &self,
        key: &str,
        epoch: u64,
        caption: Option<&str>,
        classes: &[Class],
        count_tokens: &dyn Fn(&str) -> usize,
    ) -> Enriched {
        let original = || Enriched {
            text: caption.unwrap_or_default().to_string(),
            added: Vec::new(),
            mixed: false,
            truncated_classes: 0,
        };
        if classes.is_empty() || !self.draws_enriched(key, epoch) {
            return original();
        }
        let body = caption.map(str::trim).filter(|c| !c.is_empty());
        let mut todo = dedupe(classes);
        if let Some(h) = self.vocabulary.hierarchy() {
            todo.retain(|c| !self.vocabulary.concept_of(c).is_some_and(|id| is_generic(h, id)));
        }
        if let Some(body) = body {
            let mentioned = self.mentioned(body, &todo);
            let mut flags = mentioned.into_iter();
            todo.retain(|_| !flags.next().unwrap_or(false));
        }
        if todo.is_empty() {
            return original();
        }
        let names: Vec<String> = todo.iter().map(|c| phrase::with_article(&c.name)).collect();
        let fits = |text: &str| count_tokens(text).saturating_add(SPECIAL_TOKENS) <= self.config.context;

        if let Some(body) = body {
            let joined = phrase::join(&names);
            let full = self.compose(body, &joined);
            if fits(&full) {
                return enriched(full, todo, 0);
            }
            let cuts = clause_cuts(body);
            let prefix = |k: usize| trim_cut(&body[..cuts[k - 1]]);
            let k = largest_fitting(cuts.len(), |k| {
                let p = prefix(k);
                !p.is_empty() && fits(&self.compose(p, &joined))
            });
            if k > 0 {
                return enriched(self.compose(prefix(k), &joined), todo, 0);
            }
            return Enriched { truncated_classes: todo.len(), ..original() };
        }
        let empty = |m: usize| render(&self.config.empty_template, "", &phrase::join(&names[..m]), false);
        let m = largest_fitting(names.len(), |m| fits(&empty(m)));
        if m == 0 {
            return Enriched { truncated_classes: todo.len(), ..original() };
        }
        let text = empty(m);
        let truncated = todo.len() - m;
        todo.truncate(m);
        enriched(text, todo, truncated)
    }

    /// The caption (or a cut prefix of it) with the class phrase: the sentence template when the caption ends
    /// a sentence, else the template, without doubling a comma the caption already ends with.
    fn compose(&self, caption: &str, classes: &str) -> String {
        let template =
            if phrase::ends_sentence(caption) { &self.config.sentence_template } else { &self.config.template };
        render(template, caption, classes, phrase::ends_clause(caption))
    }

    /// For each class, whether the caption already names it (module docs, rule 3): one of its own words or a
    /// word of anything below it; or a broader word, unless the class is a confident specific one.
    fn mentioned(&self, caption: &str, classes: &[Class]) -> Vec<bool> {
        let lower = caption.to_lowercase();
        let caption_words: Vec<&str> = words(&lower).collect();
        let hierarchy = self.vocabulary.hierarchy();
        let named = hierarchy.map(|h| self.nouns.concepts_named(h, caption)).unwrap_or_default();
        classes
            .iter()
            .map(|class| {
                let m = self.mentions_of(class);
                if m.own.found_in(&caption_words) {
                    return true;
                }
                if hierarchy.is_some() && self.vocabulary.concept_of(class).is_some_and(|id| named.contains(&id)) {
                    return true;
                }
                let specific = class.id.is_some() && class.prob >= self.config.specific_prob;
                !specific && m.above.found_in(&caption_words)
            })
            .collect()
    }

    /// The compiled mention terms of `class`, built on first use.
    fn mentions_of(&self, class: &Class) -> Arc<Mentions> {
        let key = (class.id, class.wnid.clone(), class.name.clone());
        if let Some(m) = self.mentions.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return m;
        }
        let terms = self.vocabulary.mention_terms(class);
        let own = std::iter::once(class.name.as_str()).chain(terms.own.iter().map(String::as_str));
        let synonyms = class.id.map(|id| self.vocabulary.synonyms(id)).unwrap_or_default();
        let names = std::iter::once(&class.name)
            .chain(synonyms)
            .map(|n| (n.clone(), Patterns::new(std::iter::once(n.as_str()))))
            .collect();
        let m = Arc::new(Mentions {
            names,
            own: Patterns::new(own),
            above: Patterns::new(terms.above.iter().map(String::as_str)),
        });
        if let Ok(mut cache) = self.mentions.lock() {
            cache.insert(key, m.clone());
        }
        m
    }
}

impl Enricher {
    /// Renames each class its caption names by one of the class's own synonyms to that synonym, as the
    /// vocabulary spells it: a hedgehog photo whose caption says "hedgehog" keeps the record's "hedgehog"
    /// rather than ImageNet 334's first name, "porcupine". Classes the caption does not name that way are left
    /// as they are. Returns how many were renamed.
    pub fn name_as_caption(&self, caption: Option<&str>, classes: &mut [Class]) -> usize {
        let Some(caption) = caption.map(str::trim).filter(|c| !c.is_empty()) else { return 0 };
        let lower = caption.to_lowercase();
        let caption_words: Vec<&str> = words(&lower).collect();
        let mut renamed = 0;
        for class in classes.iter_mut() {
            let m = self.mentions_of(class);
            if m.names.first().is_some_and(|(_, p)| p.found_in(&caption_words)) {
                continue;
            }
            if let Some((name, _)) = m.names.iter().skip(1).find(|(_, p)| p.found_in(&caption_words)) {
                class.name = name.clone();
                renamed += 1;
            }
        }
        renamed
    }
}

/// An enriched outcome.
fn enriched(text: String, added: Vec<Class>, truncated_classes: usize) -> Enriched {
    Enriched { text, added, mixed: true, truncated_classes }
}

/// The classes in order, without blank names and without a repeated concept (class id or WordNet id) or
/// (lowercased, trimmed) name.
fn dedupe(classes: &[Class]) -> Vec<Class> {
    let mut concepts = HashSet::new();
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for class in classes {
        let name = class.name.trim().to_lowercase();
        let concept = (class.id, if class.id.is_some() { "" } else { class.wnid.as_str() });
        if name.is_empty() || concepts.contains(&concept) || names.contains(&name) {
            continue;
        }
        concepts.insert(concept);
        names.insert(name);
        out.push(class.clone());
    }
    out
}

/// Renders a template in one pass: `{caption}` and `{classes}` are replaced, any other text (other braces
/// included) is kept; substituted text is never scanned again. With `caption_ends_clause`, a comma right after
/// `{caption}` in the template is left out (the caption already ends with clause punctuation).
fn render(template: &str, caption: &str, classes: &str, caption_ends_clause: bool) -> String {
    let mut out = String::with_capacity(template.len() + caption.len() + classes.len());
    let mut rest = template;
    while let Some(pos) = rest.find('{') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix(CAPTION) {
            out.push_str(caption);
            rest = if caption_ends_clause { after.strip_prefix(',').unwrap_or(after) } else { after };
        } else if let Some(after) = tail.strip_prefix(CLASSES) {
            out.push_str(classes);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Irregular plurals matched as a word's suffix (so "fireman" → "firemen", "dormouse" → "dormice").
const IRREGULAR_SUFFIX: [(&str, &str); 9] = [
    ("man", "men"),
    ("mouse", "mice"),
    ("louse", "lice"),
    ("goose", "geese"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("child", "children"),
    ("person", "people"),
    ("cactus", "cacti"),
];

/// Irregular plurals matched as the whole word only.
const IRREGULAR_WORD: [(&str, &str); 4] = [("ox", "oxen"), ("die", "dice"), ("fungus", "fungi"), ("octopus", "octopi")];

/// The forms of a lowercase noun that count as mentioning it: itself and its plural forms. Generous on
/// purpose (both "-s" and the rule-based forms): a spurious form only matters if a caption uses it.
fn plural_forms(word: &str) -> Vec<String> {
    let mut forms = vec![word.to_string(), format!("{word}s")];
    if ["s", "x", "z", "ch", "sh", "o"].iter().any(|e| word.ends_with(e)) {
        forms.push(format!("{word}es"));
    }
    if let Some(stem) = word.strip_suffix('y')
        && stem.chars().last().is_some_and(|c| c.is_alphabetic() && !"aeiou".contains(c))
    {
        forms.push(format!("{stem}ies"));
    }
    if let Some(stem) = word.strip_suffix("fe").or_else(|| word.strip_suffix('f'))
        && !stem.is_empty()
    {
        forms.push(format!("{stem}ves"));
    }
    for (singular, plural) in IRREGULAR_SUFFIX {
        if let Some(stem) = word.strip_suffix(singular) {
            forms.push(format!("{stem}{plural}"));
        }
    }
    for (singular, plural) in IRREGULAR_WORD {
        if word == singular {
            forms.push(plural.to_string());
        }
    }
    forms
}

/// Punctuation that ends a sentence.
fn ends_sentence_mark(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

/// Punctuation that ends a clause (or a list item) inside a sentence.
fn ends_clause_mark(c: char) -> bool {
    matches!(c, ',' | ';' | ':' | '—' | '–' | '，' | '、' | '；' | '：')
}

/// Punctuation written without a following space (CJK): a cut may follow it directly.
fn is_unspaced_mark(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '，' | '、' | '；' | '：')
}

/// Words after which a full stop abbreviates rather than ends a sentence ("Dr. Smith", "e.g. a cat").
const ABBREVIATIONS: [&str; 17] =
    ["mr", "mrs", "ms", "dr", "st", "mt", "vs", "etc", "eg", "ie", "no", "jr", "sr", "prof", "fig", "approx", "ca"];

/// Byte offsets where a caption (trimmed) may be cut cleanly, ascending, excluding 0 and its full length:
/// right after a sentence end (`.`, `!`, `?`, `…`, and their CJK forms; a full stop after a single letter or
/// an [`ABBREVIATIONS`] word does not count) or a clause mark (`,`, `;`, `:`, `—`, `–`, a hyphen between
/// spaces, CJK commas), followed by whitespace (CJK marks: by anything), outside brackets and double quotes.
/// A closing bracket or quote right after a sentence end moves the cut behind it. A cut never falls inside a
/// phrase: a caption without such a mark has no cut point.
fn clause_cuts(text: &str) -> Vec<usize> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut cuts = Vec::new();
    let (mut depth, mut quoted) = (0usize, false);
    for (i, &(_, c)) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).map(|j| chars[j].1);
        let next = chars.get(i + 1).map(|&(_, n)| n);
        let Some(next_at) = chars.get(i + 1).map(|&(at, _)| at) else { break };
        match c {
            '(' | '[' | '{' | '“' | '«' => depth += 1,
            ')' | ']' | '}' | '”' | '»' => depth = depth.saturating_sub(1),
            '"' => quoted = !quoted,
            _ => {}
        }
        let closes = matches!(c, ')' | ']' | '}' | '”' | '»' | '"');
        let outside = depth == 0 && !quoted;
        let spaced = next.is_some_and(char::is_whitespace);
        let boundary = if closes {
            // `… end.) Next` / `… "end." Next`: the mark sits inside, the cut goes after the closer.
            outside && spaced && prev.is_some_and(ends_sentence_mark)
        } else if !outside {
            false
        } else if is_unspaced_mark(c) {
            true
        } else if c == '.' {
            spaced && !abbreviation(&text[..chars[i].0])
        } else if ends_sentence_mark(c) || ends_clause_mark(c) {
            spaced || matches!(c, '—' | '–')
        } else {
            c == '-' && spaced && prev.is_some_and(char::is_whitespace)
        };
        if boundary {
            cuts.push(next_at);
        }
    }
    cuts
}

/// Whether the word that ends `before` (the text up to a full stop) is an abbreviation or an initial.
fn abbreviation(before: &str) -> bool {
    let word: String = before.chars().rev().take_while(|c| c.is_alphanumeric() || *c == '.').collect();
    let word: String = word.chars().rev().filter(|c| *c != '.').collect::<String>().to_lowercase();
    word.chars().count() == 1 && word.chars().all(char::is_alphabetic) || ABBREVIATIONS.contains(&word.as_str())
}

/// A cut caption without trailing whitespace and separators.
fn trim_cut(prefix: &str) -> &str {
    prefix.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, ',' | ';' | ':' | '-' | '–' | '—' | '(' | '[' | '/' | '、' | '，')
    })
}

/// The largest `k` in `1..=max` with `fits(k)`, assuming `fits` holds up to some `k` and fails after; 0 when
/// `fits(1)` fails (or `max == 0`). Gallops from 1 then bisects, so the probes stay near the answer. Only a
/// `k` for which `fits` was seen to hold is returned.
fn largest_fitting(max: usize, mut fits: impl FnMut(usize) -> bool) -> usize {
    if max == 0 || !fits(1) {
        return 0;
    }
    let mut lo = 1;
    let mut step = 1usize;
    let mut hi = loop {
        if lo == max {
            return max;
        }
        let probe = lo.saturating_add(step).min(max);
        if fits(probe) {
            lo = probe;
            step = step.saturating_mul(2);
        } else {
            break probe;
        }
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    fn class(id: u32, name: &str) -> Class {
        Class { id: Some(id), wnid: String::new(), name: name.to_string(), prob: 0.5 }
    }

    /// Whitespace word counter.
    fn ws(text: &str) -> usize {
        text.split_whitespace().count()
    }

    /// A CLIP-BPE-like counter: every punctuation mark is a token, a word costs one token per 6 characters, a
    /// non-ASCII character two tokens (byte-level BPE splits rare characters into byte tokens).
    fn bpe_like(text: &str) -> usize {
        let mut n = 0;
        for word in text.split_whitespace() {
            let mut letters = 0usize;
            for c in word.chars() {
                if c.is_ascii_alphanumeric() {
                    letters += 1;
                } else {
                    n += if c.is_ascii() { 1 } else { 2 };
                }
            }
            n += letters.div_ceil(6);
        }
        n
    }

    fn config(mix: f32, context: usize) -> EnrichConfig {
        EnrichConfig { mix, context, ..EnrichConfig::default() }
    }

    fn enricher(mix: f32, context: usize) -> Enricher {
        let e = Enricher::new(config(mix, context), 7);
        match e {
            Ok(e) => e,
            Err(err) => panic!("{err}"),
        }
    }

    /// A small vocabulary with synonyms, for controlled tests.
    fn pets() -> Enricher {
        enricher(1.0, 77).with_synonyms(vec![
            vec!["tabby".into(), "tabby cat".into(), "cat".into()],
            vec!["dog".into(), "domestic dog".into()],
            vec!["mouse".into(), "computer mouse".into()],
            vec!["butterfly".into()],
            vec!["wolf".into()],
            vec!["goose".into()],
            vec!["tiger cat".into()],
            vec!["fireman".into()],
        ])
    }

    fn names(added: &[Class]) -> Vec<&str> {
        added.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn defaults_and_problems() {
        let c = EnrichConfig::default();
        assert_eq!(c.template, "{caption}, with {classes}");
        assert_eq!(c.empty_template, "a photo of {classes}");
        assert_eq!((c.mix, c.context), (1.0, 77));
        assert!(c.problems().is_empty());
        let bad = EnrichConfig {
            template: "{caption} only".into(),
            empty_template: "{caption} {classes}".into(),
            mix: 1.5,
            context: 2,
            ..EnrichConfig::default()
        };
        assert_eq!(bad.problems().len(), 4, "{:?}", bad.problems());
        let no_caption = EnrichConfig { template: "with {classes}".into(), mix: f32::NAN, ..c.clone() };
        assert_eq!(no_caption.problems().len(), 2, "{:?}", no_caption.problems());
        assert!(matches!(Enricher::new(bad, 0), Err(Error::Config(p)) if p.len() == 4));
    }

    #[test]
    fn imagenet_synonym_table() {
        let e = enricher(1.0, 77);
        assert_eq!(e.synonyms(999)[..2], ["toilet paper", "toilet tissue"]);
        assert_eq!(e.synonyms(388)[0], "giant panda");
        assert!(e.synonyms(5000).is_empty());
        // A class is mentioned through its ImageNet label even when renamed by a vocabulary.
        let out = e.enrich("k", 0, Some("a giant panda eating"), &[class(388, "panda bear")], &ws);
        assert_eq!(out.text, "a giant panda eating");
        assert!(!out.mixed);
    }

    #[test]
    fn renders_in_one_pass() {
        assert_eq!(
            render("{caption}, with {classes}", "x {classes} {caption}", "y {caption}", false),
            "x {classes} {caption}, with y {caption}"
        );
        assert_eq!(render("{{classes}} {cap", "c", "k", false), "{k} {cap");
        assert_eq!(render("é{classes}ü", "", "k", false), "ékü");
    }

    #[test]
    fn plural_forms_cover_the_rules() {
        let has = |w: &str, p: &str| plural_forms(w).iter().any(|f| f == p);
        for (w, p) in [
            ("cat", "cats"),
            ("box", "boxes"),
            ("bus", "buses"),
            ("dish", "dishes"),
            ("potato", "potatoes"),
            ("butterfly", "butterflies"),
            ("monkey", "monkeys"),
            ("wolf", "wolves"),
            ("knife", "knives"),
            ("mouse", "mice"),
            ("dormouse", "dormice"),
            ("goose", "geese"),
            ("man", "men"),
            ("fireman", "firemen"),
            ("ox", "oxen"),
            ("sheep", "sheep"),
            ("fish", "fish"),
            ("fish", "fishes"),
            ("child", "children"),
            ("person", "people"),
        ] {
            assert!(has(w, p), "{w} → {p}: {:?}", plural_forms(w));
        }
        assert!(!has("monkey", "monkies"));
        assert!(!has("box", "boxen"));
    }

    #[test]
    fn mention_detection() {
        let e = pets();
        let m = |caption: &str, c: Class| e.mentioned(caption, &[c])[0];
        // Name, synonyms, plurals, any case, possessive, punctuation.
        assert!(m("a cat on a mat", class(0, "tabby")));
        assert!(m("Two CATS!", class(0, "tabby")));
        assert!(m("the cat's toy", class(0, "tabby")));
        assert!(m("Tabby Cats sleeping", class(0, "tabby")));
        assert!(m("butterflies in a field", class(3, "butterfly")));
        assert!(m("a pack of Wolves", class(4, "wolf")));
        assert!(m("three mice", class(2, "mouse")));
        assert!(m("geese flying", class(5, "goose")));
        assert!(m("firemen at work", class(7, "fireman")));
        assert!(m("a DOMESTIC DOGS show", class(1, "dog")));
        // Not as a substring of another word.
        assert!(!m("a category of things", class(0, "tabby")));
        assert!(!m("a bobcat and a catfish; concatenate", class(0, "tabby")));
        assert!(!m("dogma", class(1, "dog")));
        // Multi-word names match as a phrase only, plural on the last word.
        assert!(m("two tiger cats", class(6, "tiger cat")));
        assert!(!m("a tiger and a cat", class(6, "tiger cat")));
        assert!(!m("a tiger", class(6, "tiger cat")));
        // Unicode-aware lowercase, and the class name itself counts even without a synonym table entry.
        assert!(m("ÉLAN VITAL", class(99, "élan")));
        assert!(m("ΣΟΦΊΑ", class(99, "σοφία")));
        assert!(!m("", class(0, "tabby")));
    }

    /// An ImageNet concept as the tree rule emits it.
    fn concept(wnid: &str, prob: f32) -> Class {
        let h = crate::vision::hierarchy::Hierarchy::imagenet().unwrap();
        let id = h.by_wnid(wnid).unwrap();
        let c = h.concept(id).unwrap();
        Class { id: c.class, wnid: wnid.into(), name: c.name.clone(), prob }
    }

    #[test]
    fn mentions_through_synonyms_hypernyms_and_hyponyms() {
        let e = enricher(1.0, 77);
        let chameleon = |p| concept("n01694178", p); // African chameleon (class 47)
        let lizard = concept("n01674464", 0.9); // a hypernym
        let add = |caption: &str, c: Class| e.enrich("k", 0, Some(caption), &[c], &ws).text;
        // A synonym of the class itself: nothing to add.
        assert_eq!(add("A chameleon on a branch", chameleon(0.9)), "A chameleon on a branch");
        // A hyponym names the hypernym: "agama" is a lizard.
        assert_eq!(add("An agama basking", lizard.clone()), "An agama basking");
        assert_eq!(add("Two lizards basking", lizard.clone()), "Two lizards basking");
        // A hypernym names the class coarsely: a confident class is still added, a doubtful one is not.
        assert_eq!(add("A lizard on a branch", chameleon(0.9)), "A lizard on a branch, with an African chameleon");
        assert_eq!(add("A lizard on a branch", chameleon(0.5)), "A lizard on a branch");
        // Unrelated words mention nothing.
        assert_eq!(add("A branch", lizard), "A branch, with a lizard");
    }

    #[test]
    fn phrasing_keeps_the_caption_and_reads_as_english() {
        let e = enricher(1.0, 77);
        let agama = concept("n01687978", 0.9);
        let add = |caption: &str| e.enrich("k", 0, Some(caption), std::slice::from_ref(&agama), &ws).text;
        assert_eq!(add("It changes colour in seconds."), "It changes colour in seconds. Pictured: an agama.");
        assert_eq!(add("Is it fast?"), "Is it fast? Pictured: an agama.");
        assert_eq!(add("On a branch,"), "On a branch, with an agama");
        assert_eq!(add("On a branch;"), "On a branch; with an agama");
        assert_eq!(add("On a branch"), "On a branch, with an agama");
        for caption in ["It changes colour in seconds.", "On a branch,", "(see below.)"] {
            let text = add(caption);
            assert!(text.starts_with(caption) && !text.contains(".,") && !text.contains(",,"), "{text}");
        }
    }

    #[test]
    fn adds_unmentioned_classes() {
        let e = pets();
        let classes = [class(0, "tabby"), class(1, "dog"), class(3, "butterfly"), class(4, "wolf")];
        let out = e.enrich("k", 0, Some("A Dog chasing butterflies\n"), &classes, &ws);
        assert_eq!(out.text, "A Dog chasing butterflies, with a tabby and a wolf");
        assert_eq!(names(&out.added), ["tabby", "wolf"]);
        assert!(out.mixed);
        assert_eq!(out.truncated_classes, 0);
    }

    #[test]
    fn dedupes_by_id_and_name() {
        let e = pets();
        let classes = [
            class(0, "tabby"),
            class(0, "kitty"),
            class(4, "wolf"),
            class(9, "Wolf"),
            class(134, "crane"),
            class(517, "crane "),
            class(8, "  "),
        ];
        let out = e.enrich("k", 0, Some("a photo"), &classes, &ws);
        assert_eq!(out.text, "a photo, with a tabby, a wolf and a crane");
        assert_eq!(out.added.iter().map(|c| c.id).collect::<Vec<_>>(), [Some(0), Some(4), Some(134)]);
    }

    #[test]
    fn empty_caption_uses_empty_template() {
        let e = pets();
        let classes = [class(0, "tabby"), class(1, "dog"), class(4, "wolf")];
        for caption in [None, Some(""), Some("  \n\t ")] {
            let out = e.enrich("k", 0, caption, &classes, &ws);
            assert_eq!(out.text, "a photo of a tabby, a dog and a wolf");
            assert_eq!(out.added.len(), 3);
            assert!(out.mixed);
        }
        assert_eq!(e.enrich("k", 0, None, &[], &ws).text, "");
        assert_eq!(e.enrich("k", 0, Some(" "), &[], &ws).text, " ");
    }

    #[test]
    fn nothing_to_add_keeps_the_caption_byte_for_byte() {
        let e = pets();
        let caption = "  Two cats & a DOG \u{301}\n";
        for classes in [&[][..], &[class(0, "tabby"), class(1, "dog")][..]] {
            let out = e.enrich("k", 3, Some(caption), classes, &ws);
            assert_eq!(out.text, caption);
            assert!(out.added.is_empty() && !out.mixed && out.truncated_classes == 0);
        }
    }

    #[test]
    fn mix_is_deterministic_and_matches_its_rate() {
        let e = Enricher::new(config(0.3, 77), 11).map(|e| e.with_synonyms(Vec::new()));
        let Ok(e) = e else { panic!("config") };
        let classes = [class(1, "zebra")];
        let n = 20_000;
        let mut chosen = 0;
        let mut differs_by_epoch = 0;
        for i in 0..n {
            let key = format!("shard-{:06}/{i}", i / 100);
            let a = e.enrich(&key, 2, Some("a horse"), &classes, &ws);
            let b = e.enrich(&key, 2, Some("a horse"), &classes, &ws);
            assert_eq!(a, b);
            assert_eq!(a.mixed, e.draws_enriched(&key, 2));
            assert_eq!(a.text, if a.mixed { "a horse, with a zebra" } else { "a horse" });
            chosen += usize::from(a.mixed);
            differs_by_epoch += usize::from(a.mixed != e.draws_enriched(&key, 3));
        }
        let rate = chosen as f64 / n as f64;
        assert!((rate - 0.3).abs() < 0.02, "rate {rate}");
        // Epochs draw afresh: P(differ) = 2·0.3·0.7 = 0.42.
        let differ = differs_by_epoch as f64 / n as f64;
        assert!((differ - 0.42).abs() < 0.03, "differ {differ}");
        // The draw follows the documented formula.
        let mut rng = SplitMix64::new(derive(11, &[2, hash_str("shard-000000/5")]));
        assert_eq!(e.draws_enriched("shard-000000/5", 2), rng.unit_f64() < 0.3);
    }

    #[test]
    fn mix_extremes() {
        let off = enricher(0.0, 77);
        let on = enricher(1.0, 77);
        let classes = [class(1, "zebra")];
        for i in 0..1000 {
            let key = i.to_string();
            assert_eq!(off.enrich(&key, i, Some(" a horse "), &classes, &ws).text, " a horse ");
            assert_eq!(off.enrich(&key, i, None, &classes, &ws).text, "");
            assert_eq!(on.enrich(&key, i, Some(" a horse "), &classes, &ws).text, "a horse, with a zebra");
        }
    }

    #[test]
    fn overflow_cuts_the_caption_at_a_clause_boundary() {
        let e = enricher(1.0, 13);
        let caption = "one two, three four five six, seven eight nine ten eleven twelve";
        let classes = [class(1, "zebra"), class(2, "fire truck")];
        let out = e.enrich("k", 0, Some(caption), &classes, &ws);
        // 11 words fit, "one two three four, with a zebra and a fire truck" would: but "four" ends no clause.
        assert_eq!(out.text, "one two, with a zebra and a fire truck");
        assert!(ws(&out.text) + 2 <= 13);
        assert_eq!((out.added.len(), out.truncated_classes), (2, 0));
        // A sentence end stays and takes the sentence template.
        let out = e.enrich("k", 0, Some("One two. Three four five six seven eight nine"), &classes, &ws);
        assert_eq!(out.text, "One two. Pictured: a zebra and a fire truck.");
        // No clean cut leaves room: the caption stays whole, nothing is added.
        let out = e.enrich("k", 0, Some("one two three four five six seven eight nine ten"), &classes, &ws);
        assert_eq!(out.text, "one two three four five six seven eight nine ten");
        assert_eq!((out.added.len(), out.truncated_classes, out.mixed), (0, 2, false));
        // A caption that fits is kept whole.
        let out = e.enrich("k", 0, Some("one two three"), &classes, &ws);
        assert_eq!(out.text, "one two three, with a zebra and a fire truck");
    }

    #[test]
    fn overflow_keeps_the_caption_and_drops_the_last_classes_without_one() {
        let classes = [class(1, "zebra"), class(2, "fire truck"), class(3, "sea lion")];
        // Context 11 = 9 words: "a photo of a zebra, a fire truck and a sea lion" is 12 words; the two first
        // classes fit ("a photo of a zebra and a fire truck").
        let e = enricher(1.0, 11);
        let out = e.enrich("k", 0, None, &classes, &ws);
        assert_eq!(out.text, "a photo of a zebra and a fire truck");
        assert_eq!((names(&out.added), out.truncated_classes), (vec!["zebra", "fire truck"], 1));
        // A caption is never replaced by the empty template: it stays, every class reported.
        let out = e.enrich("k", 0, Some("some caption words"), &classes, &ws);
        assert_eq!(out.text, "some caption words");
        assert_eq!((out.added.len(), out.truncated_classes, out.mixed), (0, 3, false));
        // Not even one class fits: the text stays empty, every class reported.
        let e = enricher(1.0, 5);
        let out = e.enrich("k", 0, None, &classes, &ws);
        assert_eq!(out.text, "");
        assert!(out.added.is_empty() && !out.mixed);
        assert_eq!(out.truncated_classes, 3);
    }

    #[test]
    fn overflow_with_a_realistic_counter() {
        let e = enricher(1.0, 77);
        let caption = "A wide-angle photograph, taken at dusk, of a crowded harbour: fishing boats (some rusty, some \
                       freshly painted), stacked lobster traps, coils of rope, gulls circling over the pier, a lighthouse \
                       on the distant headland, and tourists photographing everything with their phones; the water \
                       reflects the orange sky; a café sign reads «Chez Marie» — overall, a busy, cheerful scene.";
        assert!(bpe_like(caption) + 2 > 77);
        let classes = [class(1, "container ship"), class(2, "pelican"), class(3, "lighthouse"), class(4, "dock")];
        let out = e.enrich("k", 0, Some(caption), &classes, &bpe_like);
        assert!(bpe_like(&out.text) + 2 <= 77, "{}", out.text);
        assert_eq!(names(&out.added), ["container ship", "pelican", "dock"]);
        assert_eq!(out.truncated_classes, 0);
        let cut = out.text.strip_suffix(", with a container ship, a pelican and a dock");
        let Some(cut) = cut else { panic!("{}", out.text) };
        assert!(caption.starts_with(cut) && cut.len() > 100, "{cut}");
        assert!(!cut.ends_with([',', ' ', ';', ':']), "{cut}");
        // At a clause mark ("…, a lighthouse on the distant headland" then ", and tourists …").
        assert!(caption[cut.len()..].starts_with(", and tourists"), "{cut}");
        // The longest clean prefix was kept: the next clause would not fit.
        let next = clause_cuts(caption).into_iter().find(|&at| at > cut.len() + 1).unwrap();
        let more = format!("{}, with a container ship, a pelican and a dock", trim_cut(&caption[..next]));
        assert!(bpe_like(&more) + 2 > 77, "{more}");
    }

    #[test]
    fn overflow_cuts_unspaced_scripts_at_their_marks() {
        let e = enricher(1.0, 20);
        let count = |t: &str| t.chars().filter(|c| !c.is_whitespace()).count();
        let caption = "一只猫坐在窗台上，看着外面的雨。天空很暗";
        let out = e.enrich("k", 0, Some(caption), &[class(1, "dog")], &count);
        assert!(count(&out.text) + 2 <= 20, "{}", out.text);
        assert_eq!(out.text, "一只猫坐在窗台上, with a dog");
        // A single huge space-less word cannot be cut: it stays, the class does not fit.
        let blob = "x".repeat(500);
        let out = enricher(1.0, 77).enrich("k", 0, Some(&blob), &[class(1, "dog")], &|t: &str| t.len() / 4);
        assert_eq!((out.text.as_str(), out.truncated_classes), (blob.as_str(), 1));
    }

    #[test]
    fn cut_points_and_search() {
        let cut = |t: &str| clause_cuts(t).iter().map(|&at| t[..at].to_string()).collect::<Vec<_>>();
        assert_eq!(
            cut("ab, cd. Ef; gh: ij — kl"),
            ["ab,", "ab, cd.", "ab, cd. Ef;", "ab, cd. Ef; gh:", "ab, cd. Ef; gh: ij —"]
        );
        assert_eq!(cut("a - b-c, d"), ["a -", "a - b-c,"]);
        // Not inside brackets or quotes; after a closer that follows a sentence end.
        assert_eq!(cut("a (b, c) d, e"), ["a (b, c) d,"]);
        assert_eq!(cut("He said \"no, never.\" Then, e"), ["He said \"no, never.\"", "He said \"no, never.\" Then,"]);
        // Initials, abbreviations and decimals are not sentence ends.
        assert!(cut("J. R. R. Tolkien met Dr. Smith at 3.5 p.m today").is_empty());
        assert_eq!(cut("猫，狗。鸟"), ["猫，", "猫，狗。"]);
        assert!(cut("").is_empty() && cut("no marks at all").is_empty() && cut("ends here.").is_empty());
        assert_eq!(trim_cut("a b, (—"), "a b");
        for limit in 0..40 {
            assert_eq!(largest_fitting(30, |k| k <= limit), limit.min(30));
        }
        assert_eq!(largest_fitting(0, |_| true), 0);
        let mut probes = 0;
        assert_eq!(
            largest_fitting(1_000_000, |k| {
                probes += 1;
                k <= 37
            }),
            37
        );
        assert!(probes < 20, "{probes}");
    }

    #[test]
    fn huge_and_odd_captions_are_fast() {
        let e = pets();
        let classes = [class(0, "tabby"), class(6, "tiger cat"), class(2, "mouse"), class(12, "zebra")];
        let word = "category bobcat tiger concatenate dogma ";
        let huge = word.repeat(1_000_000 / word.len());
        let one_word = "é".repeat(500_000);
        let cjk = "猫".repeat(333_333);
        let marks = "a\u{301}\u{302}\u{303}".repeat(100_000);
        let odd = "\u{0}\u{200d}\u{202e}İı\u{fffd}👩‍👩‍👧‍👦\u{1f3fb}ß ẞ ǅ ﬁ Σς\r\n\t".repeat(20_000);
        for caption in [&huge, &one_word, &cjk, &marks, &odd] {
            for counter in [&ws as &dyn Fn(&str) -> usize, &bpe_like] {
                let start = Instant::now();
                let out = e.enrich("k", 0, Some(caption), &classes, counter);
                assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
                assert!(!out.mixed || counter(&out.text) + 2 <= 77);
                assert_eq!(out.added.len() + out.truncated_classes, 4);
            }
        }
        // "tiger" alone and "cat"-containing words do not mention anything.
        let clauses = huge.replace("dogma ", "dogma, ");
        let out = e.enrich("k", 0, Some(&clauses), &classes, &ws);
        assert_eq!(names(&out.added), ["tabby", "tiger cat", "mouse", "zebra"]);
        assert!(clauses.starts_with(out.text.trim_end_matches(", with a tabby, a tiger cat, a mouse and a zebra")));
    }

    /// Caption words drawn from a pool that includes the test classes' names in several forms.
    fn caption_strategy() -> impl Strategy<Value = String> {
        let pool = prop::sample::select(vec![
            "a",
            "the",
            "Cat",
            "cats",
            "category",
            "DOGS",
            "dog's",
            "dogma",
            "tiger",
            "Cat.",
            "mice",
            "mouse",
            "Butterflies",
            "wolves",
            "wolf-like",
            "geese",
            "fireman",
            "photo",
            "on",
            "of",
            "é",
            "猫",
            "\u{301}",
            ",",
            "with",
            "tabby",
            "Tabby-cat",
            "and",
        ]);
        (prop::collection::vec(pool, 0..40), prop::sample::select(vec![" ", "  ", "\n", " \t"]))
            .prop_map(|(words, sep)| words.join(sep))
    }

    fn classes_strategy() -> impl Strategy<Value = Vec<Class>> {
        let pool = vec![
            (0, "tabby"),
            (1, "dog"),
            (2, "mouse"),
            (3, "butterfly"),
            (4, "wolf"),
            (5, "goose"),
            (6, "tiger cat"),
            (7, "fireman"),
            (20, "zebra"),
            (21, "fire truck"),
            (21, "engine"),
            (22, "Zebra"),
        ];
        prop::collection::vec(prop::sample::select(pool), 0..8)
            .prop_map(|v| v.into_iter().map(|(id, name)| class(id, name)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_enrich_rules(
            caption in caption_strategy(),
            classes in classes_strategy(),
            context in 3usize..80,
            key in "[a-z0-9/]{1,12}",
            epoch in 0u64..4,
        ) {
            let e = pets();
            let e = Enricher { config: config(1.0, context), ..e };
            let out = e.enrich(&key, epoch, Some(&caption), &classes, &ws);
            let body = caption.trim();
            // No class twice, by id or by name.
            let ids: HashSet<Option<u32>> = out.added.iter().map(|c| c.id).collect();
            let lower: HashSet<String> = out.added.iter().map(|c| c.name.to_lowercase()).collect();
            prop_assert_eq!(ids.len(), out.added.len());
            prop_assert_eq!(lower.len(), out.added.len());
            // Mentioned classes are never added; every candidate is added or reported truncated.
            let todo = dedupe(&classes);
            let mentioned = if body.is_empty() { vec![false; todo.len()] } else { e.mentioned(body, &todo) };
            let expected: Vec<&Class> = todo.iter().zip(&mentioned).filter(|(_, m)| !**m).map(|(c, _)| c).collect();
            prop_assert_eq!(out.added.len() + out.truncated_classes, expected.len());
            for (a, b) in out.added.iter().zip(&expected) {
                prop_assert_eq!(a, *b);
            }
            prop_assert_eq!(out.mixed, !out.added.is_empty());
            if !out.mixed {
                prop_assert_eq!(&out.text, &caption);
            } else {
                // Every added class fits in the context and appears in the text.
                prop_assert!(ws(&out.text) + 2 <= context, "{:?}", out.text);
                let phrases: Vec<String> = out.added.iter().map(|c| phrase::with_article(&c.name)).collect();
                let joined = phrase::join(&phrases);
                let all: Vec<String> = expected.iter().map(|c| phrase::with_article(&c.name)).collect();
                let full = e.compose(body, &phrase::join(&all));
                // Never a comma right after a full stop the caption did not have.
                if !caption.contains(".,") {
                    prop_assert!(!out.text.contains(".,"), "{:?}", out.text);
                }
                if body.is_empty() {
                    prop_assert_eq!(&out.text, &format!("a photo of {joined}"));
                } else if ws(&full) + 2 <= context {
                    // The (trimmed) original caption is a prefix when it fits.
                    prop_assert_eq!(out.truncated_classes, 0);
                    prop_assert!(out.text.starts_with(body));
                    prop_assert_eq!(&out.text, &full);
                } else {
                    // Else a non-empty prefix of the caption, cut at a clause boundary, then every class.
                    prop_assert_eq!(out.truncated_classes, 0);
                    let cuts = clause_cuts(body);
                    let found = (1..=cuts.len()).map(|k| trim_cut(&body[..cuts[k - 1]])).any(|cut| {
                        !cut.is_empty() && body.starts_with(cut) && e.compose(cut, &joined) == out.text
                    });
                    prop_assert!(found, "{:?}", out.text);
                }
            }
        }

        #[test]
        fn prop_mix_zero_leaves_captions_unchanged(caption in any::<Option<String>>(), classes in classes_strategy()) {
            let e = enricher(0.0, 77);
            let out = e.enrich("k", 0, caption.as_deref(), &classes, &ws);
            prop_assert_eq!(out.text, caption.unwrap_or_default());
            prop_assert!(out.added.is_empty() && !out.mixed);
        }

        #[test]
        fn prop_any_unicode_never_panics(caption in "\\PC{0,200}", name in "\\PC{0,12}", context in 0usize..40) {
            let e = Enricher { config: config(1.0, context), ..pets() };
            let out = e.enrich("k", 0, Some(&caption), &[class(1, &name), class(2, "cat")], &bpe_like);
            prop_assert!(!out.mixed || bpe_like(&out.text) + 2 <= context);
        }
    }
}
