//! MobileNetV2's depthwise 3×3 convolution + bias + ReLU6 as one pass over host memory, for burn's CPU backend.
//!
//! # Why
//! Measured per MobileNetV2 forward on one core (micro-batch 4, BatchNorms folded), burn's `flex` backend spent
//! 10.3 of 26.7 ms in its depthwise convolutions (about 2 GMAC/s: it walks each channel's plane once per kernel
//! tap, mostly in short rows of 7–56 values) and another 2.2 ms in the ReLU6 pass after them. The 1×1
//! convolutions and the stem run on host memory beside it ([`super::pointwise`]).
//!
//! # How
//! Each channel plane is copied once into a zero-padded buffer; every output value is then the bias plus 9
//! products at fixed offsets of that buffer, clamped to [0, 6], in one loop the compiler vectorises:
//! - stride 1: the padded plane is read as one flat array of rows `W + 2` wide, so the 9 taps are 9 shifted
//!   slices and the loop runs over all rows at once (the 2 extra values per row are computed and dropped);
//! - stride 2: the input rows are split into the padded plane's even and odd columns as they are copied, which
//!   turns the strided taps into the same shifted contiguous slices.
//!
//! The loops are compiled twice, for the x86-64 baseline and for AVX2 with FMA (each tap one fused multiply-add),
//! and the CPU picks at run time.
//! Channels run in parallel on the caller's rayon pool (one replica's [`crate::device::IntraOp`] threads). Padding
//! is 1 on every side, as in every depthwise layer of MobileNetV2. The result equals burn's `conv2d` + ReLU6 up
//! to float rounding (the summation order differs; a test checks every layer shape of the model).

use std::mem::MaybeUninit;

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
    /// Output height and width for an `h`×`w` input.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        (h.saturating_sub(1) / self.stride + 1, w.saturating_sub(1) / self.stride + 1)
    }

    /// `relu6(conv2d(x', weight, bias, stride, padding 1, groups = channels))` for `x` `[n, c, h, w]` row-major,
    /// where `x'` is `relu6(x)` with [`HostDepthwise::input_relu6`], else `x`; the result is `[n, c, oh, ow]`
    /// ([`HostDepthwise::output_size`]).
    ///
    /// # Panics
    /// If `x` does not have `n · c · h · w` values with `c == self.bias.len()`, or `h` or `w` is 0: fixed by the
    /// model's construction, not by input data.
    pub fn apply(&self, input: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        assert_eq!(c, self.bias.len(), "depthwise layer: channel count");
        assert_eq!(input.len(), n * c * h * w, "depthwise layer: input size");
        assert!(h > 0 && w > 0, "depthwise layer: empty plane");
        let (oh, ow) = self.output_size(h, w);
        let len = n * c * oh * ow;
        // No zero fill: the plane kernels write every output value (each ends with one pass over its whole plane).
        let mut out: Vec<f32> = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len].par_chunks_mut(oh * ow).enumerate().for_each_init(
            Scratch::default,
            |scratch, (plane, dst)| {
                let ch = plane % c;
                let src = &input[plane * h * w..(plane + 1) * h * w];
                let k: &[f32; 9] = self.weight[ch * 9..ch * 9 + 9].try_into().unwrap_or(&[0.0; 9]);
                let taps = Taps { k, bias: self.bias[ch], input_relu6: self.input_relu6 };
                plane_dispatch(self.stride, src, h, w, &taps, scratch, dst);
            },
        );
        // SAFETY: the `len` values were initialised above: `stride1` and `stride2` write all `oh × ow` values of
        // their plane (their last loop runs over `dst` in whole rows, each zipped with an accumulator row of the
        // same length), and a panic there would unwind before this line.
        unsafe { out.set_len(len) };
        out
    }
}

/// One plane on the widest vector unit this CPU has: the loops compiled for AVX2 with FMA when the CPU reports
/// both (8 lanes, one fused multiply-add per tap), else for the x86-64 baseline SSE2 (4 lanes) the crate is built
/// for.
fn plane_dispatch(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut Plane) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `plane_avx2` only requires AVX2 and FMA, which the CPU has just reported.
        unsafe { plane_avx2(stride, src, h, w, t, s, dst) };
        return;
    }
    plane::<false>(stride, src, h, w, t, s, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn plane_avx2(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut Plane) {
    plane::<true>(stride, src, h, w, t, s, dst);
}

#[inline(always)]
fn plane<const FMA: bool>(stride: usize, src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut Plane) {
    if stride == 1 { stride1::<FMA>(src, h, w, t, s, dst) } else { stride2::<FMA>(src, h, w, t, s, dst) }
}

/// `a · b + c`, as one fused multiply-add where the loop was compiled for FMA (`f32::mul_add` is a library call
/// otherwise).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// One output plane, written value by value (it starts uninitialised: no zero fill).
type Plane = [MaybeUninit<f32>];

/// One channel's kernel: its 9 weights, its bias, and whether its input goes through ReLU6 as it is read.
struct Taps<'a> {
    k: &'a [f32; 9],
    bias: f32,
    input_relu6: bool,
}

/// Per-thread buffers, reused across planes.
#[derive(Default)]
struct Scratch {
    /// Stride 1: the zero-bordered plane.
    padded: Vec<f32>,
    /// Stride 2: the even and odd columns of the zero-bordered plane.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// `(stride, h, w)` of the plane the buffers above hold the zero border for.
    shape: (usize, usize, usize),
    acc: Vec<f32>,
}

/// ReLU6; NaN stays NaN, as in burn's and PyTorch's.
#[inline(always)]
fn relu6(x: f32) -> f32 {
    x.clamp(0.0, 6.0)
}

/// Makes `buf` `len` zeros. Called when [`Scratch::shape`] changes only: the planes of one layer write only the
/// interior of the padded buffers, so their zero border survives from plane to plane.
#[inline(always)]
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// Stride 1: the plane padded to `(h + 2) × (w + 2)` (plus 2 values so the last taps stay in bounds), then one
/// flat loop over `h × (w + 2)` positions.
#[inline(always)]
fn stride1<const FMA: bool>(src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut Plane) {
    let (k, bias) = (t.k, t.bias);
    let wp = w + 2;
    if s.shape != (1, h, w) {
        zeroed(&mut s.padded, (h + 2) * wp + 2);
        s.shape = (1, h, w);
    }
    for (y, row) in src.chunks_exact(w).enumerate() {
        let padded = &mut s.padded[(y + 1) * wp + 1..(y + 1) * wp + 1 + w];
        if t.input_relu6 {
            for (d, &v) in padded.iter_mut().zip(row) {
                *d = relu6(v);
            }
        } else {
            padded.copy_from_slice(row);
        }
    }
    let n = h * wp;
    let p = &s.padded;
    let tap = |ky: usize, kx: usize| &p[ky * wp + kx..ky * wp + kx + n];
    let (t0, t1, t2, t3, t4, t5, t6, t7, t8) =
        (tap(0, 0), tap(0, 1), tap(0, 2), tap(1, 0), tap(1, 1), tap(1, 2), tap(2, 0), tap(2, 1), tap(2, 2));
    s.acc.resize(n, 0.0); // every value is written below
    let acc = &mut s.acc[..n];
    for i in 0..n {
        let mut a = madd::<FMA>(k[0], t0[i], bias);
        a = madd::<FMA>(k[1], t1[i], a);
        a = madd::<FMA>(k[2], t2[i], a);
        a = madd::<FMA>(k[3], t3[i], a);
        a = madd::<FMA>(k[4], t4[i], a);
        a = madd::<FMA>(k[5], t5[i], a);
        a = madd::<FMA>(k[6], t6[i], a);
        a = madd::<FMA>(k[7], t7[i], a);
        acc[i] = madd::<FMA>(k[8], t8[i], a);
    }
    for (y, out) in dst.chunks_exact_mut(w).enumerate() {
        for (o, &a) in out.iter_mut().zip(&acc[y * wp..y * wp + w]) {
            o.write(relu6(a));
        }
    }
}

/// Stride 2: the padded plane's columns split into even and odd ones (`2x + kx` becomes `even[x]`, `odd[x]`,
/// `even[x + 1]`), rows kept, then one flat loop per kernel row over the output rows. The split is written
/// straight from the input (padded column `2x` is input column `2x − 1`): no padded copy first.
#[inline(always)]
fn stride2<const FMA: bool>(src: &[f32], h: usize, w: usize, t: &Taps, s: &mut Scratch, dst: &mut Plane) {
    let (k, bias) = (t.k, t.bias);
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // Even and odd columns of every padded row, `half = ow + 1` wide (the even half needs x + 1 <= ow).
    let half = ow + 1;
    if s.shape != (2, h, w) {
        zeroed(&mut s.even, (h + 2) * half);
        zeroed(&mut s.odd, (h + 2) * half);
        s.shape = (2, h, w);
    }
    let f = |v: f32| if t.input_relu6 { relu6(v) } else { v };
    for (y, row) in src.chunks_exact(w).enumerate() {
        let r = (y + 1) * half;
        let (even, odd) = (&mut s.even[r..r + half], &mut s.odd[r..r + half]);
        // Input columns 2x and 2x + 1 are padded columns 2x + 1 (odd[x]) and 2x + 2 (even[x + 1]).
        let mut pairs = row.chunks_exact(2);
        for ((p, o), e) in (&mut pairs).zip(odd.iter_mut()).zip(even[1..].iter_mut()) {
            *o = f(p[0]);
            *e = f(p[1]);
        }
        if let ([last], Some(o)) = (pairs.remainder(), odd.get_mut(w / 2)) {
            *o = f(*last);
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
                acc[x] = madd::<FMA>(k2, e1[x], madd::<FMA>(k1, o0[x], madd::<FMA>(k0, e0[x], acc[x])));
            }
        }
    }
    for (y, out) in dst.chunks_exact_mut(ow).enumerate() {
        for (o, &a) in out.iter_mut().zip(&s.acc[y * half..y * half + ow]) {
            o.write(relu6(a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

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
                let [n, _, h, w] = x.dims();
                let (oh, ow) = dw.output_size(h, w);
                let input: Vec<f32> = x.clone().into_data().try_to_vec().unwrap();
                let ours =
                    Tensor::<4>::from_data(TensorData::new(dw.apply(&input, n, c, h, w), [n, c, oh, ow]), &device);
                let theirs = reference(x.clone(), &dw, &device);
                assert_eq!(ours.dims(), theirs.dims(), "{c}x{side} stride {stride}");
                let diff: f32 = (ours - theirs).abs().max().into_scalar();
                assert!(diff < 1e-4, "{c}x{side} stride {stride} relu6 {input_relu6}: max |Δ| {diff}");
            }
        }
    }
}
