//! Offline juicing: run the pipeline once and store every juiced sample as a WebDataset sample
//! (`juicer write`), so later training reads juiced data with any WebDataset reader, Python `webdataset` or
//! juicer itself, without running the models again.
//!
//! # Layout
//! Shards are `{out}/{prefix}-000000.tar`, … written by [`ShardWriter`] (a new shard after `max_count` samples or
//! before one would push the file past `max_size` bytes). Each sample `KEY` keeps its input key and has, in
//! this order:
//! - `KEY.png`: the **kept-patch mosaic**, lossless RGB8: the model-input crop (`image_size` × `image_size`,
//!   the resize + centre crop the patches are cut from) with every kept patch's exact pixels and every dropped
//!   patch blanked to the normalisation mean colour (`round(255 · mean)`, ImageNet: `(124, 116, 104)`), so a
//!   dropped patch normalises to ≈ 0. The pixels are recovered from the normalised patches as
//!   `round((x · std + mean) · 255)`, which gives back the decoder's u8 crop exactly.
//! - `KEY.txt`: the enriched caption (the caption the model trains on; `mix` applies, as in `juicer run`).
//! - `KEY.orig.txt`: the original caption; absent when the input had none.
//! - `KEY.json`: `{"grid": [rows, cols], "patch": P, "kept": [row-major patch indices, sorted], "scores": [raw
//!   score per patch, row-major; empty for the none scorer], "classes": [{"id", "wnid", "name", "prob"}], "added":
//!   [classes added to the caption, same shape], "image_size": S, "source_meta": the input's own KEY.json or
//!   null}`.
//!
//! The mosaic was chosen over "original image + `KEY.kept.json` indices" because it is self-contained: a reader
//! needs neither juicer's resize/crop geometry nor the original resolution to get the exact kept pixels, and
//! a plain WebDataset pipeline (decode PNG, normalise, patchify) reproduces juicer's patches. Reading the
//! shards back with juicer at the same `--image-size` keeps the crop as is.
//!
//! # Crash safety
//! Nothing a reader accepts is ever half written: each shard is written as `.NAME.partial` and renamed into place
//! when complete ([`ShardWriter`]), the manifest last. Each time a shard is complete, the run's progress (the
//! loader state at the batch boundary before the first sample not yet in a complete shard, how many samples of
//! that batch are, the complete shards with their sizes, the counters) is saved to `OUT/.PREFIX.progress.json`
//! the same way (temporary file, `fsync`, rename). A run killed at any point, or stopped by an error such as a
//! full disk (an [`Error::Io`] naming the file), leaves complete shards, at most one `.partial` file, and that
//! progress; [`WriteOptions::resume`] (`juicer write --resume`) checks the complete shards are still there with
//! their sizes, resumes the loader from the saved state, skips what is stored and goes on. Since output order
//! is a function of the seed and the sources only, the result is byte for byte the output of an uninterrupted
//! run (a test kills `juicer write` with SIGKILL and compares). The progress file is removed when the run ends.
//!
//! # Accounting
//! Every sample read ends written or dropped with a [`DropReason`]: the pipeline's own drops, plus
//! `stage_failed` for a sample this module cannot store (a key that would not read back as the same key from
//! a tar member, a key equal to the previous sample's, which WebDataset would merge into it). `read = written +
//! dropped` holds in the [`WriteReport`].

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Device;
use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{DropReason, Error, OnError, Result, SampleError};
use crate::pipeline::Juicer;
use crate::plan::LoaderState;
use crate::sample::{Class, JuicedSample};
use crate::source::ShardWriter;

/// A batcher that hands the samples over as they are, on the host: no tensor is made. `juicer write` builds its
/// loader with it (`JuicerBuilder::build_with(HostBatcher)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostBatcher;

impl Batcher<JuicedSample, Vec<JuicedSample>> for HostBatcher {
    fn batch(&self, items: Vec<JuicedSample>, _device: &Device) -> Vec<JuicedSample> {
        items
    }
}

/// Where and how [`write_shards`] cuts its output into shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Shard file prefix: `{prefix}-000000.tar`, … (default `juiced`).
    pub prefix: String,
    /// Samples per shard at most (default 1000).
    pub max_count: usize,
    /// Bytes per shard file at most, tar overhead included; a larger sample gets a shard of its own
    /// (default 1 GiB).
    pub max_size: u64,
    /// Continue an interrupted run from its last complete shard (see [Crash safety](crate::write#crash-safety));
    /// without a progress file, start afresh. Local output folders only.
    pub resume: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { prefix: "juiced".into(), max_count: 1000, max_size: 1 << 30, resume: false }
    }
}

/// Where an interrupted [`write_shards`] stands: saved (to a temporary name, then renamed) in
/// `OUT/.PREFIX.progress.json` each time a shard is complete, removed when the run ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    /// Format version ([`Progress::VERSION`]).
    version: u32,
    /// The options that cut the series; a resume must use the same.
    prefix: String,
    max_count: usize,
    max_size: u64,
    /// The loader's state at the batch boundary before the first sample not yet in a complete shard.
    state: LoaderState,
    /// Samples of the batch after `state` already stored in complete shards (or dropped by this module).
    skip: usize,
    /// The complete shards, as (file name, samples, bytes).
    shards: Vec<(String, u64, u64)>,
    /// Report counters at that point.
    written: u64,
    failed: u64,
    own_drops: BTreeMap<String, u64>,
    /// Key of the last sample stored.
    last_key: Option<String>,
}

impl Progress {
    const VERSION: u32 = 1;

    fn path(out_dir: &Path, prefix: &str) -> PathBuf {
        out_dir.join(format!(".{prefix}.progress.json"))
    }

    /// Saves atomically: a temporary file, synced, renamed over the previous progress.
    fn save(&self, path: &Path) -> Result<()> {
        let bytes =
            serde_json::to_vec(self).map_err(|e| Error::io(format!("encoding `{}`", path.display()), e.into()))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| Error::io(format!("writing `{}`", path.display()), e))
    }

    fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading `{}`", path.display()), e)),
        };
        let p: Self = serde_json::from_slice(&bytes)
            .map_err(|e| Error::State(format!("`{}` is not a write progress file: {e}", path.display())))?;
        if p.version != Self::VERSION {
            return Err(Error::State(format!(
                "`{}`: progress version {} (this build writes {})",
                path.display(),
                p.version,
                Self::VERSION
            )));
        }
        Ok(Some(p))
    }
}

/// What [`write_shards`] did. `read == written + dropped_total()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WriteReport {
    /// Paths (or object URLs) of the shards written, in order.
    pub shards: Vec<PathBuf>,
    /// The shards' manifest (`OUT/PREFIX.json`, `wids` format with sample counts), a path or an object URL.
    pub manifest: PathBuf,
    /// Samples the pipeline read.
    pub read: u64,
    /// Samples written to the shards.
    pub written: u64,
    /// Dropped samples by [`DropReason`] name.
    pub dropped: BTreeMap<String, u64>,
    /// Samples that failed while the loader runs with `OnError::Fail` (also counted in `dropped`); the caller
    /// decides whether that fails the run.
    pub failed: u64,
}

impl WriteReport {
    /// Total dropped samples.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// The shard prefix of task `task` of `tasks` in a fanned-out job: `{prefix}-{task:05}-of-{tasks:05}` (the
/// prefix itself for a single task). A re-run task writes exactly the names it wrote before, so it replaces its
/// own output and nothing else; its manifest part is `{that prefix}.json`.
pub fn task_prefix(prefix: &str, task: usize, tasks: usize) -> String {
    if tasks <= 1 { prefix.to_string() } else { format!("{prefix}-{task:05}-of-{tasks:05}") }
}

/// Runs one epoch of `loader` (the next one, as `juicer run` does) and writes every juiced sample into shards
/// in `out_dir` with the [layout](crate::write#layout) of this module, in the loader's output order. `out_dir`
/// may be an object-store folder (`s3://bucket/out`, given as a path): the shards are then staged locally and
/// uploaded one by one as they complete (see [`ShardWriter::to_url`]), with the loader's storage options.
///
/// `on_drop` sees every dropped sample (pipeline drops and samples this function cannot store). Errors: the
/// loader's fatal errors, and [`Error::Io`] when a shard cannot be created or written.
pub fn write_shards(
    loader: &Juicer<Vec<JuicedSample>>,
    out_dir: &Path,
    opts: &WriteOptions,
    on_drop: &mut dyn FnMut(&SampleError),
) -> Result<WriteReport> {
    let decode = &loader.config().decode;
    let (mean, std) = (decode.mean, decode.std);
    let out = out_dir.to_string_lossy();
    let remote = crate::source::is_object_url(&out);
    if remote && opts.resume {
        return Err(Error::Config(vec![format!("resuming a write needs a local output folder, not `{out}`")]));
    }
    let mut writer = if remote {
        ShardWriter::to_url(&out, &opts.prefix, opts.max_count, opts.max_size, &loader.config().read)?
    } else {
        ShardWriter::new(out_dir, &opts.prefix, opts.max_count, opts.max_size)?
    };
    let progress_path = Progress::path(out_dir, &opts.prefix);
    let mut report = WriteReport::default();
    let mut own_drops = BTreeMap::<String, u64>::new();
    let mut last_key: Option<String> = None;
    let mut skip = 0usize;
    let previous = if opts.resume { Progress::load(&progress_path)? } else { None };
    if let Some(p) = previous {
        if (p.prefix.as_str(), p.max_count, p.max_size) != (opts.prefix.as_str(), opts.max_count, opts.max_size) {
            return Err(Error::State(format!(
                "`{}` was written with prefix `{}`, max_count {}, max_size {}: resume with the same",
                progress_path.display(),
                p.prefix,
                p.max_count,
                p.max_size
            )));
        }
        loader.resume(p.state)?;
        writer = writer.continue_after(&p.shards)?;
        (report.written, report.failed, own_drops, last_key, skip) =
            (p.written, p.failed, p.own_drops, p.last_key, p.skip);
    } else if !remote {
        // A fresh run: progress left by an earlier one no longer describes this output.
        match std::fs::remove_file(&progress_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("removing `{}`", progress_path.display()), e));
            }
            _ => {}
        }
    }
    let fail_on_error = loader.config().on_error == OnError::Fail;
    let mut it = loader.iter()?;
    // The state before the batch being stored: where a resume starts, skipping what is already stored.
    let mut boundary = it.state().clone();
    while let Some(item) = it.next() {
        for e in it.take_dropped() {
            on_drop(&e);
        }
        let samples = match item {
            Ok(samples) => samples,
            Err(Error::Sample(e)) => {
                report.failed += 1;
                on_drop(&e);
                boundary = it.state().clone();
                continue;
            }
            Err(e) => return Err(e),
        };
        for (j, sample) in samples.into_iter().enumerate().skip(std::mem::take(&mut skip)) {
            let stored = if last_key.as_deref() == Some(sample.key.as_str()) {
                let detail = "same key as the previous sample: WebDataset readers would merge the two";
                Err(SampleError::new(sample.key.clone(), DropReason::StageFailed, detail))
            } else {
                members(&sample, mean, std)
            };
            match stored {
                Ok(members) => {
                    let refs: Vec<(&str, &[u8])> = members.iter().map(|(e, b)| (*e, b.as_slice())).collect();
                    if writer.write(&sample.key, &refs)? && !remote {
                        // A shard just became complete, holding everything before this sample.
                        Progress {
                            version: Progress::VERSION,
                            prefix: opts.prefix.clone(),
                            max_count: opts.max_count,
                            max_size: opts.max_size,
                            state: boundary.clone(),
                            skip: j,
                            shards: writer.closed(),
                            written: report.written,
                            failed: report.failed,
                            own_drops: own_drops.clone(),
                            last_key: last_key.clone(),
                        }
                        .save(&progress_path)?;
                    }
                    report.written += 1;
                    last_key = Some(sample.key);
                }
                Err(e) => {
                    *own_drops.entry(e.reason.as_str().to_string()).or_default() += 1;
                    if fail_on_error {
                        report.failed += 1;
                    }
                    on_drop(&e);
                }
            }
        }
        boundary = it.state().clone();
    }
    for e in it.take_dropped() {
        on_drop(&e);
    }
    let summary = it.summary();
    drop(it);
    report.read = summary.read;
    report.dropped = summary.dropped;
    for (reason, n) in own_drops {
        *report.dropped.entry(reason).or_default() += n;
    }
    (report.shards, report.manifest) = writer.finish_indexed()?;
    if !remote {
        std::fs::remove_file(&progress_path)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|e| Error::io(format!("removing `{}`", progress_path.display()), e))?;
    }
    Ok(report)
}

/// The members of one output sample, in order: `png`, `txt`, `orig.txt` (when the sample has a caption),
/// `json`. `mean` and `std` are the normalisation the sample's patches were made with. A key that would not
/// read back from a tar member as the same key, or a malformed sample, is a [`DropReason::StageFailed`].
pub fn members(
    sample: &JuicedSample,
    mean: [f32; 3],
    std: [f32; 3],
) -> std::result::Result<Vec<(&'static str, Vec<u8>)>, SampleError> {
    let fail = |detail: String| SampleError::new(sample.key.clone(), DropReason::StageFailed, detail);
    if !key_reads_back(&sample.key) {
        return Err(fail(format!(
            "key `{}` cannot be stored in a WebDataset tar (its file part must be non-empty without a dot, and \
             its first directory not `__name__`)",
            sample.key
        )));
    }
    let img = mosaic(sample, mean, std)?;
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).map_err(|e| fail(format!("encoding PNG: {e}")))?;
    let meta = Meta {
        grid: [sample.grid.0, sample.grid.1],
        patch: sample.patch,
        kept: &sample.positions,
        scores: &sample.scores,
        classes: &sample.classes,
        added: &sample.added,
        image_size: sample.grid.0 * sample.patch,
        source_meta: sample.meta.as_ref(),
    };
    let json = serde_json::to_vec(&meta).map_err(|e| fail(format!("encoding KEY.json: {e}")))?;
    let mut out = vec![("png", png), ("txt", sample.enriched.clone().into_bytes())];
    if let Some(caption) = &sample.caption {
        out.push(("orig.txt", caption.clone().into_bytes()));
    }
    out.push(("json", json));
    Ok(out)
}

/// `KEY.json` of an output sample.
#[derive(Serialize)]
struct Meta<'a> {
    grid: [usize; 2],
    patch: usize,
    kept: &'a [u32],
    scores: &'a [f32],
    classes: &'a [Class],
    added: &'a [Class],
    image_size: usize,
    source_meta: Option<&'a serde_json::Value>,
}

/// The colour of a dropped patch in the mosaic: the normalisation mean as u8, `round(255 · mean)`.
pub fn blank_colour(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| to_u8(m * 255.0))
}

/// One normalised value back to its u8 level: `round((x · std + mean) · 255)`, clamped (NaN → 0).
pub fn denormalise(x: f32, mean: f32, std: f32) -> u8 {
    to_u8((x * std + mean) * 255.0)
}

fn to_u8(v: f32) -> u8 {
    // `as` saturates (and maps NaN to 0).
    v.round().clamp(0.0, 255.0) as u8
}

/// The kept-patch mosaic of a sample: `(cols·P) × (rows·P)` RGB8, kept patches denormalised with `mean`/`std`,
/// dropped patches [`blank_colour`]. A sample whose patch data does not match its grid is a
/// [`DropReason::StageFailed`].
pub fn mosaic(sample: &JuicedSample, mean: [f32; 3], std: [f32; 3]) -> std::result::Result<RgbImage, SampleError> {
    let (rows, cols) = sample.grid;
    let p = sample.patch;
    let plen = 3 * p * p;
    let fail = |detail: String| SampleError::new(sample.key.clone(), DropReason::StageFailed, detail);
    if sample.patches.len() != sample.positions.len() * plen {
        return Err(fail(format!(
            "{} patch values for {} kept patches of {plen}",
            sample.patches.len(),
            sample.positions.len()
        )));
    }
    let (w, h) = (u32::try_from(cols * p), u32::try_from(rows * p));
    let (Ok(w), Ok(h)) = (w, h) else {
        return Err(fail(format!("a {rows}x{cols} grid of {p}-px patches is too large for an image")));
    };
    let blank = image::Rgb(blank_colour(mean));
    let mut img = RgbImage::from_pixel(w, h, blank);
    for (patch, &pos) in sample.patches.chunks_exact(plen.max(1)).zip(&sample.positions) {
        let pos = pos as usize;
        if pos >= rows * cols {
            return Err(fail(format!("kept patch {pos} outside the {rows}x{cols} grid")));
        }
        let (r, c) = (pos / cols, pos % cols);
        for py in 0..p {
            for px in 0..p {
                let at = py * p + px;
                let rgb = [0, 1, 2].map(|ch| denormalise(patch[ch * p * p + at], mean[ch], std[ch]));
                img.put_pixel((c * p + px) as u32, (r * p + py) as u32, image::Rgb(rgb));
            }
        }
    }
    Ok(img)
}

/// Whether members `KEY.ext` read back as key `KEY` (design notes §5, the rule of the tar reader): the file part
/// is non-empty and has no dot (the key ends at the first dot of the file name), and the first directory is not
/// a `__name__` entry (skipped by WebDataset readers).
fn key_reads_back(key: &str) -> bool {
    let file = key.rsplit('/').next().unwrap_or(key);
    let special_dir = key
        .split_once('/')
        .is_some_and(|(first, _)| first.len() >= 4 && first.starts_with("__") && first.ends_with("__"));
    !file.is_empty() && !file.contains('.') && !special_dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{CLIP_MEAN, CLIP_STD, DecodeConfig, Decoder, IMAGENET_MEAN, IMAGENET_STD};
    use crate::patch::patchify;

    #[test]
    fn denormalise_inverts_the_decoder_exactly() {
        for (mean, std) in [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD), ([0.5; 3], [0.5; 3])] {
            let decoder = Decoder::new(DecodeConfig { mean, std, ..DecodeConfig::default() });
            let img = RgbImage::from_fn(256, 1, |x, _| image::Rgb([x as u8, 255 - x as u8, (x * 7 % 256) as u8]));
            let norm = decoder.normalise(&img);
            for (i, px) in img.pixels().enumerate() {
                for ch in 0..3 {
                    assert_eq!(denormalise(norm[ch * 256 + i], mean[ch], std[ch]), px[ch], "{mean:?} {i} {ch}");
                }
            }
        }
        assert_eq!(blank_colour(IMAGENET_MEAN), [124, 116, 104]);
    }

    fn sample(key: &str, crop: &RgbImage, kept: &[u32]) -> JuicedSample {
        let decoder = Decoder::new(DecodeConfig { image_size: crop.width() as usize, ..DecodeConfig::default() });
        let pixels = decoder.normalise(crop);
        let s = crop.width() as usize;
        JuicedSample {
            key: key.into(),
            grid: (s / 4, s / 4),
            patch: 4,
            patches: patchify(&pixels, s, 4, kept),
            positions: kept.to_vec(),
            scores: vec![0.5; (s / 4) * (s / 4)],
            classes: vec![Class { id: Some(3), wnid: "n01491361".into(), name: "tiger shark".into(), prob: 0.25 }],
            caption: None,
            enriched: "a photo of tiger shark".into(),
            added: vec![],
            tokens: vec![],
            meta: Some(serde_json::json!({"src": 1})),
        }
    }

    #[test]
    fn mosaic_keeps_kept_patches_and_blanks_the_rest() {
        let crop = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 200]));
        let s = sample("k", &crop, &[1, 2]);
        let img = mosaic(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap();
        for (x, y, px) in img.enumerate_pixels() {
            let kept = y < 4 && x >= 4 || y >= 4 && x < 4;
            if kept {
                assert_eq!(px, crop.get_pixel(x, y), "({x}, {y})");
            } else {
                assert_eq!(px.0, [124, 116, 104], "({x}, {y})");
            }
        }
        let bad = JuicedSample { positions: vec![1, 99], ..s.clone() };
        assert_eq!(mosaic(&bad, IMAGENET_MEAN, IMAGENET_STD).unwrap_err().reason, DropReason::StageFailed);
        let bad = JuicedSample { positions: vec![1], ..s };
        assert!(mosaic(&bad, IMAGENET_MEAN, IMAGENET_STD).is_err());
    }

    #[test]
    fn the_mosaic_png_reads_back_unchanged_at_the_same_image_size() {
        let crop = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, (x * y) as u8]));
        let s = sample("k", &crop, &[0, 5, 10, 15]);
        let m = members(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap();
        let decoder = Decoder::new(DecodeConfig { image_size: 32, ..DecodeConfig::default() });
        let back = decoder.decode_rgb8("k", &m[0].1, "png").unwrap();
        assert_eq!(decoder.resize_crop_rgb8(&back), mosaic(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap());
    }

    #[test]
    fn members_are_png_txt_and_json_with_orig_only_for_a_caption() {
        let crop = RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]));
        let s = sample("d/k", &crop, &[0]);
        let m = members(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap();
        assert_eq!(m.iter().map(|(e, _)| *e).collect::<Vec<_>>(), ["png", "txt", "json"]);
        let json: serde_json::Value = serde_json::from_slice(&m[2].1).unwrap();
        assert_eq!(json["kept"], serde_json::json!([0]));
        assert_eq!(json["image_size"], 8);
        assert_eq!(json["source_meta"], serde_json::json!({"src": 1}));
        let s = JuicedSample { caption: Some("orig".into()), ..s };
        let m = members(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap();
        assert_eq!(m.iter().map(|(e, _)| *e).collect::<Vec<_>>(), ["png", "txt", "orig.txt", "json"]);
        assert_eq!(m[2].1, b"orig");
        for key in ["a.b", "d/.x", "", "d/", "__x__/k"] {
            let s = JuicedSample { key: key.into(), ..s.clone() };
            assert_eq!(members(&s, IMAGENET_MEAN, IMAGENET_STD).unwrap_err().reason, DropReason::StageFailed, "{key}");
        }
        assert!(key_reads_back("a.b/c/k1") && key_reads_back("__x__") && key_reads_back("x/__y__/k"));
    }
}
