//! The patch grid of a square input and the ViT patch layout: [`grid`], [`patchify`] (normalised pixels → the
//! kept patches `[K, 3·P·P]` a batch carries) and its inverse [`unpatchify`] (to look at what pruning kept).
//!
//! A leaf: the decode stage, the sample lifecycle (`Pruned → JuicedSample`), the scorers and the score cache all
//! index patches the same way through this module, and it depends on none of them.

/// Patch grid `(rows, cols)` of a `size`×`size` input with square patches of side `patch` (a remainder that
/// does not fill a patch is ignored, as a stride-`patch` convolution does). `(0, 0)` when `patch` is 0.
pub fn grid(size: usize, patch: usize) -> (usize, usize) {
    size.checked_div(patch).map_or((0, 0), |n| (n, n))
}

/// Cuts channel-major `[3, S, S]` pixels into the kept patches `[K, 3·P·P]`.
///
/// Patch `k` is the cell at row `k / cols`, column `k % cols` of the [`grid`]; each patch is flattened
/// channel-major `(c, py, px)`, the order a `Conv2d` patch embedding with kernel = stride = P flattens its
/// weight. Patches come out in the order of `keep`.
///
/// # Panics
/// If `pixels.len() != 3 * size * size`, `patch == 0`, or an index in `keep` is outside the grid
/// (programming errors: `keep` comes from the pruning stage).
pub fn patchify(pixels: &[f32], size: usize, patch: usize, keep: &[u32]) -> Vec<f32> {
    assert_eq!(pixels.len(), 3 * size * size, "patchify: pixels must be [3, {size}, {size}]");
    assert!(patch > 0, "patchify: patch size must be > 0");
    let (rows, cols) = grid(size, patch);
    let mut out = Vec::with_capacity(keep.len() * 3 * patch * patch);
    for &k in keep {
        let k = k as usize;
        assert!(k < rows * cols, "patchify: patch index {k} outside the {rows}x{cols} grid");
        // The row copies of the usual patch sides have a length known at compile time: inlined vector moves
        // instead of one `memcpy` call per 16-value row (9,408 of them per 224-px image).
        match patch {
            14 => patch_rows::<14>(pixels, size, k / cols, k % cols, &mut out),
            16 => patch_rows::<16>(pixels, size, k / cols, k % cols, &mut out),
            32 => patch_rows::<32>(pixels, size, k / cols, k % cols, &mut out),
            _ => {
                for ch in 0..3 {
                    for py in 0..patch {
                        let start = ch * size * size + ((k / cols) * patch + py) * size + (k % cols) * patch;
                        out.extend_from_slice(&pixels[start..start + patch]);
                    }
                }
            }
        }
    }
    out
}

/// Appends patch (`r`, `c`) of side `P` of a `[3, size, size]` image to `out`, channel by channel, row by row.
#[inline(always)]
fn patch_rows<const P: usize>(pixels: &[f32], size: usize, r: usize, c: usize, out: &mut Vec<f32>) {
    for ch in 0..3 {
        for py in 0..P {
            let start = ch * size * size + (r * P + py) * size + c * P;
            let row: &[f32; P] = match pixels[start..start + P].try_into() {
                Ok(row) => row,
                Err(_) => unreachable!("a slice of length P"),
            };
            out.extend_from_slice(row);
        }
    }
}

/// Inverse of [`patchify`]: writes the kept patches `[K, 3·P·P]` back into a `[3, S, S]` image whose other
/// pixels are `fill` (for visualising what pruning kept).
///
/// # Panics
/// If `patches.len() != keep.len() * 3 * patch * patch`, `patch == 0`, or an index is outside the grid.
pub fn unpatchify(patches: &[f32], size: usize, patch: usize, keep: &[u32], fill: f32) -> Vec<f32> {
    assert!(patch > 0, "unpatchify: patch size must be > 0");
    let plen = 3 * patch * patch;
    assert_eq!(patches.len(), keep.len() * plen, "unpatchify: patches must be [{}, {plen}]", keep.len());
    let (rows, cols) = grid(size, patch);
    let plane = size * size;
    let mut out = vec![fill; 3 * plane];
    for (p, &k) in patches.chunks_exact(plen).zip(keep) {
        let k = k as usize;
        assert!(k < rows * cols, "unpatchify: patch index {k} outside the {rows}x{cols} grid");
        let (r, c) = (k / cols, k % cols);
        for (row, src) in p.chunks_exact(patch).enumerate() {
            let (ch, py) = (row / patch, row % patch);
            let start = ch * plane + (r * patch + py) * size + c * patch;
            out[start..start + patch].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_hand_checked() {
        // S = 4, P = 2: a 2x2 grid. Pixel value = c*100 + y*10 + x.
        let s = 4;
        let pixels: Vec<f32> =
            (0..3).flat_map(|c| (0..s).flat_map(move |y| (0..s).map(move |x| (c * 100 + y * 10 + x) as f32))).collect();
        assert_eq!(grid(4, 2), (2, 2));
        assert_eq!(grid(224, 16), (14, 14));
        assert_eq!(grid(225, 16), (14, 14));
        assert_eq!(grid(4, 0), (0, 0));
        // Patch 1 is row 0, column 1: x in 2..4, y in 0..2. Patch 2 is row 1, column 0.
        let p = patchify(&pixels, s, 2, &[1, 2]);
        #[rustfmt::skip]
        let expected = [
            2.0, 3.0, 12.0, 13.0,  102.0, 103.0, 112.0, 113.0,  202.0, 203.0, 212.0, 213.0,
            20.0, 21.0, 30.0, 31.0,  120.0, 121.0, 130.0, 131.0,  220.0, 221.0, 230.0, 231.0,
        ];
        assert_eq!(p, expected);
        assert!(patchify(&pixels, s, 2, &[]).is_empty());
    }

    #[test]
    fn patchify_round_trip() {
        let (s, p) = (224, 16);
        let pixels: Vec<f32> = (0..3 * s * s).map(|i| i as f32 * 0.5 - 7.0).collect();
        let all: Vec<u32> = (0..(s / p * s / p) as u32).collect();
        let patches = patchify(&pixels, s, p, &all);
        assert_eq!(patches.len(), all.len() * 3 * p * p);
        assert_eq!(unpatchify(&patches, s, p, &all, 0.0), pixels);
        // A subset round-trips on its patches and leaves the rest at the fill value.
        let keep = [0u32, 5, 14, 100, 195];
        let sub = patchify(&pixels, s, p, &keep);
        let back = unpatchify(&sub, s, p, &keep, f32::NAN);
        assert_eq!(patchify(&back, s, p, &keep), sub);
        let kept_pixels = back.iter().filter(|v| !v.is_nan()).count();
        assert_eq!(kept_pixels, keep.len() * 3 * p * p);
        // Patch k starts at pixel (row, col) = (k / 14 * 16, k % 14 * 16) of channel 0.
        for (i, &k) in keep.iter().enumerate() {
            let (r, c) = (k as usize / 14, k as usize % 14);
            assert_eq!(sub[i * 3 * p * p], pixels[r * p * s + c * p]);
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn patchify_rejects_out_of_grid_index() {
        let pixels = vec![0.0; 3 * 32 * 32];
        let _ = patchify(&pixels, 32, 16, &[4]);
    }
}
