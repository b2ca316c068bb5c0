//! Elastic deformation: a smooth random displacement field added to a sample's affine map, so
//! that a deformed patch is still resampled once. Control points sit on a grid of
//! `control_point_spacing` nm anchored at the patch centre, in the sample's output frame (before
//! its rotation); each control point's displacement is drawn from a counter-based stream keyed by
//! the field's seed and the point's grid index, so the field does not depend on which arrays (of
//! which sizes and scales) are read, nor in which order. Between control points the field is a
//! Catmull-Rom cubic spline per axis (interpolating and C1: the displacement at a control point is
//! the one drawn there, as `jitter_sigma` states).

use multiversion::multiversion;
use rand::RngExt;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::geometry::Affine;
use crate::sample::rng::control_point_rng;

/// A value given once for all axes or once per axis (z, y, x).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerAxis {
    /// The same value on every axis.
    All(f64),
    /// One value per axis (z, y, x).
    Each([f64; 3]),
}

impl PerAxis {
    /// The value per axis.
    pub fn per_axis(self) -> [f64; 3] {
        match self {
            PerAxis::All(v) => [v; 3],
            PerAxis::Each(v) => v,
        }
    }
}

/// `{"control_point_spacing": [z, y, x] nm, "jitter_sigma": [z, y, x] nm, "prob": p}` (either
/// length may be one number for all axes; `prob` defaults to 1).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticJson {
    /// Distance between control points (nm).
    pub control_point_spacing: PerAxis,
    /// Standard deviation of a control point's displacement (nm).
    pub jitter_sigma: PerAxis,
    /// Probability that a sample is deformed.
    #[serde(default = "always")]
    pub prob: f64,
}

fn always() -> f64 {
    1.0
}

/// The checked elastic configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElasticConfig {
    /// Control point spacing per axis (nm, positive).
    pub spacing: [f64; 3],
    /// Displacement standard deviation per axis (nm, non-negative).
    pub sigma: [f64; 3],
    /// Probability that a sample is deformed.
    pub prob: f64,
}

impl ElasticConfig {
    /// Checks the values, naming the key of any that is out of range.
    pub fn new(json: &ElasticJson) -> Result<ElasticConfig> {
        let key = |name: &str| format!("spatial_transforms['elastic']['{name}']");
        let spacing = json.control_point_spacing.per_axis();
        if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::invalid(format!(
                "{} must be positive and finite (nm), not {spacing:?}",
                key("control_point_spacing")
            )));
        }
        let sigma = json.jitter_sigma.per_axis();
        if sigma.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(Error::invalid(format!(
                "{} must be non-negative and finite (nm), not {sigma:?}",
                key("jitter_sigma")
            )));
        }
        if !(0.0..=1.0).contains(&json.prob) {
            return Err(Error::invalid(format!(
                "{} must be a probability in [0, 1], not {}",
                key("prob"),
                json.prob
            )));
        }
        Ok(ElasticConfig {
            spacing,
            sigma,
            prob: json.prob,
        })
    }

    /// Whether no sample is ever deformed.
    pub fn is_identity(&self) -> bool {
        self.prob == 0.0 || self.sigma.iter().all(|s| *s == 0.0)
    }
}

/// One sample's deformation: what regenerates its field exactly (recorded in the metadata).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElasticDraw {
    /// Seed of the control point displacements.
    pub seed: u64,
    /// Control point spacing per axis (nm).
    pub spacing: [f64; 3],
    /// Displacement standard deviation per axis (nm; 0 on the axis of a 2D patch).
    pub sigma: [f64; 3],
}

impl ElasticDraw {
    /// Checks a draw given by hand (a sample re-read from its metadata).
    pub fn checked(self) -> Result<ElasticDraw> {
        ElasticConfig::new(&ElasticJson {
            control_point_spacing: PerAxis::Each(self.spacing),
            jitter_sigma: PerAxis::Each(self.sigma),
            prob: 1.0,
        })?;
        Ok(self)
    }

    /// The displacement (nm, in the output frame, per axis) of control point `index`, whose
    /// position is `index * spacing` nm from the patch centre.
    pub fn control_displacement(&self, index: [i64; 3]) -> [f64; 3] {
        let mut rng = control_point_rng(self.seed, index);
        std::array::from_fn(|k| {
            let n: f64 = rng.sample(StandardNormal);
            self.sigma[k] * n
        })
    }

    /// The displacement field (nm, output frame) at the voxel centres of a patch of `shape`
    /// voxels of `voxel_size` nm centred on the patch centre: three arrays (z, y, x components)
    /// in C order.
    pub fn field_nm(&self, shape: [usize; 3], voxel_size: [f64; 3]) -> [Vec<f32>; 3] {
        let identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut fields = [Vec::new(), Vec::new(), Vec::new()];
        self.evaluate(shape, voxel_size, &identity, &mut fields);
        fields
    }

    /// The field of a patch read through `affine` (output voxel → source voxel, for output voxels
    /// of `voxel_size` nm) as a shift of every output voxel's source position, in source voxels.
    pub fn source_shift(&self, affine: &Affine, shape: [usize; 3], voxel_size: [f64; 3]) -> SourceShift {
        self.source_shift_into(affine, shape, voxel_size, [Vec::new(), Vec::new(), Vec::new()])
    }

    /// [`Self::source_shift`] written into `buffers` (reused allocations: fresh megabyte-sized
    /// ones cost a page fault per 4 KiB).
    pub fn source_shift_into(&self, affine: &Affine, shape: [usize; 3], voxel_size: [f64; 3], mut buffers: [Vec<f32>; 3]) -> SourceShift {
        // The affine's linear part is inv(source voxel) · orientation · diag(voxel_size): without
        // the last factor it turns an output-frame offset in nm into source voxels.
        let to_source: [[f64; 3]; 3] = std::array::from_fn(|j| std::array::from_fn(|k| affine.m[j][k] / voxel_size[k]));
        let reach = self.evaluate(shape, voxel_size, &to_source, &mut buffers);
        SourceShift { shift: buffers, reach }
    }

    /// `linear · field` at every voxel centre, and the largest magnitude of each component: the
    /// spline is linear in the control values, so `linear` is applied to the (few) control points
    /// and the result interpolated.
    fn evaluate(&self, shape: [usize; 3], voxel_size: [f64; 3], linear: &[[f64; 3]; 3], fields: &mut [Vec<f32>; 3]) -> [f64; 3] {
        let axes: [AxisWeights; 3] = std::array::from_fn(|k| AxisWeights::new(shape[k], voxel_size[k], self.spacing[k]));
        let counts = axes.each_ref().map(|a| a.controls);
        // Control values, mapped by `linear`: [component][z][y][x] over the points the patch uses.
        let n_controls = counts.iter().product::<usize>();
        let mut controls = [vec![0.0f64; n_controls], vec![0.0f64; n_controls], vec![0.0f64; n_controls]];
        for cz in 0..counts[0] {
            for cy in 0..counts[1] {
                for cx in 0..counts[2] {
                    let d = self.control_displacement([axes[0].first + cz as i64, axes[1].first + cy as i64, axes[2].first + cx as i64]);
                    let at = (cz * counts[1] + cy) * counts[2] + cx;
                    for j in 0..3 {
                        controls[j][at] = (0..3).map(|k| linear[j][k] * d[k]).sum();
                    }
                }
            }
        }
        let [nz, ny, nx] = shape;
        let plane = ny * nx;
        let mut reach = [0.0; 3];
        for (j, out) in fields.iter_mut().enumerate() {
            // Separable: along x, then y (on control planes, small), then z (every voxel: four
            // multiply-adds in float32, vectorised).
            let along_x = axes[2].apply(&controls[j], counts[0] * counts[1], 1);
            let along_y: Vec<f32> = axes[1].apply(&along_x, counts[0], nx).into_iter().map(|v| v as f32).collect();
            // Every value is written below: a reused buffer needs no zero fill.
            out.resize(nz * plane, 0.0);
            let largest = out
                .par_chunks_mut(plane.max(1))
                .enumerate()
                .map(|(z, slab)| {
                    let (base, w) = (axes[0].base[z], axes[0].weights[z]);
                    let term = |m: usize| &along_y[(base + m) * plane..(base + m + 1) * plane];
                    spline_plane(w.map(|v| v as f32), [term(0), term(1), term(2), term(3)], slab)
                })
                .max()
                .unwrap_or(0);
            reach[j] = f64::from(f32::from_bits(largest));
        }
        reach
    }
}

/// A displacement of every output voxel's source position (source voxels, per source axis).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceShift {
    /// Per source axis (z, y, x), one value per output voxel in C order.
    pub shift: [Vec<f32>; 3],
    /// Largest magnitude per source axis: how far beyond the affine's footprint a read reaches.
    pub reach: [f64; 3],
}

impl SourceShift {
    /// The shift of output row `row` (voxels `row * nx .. (row + 1) * nx`) per source axis.
    pub fn row(&self, row: usize, nx: usize) -> [&[f32]; 3] {
        std::array::from_fn(|k| &self.shift[k][row * nx..(row + 1) * nx])
    }
}

/// The spline weights of one axis: output voxel `o` is `Σ_m weights[o][m] · control[base[o] + m]`
/// over the `controls` points starting at grid index `first`.
struct AxisWeights {
    first: i64,
    controls: usize,
    base: Vec<usize>,
    weights: Vec<[f64; 4]>,
}

impl AxisWeights {
    fn new(n: usize, voxel_size: f64, spacing: f64) -> AxisWeights {
        // Voxel centres in control-grid units from the patch centre.
        let t: Vec<f64> = (0..n).map(|o| (o as f64 - (n as f64 - 1.0) / 2.0) * voxel_size / spacing).collect();
        let lowest = t.iter().fold(f64::INFINITY, |m, v| m.min(*v)).floor() as i64;
        let highest = t.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v)).floor() as i64;
        let first = lowest - 1;
        let controls = (highest + 2 - first + 1) as usize;
        let mut base = Vec::with_capacity(n);
        let mut weights = Vec::with_capacity(n);
        for &ti in &t {
            let cell = ti.floor();
            base.push((cell as i64 - 1 - first) as usize);
            weights.push(catmull_rom(ti - cell));
        }
        AxisWeights {
            first,
            controls,
            base,
            weights,
        }
    }

    /// Contracts the innermost-but-`inner` axis of `values` (`outer` blocks of `self.controls` ×
    /// `inner` values) with the weights: `outer` blocks of `n` × `inner`.
    fn apply(&self, values: &[f64], outer: usize, inner: usize) -> Vec<f64> {
        let (n, controls) = (self.base.len(), self.controls);
        let mut out = vec![0.0; outer * n * inner];
        for b in 0..outer {
            for (o, (&base, w)) in self.base.iter().zip(&self.weights).enumerate() {
                let dst = &mut out[(b * n + o) * inner..(b * n + o + 1) * inner];
                for (m, &wm) in w.iter().enumerate() {
                    let src = &values[(b * controls + base + m) * inner..(b * controls + base + m + 1) * inner];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += wm * s);
                }
            }
        }
        out
    }
}

/// One output plane of the z pass: `out = Σ_m w[m] · planes[m]` (summed in order m = 0..3), and
/// the bit pattern of its largest magnitude (bit patterns of magnitudes order as the magnitudes
/// do, and an integer maximum vectorises where a float one, with its NaN rule, does not).
/// Compiled for AVX2 and SSE4.1 as well; no fused multiply-add, so every CPU gives the same bits.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn spline_plane(w: [f32; 4], planes: [&[f32]; 4], out: &mut [f32]) -> u32 {
    let n = out.len();
    let [a, b, c, d] = planes.map(|p| &p[..n]);
    let mut largest = 0u32;
    for i in 0..n {
        let v = w[0] * a[i] + w[1] * b[i] + w[2] * c[i] + w[3] * d[i];
        out[i] = v;
        largest = largest.max(v.to_bits() & 0x7fff_ffff);
    }
    largest
}

/// Catmull-Rom weights of the control points at cells −1, 0, 1, 2 for a position `f` ∈ [0, 1)
/// past cell 0: they sum to 1 and give exactly the control value at `f = 0`.
fn catmull_rom(f: f64) -> [f64; 4] {
    let (f2, f3) = (f * f, f * f * f);
    [
        -0.5 * f3 + f2 - 0.5 * f,
        1.5 * f3 - 2.5 * f2 + 1.0,
        -1.5 * f3 + 2.0 * f2 + 0.5 * f,
        0.5 * f3 - 0.5 * f2,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(sigma: [f64; 3]) -> ElasticDraw {
        ElasticDraw {
            seed: 7,
            spacing: [40.0, 30.0, 20.0],
            sigma,
        }
    }

    #[test]
    fn field_passes_through_the_control_points() {
        let d = draw([3.0, 4.0, 5.0]);
        // Odd shape, voxel size dividing the spacing: control points fall on voxel centres.
        let (shape, voxel) = ([9, 13, 21], [10.0, 10.0, 10.0]);
        let field = d.field_nm(shape, voxel);
        for (z, y, x) in [(4, 6, 10), (0, 3, 2), (8, 0, 20)] {
            let offset = [z as f64 - 4.0, y as f64 - 6.0, x as f64 - 10.0].map(|o| o * 10.0);
            if (0..3).all(|k| (offset[k] / d.spacing[k]).fract() == 0.0) {
                let index: [i64; 3] = std::array::from_fn(|k| (offset[k] / d.spacing[k]) as i64);
                let expected = d.control_displacement(index);
                let at = (z * shape[1] + y) * shape[2] + x;
                for k in 0..3 {
                    assert!(
                        (f64::from(field[k][at]) - expected[k]).abs() < 1e-4,
                        "{k}: {} vs {}",
                        field[k][at],
                        expected[k]
                    );
                }
            }
        }
    }

    #[test]
    fn field_does_not_depend_on_the_patch_size() {
        let d = draw([3.0, 4.0, 5.0]);
        let small = d.field_nm([3, 5, 7], [4.0; 3]);
        let large = d.field_nm([7, 9, 11], [4.0; 3]);
        for z in 0..3 {
            for y in 0..5 {
                for x in 0..7 {
                    let a = small[2][(z * 5 + y) * 7 + x];
                    let b = large[2][((z + 2) * 9 + y + 2) * 11 + x + 2];
                    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn zero_sigma_is_a_zero_field_and_constant_controls_a_constant_field() {
        let zero = draw([0.0; 3]).field_nm([4, 5, 6], [3.0; 3]);
        assert!(zero.iter().flatten().all(|v| *v == 0.0));
        let w = catmull_rom(0.37);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(catmull_rom(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        let bad = |json: serde_json::Value| ElasticConfig::new(&serde_json::from_value(json).unwrap()).unwrap_err().to_string();
        assert!(bad(serde_json::json!({"control_point_spacing": 0, "jitter_sigma": 1})).contains("control_point_spacing"));
        assert!(bad(serde_json::json!({"control_point_spacing": [1, 2, 3], "jitter_sigma": -1})).contains("jitter_sigma"));
        assert!(bad(serde_json::json!({"control_point_spacing": 10, "jitter_sigma": 1, "prob": 2})).contains("prob"));
    }
}
