//! Measures the extract rules against the hand labels of the fixture photos (`fixtures/labels/gcompris.json`):
//! recall (images with at least one correct concept), precision (correct emitted concepts over all emitted; a
//! hypernym is correct when it is an ancestor of a label), the share of captions that gain a wrong concept, and
//! concepts per image, for the flat rule and the tree rule at keep 1.0 and 0.5. Prints a Markdown table (the
//! README's) and, with `--wrong`, every wrong concept with its sample.
//!
//! ```text
//! cargo run --release --example extract_eval -- [--temperatures 1,2.5] [--thresholds 0.5,0.7] [--second T] [--wrong]
//! ```

use juicer::vision::ExtractRule;
use juicer::vision::labels::{Labels, Tally};
use juicer::{DeviceSpec, JuicedBatch};

const SHARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/shards/gcompris-{000000..000002}.tar");
const LABELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/labels/gcompris.json");

fn run(labels: &Labels, rule: ExtractRule, keep: f32, second: Option<f32>, wrong: bool) -> juicer::Result<Tally> {
    let mut builder = JuicedBatch::builder([SHARDS]);
    if let Some(t) = second {
        builder = builder.second_threshold(t);
    }
    let loader =
        builder.device(DeviceSpec::Cpu).batch_size(16).shuffle_buffer(0).extract(rule).keep_ratio(keep).build()?;
    let mut tally = Tally::default();
    for batch in loader.iter()? {
        let b = batch?;
        for i in 0..b.len() {
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

fn main() -> juicer::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wrong = args.iter().any(|a| a == "--wrong");
    let list = |flag: &str, default: f32| -> Vec<f32> {
        match args.iter().position(|a| a == flag) {
            Some(i) => {
                args.get(i + 1).map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect()).unwrap_or_default()
            }
            None => vec![default],
        }
    };
    let second = args.iter().position(|a| a == "--second").and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok());
    let thresholds = list("--thresholds", juicer::vision::extract::DEFAULT_THRESHOLD);
    let temperatures = list("--temperatures", juicer::vision::extract::DEFAULT_TEMPERATURE);
    let labels = Labels::read(std::path::Path::new(LABELS))?;
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
            let t = run(&labels, *rule, keep, second, wrong)?;
            println!(
                "| {name} | {keep} | {:.2} ({}/{}) | {:.2} ({}/{}) | {:.1} % ({}) | {:.2} |",
                t.recall(),
                t.with_correct,
                t.images,
                t.precision(),
                t.correct,
                t.emitted,
                100.0 * t.wrong_caption_share(),
                t.wrong_captions,
                t.per_image()
            );
        }
    }
    Ok(())
}
