//! Class activation maps (Zhou et al. 2016) on the host: the classifier's weights for a class, dotted with the
//! last feature map, give a map of where that class's evidence sits. The maths is tiny next to the backbone
//! (`n_classes × 1280 × 49` multiply-adds per image), so it runs on the CPU after the device forward.

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
