//! CLIP tokenizer throughput, single thread, on the 73 GCompris captions (`fixtures/gcompris/pairs.jsonl`):
//! `encode` (clean + BPE + framing), `count`, and `clean` alone, per caption and per token; plus one 1 MB caption.
//!
//! Run with `cargo bench --bench tokenize`. Criterion prints captions/s (`elements`) for the `captions` group and
//! tokens/s for the `tokens` group (the same work, with the number of content tokens as the throughput).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use juicer::text::tokenizer::{ClipTokenizer, clean};

fn captions() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gcompris/pairs.jsonl");
    std::fs::read_to_string(path)
        .expect("fixtures/gcompris/pairs.jsonl")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            v["caption"].as_str().expect("caption").to_owned()
        })
        .collect()
}

fn bench_tokenize(c: &mut Criterion) {
    let tok = ClipTokenizer::shared().expect("embedded vocabulary");
    let caps = captions();
    assert_eq!(caps.len(), 73);
    // Tokens the encoder emits (content, before truncation), for the tokens/s figure.
    let tokens: u64 = caps.iter().map(|t| tok.count(t) as u64).sum();

    let mut group = c.benchmark_group("captions");
    group.throughput(Throughput::Elements(caps.len() as u64));
    group.bench_function("encode_73", |b| {
        b.iter(|| {
            for t in &caps {
                black_box(tok.encode(black_box(t)));
            }
        })
    });
    group.bench_function("count_73", |b| {
        b.iter(|| {
            for t in &caps {
                black_box(tok.count(black_box(t)));
            }
        })
    });
    group.bench_function("clean_73", |b| {
        b.iter(|| {
            for t in &caps {
                black_box(clean(black_box(t)));
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("tokens");
    group.throughput(Throughput::Elements(tokens));
    group.bench_function("count_73", |b| {
        b.iter(|| {
            for t in &caps {
                black_box(tok.count(black_box(t)));
            }
        })
    });
    group.finish();

    let sentence = "The “quick” brown fox jumps over the lazy dog near the café &amp; the river. ";
    let big = sentence.repeat((1 << 20) / sentence.len() + 1);
    let mut group = c.benchmark_group("one_megabyte");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("encode", |b| b.iter(|| black_box(tok.encode(black_box(&big)))));
    group.bench_function("count", |b| b.iter(|| black_box(tok.count(black_box(&big)))));
    group.finish();
}

criterion_group!(benches, bench_tokenize);
criterion_main!(benches);
