//! OpenAI CLIP's tokenizer, id for id as open_clip 3.3.0's `open_clip.tokenize(text, context_length=77)`.
//!
//! ```
//! use juicer::text::tokenizer::{ClipTokenizer, CONTEXT, EOT, SOT};
//!
//! # fn main() -> juicer::Result<()> {
//! let tok = ClipTokenizer::shared()?;
//! assert_eq!(tok.encode("A photo of a dog"), [SOT, 320, 1125, 539, 320, 1929, EOT]);
//! let (padded, len) = tok.encode_padded("A photo of a dog");
//! assert_eq!((padded.len(), len), (CONTEXT, 7));
//! assert_eq!(tok.count("A photo of a dog"), 5);
//! # Ok(())
//! # }
//! ```
//!
//! # Pipeline
//! 1. [`clean`]: open_clip's `_clean_lower`, i.e. `ftfy.fix_text`, `html.unescape` twice, whitespace folding
//!    (`" ".join(text.split())`) and `lower()`. ftfy is ported step by step (`clean.rs`) with the tables of
//!    ftfy 6.3.1 and Python's `html` module generated into `ftfy_data.rs` by `gen_ftfy_data.py`.
//! 2. Pre-tokenisation with open_clip's regex (`regex` module, `IGNORECASE`):
//!    `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, then the GPT-2
//!    byte-to-character map and BPE with the `</w>` end-of-word suffix, all inside a `tokenizers::Tokenizer` built
//!    from the embedded `bpe_simple_vocab_16e6.txt.gz` (vocabulary: 256 byte symbols, the same with `</w>`, one
//!    entry per merge, then `<|startoftext|>` 49406 and `<|endoftext|>` 49407).
//! 3. `[SOT] + tokens + [EOT]`, cut to [`CONTEXT`] keeping [`EOT`] last; [`ClipTokenizer::encode_padded`] pads with 0
//!    (which is also the id of `!`, so the length comes with the ids).
//!
//! # Details that open_clip gets from its regex
//! - A caption that contains open_clip's own spelling of the special tokens, `<start_of_text>` or `<end_of_text>`,
//!   gets 49406 or 49407 in the middle of the sequence, exactly where open_clip's `re.findall` meets that literal
//!   as one piece: at the start of the text or after a space, letter, digit or another special literal, but not
//!   after punctuation (`"(<end_of_text>"` is plain punctuation and words). OpenAI's spelling `<|endoftext|>` is
//!   always plain text. The plain HF pipeline cannot do this (an added token matches anywhere), so the cleaned text
//!   is cut at those pieces and each part is encoded on its own; the regex never lets a piece cross a cut, so the
//!   parts tokenise exactly as they would inside the whole.
//! - `IGNORECASE` makes the contractions and the special literals match `ſ` (U+017F, which `lower()` keeps) as `s`:
//!   `"'ſ"` is one piece and `"<ſtart_of_text>"` one piece encoded by BPE. The pattern used here scopes `(?i:…)`
//!   to those alternatives. It also makes the punctuation class skip U+0345 (it folds to a letter), so open_clip
//!   drops U+0345 altogether; the pattern here excludes it from that class too.
//!
//! # Where the cleaning differs from ftfy
//! Every step of `ftfy.fix_text` is ported with ftfy's own tables: HTML entities (only until a line holds `<`),
//! mojibake repair (`fix_encoding` with its ten single-byte codecs and their "sloppy" variants, the badness
//! heuristic, `restore_byte_a0`, lossy sequences, inconsistent UTF-8, the `utf-8-variants` decoder), C1 controls,
//! Latin ligatures, full- and half-width forms, curly quotes (`“”„‟` → `"`, `‘’‚‛ʼ` → `'`; ftfy leaves `′`, `″`, `—`,
//! `–` and `…` alone), line breaks, terminal escapes, control characters (it keeps `\t\n\f`, U+200B and the soft
//! hyphen) and NFC, repeated until nothing changes, line by line (`fix_surrogates` has nothing to do on a `&str`).
//! Beyond the 46 reference entries, the port was compared with open_clip's own cleaning and tokenisation (ftfy 6.3.1,
//! `regex` 2026.11.19, Python 3.11) on about 89,000 generated captions (mojibake through a dozen codecs, entities,
//! widths, ligatures, controls, special literals, long captions, every character with a canonical decomposition or
//! combining class): cleaned strings, ids and counts agreed on all of them but about 190, and each of those holds a
//! character of the first kind below. The tests pin these differences (`documented_differences_from_open_clip`):
//! - **Unicode versions.** The pre-tokeniser's `\p{L}`/`\p{N}` come from Rust's `regex` tables (Unicode 16),
//!   open_clip's from the `regex` module it runs with (2026.11.19: Unicode 17); `lower()` is Rust's (Unicode 17),
//!   NFC is `unicode-normalization`'s (Unicode 16), while ftfy's tables were generated with Python 3.11 (Unicode 14).
//!   Characters assigned in between can be classified differently: `"a\u{209f}b"` is one word for open_clip (U+209F
//!   is a Unicode 17 letter) and three pieces here. Every difference seen in the comparison came from such
//!   characters.
//! - **Bounds.** ftfy repeats its fixes until nothing changes; here at most 32 rounds (real text needs two or three).
//!   A decimal reference longer than Python's 4300-digit `int()` limit, on which open_clip raises, becomes U+FFFD like
//!   any other out-of-range reference.
//!
//! # Performance
//! The tokenizer is built once per process ([`ClipTokenizer::shared`], about 40 ms) and is `Sync`. Most captions are
//! ASCII without `&` or control characters and skip ftfy. [`ClipTokenizer::encode`] cleans the whole caption but
//! tokenises only its first 75 words: no piece of the regex crosses a space and every word yields at least one token,
//! so the first 75 tokens come from those words (the tests check a 1 MB caption against its first 2,000 bytes).
//! [`ClipTokenizer::count`] tokenises everything, in chunks cut at spaces. One thread encodes about 34,000 GCompris
//! captions (2 million tokens) per second; a 1 MB caption takes about 30 ms to encode and 110 ms to count, and at
//! worst (a single 1 MB "word" with no space, which BPE must take whole) about 0.6 s.

mod clean;
mod ftfy_data;

use std::io::Read;
use std::sync::OnceLock;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::utils::SysRegex;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// CLIP's context length: start token, at most 75 content tokens, end token (one copy, in [`crate::sample`]).
pub use crate::sample::CONTEXT;
/// Id of `<|startoftext|>` (open_clip: `<start_of_text>`).
pub const SOT: u32 = 49406;
/// Id of `<|endoftext|>` (open_clip: `<end_of_text>`).
pub const EOT: u32 = 49407;

/// Content tokens that fit between [`SOT`] and [`EOT`].
const MAX_CONTENT: usize = CONTEXT - 2;
/// Merges used from the BPE file (`49152 - 256 - 2`); the file has more lines, which CLIP never used.
const N_MERGES: usize = 48_894;
/// 256 byte symbols, 256 with `</w>`, the merges, SOT and EOT.
const VOCAB_SIZE: usize = 512 + N_MERGES + 2;
/// Chunks of at most this many bytes (cut at spaces) when counting the tokens of a long caption.
const COUNT_CHUNK: usize = 1 << 16;

/// OpenAI CLIP's BPE merges, as open_clip ships them (MIT, see `fixtures/tokenizer/LICENSE-openai-clip`).
static BPE_GZ: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tokenizer/bpe_simple_vocab_16e6.txt.gz"));

/// open_clip's pre-tokeniser regex, with `IGNORECASE` made explicit where it matters on lower-cased text.
const PATTERN: &str =
    r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+";
/// open_clip's spelling of the start token, which its regex turns into [`SOT`] inside a caption.
const SOT_LITERAL: &str = "<start_of_text>";
/// open_clip's spelling of the end token, which its regex turns into [`EOT`] inside a caption.
const EOT_LITERAL: &str = "<end_of_text>";

/// Cleans a caption as open_clip does before tokenising: ftfy's fixes, HTML entities decoded twice, whitespace
/// runs (Python's `str.isspace`) folded to one space, ends stripped, lower-cased. See the module docs for the few
/// places where the ftfy port can differ.
pub fn clean(text: &str) -> String {
    clean::clean(text)
}

/// The CLIP BPE tokenizer: a `tokenizers::Tokenizer` (byte-level BPE over open_clip's pre-tokeniser regex) plus
/// open_clip's cleaning, special literals and truncation. Build it once with [`ClipTokenizer::shared`].
pub struct ClipTokenizer {
    hf: Tokenizer,
    /// The pre-tokeniser regex on its own, to find the special literals.
    pieces: SysRegex,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("vocab_size", &self.hf.get_vocab_size(false)).finish()
    }
}

impl ClipTokenizer {
    /// The process-wide tokenizer, built from the embedded vocabulary on first use (about 40 ms).
    ///
    /// Errors with [`Error::Config`] only if the embedded vocabulary cannot be read, which the tests rule out.
    pub fn shared() -> Result<&'static ClipTokenizer> {
        static SHARED: OnceLock<std::result::Result<ClipTokenizer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::build(BPE_GZ))
            .as_ref()
            .map_err(|e| Error::Config(vec![format!("CLIP tokenizer: {e}")]))
    }

    fn build(bpe_gz: &[u8]) -> std::result::Result<Self, String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bpe_gz)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading bpe_simple_vocab_16e6.txt.gz: {e}"))?;
        let merges = text
            .split('\n')
            .skip(1) // "#version: 0.2" header
            .take(N_MERGES)
            .map(|line| line.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<Vec<_>>>()
            .filter(|m| m.len() == N_MERGES)
            .ok_or("the BPE file does not start with 48894 merges `a b`")?;
        let symbols = byte_symbols()?;
        let mut vocab: Vec<String> = symbols.iter().map(char::to_string).collect();
        vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let vocab: Vocab = vocab.into_iter().zip(0u32..).collect();
        if vocab.len() != VOCAB_SIZE {
            return Err(format!("vocabulary has {} distinct entries, expected {VOCAB_SIZE}", vocab.len()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| format!("building the BPE model: {e}"))?;
        let split = Split::new(SplitPattern::Regex(PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| format!("pre-tokeniser regex: {e}"))?;
        let mut hf = Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::from(split),
            PreTokenizerWrapper::from(ByteLevel::new(false, true, false)),
        ])));
        if hf.token_to_id("<|endoftext|>") != Some(EOT) || hf.token_to_id("<|startoftext|>") != Some(SOT) {
            return Err("special token ids are not 49406/49407".into());
        }
        let pieces = SysRegex::new(PATTERN).map_err(|e| format!("pre-tokeniser regex: {e}"))?;
        Ok(Self { hf, pieces })
    }

    /// `[SOT] + tokens + [EOT]` for the caption, at most [`CONTEXT`] ids (the first 75 tokens when longer, as
    /// open_clip truncates), without padding. Empty or whitespace-only text gives `[SOT, EOT]`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean(text);
        let mut ids = Vec::with_capacity(CONTEXT);
        ids.push(SOT);
        self.content_ids(first_words(&cleaned, MAX_CONTENT), &mut ids);
        ids.truncate(1 + MAX_CONTENT);
        ids.push(EOT);
        ids
    }

    /// [`encode`](Self::encode) padded with 0 to [`CONTEXT`] ids, as open_clip's tensor row, with the unpadded
    /// length (0 is also the id of `!`, so the length cannot be recovered from the ids).
    pub fn encode_padded(&self, text: &str) -> ([u32; CONTEXT], usize) {
        let ids = self.encode(text);
        let mut padded = [0; CONTEXT];
        padded[..ids.len()].copy_from_slice(&ids);
        (padded, ids.len())
    }

    /// Number of content tokens (without [`SOT`]/[`EOT`]) before truncation: the caption fills the context when
    /// this is 75 or more, and loses tokens when it is more than 75.
    pub fn count(&self, text: &str) -> usize {
        let cleaned = clean(text);
        let mut ids = Vec::new();
        let mut total = 0;
        for chunk in chunks_at_spaces(&cleaned, COUNT_CHUNK) {
            ids.clear();
            self.content_ids(chunk, &mut ids);
            total += ids.len();
        }
        total
    }

    /// Appends the token ids of cleaned text, special literals included.
    fn content_ids(&self, cleaned: &str, out: &mut Vec<u32>) {
        if !cleaned.contains(SOT_LITERAL) && !cleaned.contains(EOT_LITERAL) {
            self.bpe_ids(cleaned, out);
            return;
        }
        let mut start = 0;
        for (a, b) in self.pieces.find_iter(cleaned) {
            let id = match &cleaned[a..b] {
                SOT_LITERAL => SOT,
                EOT_LITERAL => EOT,
                _ => continue,
            };
            self.bpe_ids(&cleaned[start..a], out);
            out.push(id);
            start = b;
        }
        self.bpe_ids(&cleaned[start..], out);
    }

    /// Appends the ids of text without special literals. The pipeline cannot fail here (the byte-level alphabet
    /// covers every byte and the regex needs no backtracking); if it did, the text would add no ids.
    fn bpe_ids(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        if let Ok(encoding) = self.hf.encode_fast(text, false) {
            out.extend_from_slice(encoding.get_ids());
        }
    }
}

/// The first `n` space-separated words of cleaned text (which has single spaces and no space at either end).
fn first_words(text: &str, n: usize) -> &str {
    match text.match_indices(' ').nth(n.saturating_sub(1)) {
        Some((i, _)) if n > 0 => &text[..i],
        _ if n == 0 => "",
        _ => text,
    }
}

/// Pieces of cleaned text of about `max` bytes, cut just before a space (a piece longer than `max` without a space
/// stays whole).
fn chunks_at_spaces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            let mut limit = max;
            while !rest.is_char_boundary(limit) {
                limit -= 1;
            }
            rest[..limit].rfind(' ').or_else(|| rest[limit..].find(' ').map(|i| limit + i)).unwrap_or(rest.len())
        };
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        Some(chunk)
    })
    .filter(|chunk| !chunk.trim_start_matches(' ').is_empty())
}

/// GPT-2/CLIP `bytes_to_unicode` characters in vocabulary order: the printable Latin-1 bytes as themselves, then
/// the other 68 bytes as U+0100 onwards.
fn byte_symbols() -> std::result::Result<Vec<char>, String> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut symbols: Vec<char> = (0..=255u8).filter(|&b| printable(b)).map(char::from).collect();
    for n in 0..(256 - symbols.len() as u32) {
        symbols.push(char::from_u32(256 + n).ok_or("byte symbol out of range")?);
    }
    Ok(symbols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_symbols_are_the_gpt2_table() {
        let s = byte_symbols().unwrap();
        assert_eq!(s.len(), 256);
        assert_eq!((s[0], s[93], s[188], s[255]), ('!', '~', 'Ā', 'Ń'));
    }

    #[test]
    fn first_words_and_chunks() {
        assert_eq!(first_words("a b c", 2), "a b");
        assert_eq!(first_words("a b c", 3), "a b c");
        assert_eq!(first_words("a b c", 9), "a b c");
        assert_eq!(first_words("", 75), "");
        let text = "ab cd ef gh";
        assert_eq!(chunks_at_spaces(text, 4).collect::<Vec<_>>(), ["ab", " cd", " ef", " gh"]);
        assert_eq!(chunks_at_spaces("abcdefgh ij", 4).collect::<Vec<_>>(), ["abcdefgh", " ij"]);
        assert_eq!(chunks_at_spaces(text, 100).collect::<Vec<_>>(), [text]);
    }

    #[test]
    fn tokenizer_is_sync_and_send() {
        fn check<T: Send + Sync>() {}
        check::<ClipTokenizer>();
    }
}
