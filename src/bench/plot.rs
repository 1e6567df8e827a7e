//! `juicer bench --plot FILE.png`: throughput and per-stage busy share over time, drawn with the `image` crate
//! and the 8×8 font `juicer show` uses (no plotting dependency).
//!
//! Top panel: samples/s of each pipeline, from consecutive timeline points merged into steps of at least
//! `min_step` seconds. Bottom panel: each stage's busy share (busy time over wall time over workers) for the
//! first pipeline, over the same steps. A dashed vertical line marks where the measured window opened.

use std::path::Path;

use image::{Rgb, RgbImage};

use super::{BenchReport, PipelineReport};
use crate::error::Result;
use crate::show::{draw_text, fill, save_png};

const W: u32 = 1000;
const PANEL_H: u32 = 260;
const LEFT: u32 = 70;
const RIGHT: u32 = 170;
const TOP: u32 = 40;
const GAP: u32 = 50;
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// A series: label, colour, points `(t, y)`.
struct Series {
    label: String,
    colour: Rgb<u8>,
    points: Vec<(f64, f64)>,
}

/// Renders the report's timelines; `min_step` seconds per plotted step.
pub fn render(report: &BenchReport, min_step: f64) -> RgbImage {
    let h = TOP + 2 * PANEL_H + GAP + 40;
    let mut img = RgbImage::from_pixel(W, h, Rgb([255, 255, 255]));
    let title = format!(
        "juicer bench: decode..{} scorer {} batch {}  ({} core(s))",
        report.setup.stages, report.setup.scorer, report.setup.batch_size, report.machine.cores
    );
    draw_text(&mut img, LEFT, 12, &title, 1, INK);
    let throughput: Vec<Series> = report
        .pipelines
        .iter()
        .enumerate()
        .map(|(i, p)| Series {
            label: format!("rank {} epoch {}", p.rank, p.epoch),
            colour: Rgb(PALETTE[i % PALETTE.len()]),
            points: steps(p, min_step)
                .iter()
                .map(|&(a, b)| {
                    let (ta, tb) = (p.timeline[a].t, p.timeline[b].t);
                    let n = p.timeline[b].samples.saturating_sub(p.timeline[a].samples);
                    (tb, n as f64 / (tb - ta).max(1e-9))
                })
                .collect(),
        })
        .collect();
    let window_start = report.pipelines.first().map(|p| p.warmup_seconds);
    panel(&mut img, TOP, "samples/s", &throughput, None, window_start);
    if let Some(p) = report.pipelines.first() {
        let busy: Vec<Series> = p
            .stages
            .iter()
            .enumerate()
            .map(|(k, st)| Series {
                label: st.name.clone(),
                colour: Rgb(PALETTE[k % PALETTE.len()]),
                points: steps(p, min_step)
                    .iter()
                    .filter_map(|&(a, b)| {
                        let (ta, tb) = (p.timeline[a].t, p.timeline[b].t);
                        let d = p.timeline[b].busy.get(k)? - p.timeline[a].busy.get(k)?;
                        Some((tb, 100.0 * d / ((tb - ta).max(1e-9) * st.workers.max(1) as f64)))
                    })
                    .collect(),
            })
            .collect();
        panel(&mut img, TOP + PANEL_H + GAP, "busy % per stage", &busy, Some(100.0), window_start);
    }
    draw_text(&mut img, LEFT + (W - LEFT - RIGHT) / 2 - 60, h - 24, "seconds since start", 1, INK);
    img
}

/// Renders and writes the PNG.
pub fn save(report: &BenchReport, path: &Path, min_step: f64) -> Result<()> {
    save_png(&render(report, min_step), path)
}

/// Index pairs `(a, b)` of timeline points at least `min_step` seconds apart, covering the timeline.
fn steps(p: &PipelineReport, min_step: f64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut a = 0;
    for b in 1..p.timeline.len() {
        if p.timeline[b].t - p.timeline[a].t >= min_step {
            out.push((a, b));
            a = b;
        }
    }
    out
}

fn panel(img: &mut RgbImage, top: u32, title: &str, series: &[Series], y_max: Option<f64>, mark: Option<f64>) {
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, top, top + PANEL_H);
    let t_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(0.0, f64::max).max(1e-3);
    let v_max = y_max
        .unwrap_or_else(|| series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max) * 1.1)
        .max(1e-9);
    for i in 0..=4 {
        let y = y1 - (y1 - y0) * i / 4;
        fill(img, x0, y, x1, y + 1, GRID);
        let v = v_max * f64::from(i) / 4.0;
        let label = if v_max >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") };
        draw_text(img, 4, y.saturating_sub(4), &label, 1, INK);
    }
    for i in 0..=5 {
        let x = x0 + (x1 - x0) * i / 5;
        fill(img, x, y1, x + 1, y1 + 4, INK);
        draw_text(img, x.saturating_sub(12), y1 + 8, &format!("{:.1}", t_max * f64::from(i) / 5.0), 1, INK);
    }
    fill(img, x0, y0, x0 + 1, y1, INK);
    fill(img, x0, y1, x1, y1 + 1, INK);
    draw_text(img, x0, y0.saturating_sub(14), title, 1, INK);
    let px = |t: f64| x0 as f64 + (x1 - x0) as f64 * (t / t_max).clamp(0.0, 1.0);
    let py = |v: f64| y1 as f64 - (y1 - y0) as f64 * (v / v_max).clamp(0.0, 1.0);
    if let Some(m) = mark {
        let x = px(m) as u32;
        for y in (y0..y1).step_by(8) {
            fill(img, x, y, x + 1, y + 4, INK);
        }
    }
    for (k, s) in series.iter().enumerate() {
        for w in s.points.windows(2) {
            line(img, (px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), s.colour);
        }
        if let [only] = s.points.as_slice() {
            fill(img, px(only.0) as u32, py(only.1) as u32, px(only.0) as u32 + 3, py(only.1) as u32 + 3, s.colour);
        }
        let ly = y0 + 6 + 14 * k as u32;
        fill(img, x1 + 10, ly, x1 + 24, ly + 8, s.colour);
        draw_text(img, x1 + 30, ly, &s.label, 1, INK);
    }
}

/// A 2-pixel-wide line from `a` to `b`.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), colour: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let x = (a.0 + (b.0 - a.0) * t).round() as u32;
        let y = (a.1 + (b.1 - a.1) * t).round() as u32;
        fill(img, x, y, x + 2, y + 2, colour);
    }
}
