//! The `juicer` command line: `run` streams the pipeline over shards and reports what it did; `show` renders
//! what it kept as pictures; `pack` turns a folder of images + captions JSONL into WebDataset shards; `write`
//! juices shards offline into new WebDataset shards; `bench` measures throughput, CPU, memory and the bottleneck.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use juicer::source::{Shard, ShardWriter, resolve};
use juicer::vision::ExtractRule;
use juicer::{DeviceSpec, EpochSize, JuicedBatch, KeepPolicy, OnError, PruneConfig, SampleError, ScorerSpec, Summary};

#[derive(Parser)]
#[command(
    name = "juicer",
    version,
    about = "Token-level data governance for image-text data, inside the training loop"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the pipeline over SOURCES and print a summary (and per-sample records with --jsonl).
    Run(Box<RunCmd>),
    /// Pack a folder of images + captions JSONL into WebDataset tar shards (and their manifest, PREFIX.json).
    Pack(PackArgs),
    /// Write a shard manifest (`wids` JSON: every shard with its sample count and size) for SOURCES, or join
    /// manifests with --merge. A loader given the manifest as its source skips the count scan.
    Index(IndexArgs),
    /// Render each sample (input, kept patches, saliency, classes, caption) as a PNG in --out.
    Show(Box<ShowArgs>),
    /// Juice SOURCES into WebDataset shards in --out (kept-patch mosaic, enriched caption, classes, scores).
    ///
    /// Shards are OUT/PREFIX-000000.tar, ... (a new one after --max-count samples or before --max-size bytes).
    /// Each sample keeps its key and has, in this order:
    ///   KEY.png       the kept-patch mosaic: the IMAGE_SIZE x IMAGE_SIZE model-input crop, lossless, kept
    ///                 patches with their exact pixels, dropped patches blanked to the normalisation mean colour
    ///   KEY.txt       the enriched caption (what `run` reports as "enriched")
    ///   KEY.orig.txt  the original caption (absent when the input had none)
    ///   KEY.json      {"grid", "patch", "kept", "scores", "classes", "added", "image_size", "source_meta"}
    ///                 (source_meta: the input's own KEY.json, or null)
    ///
    /// Python `webdataset` and `juicer run` read the shards. Every sample read is written or dropped with a
    /// reason; the summary says how many.
    #[command(verbatim_doc_comment)]
    Write(Box<WriteArgs>),
    /// Measure throughput: samples/s, kept patches/s and tokens/s per device, CPU per sample, peak RSS, and
    /// per stage the busy / blocked-on-output / starved-for-input shares with the bottleneck.
    ///
    /// Without SOURCES it generates synthetic JPEG shards (--synthetic, --synthetic-size) so runs compare.
    /// The report's JSON layout (--json) is documented in the README and in `juicer::bench::BenchReport`.
    Bench(Box<BenchArgs>),
    /// Write the embedded MobileNetV2 weights (torchvision's IMAGENET1K_V1 state_dict as safetensors, the
    /// scorer's and classifier's default) to FILE, for a reference framework to load the very same tensors.
    ExportWeights {
        /// Where the safetensors file goes.
        file: PathBuf,
    },
}

#[derive(Args)]
struct RunCmd {
    #[command(flatten)]
    run: RunArgs,
    /// With --limit N: stop at the first batch boundary at or after N samples and write the loader state (JSON)
    /// to FILE instead of ending the epoch there, for a later --resume.
    #[arg(long, value_name = "FILE", requires = "limit")]
    checkpoint: Option<PathBuf>,
    /// Continue from loader states written by --checkpoint: this rank's state (same world: the exact
    /// continuation), or the states of every rank of another world size (merged; the epoch's remaining samples
    /// are split over this world).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    resume: Vec<PathBuf>,
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ErrorPolicy {
    Drop,
    Fail,
}

#[derive(Clone, Copy, ValueEnum)]
enum EpochPolicy {
    Auto,
    Exhaust,
    Drop,
    Repeat,
}

/// `KEY=VALUE` of `--storage-option`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Shards: paths, globs, brace ranges (`shards-{000000..000009}.tar`), http(s) URLs, object-store URLs
    /// (`s3://`, `gs://`, `az://`, `file://`), manifests (`.json`), or a folder with captions.jsonl.
    sources: Vec<String>,
    /// Object-store setting KEY=VALUE (e.g. aws_endpoint=http://127.0.0.1:9000, aws_region=eu-west-1);
    /// overrides the AWS_*/GOOGLE_*/AZURE_* environment. Repeatable.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    storage_options: Vec<(String, String)>,
    /// Count samples per shard afresh instead of through the on-disk count cache (~/.cache/juicer, or
    /// JUICER_CACHE_DIR), when counts are needed and no manifest gives them.
    #[arg(long)]
    no_count_cache: bool,
    /// Write one JSON record per sample to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE|-")]
    jsonl: Option<String>,
    /// Stop after N samples.
    #[arg(long)]
    limit: Option<u64>,
    /// Seed of shard order, shuffle buffer and every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Model input side: resize the short side, centre crop.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 16)]
    patch_size: usize,
    /// Decode every JPEG at full resolution, as torchvision does, instead of at the reduced DCT scale (1/2, 1/4,
    /// 1/8) that still covers the crop.
    #[arg(long)]
    full_res_jpeg: bool,
    /// Largest image in pixels (width × height from its header) that is decoded; a larger one is dropped as
    /// `image_too_large` before any pixel memory is allocated. 0: no limit
    #[arg(long, default_value_t = juicer::decode::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Largest member (the image; after gzip) read into memory, in bytes; a larger one drops its sample as
    /// `member_too_large` without being read.
    #[arg(long, default_value_t = juicer::source::limits::DEFAULT_MAX_MEMBER_BYTES)]
    max_member_bytes: u64,
    /// Largest caption in bytes (`member_too_large` above it).
    #[arg(long, default_value_t = juicer::source::limits::DEFAULT_MAX_CAPTION_BYTES)]
    max_caption_bytes: u64,
    /// Largest metadata (.json) document in bytes (`member_too_large` above it).
    #[arg(long, default_value_t = juicer::source::limits::DEFAULT_MAX_META_BYTES)]
    max_meta_bytes: u64,
    /// Deepest nesting of arrays and objects in a metadata document (`invalid_meta` above it).
    #[arg(long, default_value_t = juicer::source::limits::DEFAULT_MAX_JSON_DEPTH)]
    max_json_depth: usize,
    /// Shuffle buffer in samples (0: keep the read order).
    #[arg(long, default_value_t = 0)]
    shuffle_buffer: usize,
    /// Shuffle the shard order.
    #[arg(long)]
    shuffle_shards: bool,
    /// Rank of this process (default: RANK, then SLURM_PROCID, else 0).
    #[arg(long)]
    rank: Option<usize>,
    /// Number of processes (default: WORLD_SIZE, then SLURM_NTASKS, else 1).
    #[arg(long)]
    world_size: Option<usize>,
    /// Epoch length across ranks.
    #[arg(long, value_enum, default_value = "auto")]
    epoch_size: EpochPolicy,
    /// Device for the batches: auto, cpu, wgpu, wgpu:N, cuda, cuda:N (cuda: built with --features cuda).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Decode workers (default: cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Collator threads building batches behind the ordered sink (default: one per 4 cores, 1 to 4; 0: on the
    /// sink's thread).
    #[arg(long)]
    collate_workers: Option<usize>,
    /// Shard reader workers.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Slots per graph edge.
    #[arg(long, default_value_t = 16)]
    capacity: usize,
    /// What to do with a bad sample.
    #[arg(long, value_enum, default_value = "drop")]
    on_error: ErrorPolicy,
    /// Patch saliency scorer.
    #[arg(long, value_enum, default_value = "cam")]
    scorer: ScorerArg,
    /// Weights folder for `--scorer attention` (HuggingFace ViT: model.safetensors + config.json).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// The classifier that names the classes: mobilenet-v2 (the cam scorer's own forward, embedded weights) or
    /// efficientnet-lite0/1/2 (stronger, one more forward per image; needs --classifier-weights, made by
    /// benches/classifiers/lite_weights.py). Saliency stays MobileNetV2's.
    #[arg(long, value_name = "NAME", default_value = "mobilenet-v2")]
    classifier: String,
    /// Weights of --classifier: for mobilenet-v2, a safetensors file with torchvision names instead of the
    /// embedded ImageNet weights (the cam scorer uses it too); for efficientnet-lite*, the converted file.
    #[arg(long, value_name = "FILE")]
    classifier_weights: Option<PathBuf>,
    /// Fraction of patches to keep (ratio policy).
    #[arg(long, default_value_t = 0.5, conflicts_with_all = ["keep_threshold", "keep_mass"])]
    keep_ratio: f32,
    /// Keep patches whose min-max normalised score is at least this.
    #[arg(long)]
    keep_threshold: Option<f32>,
    /// Keep the smallest top set holding this share of the softmax mass.
    #[arg(long)]
    keep_mass: Option<f32>,
    /// Never keep fewer patches.
    #[arg(long, default_value_t = 1)]
    min_keep: usize,
    /// Never keep more patches.
    #[arg(long)]
    max_keep: Option<usize>,
    /// How concepts are chosen: `tree`, the most specific WordNet concept whose summed class probability reaches
    /// --class-threshold ("lizard" for three lizard guesses), or `flat`, the top --top-k classes.
    #[arg(long, value_enum, default_value_t = ExtractArg::Tree)]
    extract: ExtractArg,
    /// Summed calibrated probability a concept needs (--extract tree; default: the classifier's calibration,
    /// 0.5 for mobilenet-v2).
    #[arg(long)]
    class_threshold: Option<f32>,
    /// Softmax temperature the class probabilities are calibrated with before they are summed (--extract tree;
    /// default: the classifier's calibration, 2.5 for mobilenet-v2).
    #[arg(long)]
    class_temperature: Option<f32>,
    /// Summed probability a second, unrelated concept needs, with evidence of a second object (--extract tree;
    /// off unless given).
    #[arg(long)]
    second_threshold: Option<f32>,
    /// Candidate classes per image (--extract flat) [default: 3].
    #[arg(long)]
    top_k: Option<usize>,
    /// Minimum full-image probability of a class (--extract flat) [default: 0.15].
    #[arg(long)]
    min_prob: Option<f32>,
    /// JSON {"<class id or wnid>": "<name>" | ["<name>", "<synonym>", ...]} restricting and renaming the concepts.
    #[arg(long, value_name = "FILE")]
    vocabulary: Option<PathBuf>,
    /// Items per model micro-batch; 0 chooses: 4 on the CPU, 16 on a GPU.
    #[arg(long, default_value_t = 0)]
    micro_batch: usize,
    /// Model threads (model replicas) per model stage; 0 chooses 2 (1 on a single-core CPU).
    #[arg(long, default_value_t = 0)]
    model_workers: usize,
    /// Run the cam scorer on an S×S downscale of the model input (cheaper; the CAM is 7×7 at 224 anyway). The
    /// batches keep the full crop. Speed and agreement at 224/192/160: README, Results.
    #[arg(long, value_name = "S")]
    score_size: Option<usize>,
    /// CPU threads per model replica; 0 chooses: the cores shared out among the replicas.
    #[arg(long, default_value_t = 0)]
    intra_op_threads: usize,
    /// Cache the scorer's outputs (cam, attention) in DIR so later epochs and runs skip the scoring model; an
    /// object-store URL (s3://bucket/cache) shares the cache across ranks and jobs.
    #[arg(long, value_name = "DIR|URL")]
    score_cache: Option<PathBuf>,
    /// Most bytes the score cache keeps (oldest entries go first).
    #[arg(long, default_value_t = 1 << 30)]
    score_cache_max_bytes: u64,
    /// Caption template: `{caption}` and `{classes}` ("a, b and c").
    #[arg(long, default_value = "{caption}, with {classes}")]
    template: String,
    /// Probability of the enriched caption over the original, drawn per (seed, epoch, key).
    #[arg(long, default_value_t = 1.0)]
    mix: f32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExtractArg {
    Tree,
    Flat,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScorerArg {
    Cam,
    Attention,
    Random,
    None,
}

#[derive(Args)]
struct IndexArgs {
    /// Shards (paths, globs, brace ranges, URLs), or with --merge the manifests to join.
    #[arg(required = true)]
    sources: Vec<String>,
    /// The manifest to write: a path or an object-store URL.
    #[arg(long)]
    out: String,
    /// Join the given manifests (paths, URLs, globs, brace ranges), in order, instead of reading shards.
    #[arg(long)]
    merge: bool,
    /// Shards read at a time.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Object-store setting KEY=VALUE (see `juicer run --help`). Repeatable.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    storage_options: Vec<(String, String)>,
}

fn index(args: IndexArgs) -> anyhow::Result<()> {
    use juicer::source::Manifest;
    let opts = juicer::source::ReadOptions { storage_options: args.storage_options.clone(), ..Default::default() };
    let manifest = if args.merge {
        let names = juicer::source::expand_names(&args.sources, &opts)?;
        let parts = names.iter().map(|m| Manifest::read(m, &opts)).collect::<juicer::Result<Vec<_>>>()?;
        Manifest::merge(parts)?
    } else {
        let (shards, _) = juicer::source::resolve_counted(&args.sources, usize::MAX, &opts)?;
        let bar = indicatif::ProgressBar::new(shards.len() as u64);
        if !std::io::stderr().is_terminal() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let m = Manifest::index(&shards, &opts, args.jobs, &|done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        m
    };
    manifest.save(&args.out, &opts)?;
    eprintln!("{} shard(s), {} samples -> {}", manifest.shards.len(), manifest.total(), args.out);
    Ok(())
}

#[derive(Args)]
struct PackArgs {
    /// A folder containing captions.jsonl, or a .jsonl file.
    source: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Shard file prefix: PREFIX-000000.tar, ...
    #[arg(long, default_value = "shard")]
    prefix: String,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    max_count: usize,
    /// Bytes per shard.
    #[arg(long, default_value_t = 1 << 30)]
    max_size: u64,
}

fn main() -> std::process::ExitCode {
    juicer::device::cap_malloc_arenas();
    // SAFETY: first thing in main, before any thread exists.
    unsafe { juicer::device::quiet_headless_vulkan() };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Pack(args) => pack(args),
        Command::Index(args) => index(args),
        Command::Show(args) => show(*args),
        Command::Write(args) => write(*args),
        Command::Bench(args) => bench(*args),
        Command::ExportWeights { file } => std::fs::write(&file, juicer::model::mobilenet_v2::embedded_weights())
            .with_context(|| format!("writing {}", file.display())),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `juicer run --jsonl - | head` closes stdout early: that is the reader's choice, not a failure.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes one JSON line; I/O errors stay `io::Error` so a closed pipe is recognised.
fn write_record(w: &mut dyn Write, record: &serde_json::Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn record_dropped(e: &SampleError) -> serde_json::Value {
    serde_json::json!({ "key": e.key, "dropped": e.reason.as_str(), "detail": e.detail })
}

fn records<'a>(batch: &'a JuicedBatch, classifier: &'a str) -> impl Iterator<Item = serde_json::Value> + 'a {
    (0..batch.len()).map(move |i| {
        serde_json::json!({
            "key": batch.keys[i],
            "classifier": classifier,
            "grid": [batch.grid.0, batch.grid.1],
            "patch": batch.patch,
            "scores": batch.scores[i],
            "kept": batch.kept[i],
            "classes": batch.classes[i],
            "caption": batch.captions[i],
            "enriched": batch.enriched[i],
            "added": batch.added[i].len(),
            "tokens": batch.token_ids[i],
        })
    })
}

/// Builds the loader from the options `run` and `show` share.
fn build_loader(args: &RunArgs) -> anyhow::Result<juicer::Juicer<JuicedBatch>> {
    Ok(loader_builder(args)?.build()?)
}

/// The builder [`build_loader`] builds, for loaders with another batcher (`write`).
fn loader_builder(args: &RunArgs) -> anyhow::Result<juicer::JuicerBuilder> {
    let device: DeviceSpec = args.device.parse()?;
    let mut builder = JuicedBatch::builder(args.sources.clone())
        .seed(args.seed)
        .batch_size(args.batch_size)
        .image_size(args.image_size)
        .jpeg_draft(!args.full_res_jpeg)
        .max_image_pixels(if args.max_image_pixels == 0 { u64::MAX } else { args.max_image_pixels })
        .max_member_bytes(args.max_member_bytes)
        .max_caption_bytes(args.max_caption_bytes)
        .max_meta_bytes(args.max_meta_bytes)
        .max_json_depth(args.max_json_depth)
        .patch_size(args.patch_size)
        .shuffle_buffer(args.shuffle_buffer)
        .shuffle_shards(args.shuffle_shards)
        .reader_workers(args.readers)
        .capacity(args.capacity)
        .device(device)
        .on_error(match args.on_error {
            ErrorPolicy::Drop => OnError::Drop,
            ErrorPolicy::Fail => OnError::Fail,
        })
        .epoch_size(match args.epoch_size {
            EpochPolicy::Auto => EpochSize::Auto,
            EpochPolicy::Exhaust => EpochSize::Exhaust,
            EpochPolicy::Drop => EpochSize::DropRemainder,
            EpochPolicy::Repeat => EpochSize::RepeatRemainder,
        });
    if let Some(w) = args.workers {
        builder = builder.decode_workers(w);
    }
    if let Some(w) = args.collate_workers {
        builder = builder.collate_workers(w);
    }
    for (k, v) in &args.storage_options {
        builder = builder.storage_option(k, v);
    }
    if args.no_count_cache {
        builder = builder.no_count_cache();
    }
    if let Some(l) = args.limit {
        builder = builder.limit(l);
    }
    if let Some(r) = args.rank {
        builder = builder.rank(r);
    }
    if let Some(w) = args.world_size {
        builder = builder.world_size(w);
    }
    builder = builder
        .classifier_named(&args.classifier, args.classifier_weights.as_deref())?
        .scorer(ScorerSpec::parse(
            match args.scorer {
                ScorerArg::Cam => "cam",
                ScorerArg::Attention => "attention",
                ScorerArg::Random => "random",
                ScorerArg::None => "none",
            },
            args.weights.as_deref(),
        )?)
        .prune(PruneConfig {
            policy: match (args.keep_threshold, args.keep_mass) {
                (Some(t), _) => KeepPolicy::Threshold(t),
                (None, Some(m)) => KeepPolicy::Mass(m),
                (None, None) => KeepPolicy::Ratio(args.keep_ratio),
            },
            min_keep: args.min_keep,
            max_keep: args.max_keep,
        })
        .micro_batch(args.micro_batch)
        .model_workers(args.model_workers)
        .intra_op_threads(args.intra_op_threads)
        .template(args.template.clone())
        .mix(args.mix);
    // The tree rule is the classifier's calibration unless --class-threshold / --class-temperature say.
    match args.extract {
        ExtractArg::Flat => builder = builder.extract(ExtractRule::Flat),
        ExtractArg::Tree => {
            if let Some(t) = args.class_threshold {
                builder = builder.class_threshold(t);
            }
            if let Some(t) = args.class_temperature {
                builder = builder.class_temperature(t);
            }
        }
    }
    if matches!(args.extract, ExtractArg::Tree) && (args.top_k.is_some() || args.min_prob.is_some()) {
        bail!("--top-k and --min-prob choose classes under --extract flat; the tree rule uses --class-threshold");
    }
    if let Some(k) = args.top_k {
        builder = builder.top_k(k);
    }
    if let Some(s) = args.score_size {
        builder = builder.score_size(s);
    }
    if let Some(p) = args.min_prob {
        builder = builder.min_prob(p);
    }
    if let Some(t) = args.second_threshold {
        builder = builder.second_threshold(t);
    }
    if let Some(v) = &args.vocabulary {
        builder = builder.vocabulary(v);
    }
    if let Some(dir) = &args.score_cache {
        builder = builder.score_cache(juicer::vision::cache::ScoreCacheConfig {
            dir: dir.clone(),
            max_bytes: args.score_cache_max_bytes,
        });
    }
    Ok(builder)
}

fn run(cmd: RunCmd) -> anyhow::Result<()> {
    let RunCmd { run: mut args, checkpoint, resume } = cmd;
    // With --checkpoint the limit is a stop point, not the end of the epoch (which a state would record).
    let stop_at = if checkpoint.is_some() { args.limit.take() } else { None };
    let loader = build_loader(&args)?;
    if !resume.is_empty() {
        let states = resume
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing the loader state {}", p.display()))
            })
            .collect::<anyhow::Result<Vec<juicer::LoaderState>>>()?;
        loader.resume_from(states)?;
    }
    let mut out: Option<Box<dyn Write>> = match args.jsonl.as_deref() {
        None => None,
        Some("-") => Some(Box::new(std::io::BufWriter::new(std::io::stdout().lock()))),
        Some(path) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {path}"))?,
        ))),
    };
    // The progress bar's total only where it costs no shard read (a loader that needs no counts never scans).
    let total = if loader.counts_are_known() { loader.epoch_samples(0).ok() } else { None };
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} samples {per_sec} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let mut it = loader.iter()?;
    let mut failures = 0u64;
    let mut checkpointed = false;
    while let Some(item) = it.next() {
        let dropped = it.take_dropped();
        for e in dropped.iter().filter(|e| e.reason == juicer::DropReason::UnreadableShard) {
            eprintln!("warning: unreadable shard `{}`: {}", e.key, e.detail);
        }
        if let Some(w) = out.as_mut() {
            for e in &dropped {
                write_record(&mut *w, &record_dropped(e))?;
            }
        }
        match item {
            Ok(batch) => {
                if let Some(w) = out.as_mut() {
                    for r in records(&batch, loader.config().vision.classifier.name()) {
                        write_record(&mut *w, &r)?;
                    }
                }
            }
            Err(juicer::Error::Sample(e)) => {
                failures += 1;
                eprintln!("error: {e}");
                if let Some(w) = out.as_mut() {
                    write_record(&mut *w, &record_dropped(&e))?;
                }
            }
            Err(e) => bail!(e),
        }
        if let Some(bar) = &bar {
            bar.set_position(it.state().samples_read);
        }
        if let (Some(path), Some(n)) = (&checkpoint, stop_at)
            && it.state().samples_read >= n
        {
            let json = serde_json::to_string_pretty(it.state())?;
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("checkpoint after {} samples -> {}", it.state().samples_read, path.display());
            checkpointed = true;
            break;
        }
    }
    if let (Some(path), false) = (&checkpoint, checkpointed) {
        // The epoch ended before the stop point: the state says so, and resuming it starts the next epoch.
        std::fs::write(path, serde_json::to_string_pretty(it.state())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(w) = out.as_mut() {
        for e in it.take_dropped() {
            write_record(&mut *w, &record_dropped(&e))?;
        }
        w.flush()?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = it.summary();
    drop(it);
    print_summary(&summary, &loader.shards().iter().map(Shard::name).collect::<Vec<_>>(), &loader);
    if failures > 0 {
        bail!("{failures} sample(s) failed (--on-error fail)");
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn print_summary(s: &Summary, shards: &[String], loader: &juicer::Juicer<JuicedBatch>) {
    let world = loader.world();
    let el = secs(s.elapsed).max(1e-9);
    eprintln!();
    eprintln!(
        "juicer run: {} shard(s), rank {}/{}, device {:?}",
        shards.len(),
        world.rank,
        world.world_size,
        loader.device()
    );
    eprintln!(
        "  samples  read {}  =  emitted {}  +  dropped {}   ({} batches, {:.1} samples/s, {:.2} s)",
        s.read,
        s.emitted,
        s.dropped_total(),
        s.batches,
        s.emitted as f64 / el,
        el
    );
    eprintln!(
        "  patches  kept {} of {} ({:.1} %)   classes extracted {}, added to captions {}   classifier forwards {}",
        s.patches_kept,
        s.patches_total,
        100.0 * s.kept_ratio(),
        s.classes,
        s.classes_added,
        s.classifier_images
    );
    if let Some(c) = &s.score_cache {
        eprintln!(
            "  score cache  hits {}  misses {}  stored {}  evicted {}  corrupt {}  write errors {}  ({:.1} MiB)",
            c.hits,
            c.misses,
            c.stored,
            c.evicted,
            c.corrupt,
            c.write_errors,
            c.bytes as f64 / (1024.0 * 1024.0)
        );
    }
    if s.io.requests > 0 {
        eprintln!(
            "  remote   requests {}  retries {}  failures {}  ({:.1} MiB received)",
            s.io.requests,
            s.io.retries,
            s.io.failures,
            s.io.bytes as f64 / (1024.0 * 1024.0)
        );
    }
    for (reason, n) in &s.dropped {
        eprintln!("  dropped  {reason:<18} {n}");
    }
    let unreadable = s.dropped.get(juicer::DropReason::UnreadableShard.as_str()).copied().unwrap_or(0);
    for f in &s.unreadable_shards {
        eprintln!("  unreadable shard  {}: {}", f.shard, f.reason);
    }
    if unreadable > s.unreadable_shards.len() as u64 {
        eprintln!("  unreadable shard  ... and {} more", unreadable - s.unreadable_shards.len() as u64);
    }
    eprintln!();
    eprintln!(
        "  {:<10} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6}",
        "stage", "workers", "in", "out", "busy%", "blocked%", "starved%", "queue"
    );
    for st in &s.stages {
        let denom = el * st.workers.max(1) as f64;
        eprintln!(
            "  {:<10} {:>7} {:>9} {:>9} {:>7.1}% {:>7.1}% {:>7.1}% {:>6}",
            st.name,
            st.workers,
            st.items_in,
            st.items_out,
            100.0 * secs(st.busy) / denom,
            100.0 * secs(st.blocked) / denom,
            100.0 * secs(st.starved) / denom,
            st.queue_depth
        );
    }
}

fn pack(args: PackArgs) -> anyhow::Result<()> {
    let shards = resolve(std::slice::from_ref(&args.source), usize::MAX)?;
    let mut writer = ShardWriter::new(&args.out, &args.prefix, args.max_count, args.max_size)?;
    let opts = juicer::source::ReadOptions::default();
    let mut n = 0usize;
    for shard in &shards {
        for sample in shard.open(0, &opts)? {
            let s = sample.map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut members: Vec<(&str, Vec<u8>)> = vec![(s.image_ext.as_str(), s.image.to_vec())];
            if let Some(c) = &s.caption {
                members.push(("txt", c.as_bytes().to_vec()));
            }
            if let Some(m) = &s.meta {
                members.push(("json", serde_json::to_vec(m)?));
            }
            let refs: Vec<(&str, &[u8])> = members.iter().map(|(e, b)| (*e, b.as_slice())).collect();
            writer.write(&s.key, &refs)?;
            n += 1;
        }
    }
    let (written, manifest) = writer.finish_indexed()?;
    eprintln!(
        "packed {n} samples into {} shard(s) in {} (manifest {})",
        written.len(),
        args.out.display(),
        manifest.display()
    );
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

/// Renders each sample (`juicer::show::ShowRun`), one PNG per sample, and prints their paths.
fn show(args: ShowArgs) -> anyhow::Result<()> {
    use juicer::show::{ShowRun, png_name, save_png};
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut run_args = args.run;
    run_args.limit = run_args.limit.or(Some(16)); // never render a whole dataset by accident
    let loader = build_loader(&run_args)?;
    let run = ShowRun::collect(&loader)?;
    for e in &run.dropped {
        eprintln!("dropped: {e}");
    }
    let missing = run.render(&loader, |key, img| {
        let path = args.out.join(png_name(key));
        save_png(&img, &path)?;
        println!("{}", path.display());
        Ok(())
    })?;
    if missing > 0 {
        eprintln!("warning: {missing} sample(s) not found again when re-reading the shards");
    }
    Ok(())
}

#[derive(Args)]
struct WriteArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Output directory (created if missing), or an object-store folder (s3://bucket/out, gs://, az://).
    #[arg(long)]
    out: PathBuf,
    /// Shard file prefix: PREFIX-000000.tar, ... In a job of several tasks (--rank/--world-size,
    /// SLURM_ARRAY_TASK_ID/COUNT, or JOB_COMPLETION_INDEX with --world-size) each task writes
    /// PREFIX-TTTTT-of-NNNNN-000000.tar, ... and its manifest part PREFIX-TTTTT-of-NNNNN.json; join the parts
    /// with `juicer index --merge`.
    #[arg(long, default_value = "juiced")]
    prefix: String,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    max_count: usize,
    /// Bytes per shard (a bigger sample gets a shard of its own).
    #[arg(long, default_value_t = 1 << 30)]
    max_size: u64,
    /// Continue an interrupted run (killed, out of disk space) from its last complete shard, with the same
    /// arguments: the output is then the uninterrupted run's, byte for byte. Without a progress file
    /// (OUT/.PREFIX.progress.json) the run starts afresh.
    #[arg(long)]
    resume: bool,
}

/// Juices the sources into WebDataset shards (layout: `juicer write --help`, `juicer::write`).
fn write(args: WriteArgs) -> anyhow::Result<()> {
    use juicer::write::{HostBatcher, WriteOptions, write_shards};
    if args.run.jsonl.is_some() {
        bail!("write takes no --jsonl: each sample's record is its KEY.json in the shards");
    }
    // A fanned-out job: this process is task `rank` of `world_size` (flags, Slurm array, Kubernetes Indexed Job)
    // and reads its share of the shards once.
    let task = juicer::World::resolve_task(args.run.rank, args.run.world_size)?;
    let mut run = args.run.clone();
    (run.rank, run.world_size, run.epoch_size) = (Some(task.rank), Some(task.world_size), EpochPolicy::Exhaust);
    let loader = loader_builder(&run)?.build_with(HostBatcher)?;
    let prefix = juicer::write::task_prefix(&args.prefix, task.rank, task.world_size);
    let opts = WriteOptions { prefix, max_count: args.max_count, max_size: args.max_size, resume: args.resume };
    let report = write_shards(&loader, &args.out, &opts, &mut |e| eprintln!("dropped: {e}"))?;
    eprintln!(
        "juicer write: read {}  =  written {}  +  dropped {}   ({} shard(s) in {})",
        report.read,
        report.written,
        report.dropped_total(),
        report.shards.len(),
        args.out.display()
    );
    eprintln!("  manifest {}", report.manifest.display());
    for (reason, n) in &report.dropped {
        eprintln!("  dropped  {reason:<18} {n}");
    }
    for p in &report.shards {
        println!("{}", p.display());
    }
    if report.failed > 0 {
        bail!("{} sample(s) failed (--on-error fail)", report.failed);
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Run the stages up to this one: decode (+ patchify), score, prune, extract, enrich (all).
    #[arg(long, default_value = "enrich")]
    stages: juicer::LastStage,
    /// Samples before the measured window opens (model start-up, first kernels, edges filling).
    #[arg(long, default_value_t = 16)]
    warmup: u64,
    /// Close the window after N samples (default: the end of the data).
    #[arg(long)]
    samples: Option<u64>,
    /// Close the window after S seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Measure N epochs one after the other (with --score-cache, epoch 2 shows what the cache saves).
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// One pipeline per device, each a rank of their world: `cpu`, `wgpu:0,wgpu:1`, or `gpus` (every
    /// hardware GPU). Default: --device.
    #[arg(long)]
    devices: Option<String>,
    /// Synthetic samples to generate when no SOURCES are given.
    #[arg(long, default_value_t = 256)]
    synthetic: usize,
    /// Synthetic image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480")]
    synthetic_size: String,
    /// Synthetic samples per shard.
    #[arg(long, default_value_t = 64)]
    synthetic_shard: usize,
    /// Where synthetic shards go (reused when they match; default: the temp dir).
    #[arg(long, value_name = "DIR")]
    synthetic_dir: Option<PathBuf>,
    /// Write the report as JSON to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE|-")]
    json: Option<String>,
    /// Draw throughput and per-stage busy share over time into FILE.png.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Instead of the pipeline: profile the MobileNetV2 forward on --device layer kind by layer kind (upload,
    /// stem, expand, depthwise, project, head, classifier, read back, host CAM), micro-batch --micro-batch.
    #[arg(long, conflicts_with_all = ["devices", "plot"])]
    layers: bool,
    /// Timed rounds of --layers (one micro-batch each).
    #[arg(long, default_value_t = 20, requires = "layers")]
    layer_rounds: usize,
    /// Untimed rounds of --layers first (kernel compilation, autotuning).
    #[arg(long, default_value_t = 3, requires = "layers")]
    layer_warmup: usize,
}

fn bench(mut args: BenchArgs) -> anyhow::Result<()> {
    use juicer::bench::{self, Window, synthetic};
    if args.layers {
        let spec: DeviceSpec = args.run.device.parse()?;
        let profile = bench::layers::profile(spec, args.run.micro_batch, args.layer_rounds, args.layer_warmup)?;
        return emit(&bench::layers::render(&profile), &profile, args.json.as_deref());
    }
    if args.run.sources.is_empty() {
        let (w, h) = args
            .synthetic_size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
            .with_context(|| format!("--synthetic-size `{}`: expected WIDTHxHEIGHT", args.synthetic_size))?;
        let spec = synthetic::SyntheticSpec {
            samples: args.synthetic,
            per_shard: args.synthetic_shard,
            width: w,
            height: h,
            seed: args.run.seed,
        };
        let dir = args.synthetic_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(spec.dir_name()));
        let t = std::time::Instant::now();
        let shards = synthetic::generate(&dir, spec)?;
        eprintln!(
            "synthetic: {} samples in {} shard(s) in {} ({:.1} s)",
            spec.samples,
            shards.len(),
            dir.display(),
            t.elapsed().as_secs_f64()
        );
        args.run.sources = shards.iter().map(|p| p.display().to_string()).collect();
    }
    let devices: Vec<String> = match args.devices.as_deref() {
        None => vec![args.run.device.clone()],
        Some("gpus") => {
            let (discrete, integrated) = juicer::device::hardware_gpus();
            let n = if discrete > 0 { discrete } else { integrated };
            if n == 0 {
                bail!("--devices gpus: no hardware GPU found (wgpu lists none)");
            }
            (0..n).map(|i| format!("wgpu:{i}")).collect()
        }
        Some(list) => list.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect(),
    };
    let world = devices.len();
    let mut loaders = Vec::with_capacity(world);
    for (rank, device) in devices.iter().enumerate() {
        let mut run = RunArgs { device: device.clone(), ..args.run.clone() };
        if world > 1 {
            run.rank = Some(rank);
            run.world_size = Some(world);
        }
        loaders.push(loader_builder(&run)?.last_stage(args.stages).build()?);
    }
    let window = Window { warmup: args.warmup, samples: args.samples, seconds: args.seconds, epochs: args.epochs };
    let report = bench::run(&loaders, &window)?;
    emit(&bench::render(&report), &report, args.json.as_deref())?;
    if let Some(path) = &args.plot {
        let step = report.pipelines.iter().map(|p| p.seconds + p.warmup_seconds).fold(0.0, f64::max) / 60.0;
        bench::plot::save(&report, path, step.max(0.2))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

/// Prints a bench table (to stderr when the JSON goes to stdout) and writes the JSON where `--json` says.
fn emit(table: &str, report: &impl serde::Serialize, json: Option<&str>) -> anyhow::Result<()> {
    if json == Some("-") {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    match json {
        None => {}
        Some("-") => println!("{}", serde_json::to_string_pretty(report)?),
        Some(path) => {
            std::fs::write(path, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {path}"))?
        }
    }
    Ok(())
}
