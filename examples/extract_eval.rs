//! Measures the extract rules against the hand labels of the fixture photos (`fixtures/labels/gcompris.json`):
//! recall (images with at least one correct concept), precision (correct emitted concepts over all emitted; a
//! hypernym is correct when it is an ancestor of a label), the share of captions that gain a wrong concept, and
//! concepts per image, for the flat rule and the tree rule at keep 1.0 and 0.5. Prints a Markdown table (the
//! README's) and, with `--wrong`, every wrong concept with its sample.
//!
//! ```text
//! cargo run --release --example extract_eval -- [--temperatures 1,2.5] [--thresholds 0.5,0.7] [--second T] [--wrong]
//!     [--source SPEC --labels FILE[,FILE]] [--classifier NAME --classifier-weights FILE]
//! ```
//!
//! `--source` and `--labels` run the pipeline over other labelled photos (a folder with captions.jsonl works:
//! `fixtures/heldout` needs one listing its photos); when the labels carry a `split`, only the `test` photos are
//! tallied. `--classifier` picks the class head; the temperature and threshold default to its calibration.
//!
//! With `--logits FILE.jsonl --labels FILE.json`, it compares classifiers instead: `FILE.jsonl` holds ImageNet
//! logits per image, model and view (`benches/classifiers/logits.py` writes it), and each (model, view) runs
//! the tree rule at keep 1.0 over them, the same [`select_concepts`] the extract stage calls. When the labels
//! carry a `split` per photo (`calibration` / `test`), the temperature and threshold are **fitted on the
//! calibration half** (the highest recall with precision ≥ 0.90 and at most 5 % wrong captions there; ties: the
//! fewest wrong captions, then the higher threshold) and the table reports the **test half** only, beside the
//! crate's defaults on the same half. `--labels` takes several files, comma-separated: the photos of a file
//! without `split` join the calibration half (`fixtures/heldout/labels.json,fixtures/labels/gcompris.json`). `--view image,crop` also scores the rule on the mean of the two views'
//! probabilities (`image+crop`); `--ensemble a+b` the mean of two (or more) models' probabilities; `--list`
//! prints what the rule names for every photo.

use std::collections::{BTreeMap, BTreeSet};

use juicer::vision::extract::{TreeSettings, calibrated_rule, select_concepts};
use juicer::vision::labels::{Labels, Tally};
use juicer::vision::{Candidate, ClassifierSpec, ExtractRule, Vocabulary};
use juicer::{DeviceSpec, JuicedBatch};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");
const LABELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/labels/gcompris.json");

/// What the pipeline mode runs: which photos, which classifier, which of them count.
struct Setup {
    source: String,
    labels: Labels,
    classifier: ClassifierSpec,
    /// The test half when the labels have one (only those photos are tallied).
    only: Option<BTreeSet<String>>,
}

fn run(setup: &Setup, rule: ExtractRule, keep: f32, second: Option<f32>, wrong: bool) -> juicer::Result<Tally> {
    let labels = &setup.labels;
    let mut builder = JuicedBatch::builder([setup.source.as_str()]).classifier(setup.classifier.clone());
    if let Some(t) = second {
        builder = builder.second_threshold(t);
    }
    let loader =
        builder.device(DeviceSpec::Cpu).batch_size(16).shuffle_buffer(0).extract(rule).keep_ratio(keep).build()?;
    let mut tally = Tally::default();
    for batch in loader.iter()? {
        let b = batch?;
        for i in (0..b.len()).filter(|&i| setup.only.as_ref().is_none_or(|o| o.contains(&b.keys[i]))) {
            tally.add(labels, &b.keys[i], &b.classes[i], &b.added[i]);
            if wrong {
                for c in b.classes[i].iter().filter(|c| labels.correct(&b.keys[i], c) == Some(false)) {
                    println!("  wrong: {} {:<28} {} ({:.2})", rule.name(), b.keys[i], c.name, c.prob);
                }
            }
        }
    }
    Ok(tally)
}

/// Probabilities per (model, view) and image key.
type Probs = BTreeMap<(String, String), BTreeMap<String, Vec<f32>>>;

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / total) as f32).collect()
}

fn read_logits(path: &str) -> juicer::Result<Probs> {
    let text = std::fs::read_to_string(path).map_err(|e| juicer::Error::io(format!("reading {path}"), e))?;
    let mut out = Probs::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| juicer::Error::Json { context: format!("logits {path}"), source: e })?;
        let field = |k: &str| row[k].as_str().unwrap_or_default().to_string();
        let logits: Vec<f32> =
            row["logits"].as_array().into_iter().flatten().filter_map(|v| v.as_f64()).map(|v| v as f32).collect();
        if logits.len() != 1000 {
            return Err(juicer::Error::Config(vec![format!("{path}: {} has {} logits", field("key"), logits.len())]));
        }
        out.entry((field("model"), field("view"))).or_default().insert(field("key"), softmax(&logits));
    }
    Ok(out)
}

/// The tree rule at keep 1.0 over precomputed probabilities (every patch kept, so only the probabilities count).
fn tally_probs(labels: &Labels, probs: &BTreeMap<String, Vec<f32>>, keys: &[String], t: f32, th: f32) -> Tally {
    let wrong = std::env::args().any(|a| a == "--wrong");
    let list = std::env::args().any(|a| a == "--list");
    let classes_txt = |i: usize| juicer::model::mobilenet_v2::imagenet_classes().get(i).copied().unwrap_or("?");
    let vocabulary = Vocabulary::imagenet().expect("embedded vocabulary");
    let settings = TreeSettings {
        threshold: th,
        temperature: t,
        confident: juicer::vision::extract::DEFAULT_CONFIDENT,
        second_threshold: None,
        margin: 0.25, // no effect here: every patch is kept
    };
    let all: Vec<u32> = (0..49).collect();
    let mut tally = Tally::default();
    for key in keys {
        let Some(p) = probs.get(key) else { continue };
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
        let candidates: Vec<Candidate> =
            order[..10].iter().map(|&id| Candidate { id, prob: p[id as usize], map: vec![1.0; 49] }).collect();
        let classes = select_concepts(p, &candidates, &all, 49, settings, &vocabulary);
        if list {
            let named: Vec<String> = classes
                .iter()
                .map(|c| format!("{}{}", c.name, if labels.correct(key, c) == Some(false) { " (WRONG)" } else { "" }))
                .collect();
            let top = order[0] as usize;
            println!(
                "  {key:<28} t = {t}, T = {th}: [{}]  top-1 {} ({:.2})",
                named.join(", "),
                classes_txt(top),
                p[top]
            );
        }
        if wrong {
            for c in classes.iter().filter(|c| labels.correct(key, c) == Some(false)) {
                println!("  wrong (t = {t}, T = {th}): {key:<28} {} ({:.2})", c.name, c.prob);
            }
        }
        tally.add(labels, key, &classes, &classes);
    }
    tally
}

fn row(name: &str, t: &Tally) -> String {
    format!(
        "| {name} | {:.2} ({}/{}) | {:.2} ({}/{}) | {:.1} % ({}) | {:.2} |",
        t.recall(),
        t.with_correct,
        t.images,
        t.precision(),
        t.correct,
        t.emitted,
        100.0 * t.wrong_caption_share(),
        t.wrong_captions,
        t.per_image()
    )
}

/// The value after `--name` on the command line.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// `--labels a.json,b.json`: every file's labels, merged.
fn read_labels(paths: &str) -> juicer::Result<Labels> {
    let mut files = paths.split(',').map(|p| Labels::read(std::path::Path::new(p)));
    let first = files.next().ok_or_else(|| juicer::Error::Config(vec!["--labels needs a file".into()]))??;
    files.try_fold(first, |all, next| all.merge(next?))
}

/// `--logits` mode (module docs).
fn compare(args: &[String], logits: &str) -> juicer::Result<()> {
    let value = |name: &str| flag(args, name);
    let labels_path = value("--labels").unwrap_or_else(|| LABELS.to_string());
    let labels = read_labels(&labels_path)?;
    let has_split = labels.keys().any(|k| labels.split(k).is_some());
    let mut halves: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in labels.keys() {
        let half = labels.split(key).unwrap_or(if has_split { "calibration" } else { "all" });
        halves.entry(half.to_string()).or_default().push(key.to_string());
    }
    let (fit, test) = match (halves.get("calibration"), halves.get("test")) {
        (Some(c), Some(t)) => (c.clone(), t.clone()),
        _ => {
            let all: Vec<String> = halves.values().flatten().cloned().collect();
            (all.clone(), all)
        }
    };
    let mut probs = read_logits(logits)?;
    let views: Vec<String> = value("--view").unwrap_or_else(|| "image".into()).split(',').map(String::from).collect();
    if views.iter().any(|v| v == "crop") {
        let models: Vec<String> = probs.keys().map(|(m, _)| m.clone()).collect();
        for model in models {
            let (Some(image), Some(crop)) =
                (probs.get(&(model.clone(), "image".into())), probs.get(&(model.clone(), "crop".into())))
            else {
                continue;
            };
            let mean: BTreeMap<String, Vec<f32>> = image
                .iter()
                .filter_map(|(k, a)| {
                    crop.get(k).map(|b| (k.clone(), a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect()))
                })
                .collect();
            probs.insert((model, "image+crop".into()), mean);
        }
    }
    // `--ensemble a+b,...`: the mean of the named models' probabilities per view, as one more classifier.
    for combo in value("--ensemble").unwrap_or_default().split(',').filter(|c| !c.is_empty()) {
        let members: Vec<&str> = combo.split('+').collect();
        let views: Vec<String> = probs.keys().filter(|(m, _)| m == members[0]).map(|(_, v)| v.clone()).collect();
        for view in views {
            let parts: Option<Vec<&BTreeMap<String, Vec<f32>>>> =
                members.iter().map(|m| probs.get(&((*m).to_string(), view.clone()))).collect();
            let Some(parts) = parts else { continue };
            let mean: BTreeMap<String, Vec<f32>> = parts[0]
                .keys()
                .filter(|k| parts.iter().all(|p| p.contains_key(*k)))
                .map(|k| {
                    let mut m = vec![0f32; 1000];
                    for p in &parts {
                        for (a, b) in m.iter_mut().zip(&p[k]) {
                            *a += b / parts.len() as f32;
                        }
                    }
                    (k.clone(), m)
                })
                .collect();
            probs.insert((combo.to_string(), view), mean);
        }
    }
    println!("Fitted on {} calibration photos, reported on {} test photos ({labels_path}).\n", fit.len(), test.len());
    println!("| classifier (view; t, T) | recall | precision | captions with a wrong concept | concepts per image |");
    println!("|---|---|---|---|---|");
    let temperatures = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0];
    let thresholds = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
    for ((model, view), p) in &probs {
        if !(views.contains(view) || view == "image+crop" && views.iter().any(|v| v == "crop")) {
            continue;
        }
        let defaults = tally_probs(
            &labels,
            p,
            &test,
            juicer::vision::extract::DEFAULT_TEMPERATURE,
            juicer::vision::extract::DEFAULT_THRESHOLD,
        );
        println!("{}", row(&format!("{model} ({view}; defaults)"), &defaults));
        let mut best: Option<(f32, f32, Tally)> = None;
        for &t in &temperatures {
            for &th in &thresholds {
                let c = tally_probs(&labels, p, &fit, t, th);
                if c.precision() < 0.90 || c.wrong_caption_share() > 0.05 {
                    continue;
                }
                let better = best.as_ref().is_none_or(|(_, bth, b)| {
                    (c.recall(), -c.wrong_caption_share(), th) > (b.recall(), -b.wrong_caption_share(), *bth)
                });
                if better {
                    best = Some((t, th, c));
                }
            }
        }
        match best {
            Some((t, th, _)) => {
                let tally = tally_probs(&labels, p, &test, t, th);
                println!("{}", row(&format!("{model} ({view}; fitted t = {t}, T = {th})"), &tally));
            }
            None => println!("| {model} ({view}) | no setting reaches the calibration bounds | | | |"),
        }
    }
    Ok(())
}

fn main() -> juicer::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--logits") {
        let Some(path) = flag(&args, "--logits") else {
            return Err(juicer::Error::Config(vec!["--logits needs a file".into()]));
        };
        return compare(&args, &path);
    }
    let wrong = args.iter().any(|a| a == "--wrong");
    let list = |name: &str, default: f32| -> Vec<f32> {
        match flag(&args, name) {
            Some(v) => v.split(',').filter_map(|t| t.parse().ok()).collect(),
            None if args.iter().any(|a| a == name) => Vec::new(),
            None => vec![default],
        }
    };
    let value = |name: &str| flag(&args, name);
    let second = value("--second").and_then(|s| s.parse().ok());
    let weights = value("--classifier-weights").map(std::path::PathBuf::from);
    let classifier =
        ClassifierSpec::parse(&value("--classifier").unwrap_or_else(|| "mobilenet-v2".into()), weights.as_deref())?;
    let ExtractRule::Tree { threshold, temperature, .. } = calibrated_rule(&classifier) else {
        return Err(juicer::Error::Config(vec!["the calibrated rule is the tree rule".into()]));
    };
    let thresholds = list("--thresholds", threshold);
    let temperatures = list("--temperatures", temperature);
    let labels = read_labels(&value("--labels").unwrap_or_else(|| LABELS.to_string()))?;
    let has_test = labels.keys().any(|k| labels.split(k) == Some("test"));
    let only = has_test.then(|| labels.keys().filter(|k| labels.split(k) == Some("test")).map(String::from).collect());
    let setup = Setup { source: value("--source").unwrap_or_else(|| SHARDS.to_string()), labels, classifier, only };
    if let Some(only) = &setup.only {
        println!("{} ({}): the {} test photos of the labels\n", setup.source, setup.classifier.name(), only.len());
    }
    let mut rules = vec![("flat (top-3, p ≥ 0.15)".to_string(), ExtractRule::Flat)];
    for &temperature in &temperatures {
        for &threshold in &thresholds {
            rules.push((
                format!("tree, t = {temperature}, T = {threshold}"),
                ExtractRule::Tree { threshold, temperature, confident: juicer::vision::extract::DEFAULT_CONFIDENT },
            ));
        }
    }
    println!("| rule | keep | recall | precision | captions with a wrong concept | concepts per image |");
    println!("|---|---|---|---|---|---|");
    for (name, rule) in &rules {
        for keep in [1.0, 0.5] {
            let t = run(&setup, *rule, keep, second, wrong)?;
            println!("{}", row(&format!("{name} | {keep}"), &t));
        }
    }
    Ok(())
}
