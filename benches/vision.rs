//! The vision branch's per-image costs on the CPU (flex backend).
//!
//! ```text
//! cargo bench --bench vision
//! ```
//!
//! - `vision/cam_score/{1,8}`: the `cam` scorer stage ([`CamScorer`]) on a micro-batch of 1 or 8 decoded fixture
//!   photos: one MobileNetV2 forward, the class activation maps of the top classes resampled to the 14×14 patch grid,
//!   and the saliency mix. Criterion reports elements/s; time per image is the reciprocal.
//! - `vision/prune/ratio_0.5`: the keep policy (ratio 0.5) on the 196 cam scores of one photo.
//! - `vision/extract/3_candidates`: the extract rule ([`select_classes`], `min_prob` 0 so all 3 maps are summed) on
//!   that photo's 3 candidates and its 98 kept patches.
//!
//! - `mobilenet/{torchvision,folded}/{1,16}`: the bare MobileNetV2 forward (features + logits) on a batch of 1 or 16
//!   fixture photos, as loaded (conv + BatchNorm, torchvision's graph) and with the BatchNorms folded into the
//!   convolutions (what the scorer runs), side by side.
//!
//! Decoding is not measured. The whole run takes about two minutes.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use burn::tensor::Device;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use juicer::decode::{DecodeConfig, Decoder};
use juicer::sample::{Decoded, RawSample};
use juicer::stage::BatchStage;
use juicer::vision::prune::{KeepPolicy, PruneConfig};
use juicer::vision::{CamScorer, Candidate, Classifier, Vocabulary, select_classes};

/// Eight fixture photos (animals, farm, monuments).
const PHOTOS: [&str; 8] = [
    "animals-giant_panda",
    "animals-koala",
    "animals-jaguar",
    "animals-scarlet_macaw",
    "farm-sheep",
    "farm-cow",
    "monuments-colosseum",
    "monuments-neuschwanstein_castle",
];

fn decoded_photos() -> Vec<Decoded> {
    let decoder = Decoder::new(DecodeConfig::default());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gcompris");
    PHOTOS
        .iter()
        .map(|key| {
            let image = std::fs::read(dir.join(format!("{key}.webp"))).expect("fixture photo");
            let raw = RawSample {
                key: key.to_string(),
                image: image.into(),
                image_ext: "webp".into(),
                caption: None,
                meta: None,
            };
            decoder.decode(raw).expect("decode fixture photo")
        })
        .collect()
}

fn bench_vision(c: &mut Criterion) {
    let classifier = Classifier::load(None, &Device::flex()).expect("embedded MobileNetV2");
    let mut scorer = CamScorer { classifier, patch: 16, cam_top: 5, top_k: 3, score_size: 224 };
    let photos = decoded_photos();

    let mut group = c.benchmark_group("vision");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    // A forward takes tens of milliseconds: the same iteration count per sample keeps the run short.
    group.sampling_mode(SamplingMode::Flat);
    for micro_batch in [1usize, 8] {
        group.throughput(Throughput::Elements(micro_batch as u64));
        group.bench_with_input(BenchmarkId::new("cam_score", micro_batch), &micro_batch, |b, &n| {
            // The stage consumes its inputs: each iteration copies them (about 0.6 MB per image, well under 1 % of
            // the time), as the pipeline hands the stage freshly decoded images.
            b.iter(|| black_box(scorer.process_batch(photos[..n].to_vec())))
        });
    }

    // Prune and extract on the real output of one photo.
    let scored = scorer.process_batch(photos[..1].to_vec()).remove(0).expect("score");
    let prune = PruneConfig { policy: KeepPolicy::Ratio(0.5), ..PruneConfig::default() };
    let kept = prune.keep(&scored.scores);
    let candidates: Vec<Candidate> = scored.candidates.clone().expect("cam candidates");
    assert_eq!((scored.scores.len(), kept.len(), candidates.len()), (196, 98, 3));
    let vocabulary = Vocabulary::imagenet().expect("embedded vocabulary");

    group.sampling_mode(SamplingMode::Auto).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    group.bench_function("prune/ratio_0.5", |b| b.iter(|| black_box(prune.keep(black_box(&scored.scores)))));
    group.bench_function("extract/3_candidates", |b| {
        b.iter(|| black_box(select_classes(black_box(&candidates), black_box(&kept), 196, 3, 0.0, 0.25, &vocabulary)))
    });
    group.finish();
}

fn bench_mobilenet(c: &mut Criterion) {
    use burn::tensor::{Tensor, TensorData};
    use juicer::model::mobilenet_v2;
    let device = Device::flex();
    let photos = decoded_photos();
    let input = |n: usize| {
        let size = photos[0].size;
        let data: Vec<f32> = (0..n).flat_map(|i| photos[i % photos.len()].pixels.clone()).collect();
        Tensor::<4>::from_data(TensorData::new(data, [n, 3, size, size]), &device)
    };
    let plain = mobilenet_v2::embedded(&device).expect("embedded MobileNetV2");
    let folded = mobilenet_v2::embedded(&device).expect("embedded MobileNetV2").fold_batch_norms();
    let mut group = c.benchmark_group("mobilenet");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    for n in [1usize, 16] {
        let x = input(n);
        group.throughput(Throughput::Elements(n as u64));
        for (name, model) in [("torchvision", &plain), ("folded", &folded)] {
            group.bench_with_input(BenchmarkId::new(name, n), &x, |b, x| {
                b.iter(|| {
                    let (features, logits) = model.forward(x.clone());
                    black_box((features.into_data(), logits.into_data()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_vision, bench_mobilenet);
criterion_main!(benches);
