//! MobileNetV2's depthwise 3×3 convolution + bias + ReLU6 as one pass over host memory, for burn's CPU backend.
//!
//! # Why
//! Measured per MobileNetV2 forward on one core (micro-batch 4, BatchNorms folded), burn's `flex` backend spent
//! 10.3 of 26.7 ms in its depthwise convolutions (about 2 GMAC/s: it walks each channel's plane once per kernel
//! tap, mostly in short rows of 7–56 values) and another 2.2 ms in the ReLU6 pass after them. The 1×1
//! convolutions, which burn runs as GEMMs, hold up well; this module replaces only the depthwise layers.
//!
//! # How
//! Each channel plane is copied once into a zero-padded buffer; every output value is then the bias plus 9
//! products at fixed offsets of that buffer, clamped to [0, 6], in one loop the compiler vectorises:
//! - stride 1: the padded plane is read as one flat array of rows `W + 2` wide, so the 9 taps are 9 shifted
//!   slices and the loop runs over all rows at once (the 2 extra values per row are computed and dropped);
//! - stride 2: the padded rows are split into their even and odd columns first, which turns the strided taps
//!   into the same shifted contiguous slices.
//!
//! The loops are compiled twice, for the x86-64 baseline and for AVX2, and the CPU picks at run time.
//! Channels run in parallel on the caller's rayon pool (one replica's [`crate::device::IntraOp`] threads). Padding
//! is 1 on every side, as in every depthwise layer of MobileNetV2. The result equals burn's `conv2d` + ReLU6 up
//! to float rounding (the summation order differs; a test checks every layer shape of the model).

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

/// One depthwise layer's folded weights on the host: `weight[c * 9 + ky * 3 + kx]`, `bias[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostDepthwise {
    /// `[channels, 3, 3]` row-major.
    pub weight: Vec<f32>,
    /// `[channels]`.
    pub bias: Vec<f32>,
    /// 1 or 2.
    pub stride: usize,
    /// Apply ReLU6 to the input as it is read (the preceding expansion conv's activation, fused into the copy
    /// this kernel makes anyway: one pass less over the block's largest tensor).
    pub input_relu6: bool,
}

impl HostDepthwise {
    /// `relu6(conv2d(x', weight, bias, stride, padding 1, groups = channels))` for `x` `[N, C, H, W]`, where `x'`
    /// is `relu6(x)` with [`HostDepthwise::input_relu6`], else `x`.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, (height - 1) / stride + 1, (width - 1) / stride + 1]`
    ///
    /// # Panics
    /// If `x` does not have `self.bias.len()` channels or is not `f32`: both are fixed by the model's
    /// construction, not by input data.
    pub fn forward(&self, x: Tensor<4>, device: &Device) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        assert_eq!(c, self.bias.len(), "depthwise layer: channel count");
        let (oh, ow) = ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1);
        let data = x.into_data();
        #[allow(clippy::expect_used)] // the model only ever builds f32 activations
        let input = data.as_slice::<f32>().expect("f32 activations");
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(Scratch::default, |scratch, (plane, dst)| {
            let ch = plane % c;
            let src = &input[plane * h * w..(plane + 1) * h * w];
            let k: &[f32; 9] = self.weight[ch * 9..ch * 9 + 9].try_into().unwrap_or(&[0.0; 9]);
            let taps = Taps { k, bias: self.bias[ch], input_relu6: self.input_relu6 };
            plane_dispatch(self.stride, src, h, w, &taps, scratch, dst);
        });
        Tensor::from_data(TensorData::new(out, [n, c, oh, ow]), device)
    }
}

/// One plane on the widest vector unit this CPU has: the loops compiled for AVX2 when the CPU reports it (8
/// lanes), else for the x86-64 baseline SSE2 (4 lanes) the crate is built for.
fn plane_dispatch(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `plane_avx2` only requires AVX2, which the CPU has just reported.
        unsafe { plane_avx2(stride, src, h, w, t, s, dst) };
        return;
    }
    plane(stride, src, h, w, t, s, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn plane_avx2(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut [f32]) {
    plane(stride, src, h, w, t, s, dst);
}

#[inline(always)]
fn plane(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut [f32]) {
    if stride == 1 { stride1(src, h, w, t, s, dst) } else { stride2(src, h, w, t, s, dst) }
}

/// One channel's kernel: its 9 weights, its bias, and whether its input goes through ReLU6 as it is read.
struct Taps<'a> {
    k: &'a [f32; 9],
    bias: f32,
    input_relu6: bool,
}

/// Per-thread buffers, reused across planes.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    /// `(h, w, len)` of the plane `padded` is the zero-bordered buffer for.
    padded_shape: (usize, usize, usize),
    even: Vec<f32>,
    odd: Vec<f32>,
    acc: Vec<f32>,
}

/// ReLU6; NaN stays NaN, as in burn's and PyTorch's.
#[inline(always)]
fn relu6(x: f32) -> f32 {
    x.clamp(0.0, 6.0)
}

/// Makes `s.padded` `len` zeros for an `h`×`w` plane, unless it already holds the padded plane of that shape:
/// only the interior is ever written, so the zero border survives from plane to plane of one layer.
#[inline(always)]
fn zeroed(s: &mut Scratch, h: usize, w: usize, len: usize) {
    if s.padded_shape != (h, w, len) {
        s.padded.clear();
        s.padded.resize(len, 0.0);
        s.padded_shape = (h, w, len);
    }
}

/// Copies the `w`-wide rows of `src` into the interior of the zeroed, `wp`-wide `padded` plane (one row and
/// column of zeros around), through ReLU6 when `relu6_input`.
#[inline(always)]
fn pad_rows(src: &[f32], w: usize, wp: usize, relu6_input: bool, padded: &mut [f32]) {
    for (y, row) in src.chunks_exact(w).enumerate() {
        let dst = &mut padded[(y + 1) * wp + 1..(y + 1) * wp + 1 + w];
        if relu6_input {
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = relu6(v);
            }
        } else {
            dst.copy_from_slice(row);
        }
    }
}

/// Stride 1: the plane padded to `(h + 2) × (w + 2)` (plus 2 values so the last taps stay in bounds), then one
/// flat loop over `h × (w + 2)` positions.
#[inline(always)]
fn stride1(src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut [f32]) {
    let (k, bias) = (t.k, t.bias);
    let wp = w + 2;
    zeroed(s, h, w, (h + 2) * wp + 2);
    pad_rows(src, w, wp, t.input_relu6, &mut s.padded);
    let n = h * wp;
    let p = &s.padded;
    let tap = |ky: usize, kx: usize| &p[ky * wp + kx..ky * wp + kx + n];
    let (t0, t1, t2, t3, t4, t5, t6, t7, t8) =
        (tap(0, 0), tap(0, 1), tap(0, 2), tap(1, 0), tap(1, 1), tap(1, 2), tap(2, 0), tap(2, 1), tap(2, 2));
    s.acc.resize(n, 0.0); // every value is written below
    let acc = &mut s.acc[..n];
    for i in 0..n {
        acc[i] = bias
            + k[0] * t0[i]
            + k[1] * t1[i]
            + k[2] * t2[i]
            + k[3] * t3[i]
            + k[4] * t4[i]
            + k[5] * t5[i]
            + k[6] * t6[i]
            + k[7] * t7[i]
            + k[8] * t8[i];
    }
    for (y, out) in dst.chunks_exact_mut(w).enumerate() {
        for (o, &a) in out.iter_mut().zip(&acc[y * wp..y * wp + w]) {
            *o = relu6(a);
        }
    }
}

/// Stride 2: the padded plane's columns split into even and odd ones (`2x + kx` becomes `even[x]`, `odd[x]`,
/// `even[x + 1]`), rows kept, then one flat loop per kernel row over the output rows.
#[inline(always)]
fn stride2(src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut [f32]) {
    let (k, bias) = (t.k, t.bias);
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let wp = w + 2;
    zeroed(s, h, w, (h + 2) * wp);
    pad_rows(src, w, wp, t.input_relu6, &mut s.padded);
    // Even and odd columns of every padded row, `half = ow + 1` wide (the even half needs x + 1 <= ow).
    let half = ow + 1;
    s.even.resize((h + 2) * half, 0.0); // every value is written below
    s.odd.resize((h + 2) * half, 0.0);
    for y in 0..h + 2 {
        let row = &s.padded[y * wp..(y + 1) * wp];
        for x in 0..half {
            s.even[y * half + x] = row.get(2 * x).copied().unwrap_or(0.0);
            s.odd[y * half + x] = row.get(2 * x + 1).copied().unwrap_or(0.0);
        }
    }
    s.acc.clear();
    s.acc.resize(oh * half, bias);
    for ky in 0..3 {
        let (k0, k1, k2) = (k[ky * 3], k[ky * 3 + 1], k[ky * 3 + 2]);
        for y in 0..oh {
            let r = (2 * y + ky) * half;
            let (e, o) = (&s.even[r..r + half], &s.odd[r..r + half]);
            let acc = &mut s.acc[y * half..y * half + ow];
            let (e0, o0, e1) = (&e[..ow], &o[..ow], &e[1..=ow]);
            for x in 0..ow {
                acc[x] += k0 * e0[x] + k1 * o0[x] + k2 * e1[x];
            }
        }
    }
    for (y, out) in dst.chunks_exact_mut(ow).enumerate() {
        for (o, &a) in out.iter_mut().zip(&s.acc[y * half..y * half + ow]) {
            *o = relu6(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    /// burn's conv2d (groups = channels, padding 1) + bias, then ReLU6.
    fn reference(x: Tensor<4>, dw: &HostDepthwise, device: &Device) -> Tensor<4> {
        let c = dw.bias.len();
        let x = if dw.input_relu6 { x.clamp(0.0, 6.0) } else { x };
        let mut conv = Conv2dConfig::new([c, c], [3, 3])
            .with_stride([dw.stride, dw.stride])
            .with_groups(c)
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(device);
        conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(dw.weight.clone(), [c, 1, 3, 3]), device));
        conv.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(dw.bias.clone(), [c]), device)));
        conv.forward(x).clamp(0.0, 6.0)
    }

    #[test]
    fn matches_burn_conv2d_on_every_mobilenet_depthwise_shape() {
        let device = Device::flex();
        // (channels, side, stride) of MobileNetV2's depthwise layers at 224 px, plus odd sides and a batch of 2.
        let shapes = [
            (32, 112, 1),
            (96, 112, 2),
            (144, 56, 1),
            (144, 56, 2),
            (192, 28, 1),
            (192, 28, 2),
            (384, 14, 1),
            (576, 14, 1),
            (576, 14, 2),
            (960, 7, 1),
            (5, 9, 2),
            (3, 1, 1),
            (4, 2, 2),
        ];
        for (c, side, stride) in shapes {
            let x = Tensor::<4>::random([2, c, side, side + 1], Distribution::Normal(0.0, 2.0), &device);
            let weight: Vec<f32> =
                Tensor::<1>::random([c * 9], Distribution::Normal(0.0, 1.0), &device).into_data().try_to_vec().unwrap();
            let bias: Vec<f32> =
                Tensor::<1>::random([c], Distribution::Normal(0.0, 1.0), &device).into_data().try_to_vec().unwrap();
            for input_relu6 in [false, true] {
                let dw = HostDepthwise { weight: weight.clone(), bias: bias.clone(), stride, input_relu6 };
                let ours = dw.forward(x.clone(), &device);
                let theirs = reference(x.clone(), &dw, &device);
                assert_eq!(ours.dims(), theirs.dims(), "{c}x{side} stride {stride}");
                let diff: f32 = (ours - theirs).abs().max().into_scalar();
                assert!(diff < 1e-4, "{c}x{side} stride {stride} relu6 {input_relu6}: max |Δ| {diff}");
            }
        }
    }
}
