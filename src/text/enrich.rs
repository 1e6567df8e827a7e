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
//! 4. **Render.** The remaining classes are joined as "a", "a and b", "a, b and c" and put into
//!    [`EnrichConfig::template`] (default `"{caption}, with {classes}"`; the caption is inserted with its
//!    leading and trailing whitespace removed). A missing or blank caption uses
//!    [`EnrichConfig::empty_template`] (default `"a photo of {classes}"`); with no classes either the text is
//!    the original (`""` for a missing caption). When no class is left to add, the text is the original
//!    caption, unchanged. Templates are rendered in one pass: a caption or a class name containing
//!    `{classes}` or `{caption}` is inserted literally.
//!
//! # Context overflow policy
//!
//! A CLIP text encoder sees `context` tokens (77) including `<|startoftext|>` and `<|endoftext|>`, and the
//! tokenizer truncates the rest. Appended classes are the first thing such truncation would cut, silently. So
//! the enriched text must fit: `count_tokens(text) + 2 <= context`, where `count_tokens` counts the text's
//! tokens without the two special tokens. The classes are the point of enrichment, so **the caption yields
//! first**:
//!
//! 1. The whole caption with every class fits: done.
//! 2. Else the caption's **tail is cut at a word boundary** (after a whitespace-separated word, or between two
//!    characters of a script written without spaces: CJK, kana, Thai, …), keeping the longest prefix of the
//!    caption with which the template and every class fit; trailing separators (`, ; : - – — ( [ /` and
//!    whitespace) are removed from the cut. The text still starts with a prefix of the caption, and every
//!    class is in it.
//! 3. Else (not even the caption's first word fits beside the classes) the caption is dropped and the text
//!    is the `empty_template` with as many classes as fit, most probable first; the classes that still do not
//!    fit are counted in [`Enriched::truncated_classes`].
//! 4. Else (not even one class fits: a tiny context) the text is the original caption, unchanged, and every
//!    class counts as truncated.
//!
//! The record says what happened: [`Enriched::added`] lists the classes that are in the text, in order, and
//! [`Enriched::truncated_classes`] how many were left out for lack of room. The prefix search gallops then
//! bisects over the cut points, so a 1 MB caption costs one full count plus a few counts of short prefixes.
//! A caption that overflows on its own with nothing to add is left to the tokenizer's truncation.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::phrase;
use crate::error::{Error, Result};
use crate::rng::{SplitMix64, derive, hash_str};
use crate::sample::Class;
use crate::vision::Vocabulary;

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
        Ok(Self { config, vocabulary, seed, mentions: Arc::default() })
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
            let cuts = cut_points(body);
            let prefix = |k: usize| trim_cut(&body[..cuts[k - 1]]);
            let k = largest_fitting(cuts.len(), |k| {
                let p = prefix(k);
                !p.is_empty() && fits(&self.compose(p, &joined))
            });
            if k > 0 {
                return enriched(self.compose(prefix(k), &joined), todo, 0);
            }
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
        classes
            .iter()
            .map(|class| {
                let m = self.mentions_of(class);
                if m.own.found_in(&caption_words) {
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
        let m = Arc::new(Mentions {
            own: Patterns::new(own),
            above: Patterns::new(terms.above.iter().map(String::as_str)),
        });
        if let Ok(mut cache) = self.mentions.lock() {
            cache.insert(key, m.clone());
        }
        m
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

/// Whether `c` belongs to a word: alphanumeric, or a combining mark (so decomposed accents stay in the word).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
        || matches!(c, '\u{300}'..='\u{36f}' | '\u{1ab0}'..='\u{1aff}' | '\u{1dc0}'..='\u{1dff}' | '\u{20d0}'..='\u{20ff}' | '\u{fe20}'..='\u{fe2f}')
}

/// The words of an (already lowercased) text.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_word_char(c)).filter(|w| !w.is_empty())
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

/// Whether `c` belongs to a script written without spaces between words (CJK, kana, Thai, Lao, Myanmar,
/// Khmer), or is CJK punctuation: a caption may be cut next to such a character.
fn is_unspaced(c: char) -> bool {
    matches!(c,
        '\u{0e00}'..='\u{0eff}' | '\u{1000}'..='\u{109f}' | '\u{1780}'..='\u{17ff}' | '\u{3000}'..='\u{30ff}'
        | '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{f900}'..='\u{faff}' | '\u{ff00}'..='\u{ffef}'
        | '\u{20000}'..='\u{3ffff}')
}

/// Byte offsets where a caption (trimmed) may be cut, ascending, excluding 0 and its full length: after a
/// word followed by whitespace, and between two non-space characters one of which is of an unspaced script.
fn cut_points(text: &str) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        let Some(&(at, next)) = chars.peek() else { break };
        let boundary = if c.is_whitespace() {
            false
        } else if next.is_whitespace() {
            true
        } else {
            is_unspaced(c) || is_unspaced(next)
        };
        if boundary {
            cuts.push(at);
        }
    }
    cuts
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
        assert_eq!(e.synonyms(999)[0], "toilet tissue");
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
    fn overflow_cuts_the_caption_tail_at_a_word_boundary() {
        let e = enricher(1.0, 13);
        let caption = "one two three four five six, seven eight nine ten eleven twelve";
        let classes = [class(1, "zebra"), class(2, "fire truck")];
        let out = e.enrich("k", 0, Some(caption), &classes, &ws);
        // 11 words fit: "one … four, with a zebra and a fire truck" is 4 + 7 words.
        assert_eq!(out.text, "one two three four, with a zebra and a fire truck");
        assert!(ws(&out.text) + 2 <= 13);
        assert_eq!((out.added.len(), out.truncated_classes), (2, 0));
        // A caption that fits is kept whole.
        let out = e.enrich("k", 0, Some("one two three"), &classes, &ws);
        assert_eq!(out.text, "one two three, with a zebra and a fire truck");
    }

    #[test]
    fn overflow_drops_the_caption_then_the_last_classes() {
        let classes = [class(1, "zebra"), class(2, "fire truck"), class(3, "sea lion")];
        // Context 11 = 9 words: "a photo of a zebra, a fire truck and a sea lion" is 12 words; without the
        // caption the two first classes fit ("a photo of a zebra and a fire truck").
        let e = enricher(1.0, 11);
        let out = e.enrich("k", 0, Some("some caption words"), &classes, &ws);
        assert_eq!(out.text, "a photo of a zebra and a fire truck");
        assert_eq!((names(&out.added), out.truncated_classes), (vec!["zebra", "fire truck"], 1));
        // Not even one class fits: the original stays, every class reported.
        let e = enricher(1.0, 5);
        let out = e.enrich("k", 0, Some("some caption words"), &classes, &ws);
        assert_eq!(out.text, "some caption words");
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
        // The longest prefix was kept: one more word would not fit.
        let next = caption[cut.len()..].trim_start_matches([',', ' ', ';', ':', '(', '—']);
        let more =
            next.split_whitespace().next().map(|w| format!("{cut} {w}, with a container ship, a pelican and a dock"));
        assert!(more.is_some_and(|t| bpe_like(&t) + 2 > 77));
    }

    #[test]
    fn overflow_cuts_unspaced_scripts_between_characters() {
        let e = enricher(1.0, 20);
        let count = |t: &str| t.chars().filter(|c| !c.is_whitespace()).count();
        let caption = "一只猫坐在窗台上看着外面的雨天空很暗";
        let out = e.enrich("k", 0, Some(caption), &[class(1, "dog")], &count);
        assert!(count(&out.text) + 2 <= 20, "{}", out.text);
        let Some(cut) = out.text.strip_suffix(", with a dog") else { panic!("{}", out.text) };
        assert!(caption.starts_with(cut) && !cut.is_empty());
        assert_eq!(count(cut) + count(", with a dog") + 2, 20);
        // A single huge space-less Latin word cannot be cut: it is dropped, the classes stay.
        let blob = "x".repeat(500);
        let out = enricher(1.0, 77).enrich("k", 0, Some(&blob), &[class(1, "dog")], &|t: &str| t.len() / 4);
        assert_eq!(out.text, "a photo of a dog");
    }

    #[test]
    fn cut_points_and_search() {
        assert_eq!(cut_points("ab  cd e"), [2, 6]);
        assert_eq!(cut_points("a猫b c"), [1, 4, 5]);
        assert!(cut_points("").is_empty());
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
                assert!(counter(&out.text) + 2 <= 77);
                assert_eq!(out.added.len() + out.truncated_classes, 4);
            }
        }
        // "tiger" alone and "cat"-containing words do not mention anything.
        let out = e.enrich("k", 0, Some(&huge), &classes, &ws);
        assert_eq!(names(&out.added), ["tabby", "tiger cat", "mouse", "zebra"]);
        assert!(huge.starts_with(out.text.trim_end_matches(", with a tabby, a tiger cat, a mouse and a zebra")));
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
                } else if out.truncated_classes == 0 && out.text != format!("a photo of {joined}") {
                    // Else a non-empty prefix of the caption, cut at a word boundary, then the classes.
                    let cuts = cut_points(body);
                    let found = (1..=cuts.len()).map(|k| trim_cut(&body[..cuts[k - 1]])).any(|cut| {
                        !cut.is_empty() && body.starts_with(cut) && e.compose(cut, &joined) == out.text
                    });
                    prop_assert!(found, "{:?}", out.text);
                } else {
                    prop_assert_eq!(&out.text, &format!("a photo of {joined}"));
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
