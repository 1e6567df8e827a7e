//! The juicer side of the peer comparison (`benches/peers/run.sh`): CAM scoring and CLIP tokenisation, timed
//! through juicer's public API, one JSON object on stdout per run.
//!
//! ```text
//! cargo build --release --example peer_bench
//! target/release/examples/peer_bench cam-inputs --out target/peers/cam_inputs.f32
//! target/release/examples/peer_bench cam --inputs target/peers/cam_inputs.f32 --batch 16 --images 128
//! target/release/examples/peer_bench tokenize --captions fixtures/gcompris/pairs.jsonl --count 20000
//! target/release/examples/peer_bench jpeg --shards target/peers/photos-640x480-n500/*.tar --upto libjpeg
//! ```
//!
//! - `cam-inputs`: decodes the 73 fixture photos (`fixtures/gcompris/*.webp`, sorted by name) with juicer's
//!   [`Decoder`] (`Resize(224)` + `CenterCrop(224)`, ImageNet mean/std) and writes them as raw little-endian
//!   f32 `[N, 3, 224, 224]`, so that juicer and the Python peer (`benches/peers/peers.py cam`) score the very
//!   same tensors.
//! - `cam`: the `cam` scorer stage ([`CamScorer`]: the embedded MobileNetV2 forward, softmax, the top
//!   `max(cam_top 5, top_k 3)` classes, their class activation maps resampled to the 14×14 patch grid, the
//!   probability-weighted saliency mix, the top-3 candidates) on micro-batches of `--batch` images, on the CPU
//!   (burn's flex backend; its matmuls and convolutions use rayon's global pool, `RAYON_NUM_THREADS` threads).
//!   One untimed pass over the N distinct inputs gives the results the runner checks against Python's (top-3
//!   classes, saliency) and warms the model; then `--images` images (the inputs cycled, rounded up to whole
//!   batches) are scored and only `process_batch` is timed (the copies of the inputs are made beforehand).
//! - `tokenize`: `ClipTokenizer::shared().encode_padded` over the captions of `pairs.jsonl` cycled to `--count`,
//!   on one thread, collected into `[count, 77]` rows as `open_clip.tokenize` returns them. An untimed pass over
//!   the distinct captions warms the tokenizer (and its BPE word cache; open_clip's is warmed the same way) and
//!   gives the rows the runner compares with open_clip's.
//! - `jpeg`: the floor under juicer's decode path. The `.jpg` members of `--shards` are read into memory; after
//!   one untimed pass over them, `--threads` threads (each taking every N-th image) decode them `--passes` times:
//!   with `--upto libjpeg` `Decoder::decode_for_crop` (libjpeg-turbo at the reduced scale juicer chooses for the
//!   224-px crop, nothing after it); with `--upto resize` `Decoder::crop_rgb8` (that decoding and the resize to
//!   the 224×224 crop). Everything the graph adds (reading, normalising, patchifying, batching, the
//!   channels) is left out, so `per_s` bounds what `juicer bench --stages decode` can reach on the same cores.
//!
//! Output (stdout, one line): `{"side": "juicer", "task", "items", "seconds", "per_s", "cpu_seconds", "threads",
//! ..., "check": {...}}`; `per_s` is images/s (`cam`, `jpeg`) or captions/s (`tokenize`); `cpu_seconds` is the process CPU
//! time (user + system, all threads) spent in the timed region, which a busy machine disturbs less than wall time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use juicer::bench::probe::cpu_time;
use juicer::decode::{DecodeConfig, Decoder};
use juicer::sample::{Decoded, RawSample};
use juicer::stage::BatchStage;
use juicer::text::tokenizer::{CONTEXT, ClipTokenizer};
use juicer::vision::{CamScorer, Classifier};

const SIZE: usize = 224;

#[derive(Parser)]
#[command(about = "juicer side of benches/peers: CAM scoring and CLIP tokenisation throughput, JSON on stdout")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode the fixture photos into raw f32 [N, 3, 224, 224] (the shared CAM inputs).
    CamInputs {
        /// Folder with the `.webp` photos.
        #[arg(long, default_value = "fixtures/gcompris")]
        photos: PathBuf,
        /// Output file (raw little-endian f32).
        #[arg(long)]
        out: PathBuf,
    },
    /// Time the cam scorer on the shared inputs.
    Cam {
        /// Raw f32 [N, 3, 224, 224] from `cam-inputs`.
        #[arg(long)]
        inputs: PathBuf,
        /// Images per forward (juicer's default micro-batch is 16).
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Images to time (rounded up to whole batches).
        #[arg(long, default_value_t = 128)]
        images: usize,
    },
    /// Time JPEG decoding alone on the shards' `.jpg` members: the floor under juicer's decode path.
    Jpeg {
        /// WebDataset tar shards; their `.jpg`/`.jpeg` members are read into memory first.
        #[arg(long, num_args = 1.., required = true)]
        shards: Vec<PathBuf>,
        /// How far to go: `libjpeg` (decoding at the scale juicer chooses, nothing else) or `resize` (the
        /// decoder's `crop_rgb8`: decoding + the resize to the 224×224 crop).
        #[arg(long, value_enum, default_value_t = Upto::Libjpeg)]
        upto: Upto,
        /// Decoding threads, each taking every N-th image.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Passes over the images in the timed region.
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
    /// Time CLIP tokenisation of the fixture captions, cycled.
    Tokenize {
        /// `pairs.jsonl` (one `{"caption": ...}` per line).
        #[arg(long, default_value = "fixtures/gcompris/pairs.jsonl")]
        captions: PathBuf,
        /// Captions to tokenise.
        #[arg(long, default_value_t = 20_000)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::CamInputs { photos, out } => cam_inputs(&photos, &out),
        Command::Cam { inputs, batch, images } => cam(&inputs, batch, images),
        Command::Jpeg { shards, upto, threads, passes } => jpeg(&shards, upto, threads, passes),
        Command::Tokenize { captions, count } => tokenize(&captions, count),
    }
}

fn cam_inputs(photos: &Path, out: &Path) -> anyhow::Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(photos)
        .with_context(|| format!("reading {}", photos.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "webp"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no .webp photos in {}", photos.display());
    }
    let decoder = Decoder::new(DecodeConfig::default());
    let mut bytes = Vec::with_capacity(paths.len() * 3 * SIZE * SIZE * 4);
    let mut keys = Vec::new();
    for p in &paths {
        let key = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let raw = RawSample {
            key: key.clone(),
            image: std::fs::read(p).with_context(|| format!("reading {}", p.display()))?.into(),
            image_ext: "webp".into(),
            caption: None,
            meta: None,
        };
        let d = decoder.decode(raw).map_err(|e| anyhow::anyhow!("{e}"))?;
        bytes.extend(d.pixels.iter().flat_map(|v| v.to_le_bytes()));
        keys.push(key);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let record = serde_json::json!({ "images": keys.len(), "shape": [keys.len(), 3, SIZE, SIZE], "keys": keys });
    println!("{record}");
    Ok(())
}

fn read_inputs(path: &Path) -> anyhow::Result<Vec<Decoded>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let per = 3 * SIZE * SIZE;
    if bytes.is_empty() || bytes.len() % (per * 4) != 0 {
        bail!("{}: {} bytes is not a whole number of f32 [3, {SIZE}, {SIZE}] images", path.display(), bytes.len());
    }
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(values
        .chunks_exact(per)
        .enumerate()
        .map(|(i, px)| Decoded {
            key: i.to_string(),
            pixels: px.to_vec(),
            size: SIZE,
            orig_size: (SIZE as u32, SIZE as u32),
            caption: None,
            meta: None,
        })
        .collect())
}

/// Process CPU time (user + system, all threads) in seconds; NaN where the platform has no reading.
fn cpu_seconds() -> f64 {
    cpu_time().map_or(f64::NAN, |d| d.as_secs_f64())
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn cam(inputs: &Path, batch: usize, images: usize) -> anyhow::Result<()> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let inputs = read_inputs(inputs)?;
    let classifier = Classifier::load(None, &Device::flex()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut scorer = CamScorer { classifier, patch: 16, cam_top: 5, top_k: 3, score_size: 224 };

    // Untimed: every distinct input once (warms the model), for the cross-check with Python.
    let mut top3 = Vec::with_capacity(inputs.len());
    let mut saliency = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(batch) {
        for r in scorer.process_batch(chunk.to_vec()) {
            let s = r.map_err(|e| anyhow::anyhow!("{e}"))?;
            let c = s.candidates.unwrap_or_default();
            top3.push(c.iter().map(|c| (c.id, c.prob)).collect::<Vec<_>>());
            saliency.push(s.scores);
        }
    }

    // Timed: whole batches of the inputs cycled; copies made before the clock starts.
    let n_batches = images.div_ceil(batch).max(1);
    let batches: Vec<Vec<Decoded>> =
        (0..n_batches).map(|b| (0..batch).map(|j| inputs[(b * batch + j) % inputs.len()].clone()).collect()).collect();
    let mut seconds = 0.0;
    let mut cpu = 0.0;
    let mut scored = 0usize;
    for items in batches {
        let (t, c) = (Instant::now(), cpu_seconds());
        let out = scorer.process_batch(items);
        seconds += t.elapsed().as_secs_f64();
        cpu += cpu_seconds() - c;
        scored += out.iter().filter(|r| r.is_ok()).count();
        std::hint::black_box(out);
    }
    if scored != n_batches * batch {
        bail!("{} of {} images failed to score", n_batches * batch - scored, n_batches * batch);
    }
    let record = serde_json::json!({
        "side": "juicer",
        "task": "cam",
        "items": scored,
        "batch": batch,
        "seconds": seconds,
        "per_s": scored as f64 / seconds,
        "cpu_seconds": cpu,
        "threads": threads(),
        "check": { "top3": top3, "saliency": saliency },
    });
    println!("{record}");
    Ok(())
}

/// How far `peer_bench jpeg` decodes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Upto {
    /// libjpeg-turbo at the reduced scale `Decoder` chooses, nothing after it.
    Libjpeg,
    /// `Decoder::crop_rgb8`: that decoding and the resize to the 224×224 crop.
    Resize,
}

/// The `.jpg`/`.jpeg` members of the tar shards, in shard and member order.
fn jpeg_members(shards: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for path in shards {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().with_context(|| format!("reading {}", path.display()))? {
            let mut entry = entry.with_context(|| format!("reading {}", path.display()))?;
            let name = entry.path()?.to_string_lossy().to_lowercase();
            if name.ends_with(".jpg") || name.ends_with(".jpeg") {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut bytes)?;
                out.push(bytes);
            }
        }
    }
    Ok(out)
}

/// Decodes one JPEG as far as `upto` says; the number of output bytes (kept so the work is not optimised away).
fn jpeg_one(decoder: &Decoder, bytes: &[u8], resize: bool) -> anyhow::Result<usize> {
    let failed = |(reason, e): (juicer::DropReason, String)| anyhow::anyhow!("{reason}: {e}");
    Ok(if resize {
        decoder.crop_rgb8(bytes, "jpg").map_err(failed)?.0.len()
    } else {
        // What `crop_rgb8` does before its resize: libjpeg at the scale the crop's box allows.
        decoder.decode_for_crop(bytes, "jpg").map_err(failed)?.0.len()
    })
}

fn jpeg(shards: &[PathBuf], upto: Upto, threads: usize, passes: usize) -> anyhow::Result<()> {
    let resize = upto == Upto::Resize;
    let images = jpeg_members(shards)?;
    if images.is_empty() {
        bail!("no .jpg members in the shards");
    }
    let decoder = Decoder::new(DecodeConfig::default());
    let threads = threads.max(1);
    // Untimed: every image once (checks that each decodes, warms the allocator and the caches).
    for bytes in &images {
        jpeg_one(&decoder, bytes, resize)?;
    }
    let (t, c) = (Instant::now(), cpu_seconds());
    let results: Vec<anyhow::Result<usize>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                let (images, decoder) = (&images, &decoder);
                scope.spawn(move || -> anyhow::Result<usize> {
                    let mut bytes_out = 0;
                    for _ in 0..passes {
                        for bytes in images.iter().skip(w).step_by(threads) {
                            bytes_out += jpeg_one(decoder, bytes, resize)?;
                        }
                    }
                    Ok(bytes_out)
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked")))).collect()
    });
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c;
    for r in results {
        std::hint::black_box(r?);
    }
    let items = images.len() * passes;
    let record = serde_json::json!({
        "side": "juicer",
        "task": if resize { "jpeg-resize" } else { "jpeg-libjpeg" },
        "items": items,
        "seconds": seconds,
        "per_s": items as f64 / seconds,
        "cpu_seconds": cpu,
        "threads": threads,
    });
    println!("{record}");
    Ok(())
}

fn tokenize(captions: &Path, count: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(captions).with_context(|| format!("reading {}", captions.display()))?;
    let mut unique = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).context("a JSON line")?;
        unique.push(v["caption"].as_str().context("a `caption` string")?.to_owned());
    }
    if unique.is_empty() {
        bail!("no captions in {}", captions.display());
    }
    let list: Vec<&str> = (0..count.max(1)).map(|i| unique[i % unique.len()].as_str()).collect();
    let tok = ClipTokenizer::shared().map_err(|e| anyhow::anyhow!("{e}"))?;

    // Untimed: the distinct captions once (builds the tokenizer, warms its word cache), for the cross-check.
    let rows: Vec<Vec<u32>> = unique.iter().map(|c| tok.encode_padded(c).0.to_vec()).collect();

    let (t, c) = (Instant::now(), cpu_seconds());
    let mut out: Vec<[u32; CONTEXT]> = Vec::with_capacity(list.len());
    for c in &list {
        out.push(tok.encode_padded(c).0);
    }
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c;
    std::hint::black_box(&out);
    let record = serde_json::json!({
        "side": "juicer",
        "task": "tokenize",
        "items": list.len(),
        "seconds": seconds,
        "per_s": list.len() as f64 / seconds,
        "cpu_seconds": cpu,
        "threads": 1,
        "check": { "rows": rows },
    });
    println!("{record}");
    Ok(())
}
