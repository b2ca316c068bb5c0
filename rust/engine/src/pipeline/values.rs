//! Value transforms the engine applies to each output patch on its own threads, right after the
//! patch is read (while it is still in cache): the standard intensity transforms of the
//! reference library (`NaNtoNum`, `Binarize`, `Normalize`, `GaussianNoise`, `RandomContrast`,
//! `RandomGamma`, `GaussianBlur`) with the numbers of the project's torch implementations.
//!
//! The Python layer recognises the transform objects users construct and sends a typed list of
//! [`ValueOp`]s; anything it does not recognise stays in torch. Random transforms draw from a
//! stream keyed by the sample's recorded `value_seed`, the array and the op's position, so a
//! sample's values are reproducible at any thread count.

use rand::rngs::Xoshiro256PlusPlus;

use rand::RngExt;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::sample::rng::op_rng;

/// Upper ends of the value ranges float data is assumed to come from: [0, 1], uint8, uint16.
const NOMINAL_MAXIMA: [f32; 3] = [1.0, 255.0, 65535.0];

/// One value transform, as the Python layer describes it (`{"op": "binarize", ...}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ValueOp {
    /// `torch.nan_to_num`: NaN → `nan`, +inf → `posinf`, −inf → `neginf` (`None`: the largest /
    /// lowest finite float32).
    NanToNum {
        /// Replacement of NaN.
        #[serde(default)]
        nan: f32,
        /// Replacement of +inf (`None`: `f32::MAX`).
        #[serde(default)]
        posinf: Option<f32>,
        /// Replacement of −inf (`None`: `f32::MIN`).
        #[serde(default)]
        neginf: Option<f32>,
    },
    /// `x > threshold` as 0/1; NaN stays NaN.
    Binarize {
        /// The threshold.
        threshold: f32,
    },
    /// `(x + shift) * scale` (the project's `Normalize`).
    ShiftScale {
        /// Added first.
        shift: f32,
        /// Then multiplied.
        scale: f32,
    },
    /// `(x − mean) / std` (torchvision's `Normalize` with one mean and one std).
    Standardize {
        /// Subtracted.
        mean: f32,
        /// Divided by.
        std: f32,
    },
    /// `x + N(mean, std)` per voxel (no clamping).
    GaussianNoise {
        /// Mean of the noise.
        mean: f32,
        /// Standard deviation of the noise.
        std: f32,
    },
    /// `ratio·x + (1 − ratio)·mean(x)`, `ratio ~ U(low, high)` per sample; the mean ignores NaN;
    /// clamped to `[0, b]` (`[−b, b]` when the patch has negative values) with `b` the nominal
    /// upper bound; NaN → 0.
    RandomContrast {
        /// Lower end of the ratio.
        low: f64,
        /// Upper end of the ratio.
        high: f64,
    },
    /// `(clamp(x / b, 0, 1))^γ · b`, `γ ~ U(low, high)` per sample, `b` the nominal upper bound
    /// (the patch's largest magnitude past 65535); NaN → 0.
    RandomGamma {
        /// Lower end of gamma.
        low: f64,
        /// Upper end of gamma.
        high: f64,
    },
    /// Separable Gaussian blur over the last `dims` axes of the sample tensor (replicate borders).
    GaussianBlur {
        /// Odd kernel length.
        kernel_size: usize,
        /// Standard deviation in voxels.
        sigma: f64,
        /// 2 or 3.
        dims: usize,
    },
}

/// The transforms of one array (or one target class), applied in order.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct ValuePipeline {
    /// The ops.
    pub ops: Vec<ValueOp>,
}

fn check_range(what: &str, low: f64, high: f64) -> Result<()> {
    if !(low.is_finite() && high.is_finite() && low <= high) {
        return Err(Error::invalid(format!(
            "{what} range must be finite (low, high) with low <= high, not ({low}, {high})"
        )));
    }
    Ok(())
}

impl ValueOp {
    /// Checks the parameters (the Python layer's objects validate too; this guards the boundary).
    pub fn validate(&self) -> Result<()> {
        match *self {
            ValueOp::GaussianNoise { std, mean } if !(std.is_finite() && mean.is_finite() && std >= 0.0) => Err(Error::invalid(format!(
                "GaussianNoise needs a finite mean and std >= 0, not ({mean}, {std})"
            ))),
            ValueOp::RandomContrast { low, high } => check_range("RandomContrast", low, high),
            ValueOp::RandomGamma { low, high } => check_range("RandomGamma", low, high),
            ValueOp::Standardize { std: 0.0, .. } => Err(Error::invalid("Normalize needs std != 0")),
            ValueOp::GaussianBlur { kernel_size, sigma, dims } => {
                if kernel_size % 2 == 0 || !(sigma > 0.0 && sigma.is_finite()) || !(dims == 2 || dims == 3) {
                    Err(Error::invalid(format!(
                        "GaussianBlur needs an odd kernel size, sigma > 0 and dim 2 or 3, not ({kernel_size}, {sigma}, {dims})"
                    )))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

impl ValuePipeline {
    /// Parses the JSON list the Python layer sends and validates each op.
    pub fn from_json(value: &serde_json::Value, what: &str) -> Result<ValuePipeline> {
        let pipeline = ValuePipeline::deserialize(value).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        for op in &pipeline.ops {
            op.validate().map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        }
        Ok(pipeline)
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies every op to one sample's values of one array, `shape` being the sample tensor's
    /// shape (channel first, singleton spatial axes squeezed, as the batch holds it).
    pub fn apply(&self, values: &mut [f32], shape: &[usize], value_seed: u64, stream: u64) {
        self.apply_known(values, shape, value_seed, stream, false);
    }

    /// [`ValuePipeline::apply`] on values a caller shaped: refused when `shape` does not hold
    /// exactly `values.len()` values.
    pub fn apply_to(&self, values: &mut [f32], shape: &[usize], value_seed: u64, stream: u64) -> Result<()> {
        let held = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if held != Some(values.len()) {
            return Err(Error::invalid(format!("shape {shape:?} does not hold {} values", values.len())));
        }
        self.apply(values, shape, value_seed, stream);
        Ok(())
    }

    /// The value a leading `NanToNum` gives NaN, if the pipeline starts with one: a read that
    /// would pad with NaN may pad with this instead (on integer data nothing else is NaN), and
    /// then skips the op.
    pub fn nan_replacement(&self) -> Option<f32> {
        match self.ops.first() {
            Some(ValueOp::NanToNum { nan, .. }) => Some(*nan),
            _ => None,
        }
    }

    /// [`ValuePipeline::apply`] knowing whether every value is finite: `NanToNum` of finite values
    /// changes nothing and is skipped (the split's default raw transform costs no pass over a
    /// patch read without padding). Finiteness is tracked through the ops.
    pub fn apply_known(&self, values: &mut [f32], shape: &[usize], value_seed: u64, stream: u64, mut finite: bool) {
        for (position, op) in self.ops.iter().enumerate() {
            match op {
                ValueOp::NanToNum { .. } if finite => continue,
                ValueOp::NanToNum { .. } => finite = true,
                // 0/1 from finite values; NaN stays NaN.
                ValueOp::Binarize { .. } => {}
                // Contrast and gamma end with NaN -> 0 and clamp to finite bounds when the
                // data's magnitude is finite; stay conservative otherwise.
                _ => finite = false,
            }
            apply_op(op, values, shape, || op_rng(value_seed, stream, position));
        }
    }
}

fn apply_op(op: &ValueOp, values: &mut [f32], shape: &[usize], rng: impl FnOnce() -> Xoshiro256PlusPlus) {
    match *op {
        ValueOp::NanToNum { nan, posinf, neginf } => {
            let (pos, neg) = (posinf.unwrap_or(f32::MAX), neginf.unwrap_or(f32::MIN));
            // Selects rather than branches, so the loop vectorises.
            for v in values.iter_mut() {
                let x = *v;
                let x = if x.is_nan() { nan } else { x };
                let x = if x == f32::INFINITY { pos } else { x };
                *v = if x == f32::NEG_INFINITY { neg } else { x };
            }
        }
        ValueOp::Binarize { threshold } => {
            for v in values.iter_mut() {
                if !v.is_nan() {
                    *v = f32::from(u8::from(*v > threshold));
                }
            }
        }
        ValueOp::ShiftScale { shift, scale } => values.iter_mut().for_each(|v| *v = (*v + shift) * scale),
        ValueOp::Standardize { mean, std } => values.iter_mut().for_each(|v| *v = (*v - mean) / std),
        ValueOp::GaussianNoise { mean, std } => {
            let mut rng = rng();
            for v in values.iter_mut() {
                let z: f32 = StandardNormal.sample(&mut rng);
                *v += z * std + mean;
            }
        }
        ValueOp::RandomContrast { low, high } => {
            let ratio = (low + (high - low) * rng().random::<f64>()) as f32;
            random_contrast(values, ratio);
        }
        ValueOp::RandomGamma { low, high } => {
            let gamma = (low + (high - low) * rng().random::<f64>()) as f32;
            random_gamma(values, gamma);
        }
        ValueOp::GaussianBlur { kernel_size, sigma, dims } => gaussian_blur(values, shape, kernel_size, sigma, dims),
    }
}

/// Largest magnitude, smallest value and NaN-free mean of a patch (`-inf`, `inf`, NaN when all NaN).
fn summary(values: &[f32]) -> (f32, f32, f32) {
    let (mut magnitude, mut min, mut sum, mut count) = (f32::NEG_INFINITY, f32::INFINITY, 0f64, 0u64);
    for &v in values {
        if v.is_nan() {
            continue;
        }
        magnitude = magnitude.max(v.abs());
        min = min.min(v);
        sum += f64::from(v);
        count += 1;
    }
    let mean = if count == 0 { f32::NAN } else { (sum / count as f64) as f32 };
    (magnitude, min, mean)
}

/// The smallest of 1, 255, 65535 that is at least `magnitude`; infinity past them.
fn nominal_upper_bound(magnitude: f32) -> f32 {
    NOMINAL_MAXIMA.into_iter().find(|&b| magnitude <= b).unwrap_or(f32::INFINITY)
}

fn random_contrast(values: &mut [f32], ratio: f32) {
    let (magnitude, min, mean) = summary(values);
    let upper = nominal_upper_bound(magnitude);
    let lower = if min < 0.0 { -upper } else { 0.0 };
    let offset = (1.0 - ratio) * mean;
    for v in values.iter_mut() {
        let c = (ratio * *v + offset).clamp(lower, upper);
        // NaN voxels (and a NaN mean) end as 0; `clamp` keeps NaN, so test after it.
        *v = if c.is_nan() { 0.0 } else { c };
    }
}

fn random_gamma(values: &mut [f32], gamma: f32) {
    let (magnitude, _, _) = summary(values);
    let mut bound = nominal_upper_bound(magnitude);
    if bound.is_infinite() {
        bound = magnitude;
    }
    for v in values.iter_mut() {
        let unit = (*v / bound).clamp(0.0, 1.0);
        let g = unit.powf(gamma) * bound;
        *v = if g.is_nan() { 0.0 } else { g };
    }
}

/// The normalised 1-D Gaussian kernel (computed in f64 like the torch implementation).
pub fn gaussian_kernel(kernel_size: usize, sigma: f64) -> Vec<f32> {
    let radius = (kernel_size / 2) as i64;
    let raw: Vec<f64> = (-radius..=radius)
        .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|k| (k / total) as f32).collect()
}

/// Blurs the last `dims` axes of a C-order tensor of `shape`, one axis at a time, replicating
/// the border voxels.
fn gaussian_blur(values: &mut [f32], shape: &[usize], kernel_size: usize, sigma: f64, dims: usize) {
    if shape.len() < dims || values.is_empty() {
        return;
    }
    let kernel = gaussian_kernel(kernel_size, sigma);
    let radius = kernel_size / 2;
    let mut line = Vec::new();
    for axis in shape.len() - dims..shape.len() {
        let n = shape[axis];
        let stride: usize = shape[axis + 1..].iter().product();
        let outer = values.len() / (n * stride);
        line.resize(n + 2 * radius, 0f32);
        for o in 0..outer {
            for s in 0..stride {
                let base = o * n * stride + s;
                for (i, slot) in line.iter_mut().enumerate() {
                    let src = i.saturating_sub(radius).min(n - 1);
                    *slot = values[base + src * stride];
                }
                for i in 0..n {
                    let acc: f32 = kernel.iter().zip(&line[i..i + kernel_size]).map(|(k, v)| k * v).sum();
                    values[base + i * stride] = acc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(v: serde_json::Value) -> ValuePipeline {
        ValuePipeline::from_json(&v, "test").unwrap()
    }

    #[test]
    fn apply_to_refuses_a_shape_that_does_not_hold_the_values() {
        let p = pipeline(json!([{"op": "binarize", "threshold": 0.5}]));
        let mut values = vec![0.2f32, 0.7, 0.9, 0.1];
        let err = p.apply_to(&mut values, &[1, 3], 0, 0).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("shape [1, 3] does not hold 4 values"), "{err}");
        assert!(
            p.apply_to(&mut values, &[usize::MAX, 2], 0, 0).is_err(),
            "an overflowing shape holds nothing"
        );
        p.apply_to(&mut values, &[2, 2], 0, 0).unwrap();
        assert_eq!(values, vec![0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn parses_the_python_description_and_rejects_unknown_ops_and_fields() {
        let p = pipeline(json!([{"op": "nan_to_num", "nan": 0.0, "posinf": null, "neginf": null}, {"op": "binarize", "threshold": 0.5}]));
        assert_eq!(p.ops.len(), 2);
        let err = ValuePipeline::from_json(&json!([{"op": "sharpen"}]), "raw transforms")
            .unwrap_err()
            .to_string();
        assert!(err.contains("raw transforms") && err.contains("sharpen"), "{err}");
        let err = ValuePipeline::from_json(&json!([{"op": "binarize", "threshold": 0.5, "extra": 1}]), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
        let err = ValuePipeline::from_json(&json!([{"op": "gaussian_blur", "kernel_size": 4, "sigma": 1.0, "dims": 2}]), "t").unwrap_err();
        assert!(err.to_string().contains("odd"));
    }

    #[test]
    fn nan_to_num_of_finite_data_is_skipped_and_later_ops_still_run() {
        let p = pipeline(json!([{"op": "nan_to_num", "nan": 0.0}, {"op": "shift_scale", "shift": 1.0, "scale": 2.0}]));
        let mut v = [1.0f32, 2.0];
        p.apply_known(&mut v, &[2], 0, 0, true);
        assert_eq!(v, [4.0, 6.0]);
        let mut v = [f32::NAN, 2.0];
        p.apply_known(&mut v, &[2], 0, 0, false);
        assert_eq!(v, [2.0, 6.0]);
    }

    #[test]
    fn nan_to_num_and_binarize_follow_torch() {
        let mut v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.25, 0.75];
        pipeline(json!([{"op": "nan_to_num", "nan": 0.0, "posinf": null, "neginf": -1.0}])).apply(&mut v, &[5], 0, 0);
        assert_eq!(v, [0.0, f32::MAX, -1.0, 0.25, 0.75]);
        let mut v = [f32::NAN, 0.5, 0.6, -1.0];
        pipeline(json!([{"op": "binarize", "threshold": 0.5}])).apply(&mut v, &[4], 0, 0);
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[0.0, 1.0, 0.0]);
    }

    #[test]
    fn contrast_with_a_fixed_ratio_matches_the_formula() {
        // ratio 2 about the NaN-free mean 2: [1, 2, 3] -> [0, 2, 4], clamped to [0, 255]; NaN -> 0.
        let mut v = [1.0, 2.0, 3.0, f32::NAN];
        pipeline(json!([{"op": "random_contrast", "low": 2.0, "high": 2.0}])).apply(&mut v, &[4], 7, 0);
        assert_eq!(v, [0.0, 2.0, 4.0, 0.0]);
        // data in [0, 1] is clamped to [0, 1]
        let mut v = [0.0, 0.5, 1.0];
        pipeline(json!([{"op": "random_contrast", "low": 3.0, "high": 3.0}])).apply(&mut v, &[3], 7, 0);
        assert_eq!(v, [0.0, 0.5, 1.0]);
    }

    #[test]
    fn gamma_with_a_fixed_exponent_works_on_the_nominal_range() {
        let mut v = [0.0, 63.75, 255.0, f32::NAN];
        pipeline(json!([{"op": "random_gamma", "low": 2.0, "high": 2.0}])).apply(&mut v, &[4], 1, 0);
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 0.0625 * 255.0).abs() < 1e-3);
        assert_eq!(v[2], 255.0);
        assert_eq!(v[3], 0.0);
    }

    #[test]
    fn random_draws_are_keyed_by_seed_stream_and_position() {
        let p = pipeline(json!([{"op": "gaussian_noise", "mean": 0.0, "std": 1.0}]));
        let run = |seed, stream| {
            let mut v = vec![0f32; 4096];
            p.apply(&mut v, &[4096], seed, stream);
            v
        };
        assert_eq!(run(5, 0), run(5, 0));
        assert_ne!(run(5, 0), run(6, 0));
        assert_ne!(run(5, 0), run(5, 1));
        let v = run(9, 0);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.1 && (var.sqrt() - 1.0).abs() < 0.1, "mean {mean} std {}", var.sqrt());
    }

    #[test]
    fn blur_of_a_constant_is_the_constant_and_of_an_impulse_is_the_kernel() {
        let mut v = vec![3.0f32; 2 * 5 * 7];
        pipeline(json!([{"op": "gaussian_blur", "kernel_size": 3, "sigma": 1.0, "dims": 2}])).apply(&mut v, &[2, 5, 7], 0, 0);
        assert!(v.iter().all(|x| (x - 3.0).abs() < 1e-6));
        let mut v = vec![0f32; 9 * 9];
        v[4 * 9 + 4] = 1.0;
        pipeline(json!([{"op": "gaussian_blur", "kernel_size": 3, "sigma": 1.0, "dims": 2}])).apply(&mut v, &[1, 9, 9], 0, 0);
        let k = gaussian_kernel(3, 1.0);
        for dy in 0..3 {
            for dx in 0..3 {
                assert!((v[(3 + dy) * 9 + 3 + dx] - k[dy] * k[dx]).abs() < 1e-7);
            }
        }
    }
}
