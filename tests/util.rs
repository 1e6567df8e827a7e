//! Shared helpers: synthetic WebDataset shards with real encoded images, fault injection, thread counting.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use juicer::source::ShardWriter;

/// A small PNG whose colour encodes `i`, so every sample has distinct pixels.
pub fn png(i: usize, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(i * 37 % 251) as u8, (i * 11 % 241) as u8 ^ (x as u8), (y as u8).wrapping_add(i as u8)])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).expect("encode png");
    out
}

/// A JPEG of sample `i`.
pub fn jpeg(i: usize, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(i * 5) as u8, x as u8, y as u8]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).expect("encode jpeg");
    out
}

/// Fault kinds for [`make_shards`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// A healthy sample.
    None,
    /// Image bytes are garbage.
    Corrupt,
    /// The sample has only a caption.
    NoImage,
    /// The caption is not UTF-8.
    BadCaption,
}

/// Writes `per_shard.len()` shards (every fourth image a JPEG, the others PNG) `s-00000i.tar` into `dir`; shard `i` holds `per_shard[i]` samples. Sample keys
/// are `s{shard}/k{global index:05}`; `fault(global index)` chooses a fault. Returns the shard paths.
pub fn make_shards(dir: &Path, per_shard: &[usize], fault: impl Fn(usize) -> Fault) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut g = 0usize;
    for (s, &n) in per_shard.iter().enumerate() {
        let mut w = ShardWriter::new(dir, &format!("s{s}"), usize::MAX, u64::MAX).expect("writer");
        for _ in 0..n {
            let key = format!("s{s}/k{g:05}");
            let caption = format!("sample number {g}");
            let (w_px, h_px) = (24 + (g % 5) as u32 * 4, 20 + (g % 3) as u32 * 6);
            let (ext, img) = if g % 4 == 3 { ("jpg", jpeg(g, w_px, h_px)) } else { ("png", png(g, w_px, h_px)) };
            match fault(g) {
                Fault::None => w.write(&key, &[(ext, &img), ("txt", caption.as_bytes())]),
                Fault::Corrupt => w.write(&key, &[("png", b"\x89PNG-not-really"), ("txt", caption.as_bytes())]),
                Fault::NoImage => w.write(&key, &[("txt", caption.as_bytes())]),
                Fault::BadCaption => w.write(&key, &[(ext, &img), ("txt", b"caf\xe9 \xff")]),
            }
            .expect("write sample");
            g += 1;
        }
        paths.extend(w.finish().expect("finish"));
    }
    paths
}

/// Paths as source strings.
pub fn specs(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// Root of the repository's fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Runs the `juicer` binary from the repository root (so fixture paths are relative, as a user types them), with
/// the rank and backtrace variables of the test environment removed.
pub fn juicer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_juicer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS")
        .output()
        .expect("spawn the juicer binary")
}

/// A finished process's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
