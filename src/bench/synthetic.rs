//! Synthetic WebDataset shards for comparable benchmark runs.
//!
//! Every image is a JPEG (quality 90) of the requested size: a smooth two-colour gradient background, a few
//! filled ellipses and rectangles as "objects", and mild pixel noise, so the decoder and the scorers see photo-like
//! work rather than flat colour. Captions name the objects ("a red circle and a blue square on a green field").
//! Everything derives from the seed and the sample index: the same [`SyntheticSpec`] always gives the same
//! bytes. A `synthetic.json` manifest next to the shards lets later runs reuse them.

use std::path::{Path, PathBuf};

use image::{ImageEncoder, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{SplitMix64, derive};
use crate::source::ShardWriter;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// Samples in all.
    pub samples: usize,
    /// Samples per shard.
    pub per_shard: usize,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Seed of every pixel and word.
    pub seed: u64,
}

impl SyntheticSpec {
    /// A folder name that identifies the spec, for a default cache location.
    pub fn dir_name(&self) -> String {
        format!(
            "juicer-synthetic-{}x{}-n{}-s{}-seed{}",
            self.width, self.height, self.samples, self.per_shard, self.seed
        )
    }
}

const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [200, 40, 40]),
    ("green", [50, 160, 60]),
    ("blue", [40, 70, 200]),
    ("yellow", [230, 210, 40]),
    ("orange", [240, 140, 30]),
    ("purple", [130, 50, 160]),
    ("white", [240, 240, 240]),
    ("black", [25, 25, 25]),
];

const GROUNDS: [&str; 6] = ["field", "wall", "beach", "floor", "sky", "table"];

const MANIFEST: &str = "synthetic.json";

#[derive(Serialize, Deserialize, PartialEq)]
struct Manifest {
    spec: SyntheticSpec,
    shards: Vec<String>,
}

/// Generates the shards into `dir` (or reuses them when `dir` holds the same spec) and returns their paths.
pub fn generate(dir: &Path, spec: SyntheticSpec) -> Result<Vec<PathBuf>> {
    if spec.samples == 0 || spec.per_shard == 0 || spec.width < 8 || spec.height < 8 {
        return Err(Error::Config(vec![format!(
            "synthetic shards need samples ≥ 1, per_shard ≥ 1 and images of at least 8×8 (got {spec:?})"
        )]));
    }
    let manifest_path = dir.join(MANIFEST);
    if let Ok(text) = std::fs::read_to_string(&manifest_path)
        && let Ok(m) = serde_json::from_str::<Manifest>(&text)
        && m.spec == spec
    {
        let shards: Vec<PathBuf> = m.shards.iter().map(|s| dir.join(s)).collect();
        if shards.iter().all(|p| p.is_file()) {
            return Ok(shards);
        }
    }
    let mut writer = ShardWriter::new(dir, "synthetic", spec.per_shard, u64::MAX)?;
    for i in 0..spec.samples {
        let key = format!("{i:08}");
        let (img, caption) = sample(spec, i as u64);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::io(format!("encoding synthetic sample `{key}`"), std::io::Error::other(e)))?;
        writer.write(&key, &[("jpg", &jpeg), ("txt", caption.as_bytes())])?;
    }
    let shards = writer.finish()?;
    let names = shards.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    let text = serde_json::to_string_pretty(&Manifest { spec, shards: names })
        .map_err(|source| Error::Json { context: "synthetic manifest".into(), source })?;
    std::fs::write(&manifest_path, text).map_err(|e| Error::io(format!("writing `{}`", manifest_path.display()), e))?;
    Ok(shards)
}

/// The image and caption of sample `index`.
pub fn sample(spec: SyntheticSpec, index: u64) -> (RgbImage, String) {
    let mut r = SplitMix64::new(derive(spec.seed, &[index]));
    let (w, h) = (spec.width, spec.height);
    let pick = |r: &mut SplitMix64, n: usize| r.below(n);
    let top = COLOURS[pick(&mut r, COLOURS.len())].1;
    let bottom = COLOURS[pick(&mut r, COLOURS.len())].1;
    let ground = GROUNDS[pick(&mut r, GROUNDS.len())];
    let mut img = RgbImage::from_fn(w, h, |_, y| {
        let t = y as f32 / h as f32;
        Rgb(std::array::from_fn(|c| (f32::from(top[c]) * (1.0 - t) + f32::from(bottom[c]) * t * 0.8) as u8))
    });
    let objects = 1 + pick(&mut r, 3);
    let mut words = Vec::with_capacity(objects);
    for _ in 0..objects {
        let (name, colour) = COLOURS[pick(&mut r, COLOURS.len())];
        let cx = r.unit_f64() as f32 * w as f32;
        let cy = r.unit_f64() as f32 * h as f32;
        let rx = (0.08 + 0.2 * r.unit_f64() as f32) * w as f32;
        let ry = (0.08 + 0.2 * r.unit_f64() as f32) * h as f32;
        let round = r.next_u64().is_multiple_of(2);
        let (x0, x1) = ((cx - rx).max(0.0) as u32, ((cx + rx) as u32).min(w));
        let (y0, y1) = ((cy - ry).max(0.0) as u32, ((cy + ry) as u32).min(h));
        for y in y0..y1 {
            for x in x0..x1 {
                let dx = (x as f32 - cx) / rx;
                let dy = (y as f32 - cy) / ry;
                if !round || dx * dx + dy * dy <= 1.0 {
                    img.put_pixel(x, y, Rgb(colour));
                }
            }
        }
        words.push(format!("a {name} {}", if round { "circle" } else { "square" }));
    }
    for p in img.pixels_mut() {
        let n = (r.next_u64() % 17) as i16 - 8;
        for c in &mut p.0 {
            *c = (i16::from(*c) + n).clamp(0, 255) as u8;
        }
    }
    let caption = match words.len() {
        1 => format!("{} on a {ground}", words[0]),
        n => format!("{} and {} on a {ground}", words[..n - 1].join(", "), words[n - 1]),
    };
    (img, caption)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_reused() {
        let spec = SyntheticSpec { samples: 5, per_shard: 2, width: 40, height: 30, seed: 3 };
        let (a, ca) = sample(spec, 4);
        let (b, cb) = sample(spec, 4);
        assert_eq!(a, b);
        assert_eq!(ca, cb);
        let (c, _) = sample(SyntheticSpec { seed: 4, ..spec }, 4);
        assert_ne!(a, c);
        let dir = tempfile::tempdir().unwrap();
        let shards = generate(dir.path(), spec).unwrap();
        assert_eq!(shards.len(), 3);
        let bytes = std::fs::read(&shards[0]).unwrap();
        // A second call reuses the shards: same paths, untouched files.
        let again = generate(dir.path(), spec).unwrap();
        assert_eq!(again, shards);
        assert_eq!(std::fs::read(&shards[0]).unwrap(), bytes);
        let n: usize = shards
            .iter()
            .map(|p| crate::source::resolve(&[p.display().to_string()], 1).unwrap()[0].open(0, &Default::default()))
            .map(|it| it.unwrap().count())
            .sum();
        assert_eq!(n, 5);
        assert!(generate(dir.path(), SyntheticSpec { samples: 0, ..spec }).is_err());
    }
}
