//! The extract rules against the hand labels of the 73 fixture photos (`fixtures/labels/gcompris.json`): the
//! default tree rule writes correct concepts into captions (precision ≥ 0.90, at most 10 % of captions gain a
//! wrong one) at keep 1.0 and 0.5; the flat rule, measured the same way, does not. The held-out set
//! (`fixtures/heldout`) is whole, and the default rule on its test half measures as the README says.

use juicer::vision::ExtractRule;
use juicer::vision::labels::{Labels, Tally};
use juicer::{DeviceSpec, JuicedBatch};

use crate::util::fixtures;

fn tally(rule: ExtractRule, keep: f32) -> Tally {
    let labels = Labels::read(&fixtures().join("labels/gcompris.json")).unwrap();
    assert_eq!(labels.len(), 73);
    let shards = fixtures().join("shards/gcompris-{000000..000002}.tar").display().to_string();
    let loader = JuicedBatch::builder([shards])
        .device(DeviceSpec::Cpu)
        .batch_size(16)
        .shuffle_buffer(0)
        .extract(rule)
        .keep_ratio(keep)
        .build()
        .unwrap();
    let mut t = Tally::default();
    for batch in loader.iter().unwrap() {
        let b = batch.unwrap();
        for i in 0..b.len() {
            t.add(&labels, &b.keys[i], &b.classes[i], &b.added[i]);
            // Every added concept is one of the extracted ones; the text before the added phrase is the caption or,
            // when the context is short, a prefix of it.
            let (text, caption) = (&b.enriched[i], b.captions[i].as_deref().unwrap_or(""));
            assert!(b.added[i].iter().all(|a| b.classes[i].contains(a)));
            if b.added[i].is_empty() {
                assert_eq!(text, caption);
            } else {
                let head =
                    [", with ", " Pictured: "].iter().filter_map(|sep| text.rfind(sep)).max().map(|at| &text[..at]);
                assert!(head.is_some_and(|h| !h.is_empty() && caption.trim().starts_with(h)), "{text}");
            }
            assert!(!text.contains(".,"), "{text}");
        }
    }
    assert_eq!(t.images, 73);
    t
}

#[test]
fn the_tree_rule_writes_correct_concepts_at_keep_1_and_0_5() {
    for keep in [1.0, 0.5] {
        let t = tally(ExtractRule::default(), keep);
        println!(
            "tree, keep {keep}: recall {:.2}, precision {:.2} ({}/{}), wrong captions {:.1} %, {:.2} per image",
            t.recall(),
            t.precision(),
            t.correct,
            t.emitted,
            100.0 * t.wrong_caption_share(),
            t.per_image()
        );
        assert!(t.precision() >= 0.90, "keep {keep}: {t:?}");
        assert!(t.wrong_caption_share() <= 0.10, "keep {keep}: {t:?}");
        assert!(t.recall() >= 0.25, "keep {keep}: {t:?}");
    }
}

#[test]
fn the_flat_rule_is_measured_by_the_same_yardstick() {
    // The flat rule names three guesses for one object; the labels count the wrong ones.
    let t = tally(ExtractRule::Flat, 1.0);
    println!("flat, keep 1.0: {t:?}");
    assert!(t.precision() < 0.6 && t.per_image() > 1.0, "{t:?}");
}

/// The held-out set (`fixtures/heldout`) is whole: every photo labelled, every label a photo, every label in the
/// calibration or the test half (74 / 71). The default rule measured on its test half through the pipeline stays
/// where the README's held-out table puts it (MobileNetV2, keep 1.0: recall 24/71, precision 24/30, 6 captions
/// wrong), within a photo or two for float differences between CPUs.
#[test]
fn heldout_set_is_whole_and_the_default_rule_measures_as_the_readme_says() {
    let dir = fixtures().join("heldout");
    let labels = Labels::read(&dir.join("labels.json")).unwrap();
    let photos: std::collections::BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str().and_then(|n| n.strip_suffix(".webp")).map(String::from))
        .collect();
    let keys: std::collections::BTreeSet<String> = labels.keys().map(String::from).collect();
    assert_eq!(keys.len(), 145);
    assert_eq!(photos, keys, "photos without labels or labels without photos");
    let half = |h: &str| keys.iter().filter(|k| labels.split(k) == Some(h)).count();
    assert_eq!((half("calibration"), half("test")), (74, 71));

    let loader = JuicedBatch::builder([dir.display().to_string()])
        .device(DeviceSpec::Cpu)
        .batch_size(16)
        .shuffle_buffer(0)
        .keep_ratio(1.0)
        .build()
        .unwrap();
    let mut t = Tally::default();
    for batch in loader.iter().unwrap() {
        let b = batch.unwrap();
        for i in (0..b.len()).filter(|&i| labels.split(&b.keys[i]) == Some("test")) {
            t.add(&labels, &b.keys[i], &b.classes[i], &b.added[i]);
        }
    }
    println!("held-out test half, default rule: {t:?}");
    assert_eq!(t.images, 71);
    assert!((22..=26).contains(&t.with_correct), "{t:?}");
    assert!((0.75..=0.85).contains(&t.precision()), "{t:?}");
    assert!((4..=8).contains(&t.wrong_captions), "{t:?}");
}
