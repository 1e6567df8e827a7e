//! The stage graph of one epoch, wired top to bottom as the crate docs' diagram reads:
//!
//! ```text
//! read (R workers) ─► shuffle (sequencer, source) ─► decode ─► score ─► prune ─► extract ─► enrich ─► batch
//! ```
//!
//! [`run_epoch`] builds the graph for one [`EpochSetup`] and hands back the running [`Run`]. A graph truncated by
//! [`Config::last_stage`] stops after that stage: [`stages`] checks the stage list against it after every
//! stage and ends the graph there with a `finish` stage ([`Finish`]) that turns whatever the last stage
//! produced into the sample the batcher takes.
//!
//! [`juice_inline`] runs the same stages, built by the same functions, one after the other on the calling thread
//! over samples held in memory ([`super::Juicer::juice`]): no graph, no score cache.
//!
//! Which runtime each stage gets is decided here, nowhere else: per-item stages run on the decode worker pool
//! (`decode_workers` threads each); the model scorers and the extract classifier run on model threads
//! (`model_workers` replicas, micro-batched), the cam scorer's outputs behind the score cache when there is one.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Device;

use super::Config;
use super::config::LastStage;
use super::models::Models;
use super::sink::{BatchSink, Output, collation};
use crate::decode::{DecodeStage, Decoder};
use crate::device::IntraOp;
use crate::error::{Error, Result, SampleError};
use crate::graph::{Envelope, Graph, Inlet, Run};
use crate::patch::grid;
use crate::plan::{LoaderState, Trace};
use crate::reader::{ReadSetup, Tasks, reader_worker, sequencer};
use crate::sample::{Decoded, JuicedSample, Pruned, Scored};
use crate::source::Shard;
use crate::stage::{BatchStage, Stage};
use crate::text::EnrichStage;
use crate::vision::cache::{Cached, ScoreCache};
use crate::vision::{
    AttentionScorer, CamScorer, ClassifierSpec, Extract, PlainScorer, PruneStage, ScorerSpec, VisionConfig,
};

/// An edge carrying items of type `T` with their checkpoint trace.
type Edge<T> = Inlet<Envelope<T, Trace>>;

/// Everything one epoch's graph is built from.
pub(super) struct EpochSetup<'a, O> {
    /// The loader's shards.
    pub shards: Arc<[Shard]>,
    /// The loader's configuration (after model loading adapted it).
    pub config: &'a Config,
    /// Models loaded at build time.
    pub models: &'a Models,
    /// What this rank reads: its shard order for the epoch (and how often it may be swept to reach `target`),
    /// or the sample ranges of an elastic epoch.
    pub tasks: Tasks,
    /// Batches this rank yields, when ranks must be equal.
    pub target: Option<u64>,
    /// Where the epoch starts (a fresh state or a resumed one).
    pub state: LoaderState,
    /// The user's batcher.
    pub batcher: Arc<dyn Batcher<JuicedSample, O>>,
    /// Device of the batches and the models.
    pub device: Device,
}

/// Builds and starts one epoch's graph.
pub(super) fn run_epoch<O: Send + 'static>(e: EpochSetup<'_, O>) -> Result<Run<Output<O>>> {
    let cfg = e.config;
    let mut graph = Graph::new(cfg.capacity);

    // read: R workers prefetch the shards of their tasks.
    let setup = Arc::new(ReadSetup {
        shards: e.shards.clone(),
        tasks: e.tasks,
        opts: cfg.read.clone(),
        start: e.state.cursor,
        start_offset: e.state.cursor_offset,
        shutdown: graph.shutdown_flag(),
    });
    let readers = graph.stage("read", cfg.reader_workers);
    let shuffle = graph.stage("shuffle", 1);
    let n_readers = cfg.reader_workers;
    let mut inlets = Vec::with_capacity(n_readers);
    for r in 0..n_readers {
        let (out, inlet) = graph.edge(&readers, &shuffle, cfg.capacity);
        inlets.push(inlet);
        let setup = setup.clone();
        graph.spawn(&format!("read-{r}"), move || {
            reader_worker(setup, r, n_readers, out);
            Ok(())
        })?;
    }

    // shuffle: the sequencer restores the canonical order, shuffles, and is the graph's source. Items in flight
    // between it and the sink are bounded by the edges and workers between them: six edges
    // (shuffle→decode→score→prune→extract→enrich→sink), four per-item pools, up to two micro-batches.
    let window = 6 * cfg.capacity + 4 * cfg.decode_workers + 2 * cfg.vision.micro_batch * cfg.vision.model_workers + 1;
    let resume = e.state.clone();
    let capacity = cfg.shuffle_buffer;
    let (raw, credits) =
        graph.source(shuffle, window, move |emitter| sequencer(&setup, inlets, &resume, capacity, emitter))?;

    let tail = stages(&mut graph, raw, cfg, e.models, &e.device, e.state.epoch)?;

    // batch: the ordered sink.
    let sink = BatchSink {
        batch_size: cfg.batch_size,
        on_error: cfg.on_error,
        target: e.target,
        limit: cfg.limit,
        range: cfg.range,
        boundary: e.state.clone(),
        state: e.state,
        pending: Vec::new(),
        dropped: Vec::new(),
    };
    graph.sink(tail, credits, sink, collation(e.batcher, e.device, cfg.collate_workers))
}

/// decode → score → prune → extract → enrich, stopping after [`Config::last_stage`].
fn stages(
    graph: &mut Graph,
    raw: Edge<crate::sample::RawSample>,
    cfg: &Config,
    m: &Models,
    device: &Device,
    epoch: u64,
) -> Result<Edge<JuicedSample>> {
    let workers = cfg.decode_workers;
    let patch = cfg.patch_size;
    let v = &cfg.vision;
    let stop_after = |stage: LastStage| cfg.last_stage == stage;

    let decoded = graph.map(raw, Arc::new(DecodeStage(Decoder::new(cfg.decode.clone()))), workers)?;
    if stop_after(LastStage::Decode) {
        return graph.map(decoded, Arc::new(Finish::<Decoded>::new(patch)), workers);
    }

    let scored = score(graph, decoded, cfg, m, device)?;
    if stop_after(LastStage::Score) {
        return graph.map(scored, Arc::new(Finish::<Scored>::new(patch)), workers);
    }

    let pruned = graph.map(scored, Arc::new(PruneStage(v.prune)), workers)?;
    if stop_after(LastStage::Prune) {
        return graph.map(pruned, Arc::new(Finish::<Pruned>::new(patch)), workers);
    }

    let extract = extract_stage(cfg, m);
    let juiced = if extract.classifier.is_none() {
        // The cam scorer's forward already produced the class candidates: extract is plain CPU work.
        graph.map(pruned, Arc::new(extract), workers)?
    } else {
        graph.model("extract", pruned, replicas(&extract, v.model_workers), v.micro_batch, v.max_wait)?
    };
    if stop_after(LastStage::Extract) {
        return Ok(juiced);
    }

    graph.map(juiced, Arc::new(enrich_stage(m, epoch)), workers)
}

/// The extract stage; it runs the classifier itself unless the scorer did (cam with the MobileNetV2 class head).
fn extract_stage(cfg: &Config, m: &Models) -> Extract {
    let v = &cfg.vision;
    let own_head = v.classifier != ClassifierSpec::MobileNetV2;
    Extract {
        classifier: (v.scorer != ScorerSpec::Cam || own_head).then(|| m.classifier.clone()),
        reclassify: own_head,
        rule: v.extract,
        top_k: v.top_k,
        min_prob: v.min_prob,
        margin: v.margin,
        second_threshold: v.second_threshold,
        vocabulary: m.vocabulary.clone(),
        input_norm: m.input_norm,
    }
}

fn enrich_stage(m: &Models, epoch: u64) -> EnrichStage {
    EnrichStage { enricher: m.enricher.clone(), tokenizer: m.tokenizer, epoch }
}

fn cam_scorer(cfg: &Config, m: &Models) -> CamScorer {
    let v = &cfg.vision;
    let top_k = v.extract.candidates(v.top_k);
    let score_size = v.score_size.unwrap_or(cfg.decode.image_size);
    CamScorer { classifier: m.cam.clone(), patch: cfg.patch_size, cam_top: v.cam_top, top_k, score_size }
}

fn attention_scorer(m: &Models, v: &VisionConfig, device: &Device) -> Result<AttentionScorer> {
    let vit = m.vit.clone().ok_or_else(|| Error::Config(vec!["attention scorer without a ViT".into()]))?;
    Ok(AttentionScorer { vit, device: device.clone(), threads: IntraOp::new(v.intra_op_threads) })
}

/// The `score` stage for the configured scorer.
fn score(graph: &mut Graph, decoded: Edge<Decoded>, cfg: &Config, m: &Models, device: &Device) -> Result<Edge<Scored>> {
    let v = &cfg.vision;
    let patch = cfg.patch_size;
    let cache = m.score_cache.as_ref();
    match &v.scorer {
        ScorerSpec::Cam => model_scorer(graph, decoded, cam_scorer(cfg, m), cache, patch, v),
        ScorerSpec::Attention(_) => model_scorer(graph, decoded, attention_scorer(m, v, device)?, cache, patch, v),
        ScorerSpec::Random => {
            graph.map(decoded, Arc::new(PlainScorer { seed: Some(cfg.seed), patch }), cfg.decode_workers)
        }
        ScorerSpec::None => graph.map(decoded, Arc::new(PlainScorer { seed: None, patch }), cfg.decode_workers),
    }
}

/// Adds a model scorer as the `score` stage, behind the score cache when there is one.
fn model_scorer<S>(
    graph: &mut Graph,
    decoded: Edge<Decoded>,
    stage: S,
    cache: Option<&Arc<ScoreCache>>,
    patch: usize,
    v: &VisionConfig,
) -> Result<Edge<Scored>>
where
    S: BatchStage<In = Decoded, Out = Scored> + Clone,
{
    match cache {
        Some(cache) => {
            let stage = Cached { inner: stage, cache: cache.clone(), patch };
            graph.model("score", decoded, replicas(&stage, v.model_workers), v.micro_batch, v.max_wait)
        }
        None => graph.model("score", decoded, replicas(&stage, v.model_workers), v.micro_batch, v.max_wait),
    }
}

/// One factory per model thread, each building its own copy of `stage` (a burn module clone shares the
/// weights' storage until a thread writes to it, which these stages never do).
fn replicas<S: Clone + Send + 'static>(stage: &S, n: usize) -> Vec<impl FnOnce() -> Result<S> + Send + 'static> {
    (0..n.max(1))
        .map(|_| {
            let s = stage.clone();
            move || Ok(s)
        })
        .collect()
}

/// Ends a graph truncated by [`Config::last_stage`]: turns what the last stage produced into the sample the
/// batcher takes ([`Pruned::into_juiced`]). Keeps every patch before prune, the kept ones after it; no classes,
/// no tokens.
struct Finish<T> {
    patch: usize,
    _in: std::marker::PhantomData<fn(T)>,
}

impl<T> Finish<T> {
    fn new(patch: usize) -> Self {
        Self { patch, _in: std::marker::PhantomData }
    }
}

/// What a truncated graph's last stage produced, as the pruned sample [`Finish`] turns into a batch item.
trait Unfinished: Send + 'static {
    /// The sample with its kept patches (every patch before prune).
    fn pruned(self, patch: usize) -> Pruned;
}

impl Unfinished for Decoded {
    fn pruned(self, patch: usize) -> Pruned {
        let grid = grid(self.size, patch);
        Pruned::keep_all(Scored { sample: self, grid, patch, scores: Vec::new(), probs: Vec::new(), candidates: None })
    }
}

impl Unfinished for Scored {
    fn pruned(self, _: usize) -> Pruned {
        Pruned::keep_all(self)
    }
}

impl Unfinished for Pruned {
    fn pruned(self, _: usize) -> Pruned {
        self
    }
}

impl<T: Unfinished> Stage for Finish<T> {
    type In = T;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "finish"
    }

    fn process(&self, item: T) -> std::result::Result<JuicedSample, SampleError> {
        Ok(item.pruned(self.patch).into_juiced(Vec::new()))
    }
}

/// What [`juice_inline`] returns: one result per input sample, in input order.
pub(super) type Juiced = Vec<std::result::Result<JuicedSample, SampleError>>;

/// Runs decode → score → prune → extract → enrich (stopping after [`Config::last_stage`]) over `raws` on the
/// calling thread, with the stages the graph runs, model stages in micro-batches of `micro_batch`. No score
/// cache. One result per input, in input order.
pub(super) fn juice_inline(
    cfg: &Config,
    m: &Models,
    device: &Device,
    epoch: u64,
    raws: Vec<crate::sample::RawSample>,
) -> Result<Juiced> {
    let v = &cfg.vision;
    let patch = cfg.patch_size;
    let micro = v.micro_batch.max(1);
    let stop_after = |stage: LastStage| cfg.last_stage == stage;
    let decoded = each(&DecodeStage(Decoder::new(cfg.decode.clone())), raws.into_iter().map(Ok).collect());
    if stop_after(LastStage::Decode) {
        return Ok(each(&Finish::<Decoded>::new(patch), decoded));
    }
    let scored = match &v.scorer {
        ScorerSpec::Cam => batched(&mut cam_scorer(cfg, m), decoded, micro),
        ScorerSpec::Attention(_) => batched(&mut attention_scorer(m, v, device)?, decoded, micro),
        ScorerSpec::Random => each(&PlainScorer { seed: Some(cfg.seed), patch }, decoded),
        ScorerSpec::None => each(&PlainScorer { seed: None, patch }, decoded),
    };
    if stop_after(LastStage::Score) {
        return Ok(each(&Finish::<Scored>::new(patch), scored));
    }
    let pruned = each(&PruneStage(v.prune), scored);
    if stop_after(LastStage::Prune) {
        return Ok(each(&Finish::<Pruned>::new(patch), pruned));
    }
    let mut extract = extract_stage(cfg, m);
    let juiced =
        if extract.classifier.is_none() { each(&extract, pruned) } else { batched(&mut extract, pruned, micro) };
    if stop_after(LastStage::Extract) {
        return Ok(juiced);
    }
    Ok(each(&enrich_stage(m, epoch), juiced))
}

type Items<T> = Vec<std::result::Result<T, SampleError>>;

/// A per-item stage over the items that are still samples; failures pass through in place.
fn each<S: Stage>(stage: &S, items: Items<S::In>) -> Items<S::Out> {
    items.into_iter().map(|i| i.and_then(|x| stage.process(x))).collect()
}

/// A micro-batch stage over the items that are still samples, `micro` at a time; failures pass through in
/// place.
fn batched<S: BatchStage>(stage: &mut S, items: Items<S::In>, micro: usize) -> Items<S::Out> {
    let mut out: Vec<Option<std::result::Result<S::Out, SampleError>>> = Vec::with_capacity(items.len());
    let mut pending: Vec<(usize, S::In)> = Vec::with_capacity(micro);
    let mut flush = |pending: &mut Vec<(usize, S::In)>, out: &mut Vec<Option<_>>| {
        let (slots, batch): (Vec<usize>, Vec<S::In>) = pending.drain(..).unzip();
        for (slot, r) in slots.into_iter().zip(stage.process_batch(batch)) {
            out[slot] = Some(r);
        }
    };
    for item in items {
        match item {
            Ok(x) => {
                pending.push((out.len(), x));
                out.push(None);
                if pending.len() == micro {
                    flush(&mut pending, &mut out);
                }
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    flush(&mut pending, &mut out);
    // `process_batch` returns one result per input (its contract); a short answer reads as a stage failure.
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(SampleError::new(
                    "",
                    crate::error::DropReason::StageFailed,
                    "a micro-batch stage returned fewer results than items",
                ))
            })
        })
        .collect()
}
