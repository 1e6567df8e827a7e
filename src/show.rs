//! Rendering one juiced sample as a picture, for `juicer show`: what the model saw, what was kept, and why.
//!
//! [`render`] lays out three tiles side by side, each the S×S model input (nearest-neighbour 2× when
//! S ≤ 256, so 224-px crops stay legible):
//! 1. **input**: the centre crop as the model received it;
//! 2. **kept**: kept patches at full brightness, dropped patches desaturated and dimmed to about 25 %, thin
//!    lines between patches;
//! 3. **saliency**: the raw patch scores, min-max normalised per image, as flat viridis cells (a hard-coded
//!    11-stop table, interpolated linearly), with the outline of the kept region drawn in red.
//!
//! Pixels outside the patch grid (when P does not divide S) belong to no patch: the model never sees them,
//! so tile 2 shows them as dropped and tile 3 in light grey.
//!
//! Below the tiles, dark text on white in the 8×8 bitmap font of `font8x8` (scale 2 when at least 40 glyphs
//! fit on a row, else 1), word-wrapped to the picture's width: the key; `kept K/N patches (xx %)` with the
//! grid and the score range; the classes with the classifier that named them, as
//! `classes (mobilenet-v2): name (0.87), …` or `classes (mobilenet-v2): none`; `caption: …`; and
//! `enriched: …` when there is an enriched caption. Characters outside the font's Basic Latin, Latin-1,
//! Greek, box and block tables are replaced: typographic quotes, dashes and the ellipsis by their ASCII
//! look-alikes, combining marks are dropped, anything else becomes `?`.
//!
//! [`save_png`] writes the picture; [`png_name`] turns a sample key into a flat file name.
//!
//! [`ShowRun`] is what `juicer show` draws: one epoch of a loader for the juicing results, then a second read
//! of the shards for the crops of exactly those samples (a batch carries the kept patches, not the whole crop),
//! each rendered as a [`Panel`].

use std::io::{BufWriter, Write};
use std::path::Path;

use font8x8::{BASIC_FONTS, BLOCK_FONTS, BOX_FONTS, GREEK_FONTS, LATIN_FONTS, MISC_FONTS, UnicodeFonts};
use image::{ImageFormat, Rgb, RgbImage};

use crate::batch::JuicedBatch;
use crate::decode::Decoder;
use crate::error::{Error, Result, SampleError};
use crate::pipeline::Juicer;
use crate::sample::Class;

/// One sample to render: the model input and what the vision branch made of it.
#[derive(Debug, Clone, Copy)]
pub struct Panel<'a> {
    /// Sample key (first text line).
    pub key: &'a str,
    /// The S×S model-input crop, u8 RGB (e.g. [`crate::decode::Decoder::resize_crop_rgb8`]).
    pub image: &'a RgbImage,
    /// Patch grid `(rows, cols)`.
    pub grid: (usize, usize),
    /// Patch side P in pixels of `image`.
    pub patch: usize,
    /// Raw saliency score of every patch, row-major over the grid. Empty (the `none` scorer) or of the
    /// wrong length: the saliency tile is plain grey.
    pub scores: &'a [f32],
    /// Row-major grid indices of the kept patches (indices outside the grid are ignored).
    pub kept: &'a [u32],
    /// Extracted classes.
    pub classes: &'a [Class],
    /// The classifier that named them (`mobilenet-v2`, `efficientnet-lite0`, ...).
    pub classifier: &'a str,
    /// Original caption.
    pub caption: Option<&'a str>,
    /// Enriched caption, when the text branch produced one.
    pub enriched: Option<&'a str>,
}

/// Margin around and between the tiles and around the text, in output pixels.
const MARGIN: u32 = 8;
/// Inputs up to this side are drawn at 2×.
const ZOOM_MAX_SIDE: u32 = 256;
/// Text is drawn at scale 2 when at least this many 16-px glyphs fit on a row.
const MIN_COLS_SCALE2: u32 = 40;
/// Rows of text are 10 font pixels apart (8 for the glyph, 2 of leading).
const LINE_PITCH: u32 = 10;
/// Continuation rows of a wrapped line are indented by this many glyphs.
const WRAP_INDENT: usize = 2;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const LABEL_INK: Rgb<u8> = Rgb([90, 90, 90]);
const OUTLINE: Rgb<u8> = Rgb([255, 32, 32]);
const NO_PATCH: Rgb<u8> = Rgb([200, 200, 200]);
const NO_SCORES: Rgb<u8> = Rgb([150, 150, 150]);
/// Brightness of a dropped patch, relative to the kept one.
const DROPPED_BRIGHTNESS: f32 = 0.25;
/// Share of the original chroma a dropped patch keeps.
const DROPPED_SATURATION: f32 = 0.2;
/// Opacity of the white grid lines on the kept tile.
const GRID_ALPHA: f32 = 0.45;

/// matplotlib's viridis at 0, 0.1, …, 1.
const VIRIDIS: [[u8; 3]; 11] = [
    [68, 1, 84],
    [72, 36, 117],
    [65, 68, 135],
    [53, 95, 141],
    [42, 120, 142],
    [33, 145, 140],
    [34, 168, 132],
    [68, 191, 112],
    [122, 209, 81],
    [189, 223, 38],
    [253, 231, 37],
];

/// The colour of `t ∈ [0, 1]` (clamped; NaN is 0) on the viridis colormap, linearly interpolated.
pub fn viridis(t: f32) -> Rgb<u8> {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    Rgb(std::array::from_fn(|c| (f32::from(a[c]) + f * (f32::from(b[c]) - f32::from(a[c]))).round() as u8))
}

/// A flat file name for a sample key: `/` and `\` become `_`, then `.png`. An empty key, `.` or `..` becomes
/// underscores (`_.png`, `_.png`, `__.png`), so the name never leaves the output folder.
pub fn png_name(key: &str) -> String {
    let flat: String = key.chars().map(|c| if c == '/' || c == '\\' { '_' } else { c }).collect();
    if flat.chars().all(|c| c == '.') { "_".repeat(flat.len().max(1)) + ".png" } else { flat + ".png" }
}

/// Sizes derived from the input side: everything [`render`] needs to place tiles and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Nearest-neighbour zoom of the tiles (2 when the input side is at most 256, else 1).
    zoom: u32,
    /// Tile width and height in output pixels.
    tile: (u32, u32),
    /// Font scale (font pixel = `text_scale`² output pixels).
    text_scale: u32,
    /// Output width.
    width: u32,
    /// Glyphs per text row.
    cols: usize,
}

impl Layout {
    fn new(w: u32, h: u32) -> Self {
        let zoom = if w.max(h) <= ZOOM_MAX_SIDE { 2 } else { 1 };
        let tile = (w * zoom, h * zoom);
        let width = 3 * tile.0 + 4 * MARGIN;
        let inner = width - 2 * MARGIN;
        let text_scale = if inner / 16 >= MIN_COLS_SCALE2 { 2 } else { 1 };
        let cols = (inner / (8 * text_scale)).max(1) as usize;
        Self { zoom, tile, text_scale, width, cols }
    }

    /// Height of one text row in output pixels.
    fn line(&self) -> u32 {
        LINE_PITCH * self.text_scale
    }

    /// Top of the tiles: a margin and one row of tile labels.
    fn tiles_top(&self) -> u32 {
        MARGIN + self.line()
    }

    /// Top of the text band below the tiles.
    fn text_top(&self) -> u32 {
        self.tiles_top() + self.tile.1 + MARGIN
    }

    /// Output height for `rows` wrapped text rows.
    fn height(&self, rows: usize) -> u32 {
        self.text_top() + rows as u32 * self.line() + MARGIN
    }

    /// Left edge of tile `i` (0, 1, 2).
    fn tile_left(&self, i: u32) -> u32 {
        MARGIN + i * (self.tile.0 + MARGIN)
    }
}

/// Renders one sample: three tiles side by side (input crop, kept patches, saliency heat map) above the text.
///
/// Size, for an input of W×H pixels (S×S in practice): zoom `z = 2` when `max(W, H) ≤ 256`, else 1; tiles
/// `T = z·W` by `z·H`; text scale `t = 2` when `(3·T + 16) / 16 ≥ 40`, else 1; rows are `10·t` pixels
/// high. The picture is `3·T + 32` wide (8-px margins around and between the tiles) and
/// `8 + 10·t + z·H + 8 + rows·10·t + 8` high, with one row of tile labels above the tiles and `rows`
/// wrapped text rows below them. 224×224 input: 1376 pixels wide, 16-px glyphs, 85 per row.
pub fn render(panel: &Panel) -> RgbImage {
    let (w, h) = panel.image.dimensions();
    let layout = Layout::new(w, h);
    let n = panel.grid.0 * panel.grid.1;
    let mut mask = vec![false; n];
    for &k in panel.kept {
        if let Some(m) = mask.get_mut(k as usize) {
            *m = true;
        }
    }
    let scores = normalised_scores(panel.scores, n);

    let rows: Vec<String> =
        text_lines(panel, scores.is_some()).iter().flat_map(|line| wrap(line, layout.cols)).collect();
    let mut img = RgbImage::from_pixel(layout.width, layout.height(rows.len()), BACKGROUND);

    let s = layout.text_scale;
    let label_cols = (layout.tile.0 / (8 * s)) as usize;
    let labels = [
        format!("input {w}x{h}"),
        format!("kept {}/{n}", mask.iter().filter(|&&m| m).count()),
        if scores.is_some() { "saliency".to_string() } else { "saliency: none".to_string() },
    ];
    for (i, label) in labels.iter().enumerate() {
        let label: String = normalise_text(label).chars().take(label_cols).collect();
        draw_text(&mut img, layout.tile_left(i as u32), MARGIN, &label, s, LABEL_INK);
    }

    let geo = Geometry { zoom: layout.zoom, patch: panel.patch, grid: panel.grid };
    let top = layout.tiles_top();
    draw_input(&mut img, panel.image, layout.tile_left(0), top, layout.zoom);
    draw_kept(&mut img, panel.image, layout.tile_left(1), top, &geo, &mask);
    draw_saliency(&mut img, (w, h), layout.tile_left(2), top, &geo, scores.as_deref(), &mask);

    for (r, row) in rows.iter().enumerate() {
        draw_text(&mut img, MARGIN, layout.text_top() + r as u32 * layout.line(), row, s, INK);
    }
    img
}

/// Writes `img` as a PNG file; a failure is [`Error::Io`] naming `path`.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let context = || format!("writing PNG {}", path.display());
    let file = std::fs::File::create(path).map_err(|e| Error::io(context(), e))?;
    let mut out = BufWriter::new(file);
    img.write_to(&mut out, ImageFormat::Png).map_err(|e| {
        let io = match e {
            image::ImageError::IoError(io) => io,
            other => std::io::Error::other(other),
        };
        Error::io(context(), io)
    })?;
    out.flush().map_err(|e| Error::io(context(), e))
}

/// What the vision and text branches made of one emitted sample, kept until its crop is read again.
#[derive(Debug, Clone)]
struct Seen {
    grid: (usize, usize),
    patch: usize,
    scores: Vec<f32>,
    kept: Vec<u32>,
    classes: Vec<Class>,
    caption: Option<String>,
    enriched: String,
}

/// The samples of one epoch of a loader, ready to render (`juicer show`).
#[derive(Debug)]
pub struct ShowRun {
    seen: std::collections::HashMap<String, Seen>,
    /// Samples the loader dropped, in order.
    pub dropped: Vec<SampleError>,
}

impl ShowRun {
    /// Runs the loader's next epoch and keeps, per emitted sample, what the panels show.
    pub fn collect(loader: &Juicer<JuicedBatch>) -> Result<Self> {
        let mut seen = std::collections::HashMap::new();
        let mut it = loader.iter()?;
        for batch in it.by_ref() {
            let b = batch?;
            for i in 0..b.len() {
                let s = Seen {
                    grid: b.grid,
                    patch: b.patch,
                    scores: b.scores[i].clone(),
                    kept: b.kept[i].clone(),
                    classes: b.classes[i].clone(),
                    caption: b.captions[i].clone(),
                    enriched: b.enriched[i].clone(),
                };
                seen.insert(b.keys[i].clone(), s);
            }
        }
        Ok(Self { seen, dropped: it.take_dropped() })
    }

    /// Samples collected.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when the epoch emitted nothing.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Reads the loader's shards again in order and calls `each(key, picture)` for every collected sample, in
    /// shard order. Returns how many collected samples were not found again (the shards changed in between).
    pub fn render(
        mut self,
        loader: &Juicer<JuicedBatch>,
        mut each: impl FnMut(&str, RgbImage) -> Result<()>,
    ) -> Result<usize> {
        let decoder = Decoder::new(loader.config().decode.clone());
        let opts = &loader.config().read;
        for shard in loader.shards() {
            for sample in shard.open(0, opts)? {
                if self.seen.is_empty() {
                    return Ok(0);
                }
                let Ok(raw) = sample else { continue };
                let Some(s) = self.seen.remove(&raw.key) else { continue };
                let rgb = decoder.decode_rgb8(&raw.key, &raw.image, &raw.image_ext).map_err(Error::Sample)?;
                let crop = decoder.resize_crop_rgb8(&rgb);
                let img = render(&Panel {
                    key: &raw.key,
                    image: &crop,
                    grid: s.grid,
                    patch: s.patch,
                    scores: &s.scores,
                    kept: &s.kept,
                    classes: &s.classes,
                    classifier: loader.config().vision.classifier.name(),
                    caption: s.caption.as_deref(),
                    enriched: Some(&s.enriched),
                });
                each(&raw.key, img)?;
            }
        }
        Ok(self.seen.len())
    }
}

/// The text lines below the tiles, before wrapping.
fn text_lines(panel: &Panel, has_scores: bool) -> Vec<String> {
    let n = panel.grid.0 * panel.grid.1;
    let k = panel.kept.len();
    let pct = if n == 0 { 0.0 } else { 100.0 * k as f64 / n as f64 };
    let mut kept =
        format!("kept {k}/{n} patches ({pct:.0} %), grid {}x{} of {} px", panel.grid.0, panel.grid.1, panel.patch);
    if has_scores {
        let finite = panel.scores.iter().copied().filter(|s| s.is_finite());
        let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)));
        if lo <= hi {
            kept.push_str(&format!(", scores {lo:.3} to {hi:.3}"));
        }
    } else {
        kept.push_str(", no scores");
    }
    let classes = if panel.classes.is_empty() {
        format!("classes ({}): none", panel.classifier)
    } else {
        let list: Vec<String> = panel.classes.iter().map(|c| format!("{} ({:.2})", c.name, c.prob)).collect();
        format!("classes ({}): {}", panel.classifier, list.join(", "))
    };
    let key = if panel.key.is_empty() { "(no key)" } else { panel.key };
    let mut lines = vec![key.to_string(), kept, classes, format!("caption: {}", panel.caption.unwrap_or("none"))];
    if let Some(e) = panel.enriched {
        lines.push(format!("enriched: {e}"));
    }
    lines
}

/// Scores min-max normalised to `[0, 1]` (non-finite scores count as the minimum; equal scores all give
/// 0.5), or `None` when there is not exactly one score per patch.
fn normalised_scores(scores: &[f32], n: usize) -> Option<Vec<f32>> {
    if n == 0 || scores.len() != n {
        return None;
    }
    let finite = scores.iter().copied().filter(|s| s.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)));
    Some(
        scores
            .iter()
            .map(|&s| match (s.is_finite(), hi > lo) {
                (false, _) => 0.0,
                (true, true) => (s - lo) / (hi - lo),
                (true, false) => 0.5,
            })
            .collect(),
    )
}

/// Patch geometry in input pixels, and the tile zoom.
struct Geometry {
    zoom: u32,
    patch: usize,
    grid: (usize, usize),
}

impl Geometry {
    /// Row-major patch index of input pixel `(x, y)`, or `None` outside the grid.
    fn patch_at(&self, x: u32, y: u32) -> Option<usize> {
        if self.patch == 0 {
            return None;
        }
        let (c, r) = (x as usize / self.patch, y as usize / self.patch);
        (r < self.grid.0 && c < self.grid.1).then_some(r * self.grid.1 + c)
    }
}

/// Tile 1: the crop, nearest-neighbour zoomed.
fn draw_input(img: &mut RgbImage, src: &RgbImage, left: u32, top: u32, zoom: u32) {
    let (w, h) = src.dimensions();
    for oy in 0..h * zoom {
        for ox in 0..w * zoom {
            img.put_pixel(left + ox, top + oy, *src.get_pixel(ox / zoom, oy / zoom));
        }
    }
}

/// Tile 2: kept patches as they are, dropped ones desaturated and dimmed, white lines between patches.
fn draw_kept(img: &mut RgbImage, src: &RgbImage, left: u32, top: u32, geo: &Geometry, mask: &[bool]) {
    let (w, h) = src.dimensions();
    let z = geo.zoom;
    let cell = (geo.patch as u32).saturating_mul(z);
    let grid_w = (geo.grid.1 as u32).saturating_mul(cell);
    let grid_h = (geo.grid.0 as u32).saturating_mul(cell);
    for oy in 0..h * z {
        for ox in 0..w * z {
            let (x, y) = (ox / z, oy / z);
            let px = *src.get_pixel(x, y);
            let kept = geo.patch_at(x, y).is_some_and(|i| mask.get(i).copied().unwrap_or(false));
            let mut out = if kept { px } else { dim(px) };
            let on_line = cell > 0
                && ((ox % cell == 0 && ox > 0 && ox < grid_w && oy < grid_h)
                    || (oy % cell == 0 && oy > 0 && oy < grid_h && ox < grid_w));
            if on_line {
                out = blend(out, BACKGROUND, GRID_ALPHA);
            }
            img.put_pixel(left + ox, top + oy, out);
        }
    }
}

/// Tile 3: flat viridis cells of the normalised scores, the kept region outlined.
fn draw_saliency(
    img: &mut RgbImage,
    (w, h): (u32, u32),
    left: u32,
    top: u32,
    geo: &Geometry,
    scores: Option<&[f32]>,
    mask: &[bool],
) {
    let z = geo.zoom;
    let colours: Option<Vec<Rgb<u8>>> = scores.map(|s| s.iter().map(|&t| viridis(t)).collect());
    for oy in 0..h * z {
        for ox in 0..w * z {
            let colour = match (&colours, geo.patch_at(ox / z, oy / z)) {
                (Some(c), Some(i)) => c[i],
                (None, Some(_)) => NO_SCORES,
                (_, None) => NO_PATCH,
            };
            img.put_pixel(left + ox, top + oy, colour);
        }
    }
    // Outline: the edges of kept patches whose neighbour on that side is not kept, drawn inside the patch.
    let cell = (geo.patch as u32).saturating_mul(z);
    if cell == 0 {
        return;
    }
    let thick = z.min((cell / 4).max(1));
    let (rows, cols) = geo.grid;
    let kept = |r: isize, c: isize| {
        r >= 0
            && c >= 0
            && (r as usize) < rows
            && (c as usize) < cols
            && mask.get(r as usize * cols + c as usize).copied().unwrap_or(false)
    };
    for r in 0..rows {
        for c in 0..cols {
            let (ri, ci) = (r as isize, c as isize);
            if !kept(ri, ci) {
                continue;
            }
            let (x0, y0) = (left + c as u32 * cell, top + r as u32 * cell);
            let (x1, y1) = (x0 + cell, y0 + cell);
            if !kept(ri - 1, ci) {
                fill(img, x0, y0, x1, y0 + thick, OUTLINE);
            }
            if !kept(ri + 1, ci) {
                fill(img, x0, y1 - thick, x1, y1, OUTLINE);
            }
            if !kept(ri, ci - 1) {
                fill(img, x0, y0, x0 + thick, y1, OUTLINE);
            }
            if !kept(ri, ci + 1) {
                fill(img, x1 - thick, y0, x1, y1, OUTLINE);
            }
        }
    }
}

/// A dropped pixel: mostly grey, at a quarter of its brightness.
fn dim(px: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = px.0.map(f32::from);
    let luma = 0.299 * r + 0.587 * g + 0.114 * b;
    Rgb(px.0.map(|c| {
        let desaturated = luma + DROPPED_SATURATION * (f32::from(c) - luma);
        (DROPPED_BRIGHTNESS * desaturated).round().clamp(0.0, 255.0) as u8
    }))
}

/// `a` blended towards `b` by `alpha`.
fn blend(a: Rgb<u8>, b: Rgb<u8>, alpha: f32) -> Rgb<u8> {
    Rgb(std::array::from_fn(|c| {
        (f32::from(a.0[c]) * (1.0 - alpha) + f32::from(b.0[c]) * alpha).round().clamp(0.0, 255.0) as u8
    }))
}

/// Fills the rectangle `[x0, x1) × [y0, y1)`, clipped to the image.
pub(crate) fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, colour: Rgb<u8>) {
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            img.put_pixel(x, y, colour);
        }
    }
}

/// The 8×8 glyph of `c` (row-major, bit 0 the leftmost pixel), from the first `font8x8` table that has it.
fn glyph(c: char) -> Option<[u8; 8]> {
    BASIC_FONTS
        .get(c)
        .or_else(|| LATIN_FONTS.get(c))
        .or_else(|| GREEK_FONTS.get(c))
        .or_else(|| MISC_FONTS.get(c))
        .or_else(|| BOX_FONTS.get(c))
        .or_else(|| BLOCK_FONTS.get(c))
}

/// Makes `text` drawable glyph for glyph: control characters become spaces, common typographic punctuation
/// its ASCII look-alike, combining marks are dropped, and anything else without a glyph becomes `?`.
fn normalise_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_control() => out.push(' '),
            '\u{0300}'..='\u{036F}' => {}
            c if glyph(c).is_some() => out.push(c),
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' | '\u{2032}' | '\u{02BC}' | '\u{02B9}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' | '\u{2033}' => out.push('"'),
            '\u{2010}'..='\u{2015}' | '\u{2212}' => out.push('-'),
            '\u{2026}' => out.push_str("..."),
            '\u{2022}' => out.push('\u{00B7}'),
            '\u{2002}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}' => out.push(' '),
            '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' => {}
            _ => out.push('?'),
        }
    }
    out
}

/// Wraps one logical line into rows of at most `cols` glyphs: greedy on whitespace, words longer than a row
/// split hard, continuation rows indented. Always at least one row.
fn wrap(line: &str, cols: usize) -> Vec<String> {
    let cols = cols.max(1);
    let indent = if cols > 4 * WRAP_INDENT { WRAP_INDENT } else { 0 };
    let mut rows: Vec<String> = Vec::new();
    let mut row = String::new();
    let mut len = 0usize;
    for word in normalise_text(line).split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let sep = usize::from(len > 0 && !row.ends_with(' '));
            if len + sep + word.len() <= cols {
                if sep == 1 {
                    row.push(' ');
                }
                row.extend(word.iter());
                len += sep + word.len();
                break;
            }
            let fresh = if rows.is_empty() { 0 } else { indent };
            if len > fresh {
                // The word does not fit behind what is on the row: start a new row.
                rows.push(std::mem::take(&mut row));
                row = " ".repeat(indent);
                len = indent;
                continue;
            }
            // The row is empty and the word is longer than a row: split it.
            let take = cols - len;
            row.extend(word[..take].iter());
            word.drain(..take);
            rows.push(std::mem::take(&mut row));
            row = " ".repeat(indent);
            len = indent;
            if word.is_empty() {
                break;
            }
        }
    }
    if len > 0 && !row.trim().is_empty() || rows.is_empty() {
        rows.push(row);
    }
    rows
}

/// Draws `text` (already normalised) with its top-left corner at `(x, y)`, each font pixel `scale`² output
/// pixels, clipped to the image.
pub(crate) fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, colour: Rgb<u8>) {
    let unknown = glyph('?').unwrap_or([0; 8]);
    for (i, c) in text.chars().enumerate() {
        let bits = if c == ' ' { [0; 8] } else { glyph(c).unwrap_or(unknown) };
        let gx = x + i as u32 * 8 * scale;
        for (row, byte) in bits.iter().enumerate() {
            for bit in 0..8u32 {
                if byte & (1 << bit) != 0 {
                    let px = gx + bit * scale;
                    let py = y + row as u32 * scale;
                    fill(img, px, py, px + scale, py + scale, colour);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(s: u32) -> RgbImage {
        RgbImage::from_fn(s, s, |x, y| Rgb([(x * 255 / s.max(1)) as u8, (y * 255 / s.max(1)) as u8, 180]))
    }

    fn panel<'a>(image: &'a RgbImage, scores: &'a [f32], kept: &'a [u32], classes: &'a [Class]) -> Panel<'a> {
        let s = image.width() as usize;
        Panel {
            key: "shard/sample-0001",
            image,
            grid: (s / 16, s / 16),
            patch: 16,
            scores,
            kept,
            classes,
            classifier: "mobilenet-v2",
            caption: Some("A short caption."),
            enriched: None,
        }
    }

    fn mean_luma(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> f64 {
        let mut sum = 0.0;
        for y in y0..y1 {
            for x in x0..x1 {
                let [r, g, b] = img.get_pixel(x, y).0.map(f64::from);
                sum += 0.299 * r + 0.587 * g + 0.114 * b;
            }
        }
        sum / f64::from((x1 - x0) * (y1 - y0))
    }

    #[test]
    fn size_is_as_documented() {
        // 224: zoom 2, T = 448, width 3·448 + 32 = 1376, text scale 2, 85 glyphs per row.
        let img = gradient(224);
        let scores = vec![0.0; 196];
        let p = panel(&img, &scores, &[0, 1, 2], &[]);
        let out = render(&p);
        assert_eq!(out.width(), 1376);
        // Five short-enough lines? The caption line is one row; no enriched line: 4 rows.
        assert_eq!(out.height(), 8 + 20 + 448 + 8 + 4 * 20 + 8);
        // 384: no zoom, width 3·384 + 32 = 1184, scale 2 (1168 / 16 = 73 glyphs).
        let img = gradient(384);
        let scores = vec![0.0; 576];
        let out = render(&panel(&img, &scores, &[], &[]));
        assert_eq!(out.width(), 1184);
        assert_eq!(out.height(), 8 + 20 + 384 + 8 + 4 * 20 + 8);
        // 32: zoom 2, T = 64, width 224, text scale 1 (208 / 16 = 13 < 40), rows 10 px, 26 glyphs per row.
        let img = gradient(32);
        let mut p = panel(&img, &[], &[], &[]);
        p.key = "k";
        p.caption = None;
        let out = render(&p);
        assert_eq!(out.width(), 224);
        let rows: usize = text_lines(&p, false).iter().map(|l| wrap(l, Layout::new(32, 32).cols).len()).sum::<usize>();
        assert_eq!(Layout::new(32, 32).cols, 26);
        assert_eq!(out.height(), 8 + 10 + 64 + 8 + rows as u32 * 10 + 8);
        // Every documented quantity agrees with the layout.
        let l = Layout::new(224, 224);
        assert_eq!((l.zoom, l.tile, l.text_scale, l.cols), (2, (448, 448), 2, 85));
    }

    #[test]
    fn dropped_patch_is_darker_than_kept() {
        let img = gradient(224);
        let scores: Vec<f32> = (0..196).map(|i| i as f32).collect();
        let kept_all: Vec<u32> = (0..196).collect();
        let kept_some: Vec<u32> = (0..196).filter(|&i| i != 30).collect();
        let a = render(&panel(&img, &scores, &kept_all, &[]));
        let b = render(&panel(&img, &scores, &kept_some, &[]));
        // Patch 30 = row 2, col 2; its interior in tile 2 (skip the grid line on its first row and column).
        let l = Layout::new(224, 224);
        let (x0, y0) = (l.tile_left(1) + 2 * 32 + 1, l.tiles_top() + 2 * 32 + 1);
        let (x1, y1) = (x0 + 31, y0 + 31);
        let kept = mean_luma(&a, x0, y0, x1, y1);
        let dropped = mean_luma(&b, x0, y0, x1, y1);
        assert!(dropped < 0.35 * kept, "dropped {dropped} vs kept {kept}");
        assert!(dropped > 0.0);
        // Tile 2 of the all-kept render equals the input (bar grid lines) in the patch interior.
        assert_eq!(
            a.get_pixel(x0 + 3, y0 + 3),
            img.get_pixel((x0 + 3 - l.tile_left(1)) / 2, (y0 + 3 - l.tiles_top()) / 2)
        );
        // Desaturated: the dropped pixel's channels are closer together than the kept pixel's.
        let spread =
            |p: &Rgb<u8>| i32::from(*p.0.iter().max().unwrap_or(&0)) - i32::from(*p.0.iter().min().unwrap_or(&0));
        assert!(spread(b.get_pixel(x0 + 3, y0 + 3)) * 4 < spread(a.get_pixel(x0 + 3, y0 + 3)).max(4));
    }

    #[test]
    fn heat_map_top_patch_has_top_colour() {
        let img = gradient(224);
        let mut scores: Vec<f32> = (0..196).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        scores[77] = 5.0;
        scores[3] = -2.0;
        let out = render(&panel(&img, &scores, &[77, 78], &[]));
        let l = Layout::new(224, 224);
        let centre = |i: u32| (l.tile_left(2) + (i % 14) * 32 + 16, l.tiles_top() + (i / 14) * 32 + 16);
        let (x, y) = centre(77);
        assert_eq!(*out.get_pixel(x, y), Rgb(VIRIDIS[10]));
        let (x, y) = centre(3);
        assert_eq!(*out.get_pixel(x, y), Rgb(VIRIDIS[0]));
        // The kept region is outlined: the top edge of patch 77 is red, the shared edge 77|78 is not.
        let (x, y) = centre(77);
        assert_eq!(*out.get_pixel(x, y - 16), OUTLINE);
        assert_ne!(*out.get_pixel(x + 15, y), OUTLINE);
        assert_eq!(*out.get_pixel(x - 16, y), OUTLINE);
        assert_eq!(viridis(0.5), Rgb(VIRIDIS[5]));
        assert_eq!(
            (viridis(-1.0), viridis(f32::NAN), viridis(2.0)),
            (Rgb(VIRIDIS[0]), Rgb(VIRIDIS[0]), Rgb(VIRIDIS[10]))
        );
    }

    #[test]
    fn no_scores_gives_grey_tile() {
        let img = gradient(64);
        let p = Panel { grid: (4, 4), ..panel(&img, &[], &[0], &[]) };
        let out = render(&p);
        let l = Layout::new(64, 64);
        assert_eq!(*out.get_pixel(l.tile_left(2) + 100, l.tiles_top() + 100), NO_SCORES);
    }

    #[test]
    fn text_band_has_dark_pixels() {
        let img = gradient(224);
        let classes = [Class { id: Some(388), wnid: "n02510455".into(), name: "giant panda".into(), prob: 0.87 }];
        let out = render(&panel(&img, &[], &[], &classes));
        let l = Layout::new(224, 224);
        let dark_in_row = |r: u32| {
            let y0 = l.text_top() + r * l.line();
            (y0..y0 + l.line())
                .flat_map(|y| (0..out.width()).map(move |x| (x, y)))
                .filter(|&(x, y)| out.get_pixel(x, y).0.iter().all(|&c| c < 64))
                .count()
        };
        for r in 0..4 {
            assert!(dark_in_row(r) > 50, "row {r} has {} dark pixels", dark_in_row(r));
        }
        // The margin below the text stays white.
        let y = out.height() - 1;
        assert!((0..out.width()).all(|x| *out.get_pixel(x, y) == BACKGROUND));
        // Glyph bit 0 is the leftmost pixel: 'I' in font8x8 is 0x1E on its top row (columns 1..=4).
        let mut t = RgbImage::from_pixel(8, 8, BACKGROUND);
        draw_text(&mut t, 0, 0, "I", 1, INK);
        let top: Vec<bool> = (0..8).map(|x| *t.get_pixel(x, 0) == INK).collect();
        assert_eq!(top, [false, true, true, true, true, false, false, false]);
    }

    #[test]
    fn long_caption_wraps() {
        let img = gradient(224);
        let short = render(&panel(&img, &[], &[], &[]));
        let long_caption = "The ultimate fairytale castle, Neuschwanstein is situated on a rugged hill near Füssen in \
            southwest Bavaria. It was the inspiration for the Sleeping Beauty castles in the Disneyland parks.";
        let p = Panel { caption: Some(long_caption), enriched: Some("castle, palace"), ..panel(&img, &[], &[], &[]) };
        let long = render(&p);
        let rows = wrap(&format!("caption: {long_caption}"), 85);
        assert!(rows.len() >= 3);
        assert!(rows.iter().all(|r| r.chars().count() <= 85));
        assert!(rows[1].starts_with("  ") && !rows[1].starts_with("   "));
        // The caption takes `rows` rows instead of one, and the enriched line adds one.
        assert_eq!(long.height(), short.height() + rows.len() as u32 * 20);
    }

    #[test]
    fn wrap_and_normalise_edge_cases() {
        assert_eq!(wrap("", 10), vec![String::new()]);
        assert_eq!(wrap("abcdefghijklmnop", 10), vec!["abcdefghij", "  klmnop"]);
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("abc", 1), vec!["a", "b", "c"]);
        assert_eq!(normalise_text("Füssen – “quoted” l’île…\tx"), "Füssen - \"quoted\" l'île... x");
        assert_eq!(normalise_text("e\u{0301}中"), "e?");
        assert_eq!(png_name("a/b\\c"), "a_b_c.png");
        assert_eq!(png_name(""), "_.png");
        assert_eq!(png_name(".."), "__.png");
        assert_eq!(png_name("../x"), ".._x.png");
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let empty = RgbImage::new(0, 0);
        let out = render(&Panel { grid: (0, 0), patch: 0, ..panel(&empty, &[], &[5], &[]) });
        assert_eq!(out.width(), 4 * MARGIN);
        let img = gradient(40); // P = 16 leaves an 8-px remainder outside the 2×2 grid
        let scores = [f32::NAN, 1.0, f32::INFINITY, 1.0];
        let out = render(&Panel { grid: (2, 2), ..panel(&img, &scores, &[0, 1, 2, 3, 99], &[]) });
        let l = Layout::new(40, 40);
        assert_eq!(*out.get_pixel(l.tile_left(2) + 75, l.tiles_top() + 75), NO_PATCH);
    }

    #[test]
    fn save_png_round_trips_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let img = render(&panel(&gradient(64), &[], &[], &[]));
        let path = dir.path().join("x.png");
        save_png(&img, &path).unwrap();
        assert_eq!(image::open(&path).unwrap().into_rgb8(), img);
        let bad = dir.path().join("missing/x.png");
        let err = save_png(&img, &bad).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("missing/x.png"), "{err}");
    }

    /// Renders four GCompris photos into `$TMPDIR/show-test/` for a look (made-up scores: a centred
    /// Gaussian, the top half kept).
    #[test]
    fn renders_gcompris_photos() {
        use crate::decode::{DecodeConfig, Decoder};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gcompris");
        let pairs = std::fs::read_to_string(root.join("pairs.jsonl")).unwrap();
        let captions: std::collections::HashMap<String, String> = pairs
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["key"].as_str().unwrap().to_string(), v["caption"].as_str().unwrap().to_string()))
            .collect();
        let out_dir = std::env::temp_dir().join("show-test");
        std::fs::create_dir_all(&out_dir).unwrap();
        let decoder = Decoder::new(DecodeConfig::default());
        let photos = [
            ("animals-giant_panda", "giant panda", 0.93),
            ("animals-koala", "koala", 0.88),
            ("farm-sheep", "ram", 0.41),
            ("monuments-neuschwanstein_castle", "castle", 0.67),
        ];
        for (n, (key, class, prob)) in photos.into_iter().enumerate() {
            let bytes = std::fs::read(root.join(format!("{key}.webp"))).unwrap();
            let rgb = decoder.decode_rgb8(key, &bytes, "webp").unwrap();
            let crop = decoder.resize_crop_rgb8(&rgb);
            let (rows, cols) = (14usize, 14usize);
            let scores: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (r, c) = ((i / cols) as f32 - 6.5, (i % cols) as f32 - 6.5 + n as f32);
                    (-(r * r + c * c) / (2.0 * 16.0)).exp()
                })
                .collect();
            let mut order: Vec<u32> = (0..scores.len() as u32).collect();
            order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
            let mut kept = order[..scores.len() / 2].to_vec();
            kept.sort_unstable();
            let classes = [
                Class { id: Some(0), wnid: String::new(), name: class.into(), prob },
                Class { id: Some(1), wnid: String::new(), name: "alp".into(), prob: 0.05 },
            ];
            let key = format!("gcompris/{key}");
            let enriched = (n == 3).then_some("A castle on a hill: Neuschwanstein, Füssen – Bavaria.");
            let panel = Panel {
                key: &key,
                image: &crop,
                grid: (rows, cols),
                patch: 16,
                scores: &scores,
                kept: &kept,
                classes: &classes[..if n == 2 { 0 } else { 1 + n % 2 }],
                classifier: "mobilenet-v2",
                caption: captions.get(key.trim_start_matches("gcompris/")).map(String::as_str),
                enriched,
            };
            let img = render(&panel);
            assert_eq!(img.width(), 1376);
            save_png(&img, &out_dir.join(png_name(&key))).unwrap();
        }
    }
}
