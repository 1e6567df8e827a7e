//! Keyword options of `juicer.Loader` → the crate's [`JuicerBuilder`]. Every option the CLI's `juicer run` has,
//! under the same name with `_` for `-`; an unknown name is a `TypeError` and a bad value a `ValueError`, each
//! naming the option. Defaults are the crate's.

use std::path::PathBuf;

use juicer::vision::ExtractRule;
use juicer::vision::cache::ScoreCacheConfig;
use juicer::{DeviceSpec, EpochSize, JuicerBuilder, KeepPolicy, LastStage, OnError, PruneConfig, ScorerSpec};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Every option `Loader` takes, in the order `juicer.Loader`'s docs list them.
pub const NAMES: &[&str] = &[
    "batch_size",
    "seed",
    "device",
    "rank",
    "world_size",
    "epoch_size",
    "shuffle_buffer",
    "shuffle_shards",
    "limit",
    "scorer",
    "weights",
    "classifier",
    "classifier_weights",
    "keep_ratio",
    "keep_threshold",
    "keep_mass",
    "min_keep",
    "max_keep",
    "extract",
    "class_threshold",
    "class_temperature",
    "second_threshold",
    "top_k",
    "min_prob",
    "vocabulary",
    "template",
    "mix",
    "image_size",
    "patch_size",
    "score_size",
    "jpeg_draft",
    "decode_workers",
    "collate_workers",
    "reader_workers",
    "capacity",
    "micro_batch",
    "model_workers",
    "intra_op_threads",
    "on_error",
    "max_image_pixels",
    "max_member_bytes",
    "max_caption_bytes",
    "max_meta_bytes",
    "max_json_depth",
    "storage_options",
    "count_cache",
    "score_cache",
    "score_cache_max_bytes",
    "last_stage",
];

/// Reads one option's value, naming the option when it has the wrong type.
fn get<'a, 'py, T: FromPyObject<'a, 'py>>(name: &str, value: &'a Bound<'py, PyAny>) -> PyResult<T> {
    value.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        PyValueError::new_err(format!("option `{name}`: {e}"))
    })
}

fn bad(name: &str, what: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("option `{name}`: {what}"))
}

/// One of `choices`, else a `ValueError` listing them.
fn choice<'a>(name: &str, value: &Bound<'_, PyAny>, choices: &[&'a str]) -> PyResult<&'a str> {
    let s: String = get(name, value)?;
    choices.iter().copied().find(|c| *c == s).ok_or_else(|| bad(name, format!("`{s}` is not one of {choices:?}")))
}

/// The builder for `sources` with `options` applied.
pub fn builder(sources: Vec<String>, options: Option<&Bound<'_, PyDict>>) -> PyResult<JuicerBuilder> {
    let mut b = JuicerBuilder::new(sources);
    // Options that combine into one setting are gathered first.
    let (mut scorer, mut weights) = ("cam".to_string(), None::<PathBuf>);
    let mut prune = PruneConfig::default();
    let (mut keep_threshold, mut keep_mass) = (None::<f32>, None::<f32>);
    let mut extract = "tree";
    let (mut threshold, mut temperature) = (None::<f32>, None::<f32>);
    let (mut classifier, mut classifier_weights) = ("mobilenet-v2".to_string(), None::<PathBuf>);
    let (mut flat_only, mut score_cache, mut cache_bytes) = (Vec::<String>::new(), None::<PathBuf>, 1u64 << 30);
    let Some(options) = options else { return Ok(b) };
    for (key, value) in options.iter() {
        let name: String = key.extract()?;
        let n = name.as_str();
        let v = &value;
        b = match n {
            "batch_size" => {
                let s: usize = get(n, v)?;
                if s == 0 {
                    return Err(bad(n, "must be at least 1"));
                }
                b.batch_size(s)
            }
            "seed" => b.seed(get(n, v)?),
            "device" => {
                let s: String = get(n, v)?;
                b.device(s.parse::<DeviceSpec>().map_err(|e| bad(n, e))?)
            }
            "rank" => match get::<Option<usize>>(n, v)? {
                Some(r) => b.rank(r),
                None => b,
            },
            "world_size" => match get::<Option<usize>>(n, v)? {
                Some(w) => b.world_size(w),
                None => b,
            },
            "epoch_size" => b.epoch_size(match choice(n, v, &["auto", "exhaust", "drop", "repeat"])? {
                "auto" => EpochSize::Auto,
                "exhaust" => EpochSize::Exhaust,
                "drop" => EpochSize::DropRemainder,
                _ => EpochSize::RepeatRemainder,
            }),
            "shuffle_buffer" => b.shuffle_buffer(get(n, v)?),
            "shuffle_shards" => b.shuffle_shards(get(n, v)?),
            "limit" => match get::<Option<u64>>(n, v)? {
                Some(l) => b.limit(l),
                None => b,
            },
            "scorer" => {
                scorer = choice(n, v, &["cam", "attention", "random", "none"])?.to_string();
                b
            }
            "weights" => {
                weights = get::<Option<PathBuf>>(n, v)?;
                b
            }
            "classifier" => {
                classifier = get(n, v)?;
                b
            }
            "classifier_weights" => {
                classifier_weights = get::<Option<PathBuf>>(n, v)?;
                b
            }
            "keep_ratio" => {
                prune.policy = KeepPolicy::Ratio(get(n, v)?);
                b
            }
            "keep_threshold" => {
                keep_threshold = get(n, v)?;
                b
            }
            "keep_mass" => {
                keep_mass = get(n, v)?;
                b
            }
            "min_keep" => {
                prune.min_keep = get(n, v)?;
                b
            }
            "max_keep" => {
                prune.max_keep = get(n, v)?;
                b
            }
            "extract" => {
                extract = choice(n, v, &["tree", "flat"])?;
                b
            }
            "class_threshold" => {
                threshold = get(n, v)?;
                b
            }
            "class_temperature" => {
                temperature = get(n, v)?;
                b
            }
            "second_threshold" => match get::<Option<f32>>(n, v)? {
                Some(t) => b.second_threshold(t),
                None => b,
            },
            "top_k" => {
                flat_only.push(name.clone());
                b.top_k(get(n, v)?)
            }
            "min_prob" => {
                flat_only.push(name.clone());
                b.min_prob(get(n, v)?)
            }
            "vocabulary" => b.vocabulary(get::<PathBuf>(n, v)?),
            "template" => b.template(get(n, v)?),
            "mix" => b.mix(get(n, v)?),
            "image_size" => b.image_size(get(n, v)?),
            "patch_size" => b.patch_size(get(n, v)?),
            "score_size" => match get::<Option<usize>>(n, v)? {
                Some(s) => b.score_size(s),
                None => b,
            },
            "jpeg_draft" => b.jpeg_draft(get(n, v)?),
            "decode_workers" => b.decode_workers(get(n, v)?),
            "collate_workers" => b.collate_workers(get(n, v)?),
            "reader_workers" => b.reader_workers(get(n, v)?),
            "capacity" => b.capacity(get(n, v)?),
            "micro_batch" => b.micro_batch(get(n, v)?),
            "model_workers" => b.model_workers(get(n, v)?),
            "intra_op_threads" => b.intra_op_threads(get(n, v)?),
            "on_error" => b.on_error(match choice(n, v, &["drop", "fail"])? {
                "drop" => OnError::Drop,
                _ => OnError::Fail,
            }),
            "max_image_pixels" => b.max_image_pixels(get::<Option<u64>>(n, v)?.unwrap_or(u64::MAX)),
            "max_member_bytes" => b.max_member_bytes(get(n, v)?),
            "max_caption_bytes" => b.max_caption_bytes(get(n, v)?),
            "max_meta_bytes" => b.max_meta_bytes(get(n, v)?),
            "max_json_depth" => b.max_json_depth(get(n, v)?),
            "storage_options" => {
                let opts: std::collections::BTreeMap<String, String> = get(n, v)?;
                opts.into_iter().fold(b, |b, (k, v)| b.storage_option(k, v))
            }
            "count_cache" => match get::<Option<PathBuf>>(n, v)? {
                Some(dir) => b.count_cache(dir),
                None => b.no_count_cache(),
            },
            "score_cache" => {
                score_cache = get(n, v)?;
                b
            }
            "score_cache_max_bytes" => {
                cache_bytes = get(n, v)?;
                b
            }
            "last_stage" => {
                let s: String = get(n, v)?;
                b.last_stage(s.parse::<LastStage>().map_err(|e| bad(n, e))?)
            }
            other => {
                return Err(PyTypeError::new_err(format!(
                    "Loader() got an unexpected option `{other}` (options: {})",
                    NAMES.join(", ")
                )));
            }
        };
    }
    prune.policy = match (keep_threshold, keep_mass) {
        (Some(_), Some(_)) => return Err(bad("keep_mass", "give one of keep_ratio, keep_threshold, keep_mass")),
        (Some(t), None) => KeepPolicy::Threshold(t),
        (None, Some(m)) => KeepPolicy::Mass(m),
        (None, None) => prune.policy,
    };
    if extract == "tree" && !flat_only.is_empty() {
        return Err(bad(
            &flat_only[0],
            "top_k and min_prob choose classes under extract=\"flat\"; the tree rule uses class_threshold",
        ));
    }
    // The class head, and the tree rule calibrated for it unless class_threshold / class_temperature say.
    b = b.classifier_named(&classifier, classifier_weights.as_deref()).map_err(|e| bad("classifier", e))?;
    if extract == "flat" {
        b = b.extract(ExtractRule::Flat);
    } else {
        if let Some(t) = threshold {
            b = b.class_threshold(t);
        }
        if let Some(t) = temperature {
            b = b.class_temperature(t);
        }
    }
    let scorer = ScorerSpec::parse(&scorer, weights.as_deref()).map_err(|e| bad("scorer", e))?;
    b = b.scorer(scorer).prune(prune);
    if let Some(dir) = score_cache {
        b = b.score_cache(ScoreCacheConfig { dir, max_bytes: cache_bytes });
    }
    Ok(b)
}
