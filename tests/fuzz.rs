//! The fuzz targets' bodies ([`juicer::fuzzing`]) over every committed input: `fuzz/corpus/TARGET/*` (seeds
//! made from the fixtures, and what fuzzing runs added) and `fuzz/regressions/TARGET/*` (inputs that once broke
//! a body). A stable `cargo test` thereby checks what the nightly fuzzer found, without a sanitizer build.
//!
//! `write_fuzz_seeds` (ignored) regenerates the seeds from the fixtures:
//! `cargo test --release --test integration -- --ignored write_fuzz_seeds`.

use std::io::Write;
use std::path::{Path, PathBuf};

use juicer::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted by name (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("dir entry").path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn every_fuzz_target_replays_its_corpus_and_regressions() {
    for (name, body) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seed: run write_fuzz_seeds");
        let regressions = inputs(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read input");
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(run.is_ok(), "fuzz target `{name}` fails on {}", path.display());
        }
        // Edge inputs every target must survive.
        for data in [&b""[..], b"\0", b"{", &[0xff; 1024]] {
            body(data);
        }
    }
}

#[test]
fn every_fuzz_target_has_a_cargo_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let src = std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|_| panic!("fuzz/fuzz_targets/{name}.rs is missing"));
        assert!(src.contains(&format!("juicer::fuzzing::{name}(data)")), "{name}.rs does not call its body");
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
    }
}

/// A fixture photo shrunk to `w`×`h`.
fn tiny_photo(w: u32, h: u32) -> image::RgbImage {
    let photo = image::open(crate::util::fixtures().join("gcompris/animals-bison.webp")).expect("fixture photo");
    image::imageops::thumbnail(&photo.into_rgb8(), w, h)
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *data).expect("append");
    }
    builder.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the fixtures or the targets"]
fn write_fuzz_seeds() {
    let img = tiny_photo(16, 12);
    let (jpg, png) = (encode(&img, image::ImageFormat::Jpeg), encode(&img, image::ImageFormat::Png));
    let webp = encode(&img, image::ImageFormat::WebP);
    let captions: Vec<String> = juicer::source::resolve(&["fixtures/shards/gcompris-000000.tar".to_string()], 1)
        .expect("fixture shard")
        .iter()
        .flat_map(|s| s.open(0, &juicer::source::ReadOptions::default()).expect("open"))
        .filter_map(|s| s.ok().and_then(|s| s.caption))
        .take(4)
        .collect();
    let meta = br#"{"url": "https://example.org/bison.webp", "size": [1024, 768], "tags": [["animal"], {"a": null}]}"#;
    let long = format!("{}/k.jpg", "deep/".repeat(30));
    let two = tar_of(&[
        ("a.jpg", &jpg),
        ("a.txt", captions[0].as_bytes()),
        ("a.json", meta),
        ("b.png", &png),
        ("b.txt.gz", &gzip(captions[1].as_bytes())),
        ("b.cls", b"3"),
    ]);
    let odd = tar_of(&[(long.as_str(), &webp), ("__meta__", b"x"), ("c.webp", &webp), ("noext", b"y")]);
    let state = serde_json::to_vec(&juicer::LoaderState {
        buffer: vec![juicer::SourcePos { pass: 0, shard: 1, index: 3 }],
        buffer_offsets: vec![Some(1536)],
        cursor: juicer::SourcePos { pass: 0, shard: 1, index: 5 },
        cursor_offset: Some(4096),
        n_shards: Some(4),
        shuffle_shards: Some(true),
        ..juicer::LoaderState::start(5, 1, juicer::World::default(), "fingerprint".into(), 8)
    })
    .expect("state json");
    let manifest = juicer::source::Manifest::from_written(&[
        (PathBuf::from("out/juiced-000000.tar"), 1000, 52_428_800),
        (PathBuf::from("out/juiced-000001.tar"), 37, 1_048_576),
    ])
    .to_json(Some(Path::new("out")));
    let fixtures = crate::util::fixtures();
    let weights = std::fs::read(fixtures.join("vit/vit_dino/model.safetensors")).expect("fixture weights");
    let header_len = u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
    let seeds: Vec<(&str, &str, Vec<u8>)> = vec![
        ("tar", "two_samples.tar", two.clone()),
        ("tar", "long_names_and_skipped_members.tar", odd),
        ("tar", "cut_in_a_member.tar", two[..two.len() / 2].to_vec()),
        ("gzip", "two_samples.tar.gz", gzip(&two)),
        ("image", "photo.jpg", jpg),
        ("image", "photo.png", png),
        ("image", "photo.webp", webp),
        ("caption", "fixture_0.txt", captions[2].as_bytes().to_vec()),
        ("caption", "fixture_1.txt", captions[3].as_bytes().to_vec()),
        ("caption", "unicode.txt", "Ein Bär & a café — ¿qué? 🦬 <|endoftext|>\u{0}".as_bytes().to_vec()),
        ("enrich", "caption_and_classes.txt", format!("{}\nbison\nox\namerican bison", captions[0]).into_bytes()),
        ("enrich", "no_caption.txt", b"\nkoala\ngiant panda".to_vec()),
        ("loader_state", "state.json", state),
        ("manifest", "manifest.json", manifest.into_bytes()),
        ("hf_config", "vit_dino.json", std::fs::read(fixtures.join("vit/vit_dino/config.json")).expect("config")),
        ("hf_config", "clip_vision.json", std::fs::read(fixtures.join("vit/clip_vision/config.json")).expect("config")),
        ("safetensors", "vit_dino_header.safetensors", weights[..(8 + header_len + 64).min(weights.len())].to_vec()),
    ];
    for (target, name, data) in seeds {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), data).expect("write seed");
    }
}
