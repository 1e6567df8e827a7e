//! MobileNetV2's 1×1 convolutions as GEMMs over host memory with the bias, the residual and ReLU6 fused, for
//! burn's CPU backend.
//!
//! # Why
//! burn's `flex` backend already runs a 1×1 convolution as one GEMM per image, but around it, per layer: a
//! zero-filled output buffer, the GEMM, a second pass adding the bias, then (a separate op each) the residual add
//! and the ReLU6, every one a full pass over the activation and a fresh allocation. MobileNetV2 has 34 of these
//! layers, most on small planes where those passes cost as much as the products.
//!
//! # How
//! The output of image `b` is first written once as the bias broadcast over the plane, or as `bias + residual`
//! when the block adds its input, then the GEMM (the `gemm` crate, which burn's backend uses too) accumulates
//! `W · X` into it (`read_dst`): one pass and one allocation per layer instead of four. The last layer
//! (`features.18`) clamps to [0, 6] in place. Images run in parallel on the caller's rayon pool (one replica's
//! [`crate::device::IntraOp`] threads); each image is its own GEMM, so an image's output does not depend on what it
//! is batched with. The result equals burn's `conv2d` (+ bias, + residual, ReLU6) up to float rounding: the bias
//! is added before the products rather than after (a test checks every layer shape of the model).

use std::borrow::Cow;

use rayon::prelude::*;

/// One folded 1×1 convolution's weights on the host: `weight[o * cin + i]`, `bias[o]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPointwise {
    /// `[cout, cin]` row-major.
    pub weight: Vec<f32>,
    /// `[cout]`.
    pub bias: Vec<f32>,
    /// Apply ReLU6 to the output (`features.18`; the blocks' expansion ReLU6 is fused into the depthwise kernel's
    /// input copy instead, see [`super::depthwise::HostDepthwise::input_relu6`]).
    pub relu6: bool,
}

impl HostPointwise {
    /// Input channels.
    pub fn cin(&self) -> usize {
        self.weight.len().checked_div(self.bias.len()).unwrap_or(0)
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.bias.len()
    }

    /// `conv1x1(x) + bias (+ residual)`, through ReLU6 with [`HostPointwise::relu6`], for `x` `[n, cin, hw]`
    /// row-major; returns `[n, cout, hw]`. `residual`, when given, is `[n, cout, hw]`.
    ///
    /// # Panics
    /// If `x` or `residual` do not have the sizes above: both are fixed by the model's construction, not by input
    /// data.
    pub fn apply(&self, x: &[f32], n: usize, hw: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let (cin, cout) = (self.cin(), self.cout());
        assert_eq!(x.len(), n * cin * hw, "1x1 conv: input size");
        let plane = cout * hw;
        if let Some(r) = residual {
            assert_eq!(r.len(), n * plane, "1x1 conv: residual size");
        }
        let mut out = Vec::with_capacity(n * plane);
        // The bias (and residual) is the GEMM's initial accumulator: one write pass, no zero fill.
        match residual {
            Some(r) => {
                for (o, r) in self.bias.iter().cycle().zip(r.chunks_exact(hw.max(1))) {
                    out.extend(r.iter().map(|&v| v + o));
                }
            }
            None => {
                for _ in 0..n {
                    for &b in &self.bias {
                        out.extend(std::iter::repeat_n(b, hw));
                    }
                }
            }
        }
        if hw == 0 || cin == 0 {
            return out;
        }
        out.par_chunks_mut(plane).zip(x.par_chunks(cin * hw)).for_each(|(dst, src)| {
            // SAFETY: `dst` is `cout × hw` (row stride hw), `weight` is `cout × cin` (row stride cin), `src` is
            // `cin × hw` (row stride hw), all contiguous and in bounds as asserted above; `dst` does not alias
            // the inputs.
            unsafe {
                gemm::gemm(
                    cout,
                    hw,
                    cin,
                    dst.as_mut_ptr(),
                    1,
                    hw as isize,
                    true,
                    self.weight.as_ptr(),
                    1,
                    cin as isize,
                    src.as_ptr(),
                    1,
                    hw as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            if self.relu6 {
                for v in dst.iter_mut() {
                    *v = v.clamp(0.0, 6.0);
                }
            }
        });
        out
    }
}

/// `x` through an inverted residual block's expansion when it has one, else `x` itself (MobileNetV2's first block
/// and EfficientNet-Lite's have none).
pub fn expand_if_any<'a>(expand: Option<&HostPointwise>, x: &'a [f32], n: usize, hw: usize) -> Cow<'a, [f32]> {
    match expand {
        Some(layer) => Cow::Owned(layer.apply(x, n, hw, None)),
        None => Cow::Borrowed(x),
    }
}

/// The 3×3 taps of `x` `[n, c, h, w]` (padding 1, `stride`) as `[n, c·9, oh·ow]` (row `ci·9 + ky·3 + kx` holds
/// the input value under tap `(ky, kx)` of channel `ci` for every output position, 0 in the padding), so that a
/// 3×3 convolution is [`HostPointwise::apply`] with `cin = c·9` on it. Returns the matrix and `(oh, ow)`.
///
/// # Panics
/// If `x` does not have `n · c · h · w` values, or `stride` is 0: fixed by the model's construction.
pub fn im2col_3x3(x: &[f32], n: usize, c: usize, h: usize, w: usize, stride: usize) -> (Vec<f32>, (usize, usize)) {
    assert_eq!(x.len(), n * c * h * w, "3x3 conv: input size");
    assert!(stride > 0, "3x3 conv: stride");
    let (oh, ow) = (h.saturating_sub(1) / stride + 1, w.saturating_sub(1) / stride + 1);
    let mut cols = Vec::with_capacity(n * c * 9 * oh * ow);
    if h == 0 || w == 0 {
        cols.resize(n * c * 9 * oh * ow, 0.0);
        return (cols, (oh, ow));
    }
    for plane in x.chunks_exact(h * w) {
        for ky in 0..3 {
            for kx in 0..3 {
                for oy in 0..oh {
                    // Input row oy·stride + ky − 1, or the zero padding.
                    let iy = (oy * stride + ky).checked_sub(1).filter(|&iy| iy < h);
                    let Some(iy) = iy else {
                        cols.extend(std::iter::repeat_n(0.0, ow));
                        continue;
                    };
                    let row = &plane[iy * w..(iy + 1) * w];
                    cols.extend((0..ow).map(|ox| {
                        (ox * stride + kx).checked_sub(1).and_then(|ix| row.get(ix)).copied().unwrap_or(0.0)
                    }));
                }
            }
        }
    }
    (cols, (oh, ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    fn random(len: usize, std: f64) -> Vec<f32> {
        Tensor::<1>::random([len], Distribution::Normal(0.0, std), &Device::flex()).into_data().try_to_vec().unwrap()
    }

    #[test]
    fn matches_burn_conv2d_on_every_mobilenet_pointwise_shape() {
        let device = Device::flex();
        // (cin, cout, side, residual, relu6): expansions, projections with and without the residual, the last
        // layer, plus odd sizes; a batch of 2 with a non-square plane.
        let shapes = [
            (32, 16, 112, false, false),
            (16, 96, 112, false, false),
            (144, 24, 56, true, false),
            (192, 32, 28, true, false),
            (384, 64, 14, true, false),
            (576, 96, 14, true, false),
            (960, 160, 7, true, false),
            (960, 320, 7, false, false),
            (320, 1280, 7, false, true),
            (3, 5, 1, true, true),
            (1, 1, 3, false, false),
        ];
        for (cin, cout, side, with_residual, relu6) in shapes {
            let (n, h, w) = (2, side, side + 1);
            let x = random(n * cin * h * w, 2.0);
            let residual = with_residual.then(|| random(n * cout * h * w, 1.0));
            let pw = HostPointwise { weight: random(cout * cin, 0.5), bias: random(cout, 1.0), relu6 };
            let ours = pw.apply(&x, n, h * w, residual.as_deref());

            let mut conv = Conv2dConfig::new([cin, cout], [1, 1]).init(&device);
            conv.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(pw.weight.clone(), [cout, cin, 1, 1]), &device));
            conv.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(pw.bias.clone(), [cout]), &device)));
            let mut theirs = conv.forward(Tensor::from_data(TensorData::new(x, [n, cin, h, w]), &device));
            if let Some(r) = residual {
                theirs = theirs + Tensor::from_data(TensorData::new(r, [n, cout, h, w]), &device);
            }
            if relu6 {
                theirs = theirs.clamp(0.0, 6.0);
            }
            let theirs: Vec<f32> = theirs.into_data().try_to_vec().unwrap();
            assert_eq!(ours.len(), theirs.len());
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = theirs.iter().map(|v| v.abs()).fold(1f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{cin}->{cout} {side}px residual {with_residual}: max |Δ| {diff}");
        }
    }

    #[test]
    fn im2col_then_gemm_matches_burn_conv2d_3x3() {
        let device = Device::flex();
        // The stem (3 -> 32, stride 2, 224 px), odd and tiny sides, stride 1.
        for (c, cout, h, w, stride) in [(3, 32, 224, 224, 2), (3, 8, 9, 8, 2), (2, 4, 5, 7, 1), (1, 1, 1, 1, 2)] {
            let n = 2;
            let x = random(n * c * h * w, 1.0);
            let pw = HostPointwise { weight: random(cout * c * 9, 0.5), bias: random(cout, 1.0), relu6: true };
            let (cols, (oh, ow)) = im2col_3x3(&x, n, c, h, w, stride);
            let ours = pw.apply(&cols, n, oh * ow, None);

            let mut conv = Conv2dConfig::new([c, cout], [3, 3])
                .with_stride([stride, stride])
                .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device);
            conv.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(pw.weight.clone(), [cout, c, 3, 3]), &device));
            conv.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(pw.bias.clone(), [cout]), &device)));
            let theirs = conv.forward(Tensor::from_data(TensorData::new(x, [n, c, h, w]), &device)).clamp(0.0, 6.0);
            assert_eq!(theirs.dims(), [n, cout, oh, ow], "{c}x{h}x{w} stride {stride}");
            let theirs: Vec<f32> = theirs.into_data().try_to_vec().unwrap();
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-4, "{c}x{h}x{w} stride {stride}: max |Δ| {diff}");
        }
    }

    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let (cin, cout, hw) = (24, 144, 56 * 56);
        let pw = HostPointwise { weight: random(cout * cin, 0.5), bias: random(cout, 1.0), relu6: false };
        let x = random(3 * cin * hw, 1.0);
        let batched = pw.apply(&x, 3, hw, None);
        let alone = pw.apply(&x[cin * hw..2 * cin * hw], 1, hw, None);
        assert_eq!(&batched[cout * hw..2 * cout * hw], &alone[..], "bit-identical alone or batched");
    }
}
