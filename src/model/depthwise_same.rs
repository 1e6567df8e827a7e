//! EfficientNet-Lite's depthwise convolutions (k×k, TensorFlow `SAME` padding, stride 1 or 2) + bias + ReLU6 as
//! one pass over host memory, for burn's CPU backend.
//!
//! # Why
//! MobileNetV2's kernel ([`super::depthwise`]) is written for 3×3 taps with one pixel of padding on every side.
//! EfficientNet-Lite has 5×5 layers too, and TensorFlow's `SAME` padding puts the odd pixel at the bottom/right
//! (a stride-2 layer on an even side pads 0 before and 1 after). burn's `conv2d` covers both, but on the CPU it
//! walks each plane once per tap in short rows and then takes a separate ReLU6 pass. Measured on one thread
//! (4 images of Lite0): the depthwise layers took 52 ms through a first version of this kernel that copied
//! pixel by pixel and accumulated row by row, 21 ms as below; the whole graph with Lite2 went from 54.6 ms of
//! CPU per sample (burn's layers) to 37.6 ms with this and the 1×1 GEMMs (README, "Scorers and the extract
//! rule").
//!
//! # How
//! Per channel plane: its values (through ReLU6 first when the expansion's activation is fused here) are copied
//! into a zero-bordered buffer split by row and column phase (`stride²` buffers, `(y, x)` of phase `(py, px)`
//! holding padded pixel `(y·stride + py, x·stride + px)`), so that every tap `(ky, kx)` reads one contiguous
//! run of one phase buffer, shifted by `(ky / stride, kx / stride)`, for all output rows at once (each row
//! computed a few columns too wide, the extra values dropped). The output starts at the bias and accumulates its
//! `k²` taps in flat loops the compiler vectorises (compiled twice, for the x86-64 baseline and for AVX2 with
//! FMA, picked at run time); then ReLU6. The padding is zeroed once per layer shape, not per plane.
//! Planes run in parallel on the caller's rayon pool. The result equals burn's `conv2d` with
//! [`burn::nn::PaddingConfig2d::Same`] + ReLU6 up to float rounding (a test checks every Lite layer shape).

use rayon::prelude::*;

/// One folded depthwise layer on the host: `weight[c * k * k + ky * k + kx]`, `bias[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostDepthwiseSame {
    /// `[channels, k, k]` row-major.
    pub weight: Vec<f32>,
    /// `[channels]`.
    pub bias: Vec<f32>,
    /// Kernel side `k` (odd: 3 or 5 in EfficientNet-Lite).
    pub kernel: usize,
    /// 1 or 2.
    pub stride: usize,
    /// Apply ReLU6 to the input as it is read (the expansion's activation, fused into the copy made anyway).
    pub input_relu6: bool,
}

/// TensorFlow's `SAME` padding of one axis: `(before, after)` for an input of `size`.
pub fn same_padding(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let out = size.div_ceil(stride.max(1));
    let total = (out.saturating_sub(1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

impl HostDepthwiseSame {
    /// Output height and width for an `h`×`w` input: `ceil(h / stride)`, `ceil(w / stride)`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.stride.max(1)), w.div_ceil(self.stride.max(1)))
    }

    /// `relu6(conv2d_same(x', weight, bias, stride, groups = channels))` for `x` `[n, c, h, w]` row-major, where
    /// `x'` is `relu6(x)` with [`HostDepthwiseSame::input_relu6`], else `x`; returns `[n, c, oh, ow]`.
    ///
    /// # Panics
    /// If `x` does not have `n · c · h · w` values with `c == self.bias.len()`, the weights are not `c · k²`, or
    /// the stride is 0: fixed by the model's construction, not by input data.
    pub fn apply(&self, input: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let k = self.kernel;
        assert_eq!(c, self.bias.len(), "depthwise layer: channel count");
        assert_eq!(self.weight.len(), c * k * k, "depthwise layer: weights");
        assert_eq!(input.len(), n * c * h * w, "depthwise layer: input size");
        assert!(self.stride > 0, "depthwise layer: stride 0");
        let (oh, ow) = self.output_size(h, w);
        let mut out = vec![0f32; n * c * oh * ow];
        if oh * ow == 0 {
            return out;
        }
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(Scratch::default, |scratch, (plane, dst)| {
            let ch = plane % c;
            let src = &input[plane * h * w..(plane + 1) * h * w];
            let taps = &self.weight[ch * k * k..(ch + 1) * k * k];
            self.plane_dispatch(src, (h, w), taps, self.bias[ch], scratch, dst);
        });
        out
    }

    fn plane_dispatch(
        &self,
        src: &[f32],
        hw: (usize, usize),
        taps: &[f32],
        bias: f32,
        s: &mut Scratch,
        dst: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: `plane_avx2` only requires AVX2 and FMA, which the CPU has just reported.
            unsafe { self.plane_avx2(src, hw, taps, bias, s, dst) };
            return;
        }
        self.plane::<false>(src, hw, taps, bias, s, dst);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn plane_avx2(&self, src: &[f32], hw: (usize, usize), taps: &[f32], bias: f32, s: &mut Scratch, dst: &mut [f32]) {
        self.plane::<true>(src, hw, taps, bias, s, dst);
    }

    /// One plane (module docs): the phase-split padded copy, the taps as flat loops, ReLU6.
    #[inline(always)]
    fn plane<const FMA: bool>(
        &self,
        src: &[f32],
        (h, w): (usize, usize),
        taps: &[f32],
        bias: f32,
        s: &mut Scratch,
        dst: &mut [f32],
    ) {
        let (k, stride) = (self.kernel, self.stride);
        let (oh, ow) = self.output_size(h, w);
        let (top, bottom) = same_padding(k, stride, h);
        let (left, right) = same_padding(k, stride, w);
        // Phase (py, px) holds padded pixel (y·stride + py, x·stride + px) at row y, column x: `rows × cols`,
        // plus `k` values of slack so that the last tap's flat run stays in bounds.
        let (rows, cols) = ((h + top + bottom).div_ceil(stride), (w + left + right).div_ceil(stride));
        let phase_len = rows * cols + k;
        if s.shape != (h, w, k, stride) {
            // Only input pixels are written below, each plane: the padding stays zero until the shape changes.
            s.phases.clear();
            s.phases.resize(stride * stride * phase_len, 0.0);
            s.shape = (h, w, k, stride);
        }
        for (y, row) in src.chunks_exact(w).enumerate() {
            let (py, ry) = ((y + top) % stride, (y + top) / stride);
            for px in 0..stride {
                // The first input column landing in column phase px, then every stride-th one.
                let x0 = (px + stride - left % stride) % stride;
                if x0 >= w {
                    continue;
                }
                let base = (py * stride + px) * phase_len + ry * cols + (x0 + left) / stride;
                let out = &mut s.phases[base..base + (w - x0).div_ceil(stride)];
                if self.input_relu6 {
                    for (d, &v) in out.iter_mut().zip(row[x0..].iter().step_by(stride)) {
                        *d = v.clamp(0.0, 6.0);
                    }
                } else {
                    for (d, &v) in out.iter_mut().zip(row[x0..].iter().step_by(stride)) {
                        *d = v;
                    }
                }
            }
        }
        // Every output row is `cols` wide here (the last `cols - ow` values are computed and dropped), so each tap
        // is one flat run over all rows at once.
        let n = oh * cols;
        s.acc.clear();
        s.acc.resize(n, bias);
        for ky in 0..k {
            for kx in 0..k {
                let wgt = taps[ky * k + kx];
                let start = ((ky % stride) * stride + kx % stride) * phase_len + (ky / stride) * cols + kx / stride;
                let run = &s.phases[start..start + n];
                for (a, &v) in s.acc.iter_mut().zip(run) {
                    *a = if FMA { wgt.mul_add(v, *a) } else { wgt * v + *a };
                }
            }
        }
        for (out, acc) in dst.chunks_exact_mut(ow).zip(s.acc.chunks_exact(cols)) {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = a.clamp(0.0, 6.0);
            }
        }
    }
}

/// Per-thread buffers, reused across planes.
#[derive(Default)]
struct Scratch {
    /// The `stride²` phase buffers of the zero-bordered plane.
    phases: Vec<f32>,
    /// `(h, w, k, stride)` of the planes whose zero border `phases` holds.
    shape: (usize, usize, usize, usize),
    /// One output value per (row, phase column).
    acc: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    #[test]
    fn same_padding_is_tensorflows() {
        assert_eq!(same_padding(3, 1, 112), (1, 1));
        assert_eq!(same_padding(3, 2, 112), (0, 1));
        assert_eq!(same_padding(5, 2, 56), (1, 2));
        assert_eq!(same_padding(5, 2, 65), (2, 2));
        assert_eq!(same_padding(3, 2, 65), (1, 1));
        assert_eq!(same_padding(5, 1, 7), (2, 2));
    }

    #[test]
    fn matches_burn_conv2d_same_on_every_lite_depthwise_shape() {
        let device = Device::flex();
        // (channels, side, kernel, stride): Lite0 at 224 and Lite2 at 260 (odd sides), a batch of 2, tiny planes.
        let shapes = [
            (32, 112, 3, 1),
            (96, 112, 3, 2),
            (144, 56, 5, 2),
            (240, 28, 3, 2),
            (480, 14, 5, 1),
            (672, 14, 5, 2),
            (1152, 7, 5, 1),
            (144, 65, 5, 2),
            (288, 33, 3, 2),
            (5, 9, 5, 2),
            (3, 1, 5, 1),
            (4, 2, 3, 2),
        ];
        for (i, &(c, side, k, stride)) in shapes.iter().enumerate() {
            let n = if i == 9 { 2 } else { 1 };
            for input_relu6 in [false, true] {
                let x = Tensor::<4>::random([n, c, side, side], Distribution::Normal(0.0, 3.0), &device);
                let weight: Vec<f32> = Tensor::<1>::random([c * k * k], Distribution::Normal(0.0, 0.5), &device)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let bias: Vec<f32> = Tensor::<1>::random([c], Distribution::Normal(0.0, 1.0), &device)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let dw = HostDepthwiseSame { weight, bias, kernel: k, stride, input_relu6 };
                let mut conv = Conv2dConfig::new([c, c], [k, k])
                    .with_stride([stride, stride])
                    .with_groups(c)
                    .with_padding(PaddingConfig2d::Same)
                    .init(&device);
                conv.weight =
                    Param::from_tensor(Tensor::from_data(TensorData::new(dw.weight.clone(), [c, 1, k, k]), &device));
                conv.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(dw.bias.clone(), [c]), &device)));
                let input = if input_relu6 { x.clone().clamp(0.0, 6.0) } else { x.clone() };
                let want: Vec<f32> = conv.forward(input).clamp(0.0, 6.0).into_data().try_to_vec::<f32>().unwrap();
                let got = dw.apply(&x.into_data().try_to_vec::<f32>().unwrap(), n, c, side, side);
                assert_eq!(got.len(), want.len(), "{c}x{side} k{k} s{stride}");
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(d <= 1e-4, "{c}x{side} k{k} s{stride} relu6 {input_relu6}: max |Δ| {d}");
            }
        }
    }
}
