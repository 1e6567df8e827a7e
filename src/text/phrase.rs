//! Phrasing the concepts appended to a caption as English: indefinite articles, lists, sentence ends.
//!
//! - [`article`]: "a" or "an" by the sound of the first word, not its first letter: "an agama", "a lizard",
//!   "a unicycle", "a one-armed bandit", "an hourglass", "an MP3 player"-style initialisms read letter by letter.
//!   Names that are plural in form ("swimming trunks", "sunglasses") or proper names take none.
//! - [`join`]: "a", "a and b", "a, b and c".
//! - [`ends_sentence`]: whether a caption already ends a sentence (`.`, `!`, `?`, `…`, possibly followed by
//!   closing quotes or brackets), in which case the concepts go into a sentence of their own instead of being
//!   tacked on with a comma.
//!
//! The rules are heuristics over the names that occur (ImageNet classes and WordNet hypernyms); the tests pin
//! the cases that matter for them.

/// Whether `c` belongs to a word: alphanumeric, or a combining mark (so decomposed accents stay in the word).
pub fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
        || matches!(c, '\u{300}'..='\u{36f}' | '\u{1ab0}'..='\u{1aff}' | '\u{1dc0}'..='\u{1dff}' | '\u{20d0}'..='\u{20ff}' | '\u{fe20}'..='\u{fe2f}')
}

/// The words of an (already lowercased) text: runs of [`is_word_char`] characters. The enrich stage's notion of a
/// word, shared by its mention check and [`crate::text::nouns`].
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_word_char(c)).filter(|w| !w.is_empty())
}

/// Word starts that are spelt with a vowel but sound like a consonant ("a unicorn", "a European", "a one").
const CONSONANT_SOUND: [&str; 14] =
    ["uni", "use", "usu", "ute", "uto", "ura", "uro", "eu", "ewe", "one", "once", "ukulele", "uganda", "u-"];

/// Word starts that are spelt with a consonant but sound like a vowel ("an hour", "an honest").
const VOWEL_SOUND: [&str; 5] = ["hour", "honest", "honor", "honour", "heir"];

/// Last words of names that are plural in form and take no article.
const PLURAL_FORM: [&str; 14] = [
    "trunks",
    "jeans",
    "tights",
    "pajamas",
    "pyjamas",
    "shorts",
    "sunglasses",
    "glasses",
    "binoculars",
    "scissors",
    "pliers",
    "tongs",
    "clogs",
    "overalls",
];

/// Letters whose name starts with a vowel sound when an initialism is read out ("an MRI", "an X-ray").
const VOWEL_LETTERS: &str = "aefhilmnorsx";

/// The indefinite article for `name`, or `""` when it takes none (plural in form, or a proper name that starts
/// with a capital and is not an initialism, such as "Granny Smith" or "Windsor tie" — left as is).
pub fn article(name: &str) -> &'static str {
    let name = name.trim();
    let Some(first) = name.split_whitespace().next() else { return "" };
    let last = name.split_whitespace().last().unwrap_or(first).to_lowercase();
    if PLURAL_FORM.contains(&last.as_str()) {
        return "";
    }
    let letters: Vec<char> = first.chars().filter(|c| c.is_alphanumeric()).collect();
    let Some(&c0) = letters.first() else { return "a" };
    let initialism = letters.len() > 1 && letters.iter().take(2).all(|c| c.is_uppercase() || c.is_ascii_digit());
    if initialism {
        return if VOWEL_LETTERS.contains(c0.to_ascii_lowercase()) { "an" } else { "a" };
    }
    let lower = first.to_lowercase();
    if VOWEL_SOUND.iter().any(|p| lower.starts_with(p)) {
        return "an";
    }
    if CONSONANT_SOUND.iter().any(|p| lower.starts_with(p)) {
        return "a";
    }
    if c0.is_ascii_digit() {
        return if matches!(c0, '8') || lower.starts_with("11") || lower.starts_with("18") { "an" } else { "a" };
    }
    if "aeiou".contains(c0.to_ascii_lowercase()) { "an" } else { "a" }
}

/// `name` with its indefinite article: "an agama", "a lizard", "swimming trunks".
pub fn with_article(name: &str) -> String {
    let name = name.trim();
    match article(name) {
        "" => name.to_string(),
        a => format!("{a} {name}"),
    }
}

/// Joins phrases as "a", "a and b", "a, b and c".
pub fn join(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Whether `caption` (trimmed) ends a sentence: its last character other than closing quotes and brackets is
/// `.`, `!`, `?` or `…` (an abbreviation's full stop counts: the caption is a finished text either way).
pub fn ends_sentence(caption: &str) -> bool {
    let closing = |c: char| matches!(c, '"' | '\'' | ')' | ']' | '}' | '»' | '”' | '’' | '」' | '』');
    caption.trim_end().trim_end_matches(closing).ends_with(['.', '!', '?', '…', '。', '！', '？'])
}

/// Whether `caption` (trimmed) ends with clause punctuation (`,` `;` `:`) after which a template's own leading
/// comma would double it.
pub fn ends_clause(caption: &str) -> bool {
    caption.trim_end().ends_with([',', ';', ':', '，', '；', '：'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn articles_follow_the_sound() {
        for (name, want) in [
            ("agama", "an"),
            ("lizard", "a"),
            ("African chameleon", "an"),
            ("umbrella", "an"),
            ("unicycle", "a"),
            ("European fire salamander", "a"),
            ("one-armed bandit", "a"),
            ("hourglass", "an"),
            ("honeycomb", "a"),
            ("ice bear", "an"),
            ("yurt", "a"),
            ("ox", "an"),
            ("CD player", "a"),
            ("MRI scanner", "an"),
            ("eel", "an"),
            ("ewe", "a"),
            ("8-ball", "an"),
            ("swimming trunks", ""),
            ("sunglasses", ""),
        ] {
            assert_eq!(article(name), want, "{name}");
        }
        assert_eq!(with_article(" agama "), "an agama");
        assert_eq!(with_article("sunglasses"), "sunglasses");
    }

    #[test]
    fn lists_read_as_english() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(join(&s(&[])), "");
        assert_eq!(join(&s(&["a lizard"])), "a lizard");
        assert_eq!(join(&s(&["a lizard", "a rock"])), "a lizard and a rock");
        assert_eq!(join(&s(&["a", "b", "c"])), "a, b and c");
    }

    #[test]
    fn sentence_and_clause_ends() {
        for c in ["It runs fast.", "Look!", "Really?", "He said \"go.\"", "(see above.)", "and so on…  "] {
            assert!(ends_sentence(c), "{c}");
        }
        for c in ["a lizard", "a lizard,", "3.5 m", ""] {
            assert!(!ends_sentence(c), "{c}");
        }
        assert!(ends_clause("a lizard, ") && ends_clause("note:") && !ends_clause("a lizard"));
    }
}
