//! Class activation maps (Zhou et al. 2016) on the host: the classifier's weights for a class, dotted with the
//! last feature map, give a map of where that class's evidence sits. The maths is tiny next to the backbone
//! (`n_classes × 1280 × 49` multiply-adds per image), so it runs on the CPU after the device forward. The scorer's
//! smaller input (`--score-size`) is made here too ([`downscale_planes`]).

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| (e / total) as f32).collect()
}

/// The `k` largest values as `(index, value)`, largest first, ties by lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, values[i])).collect()
}

/// CAM of one class: `Σ_k w[k] · features[k, ·]` over a `[channels, hw]` feature map (row-major).
pub fn class_map(features: &[f32], weight_row: &[f32]) -> Vec<f32> {
    let channels = weight_row.len();
    let hw = features.len().checked_div(channels).unwrap_or(0);
    let mut out = vec![0f32; hw];
    for (k, &w) in weight_row.iter().enumerate() {
        let row = &features[k * hw..(k + 1) * hw];
        for (o, &f) in out.iter_mut().zip(row) {
            *o += w * f;
        }
    }
    out
}

/// Downscales a square `[channels, size, size]` image (row-major planes) to `[channels, to, to]` with Pillow's
/// antialiased bilinear filter (a triangle whose support grows with the scale factor, as the decoder's resize),
/// separably: rows, then columns. `to >= size` returns the input unchanged.
pub fn downscale_planes(pixels: &[f32], channels: usize, size: usize, to: usize) -> Vec<f32> {
    if to >= size || to == 0 {
        return pixels.to_vec();
    }
    let taps = triangle_taps(size, to);
    let mut rows = vec![0f32; channels * size * to]; // [c, size, to]
    for (plane, out) in pixels.chunks_exact(size * size).zip(rows.chunks_exact_mut(size * to)) {
        for (src, dst) in plane.chunks_exact(size).zip(out.chunks_exact_mut(to)) {
            for (d, (start, w)) in dst.iter_mut().zip(&taps) {
                *d = w.iter().zip(&src[*start..]).map(|(w, s)| w * s).sum();
            }
        }
    }
    let mut out = vec![0f32; channels * to * to];
    for (plane, dst) in rows.chunks_exact(size * to).zip(out.chunks_exact_mut(to * to)) {
        for (y, (start, w)) in taps.iter().enumerate() {
            let row = &mut dst[y * to..(y + 1) * to];
            for (k, &wk) in w.iter().enumerate() {
                let src = &plane[(start + k) * to..(start + k + 1) * to];
                for (d, &s) in row.iter_mut().zip(src) {
                    *d += wk * s;
                }
            }
        }
    }
    out
}

/// Per output index: the first input index and the normalised triangle weights (Pillow's `BILINEAR` with
/// antialiasing: support `max(1, in / out)`, centred at `(o + 0.5) · in / out`).
fn triangle_taps(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f64 / output as f64;
    let support = scale.max(1.0);
    (0..output)
        .map(|o| {
            let centre = (o as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(input);
            let w: Vec<f64> = (lo..hi).map(|i| (1.0 - ((i as f64 + 0.5 - centre) / support).abs()).max(0.0)).collect();
            let total: f64 = w.iter().sum();
            (lo, w.into_iter().map(|x| (x / total.max(f64::MIN_POSITIVE)) as f32).collect())
        })
        .collect()
}

/// Bilinear resampling of a row-major `src` map of `(h, w)` to `(oh, ow)` with PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)` sampling (no antialiasing).
pub fn resample_bilinear(src: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    let coord = |o: usize, out: usize, inp: usize| -> (usize, usize, f32) {
        let scale = inp as f32 / out as f32;
        let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let x0 = (x.floor() as usize).min(inp - 1);
        let x1 = (x0 + 1).min(inp - 1);
        (x0, x1, x - x0 as f32)
    };
    let mut out = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        let (y0, y1, fy) = coord(oy, oh, h);
        for ox in 0..ow {
            let (x0, x1, fx) = coord(ox, ow, w);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscale_planes_keeps_constants_and_linear_ramps() {
        let (c, size, to) = (3, 224, 160);
        let constant = vec![0.7f32; c * size * size];
        let out = downscale_planes(&constant, c, size, to);
        assert_eq!(out.len(), c * to * to);
        assert!(out.iter().all(|&v| (v - 0.7).abs() < 1e-5));
        // A ramp in x, away from the borders: the triangle filter follows it, sampled at the output centres (to
        // within the discrete filter's centroid error, a few hundredths of an input pixel).
        let ramp: Vec<f32> = (0..c * size * size).map(|i| (i % size) as f32).collect();
        let out = downscale_planes(&ramp, c, size, to);
        let scale = size as f32 / to as f32;
        for x in 4..to - 4 {
            let want = (x as f32 + 0.5) * scale - 0.5;
            assert!((out[7 * to + x] - want).abs() < 0.1, "x {x}: {} vs {want}", out[7 * to + x]);
        }
        assert_eq!(downscale_planes(&ramp, c, size, size), ramp, "no downscale: unchanged");
    }

    #[test]
    fn softmax_and_top_k() {
        let p = softmax(&[1.0, 3.0, 3.0, -1.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&p, 2).iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn class_map_is_a_weighted_sum_of_channels() {
        // 2 channels of a 1×3 map.
        let f = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
        assert_eq!(class_map(&f, &[1.0, 0.5]), vec![6.0, 12.0, 18.0]);
    }

    #[test]
    fn bilinear_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear")
        let out = resample_bilinear(&[0.0, 1.0, 2.0, 3.0], (2, 2), (4, 4));
        let expected = [0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0];
        for (a, b) in out.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        assert_eq!(resample_bilinear(&[5.0; 49], (7, 7), (14, 14)), vec![5.0; 196]);
    }
}
