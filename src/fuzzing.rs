//! The bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`), as plain functions so that the stable test
//! suite replays every corpus and regression input through exactly what the fuzzer runs (`tests/fuzz.rs`).
//!
//! Each body feeds arbitrary bytes to one parser of untrusted input and checks, besides "no panic, no abort,
//! bounded memory", the invariants that parser promises:
//!
//! | target | parser | invariants checked |
//! |---|---|---|
//! | `tar` | WebDataset grouping over a stream | [`TarSamples::count`](crate::source) equals the items read; one item per sample; reading with `skip = k` yields items `k..`; a stream cut into odd-sized reads yields the same items |
//! | `gzip` | a gzip-compressed shard | as `tar`, over the decompressed stream |
//! | `image` | juicer's decode path with a 4-megapixel limit | a decoded image is `3 × 32 × 32` finite values; a failure is `undecodable_image` or `image_too_large` |
//! | `caption` | caption cleaner + CLIP tokenizer | tokens start with SOT, end with EOT, at most 77 |
//! | `enrich` | the caption enrichment rule | added classes come from the input; an enriched caption fits the context |
//! | `loader_state` | [`LoaderState::from_json`] + [`LoaderState::problems`] | a parsed state serialises back to itself |
//! | `manifest` | [`Manifest::parse`] | a parsed manifest writes and parses back to itself |
//! | `hf_config` | [`ViTConfig::from_json`] | errors are values |
//! | `safetensors` | the safetensors header reader | an entry that parses has ordered offsets and a shape whose size does not overflow |
//!
//! A body **panics** when an invariant breaks: that is how a fuzzer learns of it. These functions are test
//! harnesses, not a library path; nothing in the pipeline calls them.

use std::io::{Cursor, Read};

use crate::decode::{DecodeConfig, Decoder};
use crate::error::DropReason;
use crate::model::safetensors::{TensorInfo, split};
use crate::model::vit::ViTConfig;
use crate::plan::{LoaderState, StateShape};
use crate::sample::{CONTEXT, Class, RawSample};
use crate::source::Manifest;
use crate::source::ReadLimits;
use crate::source::{fuzz_count_tar, fuzz_read_tar};
use crate::text::enrich::{EnrichConfig, Enricher};
use crate::text::tokenizer::{ClipTokenizer, EOT, SOT, clean};

/// A target's body: arbitrary bytes in, a panic when an invariant breaks.
pub type Body = fn(&[u8]);

/// Every target, by name: what `tests/fuzz.rs` replays and `fuzz/fuzz_targets` wraps.
pub const TARGETS: [(&str, Body); 9] = [
    ("tar", tar),
    ("gzip", gzip),
    ("image", image),
    ("caption", caption),
    ("enrich", enrich),
    ("loader_state", loader_state),
    ("manifest", manifest),
    ("hf_config", hf_config),
    ("safetensors", safetensors),
];

/// Limits small enough that a fuzzer's inputs reach them (and its memory stays bounded).
const LIMITS: ReadLimits =
    ReadLimits { max_member_bytes: 1 << 20, max_caption_bytes: 4096, max_meta_bytes: 4096, max_json_depth: 16 };

/// A reader handing out at most `step` bytes per call, varying: how a network stream arrives.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        // The next read is a different size: 1..=97 bytes.
        self.step = self.step * 7 % 97 + 1;
        Ok(n)
    }
}

/// What an item says, without its detail text (which carries byte positions).
#[derive(Debug, PartialEq)]
enum Seen {
    Sample { key: String, image: Vec<u8>, ext: String, caption: Option<String>, meta: Option<serde_json::Value> },
    Dropped { key: String, reason: DropReason },
}

fn seen(items: Vec<Result<RawSample, crate::SampleError>>) -> Vec<Seen> {
    items
        .into_iter()
        .map(|item| match item {
            Ok(s) => {
                Seen::Sample { key: s.key, image: s.image.to_vec(), ext: s.image_ext, caption: s.caption, meta: s.meta }
            }
            Err(e) => Seen::Dropped { key: e.key, reason: e.reason },
        })
        .collect()
}

/// The `tar` target: the WebDataset reader over `data` as a shard.
pub fn tar(data: &[u8]) {
    let items = fuzz_read_tar(Cursor::new(data), 0, LIMITS);
    let count = fuzz_count_tar(Cursor::new(data));
    assert_eq!(count, items.len(), "the count scan and the reader disagree on the number of samples");
    let items = seen(items);
    let step = usize::from(data.first().copied().unwrap_or(0)) + 1;
    let chunked = fuzz_read_tar(Chunked { data, pos: 0, step }, 0, LIMITS);
    assert_eq!(seen(chunked), items, "a stream in odd-sized reads gives other items");
    let k = items.len() / 2;
    if k > 0 {
        let rest = fuzz_read_tar(Cursor::new(data), k, LIMITS);
        assert_eq!(seen(rest), items[k..], "skipping {k} samples is not the tail of the items");
    }
}

/// The `gzip` target: `data` as a gzip-compressed shard.
pub fn gzip(data: &[u8]) {
    let stream = || flate2::read::MultiGzDecoder::new(Cursor::new(data)).take(8 << 20);
    let items = fuzz_read_tar(stream(), 0, LIMITS);
    let count = fuzz_count_tar(stream());
    assert_eq!(count, items.len(), "the count scan and the reader disagree on the number of samples");
}

/// The `image` target: `data` as an image through the decode stage (32-px crop, 4-megapixel limit). The first
/// byte picks the extension hint (the format is sniffed from the bytes first).
pub fn image(data: &[u8]) {
    let ext = ["jpg", "png", "webp", "gif"][usize::from(data.first().copied().unwrap_or(0) % 4)];
    let cfg = DecodeConfig { image_size: 32, max_pixels: 1 << 22, ..DecodeConfig::default() };
    let raw = RawSample {
        key: "fuzz".into(),
        image: bytes::Bytes::copy_from_slice(data),
        image_ext: ext.into(),
        caption: None,
        meta: None,
    };
    match Decoder::new(cfg).decode(raw) {
        Ok(d) => {
            assert_eq!(d.pixels.len(), 3 * 32 * 32);
            assert!(d.pixels.iter().all(|v| v.is_finite()), "non-finite pixel");
        }
        Err(e) => assert!(
            matches!(e.reason, DropReason::UndecodableImage | DropReason::ImageTooLarge),
            "unexpected reason {}",
            e.reason
        ),
    }
}

/// The `caption` target: `data` (lossily UTF-8) cleaned and tokenised.
pub fn caption(data: &[u8]) {
    let Ok(tok) = ClipTokenizer::shared() else { return };
    let text = String::from_utf8_lossy(data);
    let _ = clean(&text);
    let ids = tok.encode(&text);
    assert!(ids.len() >= 2 && ids.len() <= CONTEXT, "{} tokens", ids.len());
    assert_eq!((ids[0], ids[ids.len() - 1]), (SOT, EOT));
    let (padded, n) = tok.encode_padded(&text);
    assert_eq!(&padded[..n], &ids[..]);
}

/// The `enrich` target: the first line of `data` is the caption, each further line a class name.
pub fn enrich(data: &[u8]) {
    let Ok(tok) = ClipTokenizer::shared() else { return };
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let caption = lines.next().filter(|c| !c.is_empty());
    let classes: Vec<Class> = lines
        .take(8)
        .enumerate()
        .map(|(i, name)| Class { id: Some(i as u32), wnid: String::new(), name: name.to_string(), prob: 0.5 })
        .collect();
    let Ok(enricher) = Enricher::new(EnrichConfig { mix: 1.0, ..EnrichConfig::default() }, 0) else { return };
    let out = enricher.enrich("fuzz", 0, caption, &classes, &|t| tok.count(t));
    for added in &out.added {
        assert!(classes.iter().any(|c| c.name == added.name), "added `{}`, not an input class", added.name);
    }
    if !out.added.is_empty() {
        let tokens = tok.count(&out.text) + 2;
        assert!(tokens <= enricher.config().context, "enriched caption of {tokens} tokens");
    }
}

/// The `loader_state` target: `data` as a checkpointed state.
pub fn loader_state(data: &[u8]) {
    let Ok(state) = LoaderState::from_json(data) else { return };
    let shape = StateShape {
        n_shards: 4,
        shuffle_shards: true,
        shuffle_buffer: 8,
        batch_size: 4,
        shards_per_pass: 2,
        max_passes: 3,
    };
    let _ = state.problems(&shape);
    let json = serde_json::to_vec(&state).unwrap_or_default();
    let back = LoaderState::from_json(&json);
    assert!(back.as_ref().is_ok_and(|b| *b == state), "the state does not serialise back to itself: {back:?}");
}

/// The `manifest` target: `data` as a `wids` manifest.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::parse(data, "fuzz/manifest.json") else { return };
    let _ = m.total();
    let json = m.to_json(None);
    let back = Manifest::parse(json.as_bytes(), "fuzz/manifest.json");
    assert!(
        back.as_ref().is_ok_and(|b| b.shards.len() == m.shards.len()),
        "the manifest does not parse back: {back:?}"
    );
}

/// The `hf_config` target: `data` as a HuggingFace `config.json`.
pub fn hf_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ViTConfig::from_json(text, "fuzz/config.json");
    }
}

/// The `safetensors` target: `data` as a safetensors file; an entry that parses has ordered offsets.
pub fn safetensors(data: &[u8]) {
    let Ok(container) = split(data) else { return };
    for (name, entry) in &container.header {
        if name == "__metadata__" {
            continue;
        }
        if let Ok(info) = TensorInfo::parse(entry) {
            let _ = info.numel();
            assert!(info.begin <= info.end, "`{name}`: offsets reversed");
        }
    }
}
