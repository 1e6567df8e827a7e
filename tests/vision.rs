//! The vision branch end to end: cam saliency on composed images with known object masks (against the random
//! baseline), the extract rule on the fixture photos (both outcomes, recomputed independently), one model forward
//! per image, determinism across decode worker counts, and vocabularies.
//!
//! Every assertion counts patches, classes or forwards; none measures time.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use burn::tensor::{Device, Tensor, TensorData};
use image::{Rgb, RgbImage, imageops};
use juicer::decode::{DecodeConfig, Decoder};
use juicer::model::mobilenet_v2;
use juicer::rng::SplitMix64;
use juicer::source::{ReadOptions, ShardWriter, resolve};
use juicer::vision::{Candidate, ExtractRule, Vocabulary, cam, select_classes};
use juicer::{Class, DeviceSpec, Error, JuicedBatch, Juicer, JuicerBuilder, ScorerSpec, Summary};

use crate::util::{fixtures, specs};

/// Model input side and patch side (the defaults): a 14×14 grid.
const SIZE: usize = 224;
const PATCH: usize = 16;
const GRID: usize = SIZE / PATCH;
const PATCHES: usize = GRID * GRID;
/// The extract defaults the tests recompute against.
const TOP_K: usize = 3;
const MIN_PROB: f32 = 0.15;
const MARGIN: f32 = 0.25;
const CAM_TOP: usize = 5;
/// Slack for a recomputed evidence share that sits on the threshold (float summation order).
const BORDER: f32 = 1e-4;

/// What one sample came out as.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    scores: Vec<f32>,
    kept: Vec<u32>,
    classes: Vec<Class>,
}

/// One epoch: keys in output order, outputs by key, counters.
struct Epoch {
    order: Vec<String>,
    out: BTreeMap<String, Out>,
    summary: Summary,
}

fn run(loader: &Juicer<JuicedBatch>) -> Epoch {
    let mut it = loader.iter().expect("start epoch");
    let (mut order, mut out) = (Vec::new(), BTreeMap::new());
    for batch in it.by_ref() {
        let b = batch.expect("batch");
        assert_eq!((b.grid, b.patch), ((GRID, GRID), PATCH));
        for i in 0..b.len() {
            order.push(b.keys[i].clone());
            let o = Out { scores: b.scores[i].clone(), kept: b.kept[i].clone(), classes: b.classes[i].clone() };
            assert!(out.insert(b.keys[i].clone(), o).is_none(), "key {} emitted twice", b.keys[i]);
        }
    }
    let summary = it.summary();
    assert_eq!(summary.read, summary.emitted + summary.dropped_total());
    Epoch { order, out, summary }
}

fn ids(classes: &[Class]) -> BTreeSet<u32> {
    classes.iter().filter_map(|c| c.id).collect()
}

fn names(classes: &[Class]) -> Vec<String> {
    classes.iter().map(|c| format!("{:?} {} ({:.2})", c.id, c.name, c.prob)).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Saliency on composed images with known object masks.
// ---------------------------------------------------------------------------------------------------------------

/// A textured object pasted on a background.
#[derive(Clone, Copy, Debug)]
enum Object {
    /// A square crop of a fixture photo: key, crop box `[left, top, side]` as fractions of the photo's width,
    /// height and short side.
    Photo(&'static str, [f32; 3]),
    /// Vertical black/white stripes, 2 px wide.
    Stripes,
    /// A black/yellow checkerboard of 6 px squares.
    Checker,
}

impl Object {
    fn name(self) -> &'static str {
        match self {
            Object::Photo(key, _) => key.trim_start_matches("animals-"),
            Object::Stripes => "stripes",
            Object::Checker => "checker",
        }
    }

    fn render(self, side: u32) -> RgbImage {
        match self {
            Object::Photo(key, [fx, fy, fs]) => {
                let photo = photo_rgb(key);
                let (w, h) = photo.dimensions();
                let s = (fs * w.min(h) as f32) as u32;
                let (x, y) = (((w - s) as f32 * fx) as u32, ((h - s) as f32 * fy) as u32);
                let crop = imageops::crop_imm(&photo, x, y, s, s).to_image();
                imageops::resize(&crop, side, side, imageops::FilterType::Triangle)
            }
            Object::Stripes => {
                RgbImage::from_fn(side, side, |x, _| if (x / 2) % 2 == 0 { Rgb([0; 3]) } else { Rgb([255; 3]) })
            }
            Object::Checker => RgbImage::from_fn(side, side, |x, y| {
                if (x / 6 + y / 6) % 2 == 0 { Rgb([20, 20, 20]) } else { Rgb([240, 220, 30]) }
            }),
        }
    }
}

fn photo_rgb(key: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join("gcompris").join(format!("{key}.webp"))).expect("fixture photo");
    image::load_from_memory(&bytes).expect("decode fixture photo").into_rgb8()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Background {
    Grey,
    Noise,
}

impl Background {
    fn name(self) -> &'static str {
        match self {
            Background::Grey => "grey",
            Background::Noise => "noise",
        }
    }

    /// Flat grey 128, or grey 128 plus Gaussian noise of σ = 10 grey levels per channel (seeded by `seed`).
    fn render(self, seed: u64) -> RgbImage {
        let mut img = RgbImage::from_pixel(SIZE as u32, SIZE as u32, Rgb([128; 3]));
        if self == Background::Noise {
            let mut r = SplitMix64::new(seed);
            for p in img.pixels_mut() {
                for c in p.0.iter_mut() {
                    // Box-Muller.
                    let (u1, u2) = (1.0 - r.unit_f64(), r.unit_f64());
                    let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    *c = (128.0 + 10.0 * g).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        img
    }
}

/// Where the object goes: top-left corner and side, in pixels of the 224×224 image.
const PLACEMENTS: [(u32, u32, u32); 6] = [
    (16, 16, 96),   // aligned to the 16-px grid, 6×6 patches
    (112, 96, 112), // aligned, 7×7 patches
    (37, 101, 88),  // unaligned
    (130, 21, 80),  // unaligned, the smallest
    (50, 60, 128),  // unaligned, larger: 64 object patches of the 98 kept
    (96, 0, 128),   // aligned, on the border, 8×8 patches
];

/// The patches (row-major) whose area is at least half inside the square `(x, y, side)`.
fn object_patches((x, y, side): (u32, u32, u32)) -> Vec<u32> {
    let overlap = |a: usize, lo: u32, len: u32| {
        let (s, e) = (a * PATCH, (a + 1) * PATCH);
        e.min((lo + len) as usize).saturating_sub(s.max(lo as usize))
    };
    (0..PATCHES)
        .filter(|&k| 2 * overlap(k % GRID, x, side) * overlap(k / GRID, y, side) >= PATCH * PATCH)
        .map(|k| k as u32)
        .collect()
}

struct Case {
    key: String,
    object: Object,
    background: Background,
    mask: Vec<u32>,
    image: RgbImage,
}

const OBJECTS: [Object; 6] = [
    Object::Photo("animals-giant_panda", [0.53, 0.3, 0.85]),
    Object::Photo("animals-koala", [0.5, 0.6, 0.8]),
    Object::Photo("animals-jaguar", [0.47, 0.78, 0.8]),
    Object::Photo("animals-scarlet_macaw", [0.66, 0.76, 0.85]),
    Object::Stripes,
    Object::Checker,
];

fn composed_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (o, object) in OBJECTS.into_iter().enumerate() {
        for background in [Background::Grey, Background::Noise] {
            for (p, placement @ (x, y, side)) in PLACEMENTS.into_iter().enumerate() {
                let mut image = background.render((o * 16 + p) as u64);
                imageops::replace(&mut image, &object.render(side), i64::from(x), i64::from(y));
                let key = format!("{}-{}-p{p}", object.name(), background.name());
                cases.push(Case { key, object, background, mask: object_patches(placement), image });
            }
        }
    }
    cases
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).expect("encode png");
    out
}

fn composed_builder(shards: Vec<String>) -> JuicerBuilder {
    JuicedBatch::builder(shards)
        .device(DeviceSpec::Cpu)
        .batch_size(8)
        .seed(5)
        .shuffle_buffer(0)
        .decode_workers(2)
        .capacity(8)
        .extract(ExtractRule::Flat)
        .keep_ratio(0.5)
}

fn kept_share(mask: &[u32], kept: &[u32]) -> f64 {
    mask.iter().filter(|i| kept.binary_search(i).is_ok()).count() as f64 / mask.len() as f64
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = xs.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

#[test]
fn cam_keeps_the_object_patches_of_composed_images() {
    let dir = tempfile::tempdir().unwrap();
    let cases = composed_cases();
    let mut w = ShardWriter::new(dir.path(), "composed", usize::MAX, u64::MAX).unwrap();
    for c in &cases {
        w.write(&c.key, &[("png", &png(&c.image))]).unwrap();
    }
    let shards = specs(&w.finish().unwrap());
    let cam = run(&composed_builder(shards.clone()).scorer(ScorerSpec::Cam).build().unwrap());
    let random = run(&composed_builder(shards).scorer(ScorerSpec::Random).build().unwrap());
    assert_eq!((cam.summary.emitted, random.summary.emitted), (cases.len() as u64, cases.len() as u64));

    let mut rows = Vec::new();
    println!("{:<28} {:>7} {:>6} {:>6}  cam classes", "image", "object", "cam", "random");
    for c in &cases {
        let (oc, or) = (&cam.out[&c.key], &random.out[&c.key]);
        assert_eq!((oc.kept.len(), or.kept.len()), (PATCHES / 2, PATCHES / 2), "{}", c.key);
        let (sc, sr) = (kept_share(&c.mask, &oc.kept), kept_share(&c.mask, &or.kept));
        println!(
            "{:<28} {:>7} {:>5.1}% {:>5.1}%  {:?}",
            c.key,
            c.mask.len(),
            100.0 * sc,
            100.0 * sr,
            names(&oc.classes)
        );
        rows.push((c, sc, sr));
    }
    println!("\nper object and background (mean over {} placements): cam / random", PLACEMENTS.len());
    for object in OBJECTS {
        for background in [Background::Grey, Background::Noise] {
            let sel: Vec<_> =
                rows.iter().filter(|(c, ..)| c.object.name() == object.name() && c.background == background).collect();
            println!(
                "  {:<14} {:<6} {:>5.1}% / {:>5.1}%",
                object.name(),
                background.name(),
                100.0 * mean(sel.iter().map(|r| r.1)),
                100.0 * mean(sel.iter().map(|r| r.2))
            );
        }
    }
    let by_bg =
        |b: Background, f: fn(&(&Case, f64, f64)) -> f64| mean(rows.iter().filter(|r| r.0.background == b).map(f));
    let (cam_all, random_all) = (mean(rows.iter().map(|r| r.1)), mean(rows.iter().map(|r| r.2)));
    println!(
        "grey: cam {:.1}% random {:.1}%; noise: cam {:.1}% random {:.1}%; all {} images: cam {:.1}% random {:.1}%",
        100.0 * by_bg(Background::Grey, |r| r.1),
        100.0 * by_bg(Background::Grey, |r| r.2),
        100.0 * by_bg(Background::Noise, |r| r.1),
        100.0 * by_bg(Background::Noise, |r| r.2),
        rows.len(),
        100.0 * cam_all,
        100.0 * random_all
    );
    let worst = rows.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("cases");
    println!("lowest cam share: {} {:.1}%", worst.0.key, 100.0 * worst.1);
    assert!(cam_all >= 0.90, "cam keeps {:.1}% of the object patches, below 90%", 100.0 * cam_all);
    for b in [Background::Grey, Background::Noise] {
        let share = by_bg(b, |r| r.1);
        assert!(share >= 0.90, "cam keeps {:.1}% of the object patches on {} backgrounds", 100.0 * share, b.name());
    }
    assert!((0.35..=0.65).contains(&random_all), "random keeps {:.1}% of the object patches", 100.0 * random_all);
    assert!(cam_all >= random_all + 0.3, "cam {cam_all:.3} does not clearly beat random {random_all:.3}");
}

// ---------------------------------------------------------------------------------------------------------------
// 2-4. The fixture photos: extract at keep 1.0 and 0.5, forwards per image, determinism.
// ---------------------------------------------------------------------------------------------------------------

const FIXTURE_SAMPLES: u64 = 73;

fn fixture_spec() -> String {
    fixtures().join("shards/gcompris-{000000..000002}.tar").display().to_string()
}

fn fixture_builder() -> JuicerBuilder {
    JuicedBatch::builder([fixture_spec()])
        .device(DeviceSpec::Cpu)
        .batch_size(8)
        .seed(17)
        .shuffle_buffer(24)
        .capacity(8)
        .scorer(ScorerSpec::Cam)
        .extract(ExtractRule::Flat)
}

/// The cam epochs several tests read: keep 1.0 (every candidate passes) and keep 0.5 (three decode workers).
struct FixtureRuns {
    full: Epoch,
    half: Epoch,
}

static RUNS: LazyLock<FixtureRuns> = LazyLock::new(|| FixtureRuns {
    full: run(&fixture_builder().keep_ratio(1.0).decode_workers(2).build().expect("build keep 1.0")),
    half: run(&fixture_builder().keep_ratio(0.5).decode_workers(3).build().expect("build keep 0.5")),
});

/// The cam scorer's forward recomputed outside the pipeline, one image at a time: candidates (top `TOP_K`) with
/// their class maps on the patch grid, and the saliency (top `CAM_TOP` maps weighted by probability).
struct Reference {
    candidates: Vec<Candidate>,
    saliency: Vec<f32>,
}

fn reference_forwards() -> BTreeMap<String, Reference> {
    let device = Device::flex();
    let model = mobilenet_v2::embedded(&device).expect("embedded weights");
    let weight = model.classifier_weight().into_data().try_to_vec::<f32>().expect("f32 weight");
    let decoder = Decoder::new(DecodeConfig::default());
    let mut out = BTreeMap::new();
    for shard in resolve(&[fixture_spec()], 256).expect("fixture shards") {
        for raw in shard.open(0, &ReadOptions::default()).expect("open shard") {
            let d = decoder.decode(raw.expect("sample")).expect("decode");
            let x = Tensor::<4>::from_data(TensorData::new(d.pixels, [1, 3, SIZE, SIZE]), &device);
            let (features, logits) = model.forward(x);
            let [_, channels, fh, fw] = features.dims();
            let f = features.into_data().try_to_vec::<f32>().expect("features");
            let probs = cam::softmax(&logits.into_data().try_to_vec::<f32>().expect("logits"));
            let top: Vec<Candidate> = cam::top_k(&probs, CAM_TOP)
                .into_iter()
                .map(|(c, prob)| {
                    let map = cam::class_map(&f, &weight[c * channels..(c + 1) * channels]);
                    Candidate { id: c as u32, prob, map: cam::resample_bilinear(&map, (fh, fw), (GRID, GRID)) }
                })
                .collect();
            let mut saliency = vec![0f32; PATCHES];
            for c in &top {
                for (s, m) in saliency.iter_mut().zip(&c.map) {
                    *s += c.prob * m;
                }
            }
            out.insert(d.key, Reference { candidates: top.into_iter().take(TOP_K).collect(), saliency });
        }
    }
    out
}

/// The kept half of the patches: scores high to low, ties by lower index, sorted ascending.
fn top_half(scores: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    let mut kept = order[..scores.len().div_ceil(2)].to_vec();
    kept.sort_unstable();
    kept
}

/// A class map's positive mass inside the kept patches over its total positive mass (0 without positive mass).
fn evidence_share(map: &[f32], kept: &[u32]) -> f32 {
    let total: f64 = map.iter().map(|&v| f64::from(v.max(0.0))).sum();
    let inside: f64 = kept.iter().map(|&i| f64::from(map[i as usize].max(0.0))).sum();
    if total > 0.0 { (inside / total) as f32 } else { 0.0 }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn extract_drops_exactly_the_classes_whose_evidence_was_pruned() {
    let runs = &*RUNS;
    let reference = reference_forwards();
    assert_eq!(reference.len() as u64, FIXTURE_SAMPLES);
    assert_eq!(runs.full.out.len(), reference.len());
    assert_eq!(runs.half.out.len(), reference.len());
    let rho = 0.5f32;
    let need = rho + MARGIN * (1.0 - rho);
    assert_eq!(need, 0.625);
    let (mut kept_all, mut dropped, mut no_class, mut borderline) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut worst_diff = 0f32;
    for (key, r) in &reference {
        let (full, half) = (&runs.full.out[key], &runs.half.out[key]);
        // The pipeline's scores are those of the reference forward, whatever micro-batch the image ran in.
        assert_eq!(full.scores, half.scores, "{key}: scores do not depend on the keep ratio");
        let scale = r.saliency.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&half.scores, &r.saliency);
        assert!(diff <= 1e-4 * scale, "{key}: scores differ from the reference forward by {diff} (scale {scale})");
        worst_diff = worst_diff.max(diff / scale);
        assert_eq!(full.kept, (0..PATCHES as u32).collect::<Vec<_>>(), "{key}: keep 1.0 keeps every patch");
        assert_eq!(half.kept, top_half(&half.scores), "{key}: keep 0.5 keeps the top half");

        // Keep 1.0 (ρ = 1): every candidate at or above min_prob passes.
        let candidates: Vec<&Candidate> = r.candidates.iter().filter(|c| c.prob >= MIN_PROB).collect();
        assert_eq!(
            full.classes.iter().map(|c| c.id).collect::<Vec<_>>(),
            candidates.iter().map(|c| Some(c.id)).collect::<Vec<_>>(),
            "{key}: full-image classes"
        );
        for (c, cand) in full.classes.iter().zip(&candidates) {
            assert!((c.prob - cand.prob).abs() < 1e-4, "{key}: {:?} prob {} vs reference {}", c.id, c.prob, cand.prob);
            // The vocabulary's name, or the synonym the caption names it by ("chameleon" for African chameleon).
            let v = Vocabulary::imagenet().unwrap();
            assert!(v.synonyms(cand.id).contains(&c.name), "{key}: {} is not a name of {}", c.name, cand.id);
        }

        // Keep 0.5: a subset (same ids, names, probabilities, order) ...
        assert!(ids(&half.classes).is_subset(&ids(&full.classes)), "{key}: {:?} ⊄ {:?}", half.classes, full.classes);
        let kept_ids = ids(&half.classes);
        let subset: Vec<Class> =
            full.classes.iter().filter(|c| c.id.is_some_and(|i| kept_ids.contains(&i))).cloned().collect();
        assert_eq!(half.classes, subset, "{key}");
        // ... missing exactly the candidates with less than `need` of their evidence inside the kept patches.
        let mut report = Vec::new();
        let mut expected = BTreeSet::new();
        let mut border = BTreeSet::new();
        for (c, cand) in full.classes.iter().zip(&candidates) {
            let f = evidence_share(&cand.map, &half.kept);
            report.push(format!("{} {:.1}%", c.name, 100.0 * f));
            if (f - need).abs() < BORDER {
                border.insert(cand.id);
                borderline.push(format!("{key}: {} {f:.6}", c.name));
            } else if f >= need {
                expected.insert(cand.id);
            }
        }
        let decided: BTreeSet<u32> = kept_ids.difference(&border).copied().collect();
        assert_eq!(decided, expected, "{key}: evidence inside the kept patches {report:?}");

        let lost: Vec<String> = full
            .classes
            .iter()
            .filter(|c| !c.id.is_some_and(|i| kept_ids.contains(&i)))
            .map(|c| c.name.clone())
            .collect();
        let line = format!("{key:<40} {report:?}");
        match (full.classes.is_empty(), lost.is_empty()) {
            (true, _) => no_class.push(key.clone()),
            (false, true) => kept_all.push(line),
            (false, false) => dropped.push(format!("{line} -> drops {lost:?}")),
        }
    }
    println!("keep 0.5 keeps every full-image class ({}):", kept_all.len());
    kept_all.iter().for_each(|l| println!("  {l}"));
    println!("keep 0.5 drops a class ({}):", dropped.len());
    dropped.iter().for_each(|l| println!("  {l}"));
    println!("no class at or above min_prob {MIN_PROB} even on the full image ({}): {no_class:?}", no_class.len());
    println!("evidence share within {BORDER} of the threshold: {borderline:?}");
    println!("largest score difference to the one-image reference forward, relative: {worst_diff:e}");
    assert!(!kept_all.is_empty(), "no fixture keeps all its classes at keep 0.5");
    assert!(!dropped.is_empty(), "no fixture drops a class at keep 0.5");
}

fn candidate(id: u32, prob: f32, map: Vec<f32>) -> Candidate {
    Candidate { id, prob, map }
}

/// A 16-cell map holding `share` of its (unit) mass, spread evenly, over the first `k` cells.
fn map_with_share(share: f32, k: usize) -> Vec<f32> {
    (0..16).map(|i| if i < k { share / k as f32 } else { (1.0 - share) / (16 - k) as f32 }).collect()
}

fn select_ids(cands: &[Candidate], kept: usize, top_k: usize, margin: f32) -> Vec<u32> {
    let kept: Vec<u32> = (0..kept as u32).collect();
    let vocabulary = Vocabulary::imagenet().unwrap();
    select_classes(cands, &kept, 16, top_k, MIN_PROB, margin, &vocabulary).iter().filter_map(|c| c.id).collect()
}

#[test]
fn select_classes_keeps_a_class_only_with_enough_evidence_inside() {
    // A 4×4 grid, the first 8 patches kept: ρ = 0.5, a class needs 62.5 % of its positive mass inside.
    let panda = candidate(388, 0.6, map_with_share(0.8125, 8)); // 81.25 % inside: kept
    let koala = candidate(105, 0.3, map_with_share(0.5625, 8)); // 56.25 %: dropped
    let jaguar = candidate(290, 0.2, map_with_share(0.625, 8)); // exactly 62.5 %: kept
    let all = [panda.clone(), koala.clone(), jaguar.clone()];
    let vocabulary = Vocabulary::imagenet().unwrap();
    let classes = select_classes(&all, &(0..8).collect::<Vec<_>>(), 16, 3, MIN_PROB, MARGIN, &vocabulary);
    assert_eq!(
        classes.iter().map(|c| (c.id, c.name.as_str(), c.prob)).collect::<Vec<_>>(),
        vec![(Some(388), "giant panda", 0.6), (Some(290), "jaguar", 0.2)]
    );
    // Every class passes at ρ = 1; none at ρ = 1/16 with these maps.
    assert_eq!(select_ids(&all, 16, 3, MARGIN), vec![388, 105, 290]);
    assert_eq!(select_ids(&all, 1, 3, MARGIN), Vec::<u32>::new());
    // Candidates below min_prob never count, and only the first top_k are considered.
    let faint = candidate(88, MIN_PROB - 0.01, map_with_share(1.0, 8));
    assert_eq!(select_ids(&[faint.clone(), panda.clone()], 8, 3, MARGIN), vec![388]);
    assert_eq!(select_ids(&[koala.clone(), panda.clone(), jaguar.clone()], 8, 2, MARGIN), vec![388]);
    // Negative activations are no evidence: they neither dilute nor add.
    let mut negative_outside = vec![1.0; 8];
    negative_outside.extend([-3.0; 8]);
    let mut negative_inside = vec![-1.0; 8];
    negative_inside.extend([1.0; 8]);
    assert_eq!(
        select_ids(&[candidate(1, 0.5, negative_outside), candidate(2, 0.4, negative_inside)], 8, 3, MARGIN),
        vec![1]
    );
    // Margin 0: chance is enough (f ≥ ρ); margin 1: all the evidence must be inside.
    assert_eq!(select_ids(&all, 8, 3, 0.0), vec![388, 105, 290]);
    assert_eq!(select_ids(&all, 8, 3, 1.0), Vec::<u32>::new());
    assert_eq!(select_ids(&[candidate(1, 0.5, map_with_share(1.0, 8))], 8, 3, 1.0), vec![1]);
}

#[test]
fn select_classes_threshold_scales_with_the_keep_ratio() {
    // need(ρ) = ρ + 0.25 (1 − ρ): 43.75 % at ρ = 0.25, 62.5 % at 0.5, 81.25 % at 0.75, 100 % at 1.
    for (kept, need) in [(4usize, 0.4375f32), (8, 0.625), (12, 0.8125)] {
        let rho = kept as f32 / 16.0;
        assert_eq!(rho + MARGIN * (1.0 - rho), need);
        let at = candidate(388, 0.5, map_with_share(need, kept));
        let above = candidate(388, 0.5, map_with_share(need + 0.01, kept));
        let below = candidate(388, 0.5, map_with_share(need - 0.01, kept));
        assert_eq!(select_ids(&[at], kept, 3, MARGIN), vec![388], "ρ = {rho}: exactly {need} passes");
        assert_eq!(select_ids(&[above], kept, 3, MARGIN), vec![388], "ρ = {rho}");
        let below = [below];
        assert_eq!(select_ids(&below, kept, 3, MARGIN), Vec::<u32>::new(), "ρ = {rho}: below {need}");
        // A smaller margin lowers the bar at every ρ (by 0.05 (1 − ρ) here): the same map then passes.
        assert_eq!(select_ids(&below, kept, 3, MARGIN - 0.05), vec![388], "ρ = {rho}, margin 0.20");
    }
    // ρ = 0.25: 43.75 % passes, 43 % does not, though 43 % is well above chance (25 %).
    assert_eq!(select_ids(&[candidate(388, 0.5, map_with_share(0.4375, 4))], 4, 3, MARGIN), vec![388]);
    assert_eq!(select_ids(&[candidate(388, 0.5, map_with_share(0.43, 4))], 4, 3, MARGIN), Vec::<u32>::new());
    // ... and 43.75 % of the evidence in half the patches is below chance there.
    assert_eq!(select_ids(&[candidate(388, 0.5, map_with_share(0.4375, 8))], 8, 3, MARGIN), Vec::<u32>::new());
}

#[test]
fn one_classifier_forward_per_image() {
    let runs = &*RUNS;
    let n = FIXTURE_SAMPLES;
    for (name, e, kept) in [("cam keep 1.0", &runs.full, PATCHES), ("cam keep 0.5", &runs.half, PATCHES / 2)] {
        let s = &e.summary;
        assert_eq!((s.read, s.emitted, s.dropped_total()), (n, n, 0), "{name}: {s:?}");
        assert_eq!(s.classifier_images, s.emitted, "{name}: the cam path runs one forward per image");
        assert_eq!((s.patches_total, s.patches_kept), (n * PATCHES as u64, n * kept as u64), "{name}");
        assert_eq!(s.classes, e.out.values().map(|o| o.classes.len() as u64).sum::<u64>(), "{name}");
    }
    let random = run(&fixture_builder().scorer(ScorerSpec::Random).keep_ratio(0.5).decode_workers(2).build().unwrap());
    let s = &random.summary;
    assert_eq!((s.read, s.emitted, s.dropped_total()), (n, n, 0), "random: {s:?}");
    assert_eq!(s.classifier_images, s.emitted, "random: the extract stage runs the classifier once per image");
    assert_eq!((s.patches_total, s.patches_kept), (n * PATCHES as u64, n * (PATCHES / 2) as u64));
    println!(
        "classes at keep 0.5: cam {}, random {} (keep 1.0: {}) over {n} images",
        runs.half.summary.classes, s.classes, runs.full.summary.classes
    );
}

#[test]
fn cam_output_is_the_same_for_one_and_three_decode_workers() {
    let one = run(&fixture_builder().keep_ratio(0.5).decode_workers(1).build().unwrap());
    let three = &RUNS.half;
    assert_eq!(one.order.len() as u64, FIXTURE_SAMPLES);
    assert_eq!(one.order, three.order, "same seed, same sample order");
    for key in &one.order {
        assert_eq!(one.out[key], three.out[key], "{key}: scores, kept patches and classes");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Vocabulary.
// ---------------------------------------------------------------------------------------------------------------

const VOCAB_PHOTOS: [&str; 5] =
    ["animals-giant_panda", "animals-koala", "animals-polar_bear", "farm-sheep", "monuments-colosseum"];

fn photo_shard(dir: &Path) -> Vec<String> {
    let mut w = ShardWriter::new(dir, "photos", usize::MAX, u64::MAX).unwrap();
    for key in VOCAB_PHOTOS {
        let bytes = std::fs::read(fixtures().join("gcompris").join(format!("{key}.webp"))).unwrap();
        w.write(key, &[("webp", &bytes)]).unwrap();
    }
    specs(&w.finish().unwrap())
}

fn vocab_file(dir: &Path, name: &str, json: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn vocabulary_restricts_and_renames_classes() {
    let dir = tempfile::tempdir().unwrap();
    let shards = photo_shard(dir.path());
    let vocab = vocab_file(dir.path(), "panda.json", r#"{"388": "panda"}"#);
    let builder = || JuicedBatch::builder(shards.clone()).device(DeviceSpec::Cpu).batch_size(8).shuffle_buffer(0);
    let open = run(&builder().build().unwrap());
    let restricted = run(&builder().vocabulary(&vocab).build().unwrap());
    for key in VOCAB_PHOTOS {
        let (o, r) = (&open.out[key], &restricted.out[key]);
        println!("{key:<24} imagenet {:?} -> vocabulary {:?}", names(&o.classes), names(&r.classes));
        assert_eq!((&o.scores, &o.kept), (&r.scores, &r.kept), "{key}: a vocabulary changes classes only");
        let expected: Vec<Class> = o
            .classes
            .iter()
            .filter(|c| c.id == Some(388))
            .map(|c| Class { name: "panda".into(), ..c.clone() })
            .collect();
        assert_eq!(r.classes, expected, "{key}");
        if key == "animals-giant_panda" {
            assert_eq!(r.classes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["panda"]);
        } else {
            assert!(r.classes.is_empty(), "{key}: {:?}", r.classes);
        }
    }
    assert_eq!(restricted.summary.classes, 1);
}

#[test]
fn bad_vocabulary_fails_at_build_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = photo_shard(dir.path());
    let build = |vocab: &Path| JuicedBatch::builder(shards.clone()).device(DeviceSpec::Cpu).vocabulary(vocab).build();
    let bad_id = vocab_file(dir.path(), "bad-id.json", r#"{"388": "panda", "1000": "beyond", "cat": "not a number"}"#);
    match build(&bad_id) {
        Err(Error::Config(problems)) => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            let shown = bad_id.display().to_string();
            assert!(problems.iter().all(|p| p.contains(&shown)), "{problems:?}");
            assert!(problems.iter().any(|p| p.contains("`1000`")) && problems.iter().any(|p| p.contains("`cat`")));
        }
        other => panic!("expected a configuration error, got {:?}", other.map(|_| ())),
    }
    let not_json = vocab_file(dir.path(), "not-json.json", r#"["panda"]"#);
    let e = build(&not_json).map(|_| ()).expect_err("a list is not a vocabulary");
    assert!(matches!(e, Error::Json { .. }) && e.to_string().contains(&not_json.display().to_string()), "{e}");
    let missing = dir.path().join("missing.json");
    let e = build(&missing).map(|_| ()).expect_err("a missing vocabulary");
    assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
}

#[test]
fn bad_weights_fail_when_the_loader_is_built_naming_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated copy of the real weights, and a ViT folder whose config disagrees with its tensors.
    let bytes = std::fs::read(fixtures().join("mobilenet_v2/mobilenet_v2.safetensors")).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = fixture_builder().classifier_weights(&cut).build().unwrap_err().to_string();
    assert!(err.contains("cut.safetensors") && err.contains("tensor `"), "{err}");

    let vit = dir.path().join("vit");
    std::fs::create_dir(&vit).unwrap();
    for f in ["model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(fixtures().join("vit/vit_dino").join(f), vit.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixtures().join("vit/vit_dino/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["hidden_size"] = serde_json::json!(64);
    std::fs::write(vit.join("config.json"), config.to_string()).unwrap();
    let err = fixture_builder().scorer(ScorerSpec::Attention(vit.clone())).build().unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("config.json implies"), "{err}");
}
