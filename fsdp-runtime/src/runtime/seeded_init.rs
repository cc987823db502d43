//! Parameter values drawn from a seed and the parameter's FQN, any range of elements at
//! a time: element `i` of a parameter is the same number whichever rank draws it and
//! however the parameter is split, so a model initialised from one seed is the same at
//! every world size, and each rank draws only its shard.
//!
//! Each parameter has its own ChaCha8 stream (the seed is the key, the FQN's hash picks
//! the stream); element `i` is made from the stream's 32-bit words `2i` and `2i + 1`,
//! which ChaCha can seek to directly. The distributions are candle-nn's `Init`: a
//! constant, a normal or uniform one, and Kaiming's, whose scale comes from the shape's
//! fan as candle-nn (and PyTorch) compute it.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::{Init, NormalOrUniform};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// What one element is drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Distribution {
    Constant(f64),
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, up: f64 },
}

impl Distribution {
    fn of(init: &Init, shape: &Shape) -> Self {
        match *init {
            Init::Const(value) => Self::Constant(value),
            Init::Randn { mean, stdev } => Self::Normal { mean, std: stdev },
            Init::Uniform { lo, up } => Self::Uniform { lo, up },
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => Self::Normal { mean: 0.0, std },
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        Self::Uniform { lo: -bound, up: bound }
                    }
                }
            }
        }
    }

    /// One element from two independent 32-bit words.
    fn sample(&self, a: u32, b: u32) -> f64 {
        match *self {
            Self::Constant(value) => value,
            Self::Normal { mean, std } => {
                // Box-Muller; `u1` lies in (0, 1], so its logarithm is finite.
                let u1 = (f64::from(a) + 1.0) / 4_294_967_296.0;
                let u2 = f64::from(b) / 4_294_967_296.0;
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
            Self::Uniform { lo, up } => {
                // 53 random bits: uniform on [0, 1).
                let bits = (u64::from(a) << 21) ^ u64::from(b >> 11);
                lo + (up - lo) * (bits as f64 / (1u64 << 53) as f64)
            }
        }
    }
}

/// FNV-1a over `text`: the same in every process (std's hasher is not guaranteed to be).
pub(crate) fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Elements `range` of the flattened parameter `fqn` of `shape`, drawn from `init` with
/// `seed`, as a 1-D tensor of `dtype` on the CPU (padded there and moved to a device in
/// one copy by the caller: an empty range is no empty device allocation).
pub(crate) fn draw(
    init: &Init,
    shape: &Shape,
    fqn: &str,
    seed: u64,
    range: Range<usize>,
    dtype: DType,
) -> Result<Tensor> {
    let distribution = Distribution::of(init, shape);
    let len = range.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(fqn));
    rng.set_word_pos(2 * range.start as u128);
    let mut next = move || distribution.sample(rng.next_u32(), rng.next_u32());
    // Drawn in f64, kept in f32 unless the parameter is f64: half the bytes of the draw.
    let values = if dtype == DType::F64 {
        Tensor::from_vec((0..len).map(|_| next()).collect::<Vec<f64>>(), len, &Device::Cpu)?
    } else {
        Tensor::from_vec((0..len).map(|_| next() as f32).collect::<Vec<f32>>(), len, &Device::Cpu)?
    };
    values.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::init::{FanInOut, NonLinearity};

    #[test]
    fn any_split_draws_the_same_elements() -> Result<()> {
        let shape = Shape::from((7, 5));
        let init = Init::Randn { mean: 0.0, stdev: 1.0 };
        let whole = draw(&init, &shape, "w", 3, 0..35, DType::F64)?.to_vec1::<f64>()?;
        let mut pieces = Vec::new();
        for range in [0..9, 9..10, 10..35] {
            pieces.extend(draw(&init, &shape, "w", 3, range, DType::F64)?.to_vec1::<f64>()?);
        }
        assert_eq!(whole, pieces);
        let other = draw(&init, &shape, "v", 3, 0..35, DType::F64)?.to_vec1::<f64>()?;
        assert_ne!(whole, other, "another FQN draws another stream");
        Ok(())
    }

    /// Kaiming's scale as PyTorch's `kaiming_normal_` / `kaiming_uniform_` compute it
    /// for a (fan_out, fan_in) weight: gain / sqrt(fan_in), the uniform bound sqrt(3)
    /// times that.
    #[test]
    fn kaiming_takes_its_scale_from_the_fan() {
        let shape = Shape::from((64, 256));
        let relu = NonLinearity::ReLU;
        let normal = Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanIn, non_linearity: relu };
        assert_eq!(Distribution::of(&normal, &shape), Distribution::Normal { mean: 0.0, std: 2f64.sqrt() / 16.0 });
        let uniform = Init::Kaiming { dist: NormalOrUniform::Uniform, fan: FanInOut::FanOut, non_linearity: relu };
        let bound = 3f64.sqrt() * 2f64.sqrt() / 8.0;
        assert_eq!(Distribution::of(&uniform, &shape), Distribution::Uniform { lo: -bound, up: bound });
    }

    #[test]
    fn moments_match_the_distribution() -> Result<()> {
        let n = 200_000;
        let stats = |init: Init| -> Result<(f64, f64, f64, f64)> {
            let v = draw(&init, &Shape::from(n), "p", 11, 0..n, DType::F64)?.to_vec1::<f64>()?;
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            Ok((mean, var.sqrt(), lo, hi))
        };
        // Standard errors at n = 200k: mean ~0.0022 std, so 0.01 is > 4 sigma.
        let (mean, std, _, _) = stats(Init::Randn { mean: 0.5, stdev: 2.0 })?;
        assert!((mean - 0.5).abs() < 0.02 && (std - 2.0).abs() < 0.02, "normal: mean {mean}, std {std}");
        let (mean, std, lo, hi) = stats(Init::Uniform { lo: -3.0, up: 1.0 })?;
        // Uniform on [-3, 1): mean -1, std 4 / sqrt(12).
        assert!((mean + 1.0).abs() < 0.01 && (std - 4.0 / 12f64.sqrt()).abs() < 0.01, "uniform: {mean} {std}");
        assert!(lo >= -3.0 && hi < 1.0 && lo < -2.99 && hi > 0.99, "uniform range: [{lo}, {hi}]");
        let (mean, std, lo, hi) = stats(Init::Const(0.25))?;
        assert_eq!((mean, std, lo, hi), (0.25, 0.0, 0.25, 0.25));
        Ok(())
    }
}
