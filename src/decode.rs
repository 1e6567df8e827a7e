//! Decoding and preprocessing: encoded bytes → RGB8 → resize + centre crop → normalised `[3, S, S]` f32.
//!
//! The geometry is exactly torchvision's `Resize(R)` + `CenterCrop(S)` on a PIL image (R = S unless
//! [`DecodeConfig::resize_size`] says otherwise):
//! - the short side becomes R and the long side `int(R * long / short)` (truncated, as torchvision does);
//! - the crop starts at `int(round((resized - S) / 2.0))` on each axis (Python rounds half to even);
//! - the resampling filter is Pillow's antialiased `BILINEAR` (a triangle filter whose support grows with the
//!   downscale factor), run by `fast_image_resize` as `ResizeAlg::Convolution(FilterType::Bilinear)`.
//!
//! The resize and the crop run as **one** `fast_image_resize` pass: the source box that maps onto the centre
//! crop of the (never materialised) resized image is resized straight to S×S. The filter taps are the same as
//! in the two-step version, so the result equals "resize to (R, long′), then crop" (a test checks it: identical
//! on the reference photos, ±1 on a few values of a 37-px upscale). Against Pillow itself the u8 crop is within
//! ±1 level (fast_image_resize runs the vertical pass first and uses other fixed-point precision): on the four
//! MobileNetV2 reference photos 13–16 % of the values differ by exactly 1 (mean |Δ| 0.13–0.16 levels), which
//! moves the normalised input by at most 1/255/0.224 ≈ 0.0175.
//!
//! Decoding: the format is sniffed from the bytes (the file extension is only a fallback hint). JPEG goes to
//! libjpeg-turbo (the `mozjpeg` crate, built from bundled sources; Pillow decodes with the same library), WebP to
//! libwebp (the `webp` crate; 3.1× the pure-Rust decoder's speed on the fixture photos, measured side by side),
//! PNG and whatever those two decline (a CMYK JPEG, an animated WebP) to the `image` crate. Like Pillow's
//! `convert("RGB")` decoding drops alpha and applies neither ICC profiles nor EXIF orientation. A JPEG whose data
//! does not end with the end-of-image marker `FF D9` (trailing `0x00` padding allowed) is rejected as truncated
//! (decoders fill a cut-off scan with grey instead of failing).
//!
//! # Reduced-scale JPEG decoding
//! A JPEG stores 8×8 blocks of DCT coefficients; libjpeg can run a smaller inverse DCT per block and produce the
//! image at 1/2, 1/4 or 1/8 of its size directly, skipping most of the IDCT, upsampling and colour-conversion
//! work. With [`DecodeConfig::jpeg_draft`] (the default) the decoder takes the smallest such scale at which the
//! crop's source box is still at least S pixels on both axes ([`draft_numerator`]; Pillow's `Image.draft` chooses
//! the same way), so the resize that follows is still a downscale: a 640×480 photo for S = 224 decodes at 1/2
//! (320×240), a 4000×3000 one at 1/8. The crop box is mapped by exactly the scale (libjpeg maps each 8×8 block
//! onto n×n pixels). The pixels differ from torchvision's full-resolution resize: the reduced IDCT is itself a
//! low-pass box-like filter, where Pillow's antialiased bilinear resize is a triangle filter over the full
//! image. On the 73 fixture photos as 640×480 JPEGs (quality 90) the 224×224 u8 crop differs from the
//! full-resolution one by 1.52 levels of 255 on average, 38 at most (at sharp edges; a test keeps these bounds).
//! On 500 such photo crops (`benches/peers`, `photos`), against full-resolution decoding: cam saliency Spearman
//! 0.994 on average (median 0.997; 60 of 500 below 0.99, the lowest 0.75: flatter maps, coefficient of variation
//! 0.32 for the 20 lowest against 0.54 overall, mostly of photos with no confident class), kept patch sets
//! overlapping 97.6 %, the same classes on 486 and the same enriched caption on 491 of 500
//! (`benches/agreement.py`; README, *Results*). `--full-res-jpeg` (`jpeg_draft = false`) decodes every JPEG at
//! full resolution.
//!
//! [`patch::patchify`](crate::patch::patchify) cuts the normalised pixels into the ViT patch layout the batcher
//! uses. [`DecodeStage`] is the graph's `decode` stage: a [`Decoder`] applied to each [`RawSample`].

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use std::io::Cursor;

use image::{ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{DropReason, Error, SampleError};
use crate::sample::{Decoded, RawSample};
use crate::stage::Stage;

/// ImageNet channel means (RGB), as used by torchvision's classification presets.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB), as used by torchvision's classification presets.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// OpenAI CLIP channel means (RGB), as in `CLIPImageProcessor`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP channel standard deviations (RGB), as in `CLIPImageProcessor`.
#[allow(clippy::excessive_precision)] // the literals as published
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest accepted model input side, a guard against absurd allocations from a typo.
const MAX_IMAGE_SIZE: usize = 8192;

/// Default of [`DecodeConfig::max_pixels`]: Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485, about 9459 × 9459),
/// the size above which Pillow warns of a decompression bomb. At that size an RGB image takes 268 MB.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Preprocessing parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecodeConfig {
    /// Side S of the square model input in pixels (default 224).
    pub image_size: usize,
    /// Short side R the image is resized to before the S×S centre crop. `None` (default) means R = S:
    /// torchvision `Resize(S)` + `CenterCrop(S)`, which keeps the whole short side. `Some(256)` with S = 224
    /// reproduces the ImageNet classification preset (`resize_size=256, crop_size=224`).
    pub resize_size: Option<usize>,
    /// Per-channel mean (RGB) subtracted after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB) divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Decode a JPEG at a reduced scale (1/2, 1/4 or 1/8, libjpeg's scaled IDCT, as Pillow's `draft`) when the
    /// crop's source box stays at least S pixels across at that scale, then resize from there (module docs,
    /// *Reduced-scale JPEG decoding*). Default `true`; `false` decodes every JPEG at full resolution.
    pub jpeg_draft: bool,
    /// Largest image, in pixels (width × height as its header declares them), that is decoded at all; a larger
    /// one is dropped as [`DropReason::ImageTooLarge`] naming its size, before any pixel memory is allocated (a
    /// 400 KB PNG can declare 20000 × 20000 pixels: 1.2 GB decoded). Default [`DEFAULT_MAX_PIXELS`];
    /// `u64::MAX` disables the check.
    pub max_pixels: u64,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            resize_size: None,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            jpeg_draft: true,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl DecodeConfig {
    /// Short side the image is resized to before cropping (R; equals `image_size` unless overridden).
    pub fn resize_short_side(&self) -> usize {
        self.resize_size.unwrap_or(self.image_size)
    }

    /// Lists every problem with this configuration; empty when it is valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.image_size == 0 {
            problems.push("image_size must be greater than 0".to_string());
        } else if self.image_size > MAX_IMAGE_SIZE {
            problems.push(format!("image_size {} is larger than the maximum {MAX_IMAGE_SIZE}", self.image_size));
        }
        if let Some(r) = self.resize_size {
            if r < self.image_size {
                problems.push(format!(
                    "resize_size {r} must be at least image_size {} (the crop must fit inside the resized image)",
                    self.image_size
                ));
            } else if r > MAX_IMAGE_SIZE {
                problems.push(format!("resize_size {r} is larger than the maximum {MAX_IMAGE_SIZE}"));
            }
        }
        if self.max_pixels == 0 {
            problems.push("max_pixels must be greater than 0 (u64::MAX for no limit)".to_string());
        }
        for (c, name) in ["R", "G", "B"].iter().enumerate() {
            if !self.mean[c].is_finite() {
                problems.push(format!("mean[{c}] ({name}) must be finite, got {}", self.mean[c]));
            }
            if !(self.std[c].is_finite() && self.std[c] > 0.0) {
                problems.push(format!("std[{c}] ({name}) must be finite and > 0, got {}", self.std[c]));
            }
        }
        problems
    }
}

/// Where the centre crop of an image lies, in resized and in source coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropGeometry {
    /// Size `(width, height)` of the (virtual) resized image: short side R, long side `int(R * long / short)`.
    pub resized: (u32, u32),
    /// Top-left corner `(left, top)` of the S×S crop inside the resized image.
    pub offset: (u32, u32),
    /// The crop's box in source pixels `[left, top, width, height]` (fractional), resized straight to S×S.
    pub src_box: [f64; 4],
}

impl CropGeometry {
    /// Computes the geometry of torchvision `Resize(resize)` + `CenterCrop(crop)` for a `width`×`height`
    /// image. Requires `crop <= resize` and a non-empty image for a meaningful result.
    pub fn new(width: u32, height: u32, resize: u32, crop: u32) -> Self {
        let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
        let r = u64::from(resize);
        // torchvision: new_short = size, new_long = int(size * long / short). size * long is exact in f64,
        // so the one division is correctly rounded exactly like Python's int / int.
        let scaled_long = |long: u64, short: u64| ((r * long) as f64 / short as f64) as u32;
        let resized = if w <= h { (resize, scaled_long(h, w)) } else { (scaled_long(w, h), resize) };
        // torchvision CenterCrop: int(round((resized - crop) / 2.0)), round half to even.
        let off = |len: u32| (f64::from(len.saturating_sub(crop)) / 2.0).round_ties_even() as u32;
        let offset = (off(resized.0), off(resized.1));
        // Map the crop box back to the source: x_src = x_resized * (src / resized).
        let axis = |src: u64, res: u32, o: u32| {
            let src = src as f64;
            let res = f64::from(res.max(1));
            let len = (f64::from(crop) * src / res).min(src);
            let start = (f64::from(o) * src / res).min(src - len).max(0.0);
            (start, len)
        };
        let (left, bw) = axis(w, resized.0, offset.0);
        let (top, bh) = axis(h, resized.1, offset.1);
        Self { resized, offset, src_box: [left, top, bw, bh] }
    }
}

/// Pillow's antialiased bilinear resize of the box `[left, top, width, height]` (module docs).
fn resize_options(src_box: [f64; 4]) -> ResizeOptions {
    let [left, top, bw, bh] = src_box;
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(left, top, bw, bh)
}

thread_local! {
    /// The resizer of [`Decoder::try_resize_box`] on this thread (decode workers live as long as the graph).
    static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
}

/// Decodes and preprocesses images. Cheap to share: it holds the configuration and a lookup table, and each
/// call uses its own scratch buffers, so one `Decoder` (in an `Arc` or by reference) serves many threads.
#[derive(Clone)]
pub struct Decoder {
    cfg: DecodeConfig,
    /// `lut[c][v] = (v / 255 - mean[c]) / std[c]`, computed in f32 in the same order as torchvision.
    lut: Box<[[f32; 256]; 3]>,
}

impl Decoder {
    /// Builds a decoder. The configuration is not checked here: call [`DecodeConfig::validate`] first, or
    /// use [`Decoder::try_new`].
    pub fn new(cfg: DecodeConfig) -> Self {
        let mut lut = Box::new([[0.0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - cfg.mean[c]) / cfg.std[c];
            }
        }
        Self { cfg, lut }
    }

    /// Builds a decoder after validating the configuration; every problem is listed in the error.
    pub fn try_new(cfg: DecodeConfig) -> Result<Self, Error> {
        let problems = cfg.validate();
        if problems.is_empty() { Ok(Self::new(cfg)) } else { Err(Error::Config(problems)) }
    }

    /// The configuration this decoder was built with.
    pub fn config(&self) -> &DecodeConfig {
        &self.cfg
    }

    /// Side S of the square output.
    pub fn size(&self) -> usize {
        self.cfg.image_size
    }

    /// Decodes one sample into normalised `[3, S, S]` pixels. Undecodable data (corrupt, unsupported, or a
    /// JPEG without its end-of-image marker) is [`DropReason::UndecodableImage`] naming the sample key.
    pub fn decode(&self, raw: RawSample) -> Result<Decoded, SampleError> {
        let RawSample { key, image, image_ext, caption, meta } = raw;
        let (crop, orig_size) = match self.crop_rgb8(&image, &image_ext) {
            Ok(decoded) => decoded,
            Err((reason, detail)) => return Err(SampleError::new(key, reason, detail)),
        };
        let pixels = self.normalise(&crop);
        Ok(Decoded { key, pixels, size: self.cfg.image_size, orig_size, caption, meta })
    }

    /// The S×S RGB8 crop [`Decoder::decode`] normalises, and the image's full-resolution size.
    pub fn crop_rgb8(&self, bytes: &[u8], ext_hint: &str) -> Result<(RgbImage, (u32, u32)), (DropReason, String)> {
        let (rgb, orig_size, src_box) = self.decode_for_crop(bytes, ext_hint)?;
        let crop = self
            .try_resize_box(&rgb, src_box)
            .map_err(|e| (DropReason::StageFailed, format!("resizing {}x{} failed: {e}", orig_size.0, orig_size.1)))?;
        Ok((crop, orig_size))
    }

    /// Decodes encoded bytes to RGB8 only (no resize, always at full resolution), with the same checks as
    /// [`Decoder::decode`]; `key` names the sample in the error. Useful for visualising the original image.
    pub fn decode_rgb8(&self, key: &str, bytes: &[u8], ext_hint: &str) -> Result<RgbImage, SampleError> {
        decode_rgb8_inner(bytes, ext_hint, self.cfg.max_pixels, |_, _| 8)
            .map(|(img, _, _)| img)
            .map_err(|(reason, detail)| SampleError::new(key, reason, detail))
    }

    /// The decoding half of [`Decoder::crop_rgb8`], with the same checks: the RGB image (at a reduced scale when
    /// [`DecodeConfig::jpeg_draft`] allows), the full-resolution size, and the crop's source box
    /// `[left, top, width, height]` in the decoded image's pixels. `benches/peers` times it alone as the floor
    /// under the decode path.
    pub fn decode_for_crop(&self, bytes: &[u8], ext_hint: &str) -> Result<ForCrop, (DropReason, String)> {
        let s = self.cfg.image_size as f64;
        let draft = |w: u32, h: u32| {
            let [_, _, bw, bh] = self.geometry(w, h).src_box;
            if self.cfg.jpeg_draft { draft_numerator(bw, bh, s) } else { 8 }
        };
        let (img, (w, h), numerator) = decode_rgb8_inner(bytes, ext_hint, self.cfg.max_pixels, draft)?;
        // libjpeg's scaled IDCT maps every 8×8 block onto n×n pixels: source coordinates scale by exactly n/8.
        let k = f64::from(numerator) / 8.0;
        let [left, top, bw, bh] = self.geometry(w, h).src_box;
        let (dw, dh) = (f64::from(img.width()), f64::from(img.height()));
        let (bw, bh) = ((bw * k).min(dw), (bh * k).min(dh));
        Ok((img, (w, h), [(left * k).min(dw - bw), (top * k).min(dh - bh), bw, bh]))
    }

    /// The crop geometry this decoder uses for a `width`×`height` image.
    pub fn geometry(&self, width: u32, height: u32) -> CropGeometry {
        CropGeometry::new(width, height, self.cfg.resize_short_side() as u32, self.cfg.image_size as u32)
    }

    /// Resizes and centre-crops an RGB image to S×S u8 (before normalisation). An empty (0-pixel) image gives
    /// a black S×S image.
    pub fn resize_crop_rgb8(&self, img: &RgbImage) -> RgbImage {
        let s = self.cfg.image_size as u32;
        // The only possible errors come from an invalid crop box, which `CropGeometry` never produces.
        self.try_resize_crop(img).unwrap_or_else(|_| RgbImage::new(s, s))
    }

    fn try_resize_crop(&self, img: &RgbImage) -> Result<RgbImage, fast_image_resize::ResizeError> {
        let (w, h) = img.dimensions();
        self.try_resize_box(img, self.geometry(w, h).src_box)
    }

    /// Resizes the box `[left, top, width, height]` of `img` to S×S.
    fn try_resize_box(&self, img: &RgbImage, src_box: [f64; 4]) -> Result<RgbImage, fast_image_resize::ResizeError> {
        let s = self.cfg.image_size as u32;
        let mut dst = RgbImage::new(s, s);
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 || s == 0 {
            return Ok(dst);
        }
        let options = resize_options(src_box);
        // One resizer per thread: it keeps its scratch buffers (the horizontal pass, the filter coefficients)
        // between calls instead of allocating and faulting them in per image (0.51 → 0.36–0.40 ms per 640×480
        // photo crop, measured side by side).
        RESIZER.with(|resizer| match resizer.try_borrow_mut() {
            Ok(mut resizer) => resizer.resize(img, &mut dst, &options),
            Err(_) => Resizer::new().resize(img, &mut dst, &options),
        })?;
        Ok(dst)
    }

    /// Normalises an RGB8 image, `(x / 255 - mean) / std` per channel, into channel-major `[3, H, W]` f32
    /// (`[3, S, S]` for the output of [`Decoder::resize_crop_rgb8`]).
    pub fn normalise(&self, crop: &RgbImage) -> Vec<f32> {
        let n = crop.width() as usize * crop.height() as usize;
        // One pass per channel, appending: no zero-filled buffer to overwrite (the crop is in cache).
        let mut out = Vec::with_capacity(3 * n);
        for (c, lut) in self.lut.iter().enumerate() {
            out.extend(crop.as_raw().chunks_exact(3).map(|px| lut[usize::from(px[c])]));
        }
        out
    }
}

/// Channel-major `[3, H, W]` pixels normalised with `from` (`(mean, std)`, `[0, 1]` pixel units) re-expressed
/// with `to`: `(x·std_from + mean_from − mean_to) / std_to` per channel. How a model whose preprocessing differs
/// from the decoder's (the classifier after a ViT scorer, EfficientNet-Lite after ImageNet's) reads the decoded
/// pixels.
pub fn renormalise(pixels: &[f32], from: ([f32; 3], [f32; 3]), to: ([f32; 3], [f32; 3])) -> Vec<f32> {
    let plane = (pixels.len() / 3).max(1);
    let ((m0, s0), (m1, s1)) = (from, to);
    pixels
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = (i / plane).min(2);
            (x * s0[c] + m0[c] - m1[c]) / s1[c]
        })
        .collect()
}

/// The `decode` stage: bytes → normalised pixels, one sample per call on the decode worker pool.
#[derive(Debug)]
pub struct DecodeStage(pub Decoder);

impl Stage for DecodeStage {
    type In = RawSample;
    type Out = Decoded;

    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&self, raw: RawSample) -> std::result::Result<Decoded, SampleError> {
        self.0.decode(raw)
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Whether JPEG data ends with the end-of-image marker `FF D9`, ignoring trailing `0x00` padding.
pub fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&[0xFF, 0xD9])
}

/// A decoded RGB8 image, the image's full-resolution size, and the numerator (of 8) of the scale it was decoded at.
type Decoded8 = (RgbImage, (u32, u32), u8);

/// A decoded RGB8 image, the image's full-resolution size, and the crop's source box in the decoded pixels.
pub type ForCrop = (RgbImage, (u32, u32), [f64; 4]);

/// Why an image was not decoded, and the detail.
type Failure = (DropReason, String);

/// Refuses a `w`×`h` image above `max` pixels ([`DecodeConfig::max_pixels`]); called with the header's size,
/// before any pixel memory is allocated.
fn check_pixels(w: u32, h: u32, max: u64) -> Result<(), Failure> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max {
        return Err((
            DropReason::ImageTooLarge,
            format!("image of {w}x{h} = {pixels} pixels is above the limit of {max} pixels (max_pixels)"),
        ));
    }
    Ok(())
}

/// The libjpeg scale numerator (of 8) for a crop whose source box is `bw`×`bh` pixels and whose output is `s`
/// pixels across: the smallest of 1/8, 1/4, 1/2 that keeps the box at least `s` pixels on both axes (so the
/// resize stays a downscale), else 8 (full resolution). Pillow's `Image.draft` chooses the same way.
pub fn draft_numerator(bw: f64, bh: f64, s: f64) -> u8 {
    [1u8, 2, 4].into_iter().find(|&n| bw * f64::from(n) / 8.0 >= s && bh * f64::from(n) / 8.0 >= s).unwrap_or(8)
}

/// Decodes a JPEG with libjpeg-turbo at the scale `numerator(width, height)` / 8 chooses (8: full resolution);
/// returns the image, the full-resolution size and the numerator used. libjpeg reports a fatal error by
/// unwinding (the `mozjpeg` crate's contract); it is caught here and returned as its message.
fn decode_jpeg(bytes: &[u8], max_pixels: u64, numerator: impl FnOnce(u32, u32) -> u8) -> Result<Decoded8, Failure> {
    let undecodable = |d: String| (DropReason::UndecodableImage, d);
    let run = || -> std::io::Result<Result<Decoded8, Failure>> {
        let mut d = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        if w == 0 || h == 0 {
            return Ok(Err(undecodable(format!("image has no pixels ({w}x{h})"))));
        }
        if let Err(too_large) = check_pixels(w, h, max_pixels) {
            return Ok(Err(too_large));
        }
        let n = numerator(w, h).clamp(1, 8);
        d.scale(n);
        let mut image = d.rgb()?;
        let (ow, oh) = (image.width() as u32, image.height() as u32);
        let pixels: Vec<u8> = image.read_scanlines()?;
        image.finish()?;
        Ok(RgbImage::from_raw(ow, oh, pixels)
            .map(|img| (img, (w, h), n))
            .ok_or_else(|| undecodable(format!("libjpeg returned fewer pixels than {ow}x{oh}"))))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(undecodable(e.to_string())),
        Err(payload) => Err(undecodable(match (payload.downcast_ref::<String>(), payload.downcast_ref::<&str>()) {
            (Some(s), _) => s.clone(),
            (_, Some(s)) => (*s).to_string(),
            _ => "libjpeg failed".to_string(),
        })),
    }
}

/// Decodes a still WebP with libwebp to RGB8 (alpha dropped); `None` when libwebp declines it (corrupt data,
/// an animation), which the caller hands to the `image` crate for a decode or a precise error.
fn decode_webp(bytes: &[u8]) -> Option<RgbImage> {
    let image = webp::Decoder::new(bytes).decode()?;
    let (w, h) = (image.width(), image.height());
    let pixels: Vec<u8> = if image.is_alpha() {
        image.chunks_exact(4).flat_map(|px| [px[0], px[1], px[2]]).collect()
    } else {
        image.to_vec()
    };
    RgbImage::from_raw(w, h, pixels)
}

/// Decodes `bytes` to RGB8; a JPEG at the scale `numerator` chooses ([`decode_jpeg`]), a WebP with libwebp
/// ([`decode_webp`]), anything else (and what those two decline, such as a CMYK JPEG) with the `image` crate at
/// full resolution. Every path reads the image's size from its header first and refuses one above `max_pixels`
/// ([`check_pixels`]). Returns the image, the full-resolution size and the numerator (of 8) it was decoded at.
fn decode_rgb8_inner(
    bytes: &[u8],
    ext_hint: &str,
    max_pixels: u64,
    numerator: impl FnOnce(u32, u32) -> u8,
) -> Result<Decoded8, Failure> {
    let undecodable = |d: String| (DropReason::UndecodableImage, d);
    if bytes.is_empty() {
        return Err(undecodable("empty image data".to_string()));
    }
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        Err(_) => ImageFormat::from_extension(ext_hint).ok_or_else(|| {
            undecodable(format!("unrecognised image data ({} bytes, extension hint `{ext_hint}`)", bytes.len()))
        })?,
    };
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) {
        return Err(undecodable(format!("unsupported image format {format:?} (JPEG, PNG and WebP are supported)")));
    }
    let mut libjpeg_error = None;
    if format == ImageFormat::Jpeg {
        if !jpeg_has_eoi(bytes) {
            return Err(undecodable(format!(
                "truncated JPEG: no end-of-image marker FF D9 at the end of {} bytes",
                bytes.len()
            )));
        }
        match decode_jpeg(bytes, max_pixels, numerator) {
            Ok(decoded) => return Ok(decoded),
            Err((DropReason::UndecodableImage, e)) => libjpeg_error = Some(e),
            Err(other) => return Err(other),
        }
    }
    if format == ImageFormat::WebP {
        if let Some(features) = webp::BitstreamFeatures::new(bytes) {
            check_pixels(features.width(), features.height(), max_pixels)?;
        }
        if let Some(img) = decode_webp(bytes).filter(|i| i.width() > 0 && i.height() > 0) {
            let size = img.dimensions();
            return Ok((img, size, 8));
        }
    }
    let cannot = |e: image::ImageError| match &libjpeg_error {
        Some(j) => undecodable(format!("cannot decode JPEG ({} bytes): {j}; {e}", bytes.len())),
        None => undecodable(format!("cannot decode {format:?} ({} bytes): {e}", bytes.len())),
    };
    // The header alone first: the size check comes before the decoder allocates anything.
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(&cannot)?;
    check_pixels(w, h, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // What the size allows (RGBA at 16 bits per channel, the widest PNG the decoder produces), and no more.
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(&cannot)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(undecodable(format!("image has no pixels ({}x{})", img.width(), img.height())));
    }
    let size = (img.width(), img.height());
    Ok((img.into_rgb8(), size, 8))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::path::{Path, PathBuf};

    use bytes::Bytes;
    use image::codecs::jpeg::JpegEncoder;
    use image::{GenericImageView, Rgb};

    use super::*;

    #[test]
    fn renormalise_maps_one_normalisation_onto_another() {
        let clip = (CLIP_MEAN, CLIP_STD);
        let imagenet = (IMAGENET_MEAN, IMAGENET_STD);
        // Pixel values 0.2 / 0.5 / 0.9 per channel, normalised both ways.
        let raw = [0.2f32, 0.5, 0.9];
        let norm = |(m, s): ([f32; 3], [f32; 3])| -> Vec<f32> {
            (0..12).map(|i| (raw[i / 4] - m[i / 4]) / s[i / 4]).collect()
        };
        let got = renormalise(&norm(clip), clip, imagenet);
        for (g, w) in got.iter().zip(norm(imagenet)) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(renormalise(&norm(clip), clip, clip).len(), 12);
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }

    fn photo_bytes(key: &str) -> Vec<u8> {
        std::fs::read(fixtures().join("gcompris").join(format!("{key}.webp"))).unwrap()
    }

    fn raw(key: &str, bytes: Vec<u8>, ext: &str) -> RawSample {
        RawSample {
            key: key.to_string(),
            image: Bytes::from(bytes),
            image_ext: ext.to_string(),
            caption: Some("a caption".to_string()),
            meta: Some(serde_json::json!({"k": 1})),
        }
    }

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn encode_jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
        out
    }

    /// A smooth but non-trivial test pattern.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, ((x * 7 + y * 13) % 256) as u8])
        })
    }

    fn decode_photo(key: &str) -> RgbImage {
        image::load_from_memory(&photo_bytes(key)).unwrap().into_rgb8()
    }

    /// Two-step reference: full resize to the torchvision size, then the centre crop.
    fn two_step(dec: &Decoder, img: &RgbImage) -> RgbImage {
        let g = dec.geometry(img.width(), img.height());
        let mut resized = RgbImage::new(g.resized.0, g.resized.1);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new().resize(img, &mut resized, &options).unwrap();
        let s = dec.size() as u32;
        resized.view(g.offset.0, g.offset.1, s, s).to_image()
    }

    /// (max |Δ|, number of differing channel values, mean |Δ|)
    fn diff_u8(a: &[u8], b: &[u8]) -> (u8, usize, f64) {
        assert_eq!(a.len(), b.len());
        let mut max = 0u8;
        let mut n = 0usize;
        let mut sum = 0u64;
        for (&x, &y) in a.iter().zip(b) {
            let d = x.abs_diff(y);
            max = max.max(d);
            n += usize::from(d > 0);
            sum += u64::from(d);
        }
        (max, n, sum as f64 / a.len() as f64)
    }

    /// Reads one tensor from a safetensors file: (dtype, shape, raw little-endian bytes).
    fn read_tensor(path: &Path, name: &str) -> (String, Vec<usize>, Vec<u8>) {
        let data = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
        let t = &header[name];
        let dtype = t["dtype"].as_str().unwrap().to_string();
        let shape = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let offs = t["data_offsets"].as_array().unwrap();
        let (a, b) = (offs[0].as_u64().unwrap() as usize, offs[1].as_u64().unwrap() as usize);
        (dtype, shape, data[8 + n + a..8 + n + b].to_vec())
    }

    fn imagenet_preset() -> Decoder {
        Decoder::new(DecodeConfig { resize_size: Some(256), ..DecodeConfig::default() })
    }

    const REFERENCE_PHOTOS: [&str; 4] =
        ["animals-giant_panda", "animals-koala", "monuments-neuschwanstein_castle", "farm-sheep"];

    #[test]
    fn decode_config_default_and_validate() {
        let cfg = DecodeConfig::default();
        assert_eq!(cfg.image_size, 224);
        assert_eq!(cfg.resize_short_side(), 224);
        assert_eq!(cfg.mean, [0.485, 0.456, 0.406]);
        assert_eq!(cfg.std, [0.229, 0.224, 0.225]);
        assert!(cfg.validate().is_empty());
        assert!(cfg.jpeg_draft, "reduced-scale JPEG decoding is the default");
        assert_eq!(cfg.max_pixels, DEFAULT_MAX_PIXELS, "Pillow's MAX_IMAGE_PIXELS");
        let bad = DecodeConfig {
            image_size: 0,
            resize_size: None,
            mean: [f32::NAN, 0.0, 0.0],
            std: [0.0, -1.0, f32::INFINITY],
            jpeg_draft: true,
            max_pixels: 0,
        };
        let problems = bad.validate();
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems[0].contains("image_size"));
        let small_resize = DecodeConfig { resize_size: Some(200), ..DecodeConfig::default() };
        assert_eq!(small_resize.validate().len(), 1);
        assert!(matches!(Decoder::try_new(bad), Err(Error::Config(p)) if p.len() == 6));
        assert!(Decoder::try_new(DecodeConfig::default()).is_ok());
    }

    #[test]
    fn decode_decoder_is_send_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Decoder>();
    }

    #[test]
    fn decode_geometry_matches_torchvision() {
        // Values documented for the MobileNetV2 reference (Resize(256) + CenterCrop(224)).
        let g = CropGeometry::new(1024, 681, 256, 224);
        assert_eq!((g.resized, g.offset), ((384, 256), (80, 16)));
        let g = CropGeometry::new(768, 1024, 256, 224);
        assert_eq!((g.resized, g.offset), ((256, 341), (16, 58))); // 58.5 rounds to 58
        let g = CropGeometry::new(1024, 683, 256, 224);
        assert_eq!((g.resized, g.offset), ((383, 256), (80, 16))); // 79.5 rounds to 80
        let g = CropGeometry::new(359, 1024, 256, 224);
        assert_eq!(g.resized, (256, 730));
        // Square and already-sized images: no scaling, the box is the crop itself.
        let g = CropGeometry::new(224, 224, 224, 224);
        assert_eq!((g.resized, g.offset, g.src_box), ((224, 224), (0, 0), [0.0, 0.0, 224.0, 224.0]));
        let g = CropGeometry::new(224, 300, 224, 224);
        assert_eq!((g.resized, g.offset, g.src_box), ((224, 300), (0, 38), [0.0, 38.0, 224.0, 224.0]));
        // The source box always lies inside the image.
        for (w, h) in [(1, 1), (1, 5000), (5000, 1), (3, 7), (1023, 1021), (640, 480)] {
            for (r, s) in [(224, 224), (256, 224), (16, 16)] {
                let [l, t, bw, bh] = CropGeometry::new(w, h, r, s).src_box;
                assert!(l >= 0.0 && t >= 0.0 && bw > 0.0 && bh > 0.0);
                assert!(l + bw <= f64::from(w) && t + bh <= f64::from(h), "{w}x{h} {r}/{s}");
            }
        }
    }

    #[test]
    fn decode_all_fixture_photos_webp() {
        let dec = Decoder::new(DecodeConfig::default());
        let pairs = std::fs::read_to_string(fixtures().join("gcompris/pairs.jsonl")).unwrap();
        let mut n = 0;
        for line in pairs.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap();
            let out = dec.decode(raw(key, photo_bytes(key), "webp")).unwrap();
            assert_eq!(out.key, key);
            assert_eq!(out.size, 224);
            assert_eq!(out.pixels.len(), 3 * 224 * 224);
            assert!(out.pixels.iter().all(|x| x.is_finite() && x.abs() < 3.0));
            assert!(out.orig_size.0.max(out.orig_size.1) >= 1000, "{key} {:?}", out.orig_size);
            assert_eq!(out.caption.as_deref(), Some("a caption"));
            assert_eq!(out.meta, Some(serde_json::json!({"k": 1})));
            n += 1;
        }
        assert_eq!(n, 73);
        let panda = dec.decode(raw("p", photo_bytes("animals-giant_panda"), "webp")).unwrap();
        assert_eq!(panda.orig_size, (1024, 681));
    }

    #[test]
    fn decode_png_and_jpeg_encoded_in_test() {
        let dec = Decoder::new(DecodeConfig::default());
        let img = pattern(320, 240);
        let png = dec.decode(raw("png", encode(&img, ImageFormat::Png), "png")).unwrap();
        assert_eq!(png.orig_size, (320, 240));
        // Lossless: PNG decoding then preprocessing equals preprocessing the source image.
        assert_eq!(png.pixels, dec.normalise(&dec.resize_crop_rgb8(&img)));
        let jpg = dec.decode(raw("jpg", encode_jpeg(&img, 95), "jpg")).unwrap();
        assert_eq!(jpg.orig_size, (320, 240));
        assert_eq!(jpg.pixels.len(), 3 * 224 * 224);
        // The extension is only a hint: a PNG named .jpg still decodes.
        let misnamed = dec.decode(raw("m", encode(&img, ImageFormat::Png), "jpg")).unwrap();
        assert_eq!(misnamed.pixels, png.pixels);
        // Grey and RGBA inputs become RGB.
        let grey = image::DynamicImage::ImageRgb8(img.clone()).into_luma8();
        let mut buf = Cursor::new(Vec::new());
        grey.write_to(&mut buf, ImageFormat::Png).unwrap();
        assert!(dec.decode(raw("g", buf.into_inner(), "png")).is_ok());
        let rgba = image::DynamicImage::ImageRgb8(img).into_rgba8();
        let mut buf = Cursor::new(Vec::new());
        rgba.write_to(&mut buf, ImageFormat::Png).unwrap();
        assert!(dec.decode(raw("a", buf.into_inner(), "png")).is_ok());
    }

    #[test]
    fn decode_truncated_jpeg_is_undecodable() {
        let dec = Decoder::new(DecodeConfig::default());
        let jpeg = encode_jpeg(&decode_photo("animals-koala"), 90);
        assert!(jpeg_has_eoi(&jpeg));
        // Trailing zero padding is fine.
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0, 0, 0, 0]);
        assert!(dec.decode(raw("padded", padded, "jpg")).is_ok());
        let half = jpeg[..jpeg.len() / 2].to_vec();
        let accepted_by_image = image::load_from_memory(&half).is_ok();
        let err = dec.decode(raw("cut/koala", half, "jpg")).unwrap_err();
        assert_eq!(err.key, "cut/koala");
        assert_eq!(err.reason, DropReason::UndecodableImage);
        assert!(err.detail.contains("end-of-image"), "{}", err.detail);
        assert!(err.to_string().contains("cut/koala"));
        eprintln!("image 0.25 decodes the half JPEG without an error: {accepted_by_image}");
        // Cut just before the marker, and with garbage after it.
        let cut = jpeg[..jpeg.len() - 2].to_vec();
        assert_eq!(dec.decode(raw("c", cut, "jpg")).unwrap_err().reason, DropReason::UndecodableImage);
        let mut trailing = jpeg;
        trailing.extend_from_slice(b"junk");
        assert_eq!(dec.decode(raw("t", trailing, "jpg")).unwrap_err().reason, DropReason::UndecodableImage);
    }

    #[test]
    fn decode_refuses_images_above_max_pixels_from_their_header() {
        // Every decode path (libjpeg, libwebp, the image crate for PNG) reads the size from the header and drops
        // an image above the limit as image_too_large, naming the size; at the limit it decodes.
        let jpeg = encode_jpeg(&pattern(64, 48), 90);
        let png = encode(&pattern(64, 48), ImageFormat::Png);
        let webp = photo_bytes("farm-cat");
        let webp_size = {
            let f = webp::BitstreamFeatures::new(&webp).unwrap();
            (f.width(), f.height())
        };
        for (name, bytes, ext, (w, h)) in
            [("jpeg", jpeg, "jpg", (64, 48)), ("png", png, "png", (64, 48)), ("webp", webp, "webp", webp_size)]
        {
            let pixels = u64::from(w) * u64::from(h);
            let tight = Decoder::new(DecodeConfig { max_pixels: pixels - 1, ..DecodeConfig::default() });
            let err = tight.decode(raw("big", bytes.clone(), ext)).unwrap_err();
            assert_eq!((err.key.as_str(), err.reason), ("big", DropReason::ImageTooLarge), "{name}");
            assert!(err.detail.contains(&format!("{w}x{h} = {pixels} pixels")), "{name}: {}", err.detail);
            assert_eq!(tight.decode_rgb8("big", &bytes, ext).unwrap_err().reason, DropReason::ImageTooLarge);
            let exact = Decoder::new(DecodeConfig { max_pixels: pixels, ..DecodeConfig::default() });
            assert!(exact.decode(raw("ok", bytes, ext)).is_ok(), "{name} at the limit decodes");
        }
        // A PNG whose header alone declares 20000 x 20000 pixels: refused from the header, nothing decoded.
        let mut png = encode(&pattern(8, 8), ImageFormat::Png);
        png[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20_000u32.to_be_bytes());
        let crc = {
            let mut c = flate2::Crc::new();
            c.update(&png[12..29]);
            c.sum()
        };
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = Decoder::new(DecodeConfig::default()).decode(raw("bomb", png, "png")).unwrap_err();
        assert_eq!(err.reason, DropReason::ImageTooLarge, "{}", err.detail);
        assert!(err.detail.contains("20000x20000"), "{}", err.detail);
    }

    #[test]
    fn decode_garbage_is_undecodable() {
        let dec = Decoder::new(DecodeConfig::default());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut garbage: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        for ext in ["jpg", "png", "webp", "bin"] {
            let err = dec.decode(raw("junk", garbage.clone(), ext)).unwrap_err();
            assert_eq!((err.key.as_str(), err.reason), ("junk", DropReason::UndecodableImage));
        }
        // Garbage behind valid magic bytes, with a JPEG end marker.
        garbage[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
        let n = garbage.len();
        garbage[n - 2..].copy_from_slice(&[0xFF, 0xD9]);
        let err = dec.decode(raw("j", garbage.clone(), "jpg")).unwrap_err();
        assert_eq!(err.reason, DropReason::UndecodableImage);
        let mut png = encode(&pattern(64, 64), ImageFormat::Png);
        png.truncate(png.len() / 2);
        assert_eq!(dec.decode(raw("p", png, "png")).unwrap_err().reason, DropReason::UndecodableImage);
        let mut webp = photo_bytes("farm-cat");
        webp.truncate(webp.len() / 2);
        assert_eq!(dec.decode(raw("w", webp, "webp")).unwrap_err().reason, DropReason::UndecodableImage);
        let err = dec.decode(raw("e", Vec::new(), "png")).unwrap_err();
        assert_eq!(err.reason, DropReason::UndecodableImage);
    }

    #[test]
    fn decode_non_square_both_orientations() {
        for size in [224usize, 64, 17] {
            let dec = Decoder::new(DecodeConfig { image_size: size, ..DecodeConfig::default() });
            for (w, h) in [(640, 200), (200, 640), (1, 300), (300, 1), (50, 20), (13, 31)] {
                let img = pattern(w, h);
                let crop = dec.resize_crop_rgb8(&img);
                assert_eq!(crop.dimensions(), (size as u32, size as u32));
                let out = dec.decode(raw("x", encode(&img, ImageFormat::Png), "png")).unwrap();
                assert_eq!(out.orig_size, (w, h));
                assert_eq!(out.pixels.len(), 3 * size * size);
                assert_eq!(out.pixels, dec.normalise(&crop));
            }
        }
        // An empty image gives a black crop instead of panicking.
        let dec = Decoder::new(DecodeConfig::default());
        assert_eq!(dec.resize_crop_rgb8(&RgbImage::new(0, 5)).dimensions(), (224, 224));
    }

    #[test]
    fn decode_constant_colour_normalises_to_formula() {
        let cfg = DecodeConfig::default();
        let dec = Decoder::new(cfg.clone());
        let colour = [200u8, 10, 127];
        let img = RgbImage::from_pixel(333, 500, Rgb(colour));
        let out = dec.decode(raw("c", encode(&img, ImageFormat::Png), "png")).unwrap();
        let n = 224 * 224;
        for (c, &value) in colour.iter().enumerate() {
            let expected = (f32::from(value) / 255.0 - cfg.mean[c]) / cfg.std[c];
            for &v in &out.pixels[c * n..(c + 1) * n] {
                assert!((v - expected).abs() < 1e-6, "channel {c}: {v} vs {expected}");
            }
        }
        // Spot-check the formula against hand-computed values: (200/255 - 0.485) / 0.229 = 1.30704...
        assert!((out.pixels[0] - 1.307_046_8).abs() < 1e-5);
        assert!((out.pixels[n] - (-1.860_644_3)).abs() < 1e-5);
    }

    #[test]
    fn decode_one_pass_equals_two_step_reference() {
        // Synthetic sizes (up and down scaling, both orientations, rounding-half offsets) and real photos.
        let mut cases: Vec<(String, RgbImage)> = [(640, 480), (480, 640), (1023, 517), (300, 301), (100, 37)]
            .iter()
            .map(|&(w, h)| (format!("pattern {w}x{h}"), pattern(w, h)))
            .collect();
        for key in REFERENCE_PHOTOS.iter().chain(&["monuments-cabrillo"]) {
            cases.push((key.to_string(), decode_photo(key)));
        }
        for cfg in [DecodeConfig::default(), imagenet_preset().config().clone()] {
            let dec = Decoder::new(cfg);
            for (name, img) in &cases {
                let one = dec.resize_crop_rgb8(img);
                let two = two_step(&dec, img);
                let (max, n, mean) = diff_u8(one.as_raw(), two.as_raw());
                eprintln!(
                    "one-pass vs two-step {name} R={}: max {max}, {n} values differ, mean {mean:.5}",
                    dec.config().resize_short_side()
                );
                assert!(max <= 1, "{name}: max |Δ| {max}");
            }
        }
    }

    #[test]
    fn the_per_thread_resizer_gives_what_a_fresh_one_gives() {
        // Alternating sizes, orientations and output sides on one thread: the reused scratch buffers must never
        // leak one image's pixels or coefficients into the next.
        let images: Vec<RgbImage> =
            [(640, 480), (100, 37), (480, 640), (1023, 517), (224, 224), (640, 480)].map(|(w, h)| pattern(w, h)).into();
        for cfg in [DecodeConfig::default(), DecodeConfig { image_size: 96, ..DecodeConfig::default() }] {
            let dec = Decoder::new(cfg);
            for img in images.iter().chain(images.iter().rev()) {
                let reused = dec.resize_crop_rgb8(img);
                let s = dec.size() as u32;
                let mut fresh = RgbImage::new(s, s);
                let options = resize_options(dec.geometry(img.width(), img.height()).src_box);
                Resizer::new().resize(img, &mut fresh, &options).unwrap();
                assert_eq!(reused, fresh, "{}x{} -> {s}", img.width(), img.height());
            }
        }
    }

    #[test]
    fn draft_numerator_keeps_the_crop_at_least_s_pixels_across() {
        assert_eq!(draft_numerator(480.0, 480.0, 224.0), 4, "640x480 -> 1/2");
        assert_eq!(draft_numerator(447.0, 447.0, 224.0), 8, "less than twice S: full resolution");
        assert_eq!(draft_numerator(1792.0, 1792.0, 224.0), 1, "8x S: 1/8");
        assert_eq!(draft_numerator(3000.0, 900.0, 224.0), 2, "the short axis decides");
        assert_eq!(draft_numerator(100.0, 100.0, 224.0), 8, "an upscale stays at full resolution");
    }

    #[test]
    fn decode_reduced_scale_jpeg_stays_close_to_full_resolution() {
        // Every fixture photo as a 640x480 JPEG (quality 90): the reduced-scale decode (1/2 here) against the
        // full-resolution one, on the S×S u8 crop the model sees. The module docs quote these figures.
        let (draft, full) = (Decoder::new(DecodeConfig::default()), imagenet_full());
        let (mut worst, mut sum, mut n) = (0u8, 0.0f64, 0usize);
        for key in fixture_keys() {
            let photo = decode_photo(&key);
            let img = image::imageops::resize(&photo, 640, 480, image::imageops::FilterType::Triangle);
            let jpeg = encode_jpeg(&img, 90);
            let (a, size) = draft.crop_rgb8(&jpeg, "jpg").unwrap();
            let (b, _) = full.crop_rgb8(&jpeg, "jpg").unwrap();
            assert_eq!(size, (640, 480), "the full-resolution size is reported");
            let (max, _, mean) = diff_u8(a.as_raw(), b.as_raw());
            worst = worst.max(max);
            sum += mean * a.as_raw().len() as f64;
            n += a.as_raw().len();
        }
        let mean = sum / n as f64;
        eprintln!(
            "reduced-scale vs full-resolution JPEG decode, 640x480 fixture photos: max |Δ| {worst}, mean {mean:.3}"
        );
        assert!(mean < 2.0 && worst < 64, "max |Δ| {worst}, mean |Δ| {mean:.3} levels");
        // Below twice S there is nothing to gain: both decoders agree bit for bit.
        let small = encode_jpeg(&pattern(400, 300), 90);
        assert_eq!(draft.crop_rgb8(&small, "jpg").unwrap().0, full.crop_rgb8(&small, "jpg").unwrap().0);
    }

    fn imagenet_full() -> Decoder {
        Decoder::new(DecodeConfig { jpeg_draft: false, ..DecodeConfig::default() })
    }

    fn fixture_keys() -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(fixtures().join("gcompris"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".webp").map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn decode_webp_with_libwebp_matches_the_pure_rust_decoder() {
        // libwebp and image-webp implement the same lossy VP8 decoding and YUV->RGB conversion: identical on every
        // fixture photo when this was written (max |Δ| 0); a rounding change in either would show here.
        let mut worst = 0u8;
        for key in fixture_keys() {
            let bytes = photo_bytes(&key);
            let ours = decode_webp(&bytes).unwrap();
            let reference = image::load_from_memory_with_format(&bytes, ImageFormat::WebP).unwrap().into_rgb8();
            assert_eq!(ours.dimensions(), reference.dimensions(), "{key}");
            worst = worst.max(diff_u8(ours.as_raw(), reference.as_raw()).0);
        }
        eprintln!("libwebp vs image-webp on the fixture photos: max |Δ| {worst}");
        assert!(worst <= 1, "max |Δ| {worst}");
    }

    #[test]
    fn decode_matches_mobilenet_reference_crop_and_input() {
        let dec = imagenet_preset();
        let dir = fixtures().join("mobilenet_v2/reference");
        let one_level = 1.0 / 255.0 / 0.224 + 1e-5;
        for key in REFERENCE_PHOTOS {
            let path = dir.join(format!("{key}.safetensors"));
            let (dtype, shape, crop_ref) = read_tensor(&path, "crop_u8");
            assert_eq!((dtype.as_str(), shape), ("U8", vec![224, 224, 3]));
            let (dtype, shape, input) = read_tensor(&path, "input");
            assert_eq!((dtype.as_str(), shape), ("F32", vec![1, 3, 224, 224]));
            let input: Vec<f32> = input.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();

            let crop = dec.resize_crop_rgb8(&decode_photo(key));
            let (max, n, mean) = diff_u8(crop.as_raw(), &crop_ref);
            let frac = n as f64 / crop_ref.len() as f64;
            eprintln!("{key}: crop_u8 max |Δ| {max}, {n} values ({:.3}%) differ, mean |Δ| {mean:.4}", 100.0 * frac);
            assert!(max <= 1, "{key}: crop_u8 max |Δ| {max}");

            // normalise() on the reference crop reproduces the reference input (same f32 arithmetic).
            let ref_crop = RgbImage::from_raw(224, 224, crop_ref).unwrap();
            let exact = dec.normalise(&ref_crop);
            let d_exact = exact.iter().zip(&input).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // The full decode path differs only by the ±1-level crop differences.
            let out = dec.decode(raw(key, photo_bytes(key), "webp")).unwrap();
            let d_full = out.pixels.iter().zip(&input).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!("{key}: input max |Δ| normalise(crop_u8) {d_exact:e}, decode() {d_full:e}");
            assert!(d_exact <= 1e-6, "{key}: {d_exact}");
            assert!(d_full <= one_level, "{key}: {d_full}");
        }
    }
}
