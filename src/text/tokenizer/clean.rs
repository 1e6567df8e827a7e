//! open_clip's caption cleaning, ported: `ftfy.fix_text` (ftfy 6.3.1, default settings), `html.unescape` twice,
//! Python's `str.split()` whitespace folding and `str.lower()`.
//!
//! The port follows ftfy's code path step by step (see the notes on each function) and takes every table from the
//! Python sources through `gen_ftfy_data.py`, so what it does not reproduce is small and listed in the docs of
//! [`super`] ("Where the cleaning differs from ftfy").
//!
//! This is a port of ftfy 6.3.1's `fix_text` (Copyright 2023 Robyn Speer, Apache-2.0, the same licence as this
//! crate); its tables in `ftfy_data.rs` are generated from ftfy and Python 3.11's `html.entities`.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::OnceLock;

use tokenizers::utils::SysRegex;
use unicode_normalization::{IsNormalized, UnicodeNormalization};

use super::ftfy_data as data;

/// ftfy's `max_decode_length`: a line longer than this many characters is fixed in pieces of this length.
const MAX_SEGMENT_CHARS: usize = 1_000_000;

/// Bound on ftfy's "repeat until nothing changes" loops. ftfy has no bound; real text settles in two or three
/// rounds, and the bound only guarantees termination on adversarial input.
const MAX_ROUNDS: usize = 32;

/// Index of `sloppy-windows-1252` in [`data::CODECS`]: what C1 control characters are read as.
const SLOPPY_1252: usize = 1;
/// Index of `latin-1` in [`data::CODECS`].
const LATIN_1: usize = 0;
/// Index of `macroman` in [`data::CODECS`] (`restore_byte_a0` is skipped for it).
const MACROMAN: usize = 8;

/// `open_clip.tokenizer._clean_lower`: `whitespace_clean(basic_clean(text)).lower()`.
pub(super) fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    let mut joined = String::with_capacity(twice.len());
    for word in twice.split(is_py_space).filter(|w| !w.is_empty()) {
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(word);
    }
    if joined.is_ascii() {
        joined.make_ascii_lowercase();
        joined
    } else {
        joined.to_lowercase()
    }
}

/// Python's `str.isspace` (Rust's `char::is_whitespace` plus U+001C..U+001F).
pub(super) fn is_py_space(c: char) -> bool {
    if c.is_ascii() { matches!(c, '\t'..='\r' | '\x1c'..=' ') } else { in_ranges(c, data::PY_SPACE) }
}

fn in_ranges(c: char, ranges: &[(char, char)]) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

fn lookup<V: Copy>(table: &[(char, V)], c: char) -> Option<V> {
    table.binary_search_by_key(&c, |&(k, _)| k).ok().map(|i| table[i].1)
}

fn lookup_str<'t>(table: &[(&str, &'t str)], key: &str) -> Option<&'t str> {
    table.binary_search_by_key(&key, |&(k, _)| k).ok().map(|i| table[i].1)
}

/// Replaces `text` with `f(text)` when `f` changed it.
fn apply(text: &mut String, f: impl FnOnce(&str) -> Cow<'_, str>) {
    let changed = match f(text) {
        Cow::Owned(s) => Some(s),
        Cow::Borrowed(_) => None,
    };
    if let Some(s) = changed {
        *text = s;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ftfy.fix_text
// ---------------------------------------------------------------------------------------------------------------

/// True when no ftfy step can change `s`: ASCII without `&`, `\r` or the control characters ftfy deletes. Most
/// captions take this path and skip ftfy entirely.
fn is_untouched(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii() && !matches!(b, b'&' | b'\r' | 0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f))
}

/// `ftfy.fix_text`: fixes each line (up to and including its `\n`; at most [`MAX_SEGMENT_CHARS`] characters) on
/// its own. HTML entities are decoded only until the first line that contains `<`.
pub(super) fn fix_text(text: &str) -> Cow<'_, str> {
    if is_untouched(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        let (segment, tail) = rest.split_at(segment_end(rest));
        if unescape && segment.contains('<') {
            unescape = false;
        }
        if is_untouched(segment) {
            out.push_str(segment);
        } else {
            out.push_str(&fix_segment(segment, unescape));
        }
        rest = tail;
    }
    Cow::Owned(out)
}

fn segment_end(s: &str) -> usize {
    let line = s.find('\n').map_or(s.len(), |i| i + 1);
    if line <= MAX_SEGMENT_CHARS {
        return line; // fewer bytes than the limit, so fewer characters
    }
    s[..line].char_indices().nth(MAX_SEGMENT_CHARS).map_or(line, |(i, _)| i)
}

/// `ftfy.fix_and_explain` with the default configuration: every fixer in ftfy's order, repeated until the text
/// stops changing.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_owned();
    for _ in 0..MAX_ROUNDS {
        let orig = text.clone();
        if unescape {
            apply(&mut text, ftfy_unescape_html);
        }
        apply(&mut text, fix_encoding);
        apply(&mut text, fix_c1_controls);
        apply(&mut text, |t| map_chars(t, |c| lookup(data::LIGATURES, c)));
        apply(&mut text, |t| map_chars(t, |c| lookup(data::WIDTH_MAP, c)));
        apply(&mut text, uncurl_quotes);
        apply(&mut text, fix_line_breaks);
        // fix_surrogates: a &str holds no surrogates.
        apply(&mut text, remove_terminal_escapes);
        apply(&mut text, remove_control_chars);
        apply(&mut text, nfc);
        if text == orig {
            break;
        }
    }
    text
}

/// Replaces the characters `f` maps to a string (`str.translate`).
fn map_chars<'a>(text: &'a str, f: impl Fn(char) -> Option<&'static str>) -> Cow<'a, str> {
    let Some(first) = text.char_indices().find(|&(_, c)| f(c).is_some()).map(|(i, _)| i) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        match f(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `fixes.uncurl_quotes`.
fn uncurl_quotes(text: &str) -> Cow<'_, str> {
    map_chars(text, |c| {
        if in_ranges(c, data::DOUBLE_QUOTES) {
            Some("\"")
        } else if in_ranges(c, data::SINGLE_QUOTES) {
            Some("'")
        } else {
            None
        }
    })
}

/// `fixes.fix_line_breaks`: `\r\n`, `\r`, U+2028, U+2029 and U+0085 become `\n`.
fn fix_line_breaks(text: &str) -> Cow<'_, str> {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n"))
}

/// `fixes.remove_control_chars`.
fn remove_control_chars(text: &str) -> Cow<'_, str> {
    let is_control = |c: char| in_ranges(c, data::CONTROL_CHARS);
    if !text.contains(is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().filter(|&c| !is_control(c)).collect())
}

/// `fixes.remove_terminal_escapes`: `ESC [ (digits|;)* letter` (digits: any Unicode decimal digit, as Python's
/// `\d`).
fn remove_terminal_escapes(text: &str) -> Cow<'_, str> {
    if !text.contains('\x1b') {
        return Cow::Borrowed(text);
    }
    let Some(re) = &regexes().ansi else { return Cow::Borrowed(text) };
    replace_matches(text, re, |_| "")
}

fn replace_matches<'a>(text: &'a str, re: &SysRegex, f: impl Fn(&str) -> &str) -> Cow<'a, str> {
    let mut out = String::new();
    let mut last = 0;
    for (a, b) in re.find_iter(text) {
        out.push_str(&text[last..a]);
        out.push_str(f(&text[a..b]));
        last = b;
    }
    if last == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

/// Unicode NFC (`unicodedata.normalize("NFC", ..)`).
fn nfc(text: &str) -> Cow<'_, str> {
    if unicode_normalization::is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(text);
    }
    let normalized: String = text.nfc().collect();
    if normalized == text { Cow::Borrowed(text) } else { Cow::Owned(normalized) }
}

/// `fixes.fix_c1_controls`: U+0080..U+009F read as their `sloppy-windows-1252` bytes.
fn fix_c1_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_c1) {
        return Cow::Borrowed(text);
    }
    let high = &data::CODECS[SLOPPY_1252].high;
    Cow::Owned(text.chars().map(|c| if is_c1(c) { high[c as usize - 0x80] } else { c }).collect())
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

// ---------------------------------------------------------------------------------------------------------------
// HTML entities
// ---------------------------------------------------------------------------------------------------------------

/// `fixes.unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced by ftfy's entity table (every HTML5 name with `;`,
/// plus upper-cased names such as `&NTILDE;`); numeric references go through `html.unescape` and stay as they are
/// when the result still contains `;`.
fn ftfy_unescape_html(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let mut out = String::new();
    let mut last = 0;
    let mut i = 0;
    while let Some(off) = text[i..].find('&') {
        let amp = i + off;
        let mut j = amp + 1;
        if b.get(j) == Some(&b'#') {
            j += 1;
        }
        let run = j;
        while b.get(j).is_some_and(u8::is_ascii_alphanumeric) {
            j += 1;
        }
        if !(1..=24).contains(&(j - run)) || b.get(j) != Some(&b';') {
            i = amp + 1;
            continue;
        }
        let m = &text[amp..=j];
        if let Some(rep) = ftfy_entity(m) {
            out.push_str(&text[last..amp]);
            out.push_str(&rep);
            last = j + 1;
        }
        i = j + 1;
    }
    if last == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

fn ftfy_entity(m: &str) -> Option<Cow<'static, str>> {
    let name = &m[1..];
    if let Some(v) = lookup_str(data::HTML5, name).or_else(|| lookup_str(data::FTFY_UPPER_ENTITIES, name)) {
        return Some(Cow::Borrowed(v));
    }
    if name.starts_with('#') {
        let u = html_unescape(m);
        if !u.contains(';') {
            return Some(Cow::Owned(u.into_owned()));
        }
    }
    None
}

/// Python's `html.unescape`: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` replaced by the HTML5 rules
/// (named references with or without `;`, the longest known prefix of an unknown name, numeric references with
/// the Windows-1252 fix-ups, U+FFFD for surrogates and out-of-range numbers, nothing for forbidden code points).
pub(super) fn html_unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::new();
    let mut last = 0;
    let mut i = 0;
    while let Some(off) = text[i..].find('&') {
        let amp = i + off;
        let Some((end, rep)) = charref_at(text, amp + 1) else {
            i = amp + 1;
            continue;
        };
        out.push_str(&text[last..amp]);
        match rep {
            Some(rep) => out.push_str(&rep),
            None => out.push_str(&text[amp..end]),
        }
        last = end;
        i = end;
    }
    if last == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

/// The reference that starts at byte `at` (just after a `&`): its end and its replacement (`None` when the match
/// is kept as it is). `None` when nothing matches there.
fn charref_at(text: &str, at: usize) -> Option<(usize, Option<String>)> {
    let b = text.as_bytes();
    let semicolon = |j: usize| if b.get(j) == Some(&b';') { j + 1 } else { j };
    if b.get(at) == Some(&b'#') {
        let (digits, radix) = match b.get(at + 1) {
            Some(c) if c.is_ascii_digit() => (at + 1, 10),
            Some(b'x' | b'X') if b.get(at + 2).is_some_and(u8::is_ascii_hexdigit) => (at + 2, 16),
            _ => return None,
        };
        let mut j = digits;
        let mut num: u64 = 0;
        while let Some(d) = b.get(j).and_then(|&c| (c as char).to_digit(radix)) {
            num = (num * u64::from(radix) + u64::from(d)).min(0x11_0000);
            j += 1;
        }
        return Some((semicolon(j), Some(numeric_charref(num))));
    }
    let mut end = at;
    for (n, c) in text[at..].chars().enumerate() {
        if n == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end += c.len_utf8();
    }
    if end == at {
        return None;
    }
    let end = semicolon(end);
    let name = &text[at..end];
    if let Some(v) = lookup_str(data::HTML5, name) {
        return Some((end, Some(v.to_owned())));
    }
    // The longest prefix (of at least 2 characters) that is a known name.
    let bounds: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    for &x in bounds.iter().rev() {
        if let Some(v) = lookup_str(data::HTML5, &name[..x]) {
            return Some((end, Some(format!("{v}{}", &name[x..]))));
        }
    }
    Some((end, None))
}

fn numeric_charref(num: u64) -> String {
    if let Some(&(_, c)) = data::INVALID_CHARREFS.iter().find(|&&(k, _)| u64::from(k) == num) {
        return c.to_string();
    }
    if (0xd800..=0xdfff).contains(&num) || num > 0x10_ffff {
        return '\u{fffd}'.to_string();
    }
    if data::INVALID_CODEPOINTS.iter().any(|&k| u64::from(k) == num) {
        return String::new();
    }
    u32::try_from(num).ok().and_then(char::from_u32).map_or_else(|| '\u{fffd}'.to_string(), String::from)
}

// ---------------------------------------------------------------------------------------------------------------
// Mojibake: ftfy.fix_encoding
// ---------------------------------------------------------------------------------------------------------------

struct Regexes {
    /// `ftfy.badness.BADNESS_RE`.
    badness: Option<SysRegex>,
    /// `fixes.ANSI_RE`.
    ansi: Option<SysRegex>,
}

fn regexes() -> &'static Regexes {
    static REGEXES: OnceLock<Regexes> = OnceLock::new();
    REGEXES.get_or_init(|| Regexes {
        badness: SysRegex::new(data::BADNESS).ok(),
        ansi: SysRegex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").ok(),
    })
}

/// True when both regexes compiled (checked by the tests; without them mojibake and terminal escapes are left
/// alone).
#[cfg(test)]
pub(super) fn regexes_compiled() -> bool {
    regexes().badness.is_some() && regexes().ansi.is_some()
}

/// `ftfy.badness.is_bad`.
pub(super) fn is_bad(text: &str) -> bool {
    regexes().badness.as_ref().is_some_and(|re| re.find_iter(text).next().is_some())
}

/// `ftfy.fix_encoding`: one step at a time until the text stops changing.
fn fix_encoding(text: &str) -> Cow<'_, str> {
    let mut cur = Cow::Borrowed(text);
    for _ in 0..MAX_ROUNDS {
        match fix_encoding_step(&cur) {
            Some(next) if next != *cur => cur = Cow::Owned(next),
            _ => break,
        }
    }
    cur
}

/// `ftfy._fix_encoding_one_step_and_explain`; `None` when the text stays as it is.
fn fix_encoding_step(text: &str) -> Option<String> {
    if text.is_empty() || text.is_ascii() || !is_bad(text) {
        return None;
    }
    let mut latin1_possible = false;
    for (k, codec) in data::CODECS.iter().enumerate() {
        let Some(mut bytes) = encode_charmap(text, k) else { continue };
        latin1_possible |= k == LATIN_1;
        if k != MACROMAN && find_fixed(&bytes, altered_utf8_len) {
            bytes = restore_byte_a0(&bytes);
        }
        if codec.name.starts_with("sloppy") {
            bytes = replace_fixed(&bytes, lossy_utf8_len, "\u{fffd}".as_bytes());
        }
        if let Some(fixed) = decode_utf8_variants(bytes) {
            return Some(fixed);
        }
    }
    if utf8_detector_in(&text.chars().collect::<Vec<_>>(), 0).is_some() {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return Some(fixed);
        }
    }
    // ftfy checks for "windows-1252" among the possible encodings here, a name its list never holds, so text
    // that fits Latin-1 is always re-read as strict Windows-1252.
    if latin1_possible
        && let Some(fixed) = latin1_as_cp1252(text)
        && fixed != text
    {
        return Some(fixed);
    }
    if text.chars().any(is_c1) {
        return Some(fix_c1_controls(text).into_owned());
    }
    None
}

/// `text.encode(codec)`, `None` when a character has no byte in it.
fn encode_charmap(text: &str, codec: usize) -> Option<Vec<u8>> {
    let table = &reverse_tables()[codec];
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\x1a' {
            out.push(c as u8);
        } else {
            out.push(lookup(table, c)?);
        }
    }
    Some(out)
}

/// Character -> byte for bytes 0x1A and 0x80..=0xFF of each codec, sorted by character.
fn reverse_tables() -> &'static [Vec<(char, u8)>] {
    static TABLES: OnceLock<Vec<Vec<(char, u8)>>> = OnceLock::new();
    TABLES.get_or_init(|| {
        data::CODECS
            .iter()
            .map(|codec| {
                let mut t: Vec<(char, u8)> = (0x80..=0xffu8).map(|b| (codec.high[usize::from(b) - 0x80], b)).collect();
                t.push((codec.x1a, 0x1a));
                t.sort_unstable();
                t
            })
            .collect()
    })
}

/// `text.encode("latin-1").decode("windows-1252")` (strict); the caller knows the text fits Latin-1.
fn latin1_as_cp1252(text: &str) -> Option<String> {
    let high = &data::CODECS[SLOPPY_1252].high;
    text.chars()
        .map(|c| {
            if is_c1(c) {
                let byte = c as u8;
                if data::CP1252_UNDEFINED.contains(&byte) { None } else { Some(high[usize::from(byte) - 0x80]) }
            } else {
                Some(c)
            }
        })
        .collect()
}

/// Decodes with ftfy's `utf-8-variants` codec: strict UTF-8, plus `C0 80` for U+0000 and CESU-8 surrogate pairs
/// (`ED A0..AF 80..BF ED B0..BF 80..BF`) for supplementary characters.
fn decode_utf8_variants(bytes: Vec<u8>) -> Option<String> {
    if !bytes.contains(&0xc0) && !bytes.contains(&0xed) {
        return String::from_utf8(bytes).ok();
    }
    let b = &bytes;
    let mut out = String::with_capacity(b.len());
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        let special = if b[i] == 0xc0 && b.get(i + 1) == Some(&0x80) {
            Some(('\0', 2))
        } else if b[i] == 0xed && is_cesu8_pair(&b[i..], i + 6 == b.len()) {
            let cp = ((u32::from(b[i + 1]) & 0x0f) << 16)
                + ((u32::from(b[i + 2]) & 0x3f) << 10)
                + ((u32::from(b[i + 4]) & 0x0f) << 6)
                + (u32::from(b[i + 5]) & 0x3f)
                + 0x1_0000;
            char::from_u32(cp).map(|c| (c, 6))
        } else {
            None
        };
        match special {
            Some((c, n)) => {
                out.push_str(std::str::from_utf8(&b[start..i]).ok()?);
                out.push(c);
                i += n;
                start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(std::str::from_utf8(&b[start..]).ok()?);
    Some(out)
}

/// `ED A0..AF 80..BF ED B0..BF 80..BF` at the start of `b`. When these are the last six bytes, the sixth may also
/// be `\n`: Python's `$` in ftfy's pattern matches before a final newline, so ftfy decodes that too.
fn is_cesu8_pair(b: &[u8], last: bool) -> bool {
    b.len() >= 6
        && (0xa0..=0xaf).contains(&b[1])
        && (0x80..=0xbf).contains(&b[2])
        && b[3] == 0xed
        && (0xb0..=0xbf).contains(&b[4])
        && ((0x80..=0xbf).contains(&b[5]) || (last && b[5] == b'\n'))
}

/// The byte at `i`, or 0 (which no pattern below accepts) past the end.
fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

/// `chardata.ALTERED_UTF8_RE` anchored at the start of `b`: the length of the match.
fn altered_utf8_len(b: &[u8]) -> Option<usize> {
    let cont = |x: u8| (0x80..=0xbf).contains(&x);
    let cont_not_a0_85 = |x: u8| matches!(x, 0x80..=0x84 | 0x86..=0x9f | 0xa1..=0xbf);
    let (b0, b1, b2, b3) = (at(b, 0), at(b, 1), at(b, 2), at(b, 3));
    if matches!(b0, 0xc2 | 0xc3 | 0xc5 | 0xce | 0xd0 | 0xd9) && b1 == b' ' {
        Some(2)
    } else if (matches!(b0, 0xe2 | 0xe3) && b1 == b' ' && cont_not_a0_85(b2))
        || ((0xe0..=0xe3).contains(&b0) && cont_not_a0_85(b1) && b2 == b' ')
    {
        Some(3)
    } else if b0 == 0xf0
        && ((b1 == b' ' && cont(b2) && cont(b3))
            || (cont(b1) && b2 == b' ' && cont(b3))
            || (cont(b1) && cont(b2) && b3 == b' '))
    {
        Some(4)
    } else {
        None
    }
}

/// `chardata.LOSSY_UTF8_RE` anchored at the start of `b` (byte 0x1A stands for a lost byte, `?` sometimes too).
fn lossy_utf8_len(b: &[u8]) -> Option<usize> {
    let sub = |x: u8| x == 0x1a;
    let sub_q = |x: u8| x == 0x1a || x == b'?';
    let cont = |x: u8| (0x80..=0xbf).contains(&x);
    let sub_c = |x: u8| sub(x) || cont(x);
    let sub_q_c = |x: u8| sub_q(x) || cont(x);
    let (b0, b1, b2, b3, b4, b5) = (at(b, 0), at(b, 1), at(b, 2), at(b, 3), at(b, 4), at(b, 5));
    let hi_surrogate = b0 == 0xed && (0xa0..=0xaf).contains(&b1) && b3 == 0xed && (0xb0..=0xbf).contains(&b4);
    if ((0xc2..=0xdf).contains(&b0) && sub(b1)) || ((0xc2..=0xc3).contains(&b0) && b1 == b'?') {
        Some(2)
    } else if hi_surrogate && ((sub_q(b2) && sub_q_c(b5)) || (sub_q_c(b2) && sub_q(b5))) {
        Some(6)
    } else if (0xe0..=0xef).contains(&b0) && ((sub_q(b1) && sub_c(b2)) || (sub_c(b1) && sub_q(b2))) {
        Some(3)
    } else if (0xf0..=0xf4).contains(&b0)
        && ((sub_q(b1) && sub_c(b2) && sub_c(b3))
            || (sub_c(b1) && sub_q(b2) && sub_c(b3))
            || (sub_c(b1) && sub_c(b2) && sub_q(b3)))
    {
        Some(4)
    } else if sub(b0) {
        Some(1)
    } else {
        None
    }
}

fn find_fixed(b: &[u8], pattern: fn(&[u8]) -> Option<usize>) -> bool {
    (0..b.len()).any(|i| pattern(&b[i..]).is_some())
}

/// `re.sub(pattern, replacement, b)` for a pattern given as an anchored matcher.
fn replace_fixed(b: &[u8], pattern: fn(&[u8]) -> Option<usize>, replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match pattern(&b[i..]) {
            Some(n) => {
                out.extend_from_slice(replacement);
                i += n;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// `fixes.restore_byte_a0`: puts back the 0xA0 bytes that became spaces inside UTF-8 sequences.
fn restore_byte_a0(b: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE: b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "
    let mut grave = Vec::with_capacity(b.len() + 8);
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0xc3 && b.get(i + 1) == Some(&b' ') {
            let ahead = &b[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "].iter().any(|p| ahead.starts_with(p));
            if !excluded {
                grave.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
                continue;
            }
        }
        grave.push(b[i]);
        i += 1;
    }
    let mut out = Vec::with_capacity(grave.len());
    let mut i = 0;
    while i < grave.len() {
        match altered_utf8_len(&grave[i..]) {
            Some(n) => {
                out.extend(grave[i..i + n].iter().map(|&x| if x == b' ' { 0xa0 } else { x }));
                i += n;
            }
            None => {
                out.push(grave[i]);
                i += 1;
            }
        }
    }
    out
}

/// `chardata.UTF8_DETECTOR_RE`: the first match starting at character index `from` or later, as character
/// indices `(start, end)`; `chars` must be the text's characters.
fn utf8_detector_in(chars: &[char], from: usize) -> Option<(usize, usize)> {
    let cont = |k: usize| chars.get(k).is_some_and(|&c| in_ranges(c, data::UTF8_CONTINUATION));
    (from..chars.len()).find_map(|start| {
        if start > 0 && in_ranges(chars[start - 1], data::UTF8_CONTINUATION_STRICT) {
            return None;
        }
        let mut k = start;
        loop {
            let c = chars[k..].first().copied()?;
            let n = if in_ranges(c, data::UTF8_FIRST_OF_2) {
                2
            } else if in_ranges(c, data::UTF8_FIRST_OF_3) {
                3
            } else if in_ranges(c, data::UTF8_FIRST_OF_4) {
                4
            } else {
                0
            };
            if n == 0 || !(1..n).all(|d| cont(k + d)) {
                break;
            }
            k += n;
            if k >= chars.len() {
                break;
            }
        }
        (k > start).then_some((start, k))
    })
}

/// `fixes.decode_inconsistent_utf8`: fixes each UTF-8-looking run on its own when it is shorter than the whole
/// text and looks bad. (The recursion is one level deep: inside a run, the detector's first match is the whole
/// run, which is not shorter.)
fn decode_inconsistent_utf8(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut from = 0;
    while let Some((start, end)) = utf8_detector_in(&chars, from) {
        let sub = &text[offsets[start]..offsets[end]];
        out.push_str(&text[last..offsets[start]]);
        if end - start < chars.len() && is_bad(sub) {
            out.push_str(&fix_encoding(sub));
        } else {
            out.push_str(sub);
        }
        last = offsets[end];
        from = end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_what_the_code_expects() {
        assert_eq!(data::CODECS[LATIN_1].name, "latin-1");
        assert_eq!(data::CODECS[SLOPPY_1252].name, "sloppy-windows-1252");
        assert_eq!(data::CODECS[MACROMAN].name, "macroman");
        assert!(regexes_compiled());
        for table in [data::HTML5, data::FTFY_UPPER_ENTITIES] {
            assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
        }
        for table in [data::LIGATURES, data::WIDTH_MAP] {
            assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
        }
        for r in [data::PY_SPACE, data::CONTROL_CHARS, data::UTF8_CONTINUATION, data::UTF8_FIRST_OF_2] {
            assert!(r.windows(2).all(|w| w[0].1 < w[1].0));
        }
        for t in reverse_tables() {
            assert_eq!(t.len(), 129);
            assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "a codec maps two bytes to one character");
        }
    }

    #[test]
    fn python_whitespace() {
        for c in ['\t', '\n', '\x0b', '\x0c', '\r', '\x1c', '\x1f', ' ', '\u{85}', '\u{a0}', '\u{2003}', '\u{3000}'] {
            assert!(is_py_space(c), "{c:?}");
        }
        for c in ['a', '\u{200b}', '\u{1b}', '\u{180e}', '\u{feff}'] {
            assert!(!is_py_space(c), "{c:?}");
        }
    }

    #[test]
    fn html_unescape_follows_python() {
        let cases = [
            ("&amp;", "&"),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&notit;", "¬it;"),
            ("&notin;", "∉"),
            ("&eacute", "é"),
            ("&#65;&#x42;&#X43", "ABC"),
            ("&#0;", "\u{fffd}"),
            ("&#13;", "\r"),
            ("&#128;&#x9d;", "€\u{9d}"),
            ("&#1;&#11;&#xfffe;", ""),
            ("&#xd800;&#99999999999999999999;", "\u{fffd}\u{fffd}"),
            ("&#abc; &# &x; &;", "&#abc; &# &x; &;"),
            ("&&amp;", "&&"),
            ("&unknownentity;", "&unknownentity;"),
            ("&NTILDE;", "&NTILDE;"),
        ];
        for (input, want) in cases {
            assert_eq!(html_unescape(input), want, "{input}");
        }
    }

    #[test]
    fn ftfy_unescape_is_stricter() {
        assert_eq!(ftfy_unescape_html("&amp; &amp &NTILDE; &#x41; &#x41zz; &#abc;"), "& &amp Ñ A &#x41zz; &#abc;");
    }

    #[test]
    fn utf8_variants() {
        assert_eq!(decode_utf8_variants(b"a\xc0\x80b".to_vec()).as_deref(), Some("a\0b"));
        assert_eq!(decode_utf8_variants(b"\xed\xa0\xbd\xed\xb8\x8d".to_vec()).as_deref(), Some("😍"));
        assert_eq!(decode_utf8_variants(b"\xed\xa0\x80".to_vec()), None);
        assert_eq!(decode_utf8_variants(b"\xc0".to_vec()), None);
        assert_eq!(decode_utf8_variants("naïve".as_bytes().to_vec()).as_deref(), Some("naïve"));
        // ftfy's regex accepts a final newline as the last byte of a pair (Python's `$`).
        assert_eq!(decode_utf8_variants(b"\xed\xa0\x80\xed\xb0\n".to_vec()).as_deref(), Some("\u{1000a}"));
        assert_eq!(decode_utf8_variants(b"\xed\xa0\x80\xed\xb0\nx".to_vec()), None);
    }

    #[test]
    fn restore_a0_and_lossy() {
        assert_eq!(restore_byte_a0(b"voil\xc3 le"), b"voil\xc3\xa0 le");
        assert_eq!(restore_byte_a0(b"\xc3 s x"), b"\xc3\xa0s x");
        assert_eq!(replace_fixed(b"\xe2\x80\x1a!", lossy_utf8_len, b"#"), b"#!");
        assert_eq!(replace_fixed(b"a\x1ab", lossy_utf8_len, b"#"), b"a#b");
    }
}
