//! Decode-stage benchmarks: `Decoder::decode` per image (JPEG and WebP), its resize and normalise steps, and
//! `patchify` of a 224×224 input.
//!
//! Run with `cargo bench --bench decode`. The JPEG is a fixture photo re-encoded at quality 90 in the setup,
//! so no extra file is needed.

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use image::codecs::jpeg::JpegEncoder;
use juicer::decode::{DecodeConfig, Decoder};
use juicer::patch::{grid, patchify};
use juicer::sample::RawSample;

const PHOTO: &str = "animals-giant_panda"; // 1024×681 lossy WebP

fn raw(key: &str, image: Vec<u8>, ext: &str) -> RawSample {
    RawSample {
        key: key.to_string(),
        image: Bytes::from(image),
        image_ext: ext.to_string(),
        caption: Some("A giant panda.".to_string()),
        meta: None,
    }
}

fn bench_decode(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/gcompris/{PHOTO}.webp"));
    let webp = std::fs::read(&path).expect("fixture photo");
    let rgb = image::load_from_memory(&webp).expect("decodable fixture").into_rgb8();
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&rgb).expect("JPEG encoding");

    let decoder = Decoder::new(DecodeConfig::default());
    let webp_sample = raw(PHOTO, webp, "webp");
    let jpeg_sample = raw(PHOTO, jpeg, "jpg");

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_jpeg_q90_1024x681_to_224", |b| {
        b.iter(|| decoder.decode(black_box(jpeg_sample.clone())).expect("decodes"))
    });
    group.bench_function("decode_webp_1024x681_to_224", |b| {
        b.iter(|| decoder.decode(black_box(webp_sample.clone())).expect("decodes"))
    });
    group.bench_function("resize_crop_rgb8_1024x681_to_224", |b| b.iter(|| decoder.resize_crop_rgb8(black_box(&rgb))));
    let crop = decoder.resize_crop_rgb8(&rgb);
    group.bench_function("normalise_224", |b| b.iter(|| decoder.normalise(black_box(&crop))));
    group.finish();

    let pixels = decoder.normalise(&crop);
    let (rows, cols) = grid(224, 16);
    let all: Vec<u32> = (0..(rows * cols) as u32).collect();
    let half: Vec<u32> = all.iter().copied().filter(|k| k % 2 == 0).collect();
    let mut group = c.benchmark_group("patchify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("patchify_224_p16_all_196", |b| {
        b.iter(|| patchify(black_box(&pixels), 224, 16, black_box(&all)))
    });
    group.bench_function("patchify_224_p16_keep_98", |b| {
        b.iter(|| patchify(black_box(&pixels), 224, 16, black_box(&half)))
    });
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
