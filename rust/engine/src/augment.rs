//! Spatial augmentation: the user's transform config, the per-sample random draw (mirror,
//! transpose, rotation) turned into one orientation matrix, the counter-based RNG every draw
//! comes from, and the resampling kernels of the general (non axis-aligned) read path.

use std::collections::BTreeMap;

use multiversion::multiversion;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::elastic::{ElasticConfig, ElasticDraw, ElasticJson, SourceShift};
use crate::error::{Error, Result};
use crate::geometry::{matmul, Affine, Mat3, AXES, IDENTITY};

/// How to interpolate between source voxels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Nearest voxel (labels).
    Nearest,
    /// Trilinear (raw).
    Linear,
}

impl Interpolation {
    /// Parses `"nearest"` / `"linear"` (also `"trilinear"`, `"bilinear"`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nearest" => Ok(Interpolation::Nearest),
            "linear" | "trilinear" | "bilinear" => Ok(Interpolation::Linear),
            other => Err(Error::invalid(format!(
                "interpolation must be 'nearest' or 'linear', not '{other}'"
            ))),
        }
    }
}

/// The parsed spatial-transform configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpatialConfig {
    /// Mirror probability per axis (z, y, x).
    pub mirror: [f64; 3],
    /// Axes that may be permuted among themselves.
    pub transpose: Vec<usize>,
    /// Rotation angle range in degrees about each axis (z, y, x); `None` = no rotation.
    pub rotate: [Option<(f64, f64)>; 3],
    /// Zoom factor range (`lo`, `hi`) and whether each axis draws its own factor.
    pub zoom: Option<(f64, f64, bool)>,
    /// Largest magnitude of each shear term.
    pub shear: Option<f64>,
    /// Elastic deformation.
    pub elastic: Option<ElasticConfig>,
}

/// The off-diagonal terms of a shear, `(row, column)` of the matrix: the order shear draws and
/// metadata columns (`shear_zy` is the z displacement per unit of y) follow.
pub const SHEAR_TERMS: [(usize, usize); 6] = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)];

/// Largest shear term accepted: keeps the map well conditioned (and invertible).
pub const MAX_SHEAR: f64 = 0.5;

/// The spatial-transform configuration in the one form the engine reads (the Python layer
/// translates the reference library's dialects into it): mirror probability per axis, the
/// axes that may be permuted, and a rotation range in degrees per axis. Unknown keys are
/// errors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpatialJson {
    /// `{"x": 0.5}`
    #[serde(default)]
    pub mirror: BTreeMap<String, f64>,
    /// `["x", "y"]`
    #[serde(default)]
    pub transpose: Vec<String>,
    /// `{"z": [-180, 180]}`
    #[serde(default)]
    pub rotate: BTreeMap<String, [f64; 2]>,
    /// `{"range": [0.9, 1.1], "per_axis": false}`: zoom about the patch centre; a factor f makes
    /// the patch cover f times the world extent (f > 1 zooms out).
    #[serde(default, deserialize_with = "scale_config")]
    pub scale: Option<ScaleJson>,
    /// `{"range": 0.1}`: each off-diagonal term of a shear drawn in [-0.1, 0.1].
    #[serde(default, deserialize_with = "shear_config")]
    pub shear: Option<ShearJson>,
    /// `{"control_point_spacing": [z, y, x], "jitter_sigma": [z, y, x], "prob": p}` (nm; either
    /// length may be one number): a smooth random deformation in the same single resample.
    #[serde(default, deserialize_with = "elastic_config")]
    pub elastic: Option<ElasticJson>,
}

fn elastic_config<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<ElasticJson>, D::Error> {
    Option::<ElasticJson>::deserialize(deserializer).map_err(|e| {
        let e = e.to_string();
        let why = if e.contains("untagged") {
            "control_point_spacing and jitter_sigma must each be a number or a list of three (z, y, x) numbers".to_string()
        } else {
            e
        };
        D::Error::custom(format!("['elastic']: {why}"))
    })
}

fn scale_config<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<ScaleJson>, D::Error> {
    Option::<ScaleJson>::deserialize(deserializer).map_err(|e| D::Error::custom(format!("['scale']: {e}")))
}

fn shear_config<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<ShearJson>, D::Error> {
    Option::<ShearJson>::deserialize(deserializer).map_err(|e| D::Error::custom(format!("['shear']: {e}")))
}

/// The `scale` (zoom) transform.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleJson {
    /// Factor range `[low, high]`, both positive.
    pub range: [f64; 2],
    /// One factor per axis (default: one factor for all axes).
    #[serde(default)]
    pub per_axis: bool,
}

/// The `shear` transform.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShearJson {
    /// Largest magnitude of each shear term (at most [`MAX_SHEAR`]).
    pub range: f64,
}

/// Reads an optional [`SpatialJson`], naming `spatial_transforms` in any error (for
/// `#[serde(deserialize_with)]`).
pub fn spatial_transforms<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<SpatialJson>, D::Error> {
    Option::<SpatialJson>::deserialize(deserializer).map_err(|e| D::Error::custom(format!("spatial_transforms: {e}")))
}

fn axis_index(name: &str, key: &str) -> Result<usize> {
    AXES.iter().position(|a| *a == name).ok_or_else(|| {
        Error::invalid(format!(
            "spatial_transforms['{key}']: unknown axis '{name}' (the data has axes z, y, x)"
        ))
    })
}

fn finite(value: f64, what: &str) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::invalid(format!("{what} must be a finite number, not {value}")))
    }
}

impl SpatialConfig {
    /// Checks the configuration (axis names, probabilities, angle ranges) and resolves it.
    pub fn new(config: &SpatialJson) -> Result<SpatialConfig> {
        let mut out = SpatialConfig::default();
        for (name, &p) in &config.mirror {
            let what = format!("spatial_transforms['mirror']['{name}']");
            let p = finite(p, &what)?;
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(format!("{what} must be a probability in [0, 1], not {p}")));
            }
            out.mirror[axis_index(name, "mirror")?] = p;
        }
        for name in &config.transpose {
            let k = axis_index(name, "transpose")?;
            if !out.transpose.contains(&k) {
                out.transpose.push(k);
            }
        }
        for (name, &[lo, hi]) in &config.rotate {
            let what = format!("spatial_transforms['rotate']['{name}']");
            let (lo, hi) = (finite(lo, &what)?, finite(hi, &what)?);
            if lo > hi {
                return Err(Error::invalid(format!("{what}: low {lo} is greater than high {hi}")));
            }
            out.rotate[axis_index(name, "rotate")?] = Some((lo, hi));
        }
        if let Some(scale) = &config.scale {
            let what = "spatial_transforms['scale']['range']";
            let [lo, hi] = scale.range;
            let (lo, hi) = (finite(lo, what)?, finite(hi, what)?);
            if !(lo > 0.0 && lo <= hi) {
                return Err(Error::invalid(format!(
                    "{what} must be [low, high] with 0 < low <= high, not [{lo}, {hi}]"
                )));
            }
            out.zoom = Some((lo, hi, scale.per_axis));
        }
        if let Some(shear) = &config.shear {
            let what = "spatial_transforms['shear']['range']";
            let s = finite(shear.range, what)?;
            if !(0.0..=MAX_SHEAR).contains(&s) {
                return Err(Error::invalid(format!("{what} must be in [0, {MAX_SHEAR}], not {s}")));
            }
            out.shear = Some(s);
        }
        if let Some(elastic) = &config.elastic {
            out.elastic = Some(ElasticConfig::new(elastic)?);
        }
        Ok(out)
    }

    /// Whether the config changes anything.
    pub fn is_identity(&self) -> bool {
        self.mirror.iter().all(|p| *p == 0.0)
            && self.transpose.len() < 2
            && self.rotate.iter().all(Option::is_none)
            && self.zoom.is_none_or(|(lo, hi, _)| lo == 1.0 && hi == 1.0)
            && self.shear.is_none_or(|s| s == 0.0)
            && self.elastic.is_none_or(|e| e.is_identity())
    }

    /// Draws one sample's transform. With `planar_axis = Some(a)` (2D patches with a singleton
    /// on axis `a`) rotation is in-plane only (about `a`) and `a` is never transposed.
    pub fn draw(&self, rng: &mut SampleRng, planar_axis: Option<usize>) -> SpatialDraw {
        let mut d = SpatialDraw::default();
        // Fixed draw order keeps samples reproducible whatever the config contains.
        for k in 0..3 {
            let u: f64 = rng.0.random();
            d.mirror[k] = u < self.mirror[k] && Some(k) != planar_axis;
        }
        let axes: Vec<usize> = self.transpose.iter().copied().filter(|a| Some(*a) != planar_axis).collect();
        let mut shuffled = axes.clone();
        for i in (1..shuffled.len()).rev() {
            let j = rng.0.random_range(0..=i);
            shuffled.swap(i, j);
        }
        for (from, to) in axes.iter().zip(&shuffled) {
            d.permutation[*from] = *to;
        }
        for k in 0..3 {
            let u: f64 = rng.0.random();
            if let Some((lo, hi)) = self.rotate[k] {
                if planar_axis.is_none() || planar_axis == Some(k) {
                    d.angles_deg[k] = lo + u * (hi - lo);
                }
            }
        }
        // Zoom and shear draw only when configured, so configurations without them keep
        // the draws (and value seeds) they always had.
        if let Some((lo, hi, per_axis)) = self.zoom {
            let shared: f64 = rng.0.random();
            for k in 0..3 {
                let u: f64 = if per_axis { rng.0.random() } else { shared };
                if Some(k) != planar_axis {
                    d.zoom[k] = lo + u * (hi - lo);
                }
            }
        }
        if let Some(s) = self.shear {
            for (term, &(row, column)) in SHEAR_TERMS.iter().enumerate() {
                let u: f64 = rng.0.random();
                if Some(row) != planar_axis && Some(column) != planar_axis {
                    d.shear[term] = (2.0 * u - 1.0) * s;
                }
            }
        }
        if let Some(e) = self.elastic {
            let (u, seed) = (rng.uniform(), rng.next_seed());
            let mut sigma = e.sigma;
            if let Some(a) = planar_axis {
                // A 2D patch deforms in its plane only.
                sigma[a] = 0.0;
            }
            if u < e.prob && sigma.iter().any(|s| *s > 0.0) {
                d.elastic = Some(ElasticDraw {
                    seed,
                    spacing: e.spacing,
                    sigma,
                });
            }
        }
        d
    }
}

/// One sample's spatial draw; recorded in the sample metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpatialDraw {
    /// Whether each axis (z, y, x) is mirrored.
    pub mirror: [bool; 3],
    /// Output axis `k` walks world axis `permutation[k]`.
    pub permutation: [usize; 3],
    /// Rotation angles about z, y, x in degrees.
    pub angles_deg: [f64; 3],
    /// An explicit rotation matrix (z, y, x; world offset = matrix · turned offset) used instead
    /// of the one built from `angles_deg` (the reference library's `rotation_matrix`).
    pub rotation: Option<Mat3>,
    /// Zoom factor per axis (z, y, x): the patch covers this many times its world extent.
    pub zoom: [f64; 3],
    /// Shear terms in [`SHEAR_TERMS`] order.
    pub shear: [f64; 6],
    /// The elastic deformation, if the sample is deformed.
    pub elastic: Option<ElasticDraw>,
}

impl Default for SpatialDraw {
    fn default() -> Self {
        SpatialDraw {
            mirror: [false; 3],
            permutation: [0, 1, 2],
            angles_deg: [0.0; 3],
            zoom: [1.0; 3],
            shear: [0.0; 6],
            rotation: None,
            elastic: None,
        }
    }
}

impl SpatialDraw {
    /// World offset = orientation · output-frame offset (rotate ∘ zoom ∘ shear ∘ transpose ∘
    /// mirror): one linear map, so the patch is still resampled once.
    pub fn orientation(&self) -> Mat3 {
        let mut mirror = IDENTITY;
        for (k, row) in mirror.iter_mut().enumerate() {
            if self.mirror[k] {
                row[k] = -1.0;
            }
        }
        let mut transpose = [[0.0; 3]; 3];
        for k in 0..3 {
            transpose[self.permutation[k]][k] = 1.0;
        }
        let rotation = self.rotation.unwrap_or_else(|| rotation_matrix(self.angles_deg));
        let mut zoom_shear = IDENTITY;
        for (k, row) in zoom_shear.iter_mut().enumerate() {
            row[k] = self.zoom[k];
        }
        let mut shear = IDENTITY;
        for (&(row, column), &term) in SHEAR_TERMS.iter().zip(&self.shear) {
            shear[row][column] = term;
        }
        zoom_shear = matmul(&zoom_shear, &shear);
        matmul(&rotation, &matmul(&zoom_shear, &matmul(&transpose, &mirror)))
    }
}

/// Rotation by `angles_deg` about z, then y, then x (applied x first). Rotating about an axis
/// turns the plane of the two other axes: about z, the y–x plane.
pub fn rotation_matrix(angles_deg: [f64; 3]) -> Mat3 {
    let mut r = IDENTITY;
    for axis in (0..3).rev() {
        let a = angles_deg[axis].to_radians();
        if a == 0.0 {
            continue;
        }
        let (s, c) = a.sin_cos();
        let (p, q) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let mut m = IDENTITY;
        m[p][p] = c;
        m[p][q] = -s;
        m[q][p] = s;
        m[q][q] = c;
        r = matmul(&m, &r);
    }
    r
}

/// The random stream of one sample, keyed by (seed, epoch, rank, sample index) so that a
/// sample's draws never depend on thread scheduling or on other samples.
pub struct SampleRng(Xoshiro256PlusPlus);

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SampleRng {
    /// The stream for one sample.
    pub fn new(seed: u64, epoch: u64, rank: u64, index: u64) -> Self {
        let key = splitmix(splitmix(splitmix(splitmix(seed) ^ epoch) ^ rank) ^ index);
        SampleRng(Xoshiro256PlusPlus::seed_from_u64(key))
    }

    /// A uniform float in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }

    /// A 63-bit seed for value transforms (fits torch's int64 generator seeds).
    pub fn next_seed(&mut self) -> u64 {
        self.0.random::<u64>() >> 1
    }
}

/// An element of a source block: float32 (every dtype converted as it is gathered), or uint8
/// raw data kept as stored, whose blocks take a quarter of the memory (a rotated 128³ read's
/// source planes then stay in the first-level cache). A uint8 value converts to float32
/// exactly, so both give the same samples bit for bit.
pub trait BlockValue: Copy + Send + Sync + 'static {
    /// The value as float32.
    fn value(self) -> f32;
}

impl BlockValue for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

impl BlockValue for u8 {
    #[inline(always)]
    fn value(self) -> f32 {
        f32::from(self)
    }
}

/// The part of a source block known to hold no NaN, as a box `[lo, hi)` in block indices:
/// integer data read from inside the array (the rest may be NaN padding), or the whole block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiniteRegion {
    /// First index per axis.
    pub lo: [i64; 3],
    /// One past the last index per axis.
    pub hi: [i64; 3],
}

impl FiniteRegion {
    /// The whole block of `shape`.
    pub fn whole(shape: [usize; 3]) -> FiniteRegion {
        FiniteRegion {
            lo: [0; 3],
            hi: shape.map(|n| n as i64),
        }
    }
}

/// Resamples `block` (C order, shape `block_shape`, whose element 0 is source voxel
/// `block_lo`) onto the output grid through `affine`. The block must contain every source voxel
/// the kernel touches, so the inner loop does no bounds tests beyond a clamp at the far edge.
/// Linear rows whose eight-neighbourhoods all lie in `finite` (no NaN there) take the
/// vectorised kernel; other rows the NaN-aware one. Both give the same value for a sample
/// with finite neighbours, so the choice never shows in the output. A `shift` (elastic
/// deformation) moves each output voxel's source position further; a zero shift gives the
/// unshifted result bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn resample<V: BlockValue>(
    block: &[V],
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    interpolation: Interpolation,
    finite: Option<FiniteRegion>,
    out: &mut [f32],
) {
    match interpolation {
        // No NaN-free region: every row takes the NaN-aware kernel.
        Interpolation::Linear => {
            let region = finite.unwrap_or(FiniteRegion { lo: [0; 3], hi: [0; 3] });
            resample_linear(block, block_shape, block_lo, affine, shift, out_shape, region, None, out)
        }
        Interpolation::Nearest => resample_nearest(block, block_shape, block_lo, affine, shift, out_shape, out),
    }
}

/// Linear resampling of a uint8 block of which only `inside` holds data: the voxels outside it
/// are NaN padding (the uint8 block cannot hold NaN, so the NaN-aware kernel reads them as NaN).
/// The same values, bit for bit, as [`resample`] of the float32 block padded with NaN.
#[allow(clippy::too_many_arguments)]
pub fn resample_nan_padded(
    block: &[u8],
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    inside: FiniteRegion,
    out: &mut [f32],
) {
    resample_linear(block, block_shape, block_lo, affine, shift, out_shape, inside, Some(inside), out)
}

/// Source position of sample `x` of a row: `start + step · x`, plus the row's shift when there
/// is one (added last, so a zero shift changes no bit).
#[inline(always)]
fn position(start: [f64; 3], step: [f64; 3], shift: Option<[&[f32]; 3]>, x: usize) -> [f64; 3] {
    shifted_position(start, step, x as f64, shift, x)
}

/// [`position`] of sample `x` taking its shift from element `i` of `shift`. Every caller's `i`
/// is below the length of the shift slices (a row's, or a pass's share of one).
#[inline(always)]
fn shifted_position(start: [f64; 3], step: [f64; 3], x: f64, shift: Option<[&[f32]; 3]>, i: usize) -> [f64; 3] {
    let s = [start[0] + step[0] * x, start[1] + step[1] * x, start[2] + step[2] * x];
    match shift {
        Some(d) => {
            debug_assert!(d.iter().all(|k| i < k.len()));
            // SAFETY: see above; unchecked so that the row kernels' position pass vectorises.
            let at = |k: usize| f64::from(unsafe { *d[k].get_unchecked(i) });
            [s[0] + at(0), s[1] + at(1), s[2] + at(2)]
        }
        None => s,
    }
}

/// Trilinear resampling, choosing a kernel per row: rows whose samples all have their eight
/// neighbours inside the NaN-free `region` take the vectorised kernel; rows elsewhere in a
/// wholly NaN-free block take the clamped kernel; the rest the NaN-aware kernel.
#[allow(clippy::too_many_arguments)]
fn resample_linear<V: BlockValue>(
    block: &[V],
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    region: FiniteRegion,
    nan_outside: Option<FiniteRegion>,
    out: &mut [f32],
) {
    let [_, ny, nx] = out_shape;
    if nx == 0 || ny == 0 {
        return;
    }
    assert!(block.len() >= block_shape.iter().product::<usize>() && block_shape.iter().all(|&n| n > 0));
    // The row kernel computes flat indices in u32.
    assert!(block.len() <= u32::MAX as usize, "source block too large");
    let sy = block_shape[2];
    let sz = block_shape[1] * block_shape[2];
    let max_idx: [i64; 3] = std::array::from_fn(|k| block_shape[k] as i64 - 1);
    // Keep the region inside the block so the fast kernel's reads stay in bounds.
    let lo: [i64; 3] = std::array::from_fn(|k| region.lo[k].max(0));
    let hi: [i64; 3] = std::array::from_fn(|k| region.hi[k].min(block_shape[k] as i64));
    let whole_block_finite = lo == [0; 3] && (0..3).all(|k| hi[k] == block_shape[k] as i64);
    let nan_outside = nan_outside.filter(|_| !whole_block_finite).map(|r| (r.lo, r.hi));
    let step = [affine.m[0][2], affine.m[1][2], affine.m[2][2]];
    let reach = shift.map_or([0.0; 3], |s| s.reach);
    let kernels = RowKernels {
        block,
        sz,
        sy,
        max_idx,
        lo,
        hi,
        whole_block_finite,
        nan_outside,
        step,
    };
    if shift.is_none() && affine.plane_separable() && out_shape[0] > 1 && SHARE_PLANES.with(|s| s.get()) {
        return resample_linear_planes(&kernels, block_lo, affine, out_shape, out);
    }
    out.par_chunks_mut(nx).with_min_len(4).enumerate().for_each(|(row, line)| {
        let start = row_start(affine, row, ny, block_lo);
        let row_shift = shift.map(|s| s.row(row, nx));
        let end: [f64; 3] = std::array::from_fn(|k| start[k] + step[k] * (nx - 1) as f64);
        // Samples move linearly along a row (give or take the shift's reach), so checking both
        // ends checks the whole row.
        let interior = (0..3).all(|k| {
            let (a, b) = if start[k] <= end[k] {
                (start[k], end[k])
            } else {
                (end[k], start[k])
            };
            floor_i(a - reach[k]) >= lo[k] && floor_i(b + reach[k]) + 1 < hi[k]
        });
        if interior {
            match row_shift {
                None => trilinear_row_interior(block, sz, sy, start, step, line),
                Some(d) => trilinear_row_interior_shifted(block, sz, sy, start, step, d, line),
            }
        } else if whole_block_finite {
            for (x, value) in line.iter_mut().enumerate() {
                *value = trilinear_clamped(block, sz, sy, max_idx, position(start, step, row_shift, x));
            }
        } else {
            for (x, value) in line.iter_mut().enumerate() {
                *value = trilinear(block, sz, sy, max_idx, nan_outside, position(start, step, row_shift, x));
            }
        }
    });
}

thread_local! {
    /// Whether plane-separable maps share in-plane work between output planes (always, but for
    /// tests that compare with the per-row kernels).
    static SHARE_PLANES: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the per-row kernels only (no sharing between planes), on this thread: for
/// tests comparing the two.
#[cfg(test)]
pub(crate) fn without_shared_planes<T>(f: impl FnOnce() -> T) -> T {
    SHARE_PLANES.with(|s| s.set(false));
    let out = f();
    SHARE_PLANES.with(|s| s.set(true));
    out
}

/// What the linear row kernels share: the block, its strides and last indices, the NaN-free
/// region and the step along a row.
struct RowKernels<'a, V> {
    block: &'a [V],
    sz: usize,
    sy: usize,
    max_idx: [i64; 3],
    lo: [i64; 3],
    hi: [i64; 3],
    whole_block_finite: bool,
    /// The box outside which the block's voxels read as NaN padding (uint8 blocks).
    nan_outside: Option<([i64; 3], [i64; 3])>,
    step: [f64; 3],
}

impl<V: BlockValue> RowKernels<'_, V> {
    /// The samples `[x0, x1)` of a row starting at `start` whose eight neighbours all lie in
    /// the NaN-free region (empty when none do): positions move linearly along a row, so the
    /// interior samples are one run, and checking its two ends checks it all.
    fn interior_span(&self, start: [f64; 3], nx: usize) -> (usize, usize) {
        let inside = |x: usize| {
            let s = position(start, self.step, None, x);
            (0..3).all(|k| floor_i(s[k]) >= self.lo[k] && floor_i(s[k]) + 1 < self.hi[k])
        };
        if nx == 0 || (inside(0) && inside(nx - 1)) {
            return (0, nx);
        }
        // A first guess from the linear bounds, then moved to the exact ends.
        let (mut x0, mut x1) = (0f64, nx as f64);
        for k in 0..3 {
            let (step, lo, hi) = (self.step[k], self.lo[k] as f64 - start[k], (self.hi[k] - 1) as f64 - start[k]);
            if step > 0.0 {
                x0 = x0.max(lo / step);
                x1 = x1.min(hi / step);
            } else if step < 0.0 {
                x0 = x0.max(hi / step);
                x1 = x1.min(lo / step);
            }
        }
        // floor_i rather than floor/ceil: no libm call (see floor_i).
        let mut x0 = ((floor_i(x0) + 1).max(0) as usize).min(nx);
        let mut x1 = ((floor_i(x1) + 1).max(0) as usize).min(nx);
        while x0 < x1 && !inside(x0) {
            x0 += 1;
        }
        while x1 > x0 && !inside(x1 - 1) {
            x1 -= 1;
        }
        if x1 <= x0 {
            return (0, 0);
        }
        // Widen over interior samples the guess left out (rounding), one at a time.
        while x0 > 0 && inside(x0 - 1) {
            x0 -= 1;
        }
        while x1 < nx && inside(x1) {
            x1 += 1;
        }
        (x0, x1)
    }

    /// A row that is not interior: clamped at the block's edges, or NaN-aware.
    fn edge_row(&self, start: [f64; 3], line: &mut [f32]) {
        self.edge_samples(start, 0, line);
    }

    /// Samples `first..first + line.len()` of a row with the edge kernels.
    fn edge_samples(&self, start: [f64; 3], first: usize, line: &mut [f32]) {
        for (i, value) in line.iter_mut().enumerate() {
            let s = position(start, self.step, None, first + i);
            *value = if self.whole_block_finite {
                trilinear_clamped(self.block, self.sz, self.sy, self.max_idx, s)
            } else {
                trilinear(self.block, self.sz, self.sy, self.max_idx, self.nan_outside, s)
            };
        }
    }
}

/// Trilinear resampling of a plane-separable map ([`Affine::plane_separable`], no shift): the
/// in-plane (y, x) positions and weights are the same in every output plane, so each source
/// plane's bilinear values are computed once for the consecutive output planes that use it and
/// each output voxel is the lerp of two of them in z — the arithmetic of the trilinear kernel,
/// term for term, so bit for bit its values, for about half its loads. Rows whose neighbours
/// leave the NaN-free region take the same edge kernels as in [`resample_linear`].
fn resample_linear_planes<V: BlockValue>(k: &RowKernels<V>, block_lo: [i64; 3], affine: &Affine, out_shape: [usize; 3], out: &mut [f32]) {
    let [nz, ny, nx] = out_shape;
    let plane_len = ny * nx;
    let table = PlaneTable::of(k, block_lo, affine, ny, nx);
    // Consecutive output planes per task, so tasks reuse source planes (any grouping gives the
    // same values).
    let group = (nz / (4 * rayon::current_num_threads()).max(1)).max(1);
    out.par_chunks_mut(plane_len * group).enumerate().for_each(|(g, planes)| {
        // Bilinear rows of two source planes, computed on demand: (plane index, row computed?).
        let mut slots: [(i64, Vec<f32>, Vec<bool>); 2] = [
            (i64::MIN, vec![0f32; plane_len], vec![false; ny]),
            (i64::MIN, vec![0f32; plane_len], vec![false; ny]),
        ];
        for (p, plane) in planes.chunks_mut(plane_len).enumerate() {
            let z = g * group + p;
            for (y, line) in plane.chunks_mut(nx).enumerate() {
                let start = row_start(affine, z * ny + y, ny, block_lo);
                // The row's interior run takes the shared planes; the samples before and after
                // it (rows crossing the array's edge) the edge kernels, with the same values.
                let (x0, x1) = k.interior_span(start, nx);
                if x1 <= x0 {
                    k.edge_row(start, line);
                    continue;
                }
                k.edge_samples(start, 0, &mut line[..x0]);
                k.edge_samples(start, x1, &mut line[x1..]);
                // SAFETY: interior samples have 0 <= start[0] < block size (see the row kernels).
                let z0 = unsafe { start[0].to_int_unchecked::<i32>() } as i64;
                let tz = (start[0] - z0 as f64) as f32;
                let need = [z0, z0 + 1];
                // The next output plane moves by a source plane (up, or down when z is mirrored):
                // the plane both use changes slots instead of being computed again.
                if slots[0].0 == need[1] || slots[1].0 == need[0] {
                    slots.swap(0, 1);
                }
                // A row's interior run is the same in every plane whose rows are interior in z
                // (the in-plane positions do not depend on the plane), so a computed run is the
                // row's for the slot's plane.
                let run = y * nx + x0..y * nx + x1;
                for (which, source) in need.into_iter().enumerate() {
                    if slots[which].0 != source {
                        slots[which].0 = source;
                        slots[which].2.fill(false);
                    }
                    let (_, values, done) = &mut slots[which];
                    if !done[y] {
                        let (base, ty, tx) = (&table.base[run.clone()], &table.ty[run.clone()], &table.tx[run.clone()]);
                        bilinear_row(
                            k.block,
                            (source as usize * k.sz) as u32,
                            k.sy,
                            base,
                            ty,
                            tx,
                            &mut values[run.clone()],
                        );
                        done[y] = true;
                    }
                }
                let (c0, c1) = (&slots[0].1[run.clone()], &slots[1].1[run]);
                lerp_planes(c0, c1, tz, &mut line[x0..x1]);
            }
        }
    });
}

/// `c0 + tz · (c1 − c0)` per sample: the z step of the trilinear kernel over two source planes'
/// bilinear values.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn lerp_planes(c0: &[f32], c1: &[f32], tz: f32, line: &mut [f32]) {
    for ((o, a), b) in line.iter_mut().zip(c0).zip(c1) {
        *o = a + tz * (b - a);
    }
}

/// The in-plane part of a plane-separable map, computed once for every output plane: per
/// output (y, x), the flat offset of its source voxel in a source plane and its y and x weights,
/// as the trilinear kernel computes them (positions of rows that leave the block are clamped,
/// and never used: such rows take the edge kernels).
struct PlaneTable {
    base: Vec<u32>,
    ty: Vec<f32>,
    tx: Vec<f32>,
}

impl PlaneTable {
    fn of<V: BlockValue>(k: &RowKernels<V>, block_lo: [i64; 3], affine: &Affine, ny: usize, nx: usize) -> PlaneTable {
        let mut table = PlaneTable {
            base: vec![0; ny * nx],
            ty: vec![0.0; ny * nx],
            tx: vec![0.0; ny * nx],
        };
        table
            .base
            .par_chunks_mut(nx)
            .zip(table.ty.par_chunks_mut(nx))
            .zip(table.tx.par_chunks_mut(nx))
            .enumerate()
            .for_each(|(y, ((base, ty), tx))| {
                let start = row_start(affine, y, ny, block_lo);
                plane_table_row(start, k.step, k.sy, base, ty, tx);
            });
        table
    }
}

/// One row of a [`PlaneTable`].
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn plane_table_row(start: [f64; 3], step: [f64; 3], sy: usize, base: &mut [u32], ty: &mut [f32], tx: &mut [f32]) {
    for (i, ((b, wy), wx)) in base.iter_mut().zip(ty.iter_mut()).zip(tx.iter_mut()).enumerate() {
        let x = i as f64;
        let s = [start[1] + step[1] * x, start[2] + step[2] * x];
        // `as` saturates (positions of rows that leave the block); inside it truncates, which
        // for the non-negative positions of interior rows is the kernel's floor.
        let f = [s[0] as i32, s[1] as i32];
        *wy = (s[0] - f[0] as f64) as f32;
        *wx = (s[1] - f[1] as f64) as f32;
        *b = (f[0] as u32).wrapping_mul(sy as u32).wrapping_add(f[1] as u32);
    }
}

/// The bilinear values of one source plane (element offset `plane`) along an output row from
/// its [`PlaneTable`] row: the `c0` (or `c1`) of the trilinear kernel, with the same positions,
/// weights and arithmetic.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn bilinear_row<V: BlockValue>(block: &[V], plane: u32, sy: usize, base: &[u32], ty: &[f32], tx: &[f32], line: &mut [f32]) {
    let mut corner = [[0f32; LANES]; 4];
    let offsets = [0, 1, sy, sy + 1];
    for (c, out) in line.chunks_mut(LANES).enumerate() {
        let n = out.len();
        let x0 = c * LANES;
        let (base, ty, tx) = (&base[x0..x0 + n], &ty[x0..x0 + n], &tx[x0..x0 + n]);
        for (i, &b) in base.iter().enumerate() {
            let b = plane.wrapping_add(b) as usize;
            for (values, &o) in corner.iter_mut().zip(&offsets) {
                debug_assert!(b + o < block.len());
                // SAFETY: interior rows keep every neighbour inside the block.
                values[i] = unsafe { block.get_unchecked(b + o).value() };
            }
        }
        let [v0, v1, v2, v3] = &corner;
        for i in 0..n {
            let c00 = v0[i] + tx[i] * (v1[i] - v0[i]);
            let c01 = v2[i] + tx[i] * (v3[i] - v2[i]);
            out[i] = c00 + ty[i] * (c01 - c00);
        }
    }
}

/// Output voxels per pass of the row kernels (their scratch arrays stay in L1).
const LANES: usize = 64;

/// Trilinear samples along one output row whose samples all have their eight neighbours inside
/// the block: `start` is sample 0 in block coordinates, `step` the move per sample. Split into
/// passes (positions and weights, neighbour loads, interpolation) so the arithmetic vectorises;
/// compiled for AVX2 and SSE4.1 as well and picked at run time. The arithmetic is the same in
/// every version (no fused multiply-add), so results do not depend on the CPU.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn trilinear_row_interior<V: BlockValue>(block: &[V], sz: usize, sy: usize, start: [f64; 3], step: [f64; 3], line: &mut [f32]) {
    trilinear_row_interior_kernel(block, sz, sy, start, step, None, line);
}

/// [`trilinear_row_interior`] with each sample moved by the row's shift.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn trilinear_row_interior_shifted<V: BlockValue>(
    block: &[V],
    sz: usize,
    sy: usize,
    start: [f64; 3],
    step: [f64; 3],
    shift: [&[f32]; 3],
    line: &mut [f32],
) {
    trilinear_row_interior_kernel(block, sz, sy, start, step, Some(shift), line);
}

/// The body of the interior row kernels (inlined into each CPU version; `shift` is a constant
/// there, so the unshifted kernel carries no shift code).
#[inline(always)]
fn trilinear_row_interior_kernel<V: BlockValue>(
    block: &[V],
    sz: usize,
    sy: usize,
    start: [f64; 3],
    step: [f64; 3],
    shift: Option<[&[f32]; 3]>,
    line: &mut [f32],
) {
    let offsets = [0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1];
    let mut base = [0u32; LANES];
    let mut weight = [[0f32; LANES]; 3];
    let mut corner = [[0f32; LANES]; 8];
    for (c, out) in line.chunks_mut(LANES).enumerate() {
        let n = out.len();
        let x0 = c * LANES;
        // This pass's share of the shift, re-based to 0 (slices of exactly n: no bounds checks).
        let shift = shift.map(|d| d.map(|k| &k[x0..x0 + n]));
        let (tz, rest) = weight.split_at_mut(1);
        let (ty, tx) = rest.split_at_mut(1);
        let (tz, ty, tx) = (&mut tz[0][..n], &mut ty[0][..n], &mut tx[0][..n]);
        for (i, (((b, wz), wy), wx)) in base[..n]
            .iter_mut()
            .zip(tz.iter_mut())
            .zip(ty.iter_mut())
            .zip(tx.iter_mut())
            .enumerate()
        {
            let s = shifted_position(start, step, (x0 + i) as f64, shift, i);
            // SAFETY: the caller checked 0 <= s < max on every axis for the whole row, so the
            // truncation is in range (and equals floor).
            let f: [i32; 3] = std::array::from_fn(|k| unsafe { s[k].to_int_unchecked::<i32>() });
            *wz = (s[0] - f[0] as f64) as f32;
            *wy = (s[1] - f[1] as f64) as f32;
            *wx = (s[2] - f[2] as f64) as f32;
            *b = f[0] as u32 * sz as u32 + f[1] as u32 * sy as u32 + f[2] as u32;
        }
        for (i, &b) in base[..n].iter().enumerate() {
            for (values, &o) in corner.iter_mut().zip(&offsets) {
                debug_assert!(b as usize + o < block.len());
                // SAFETY: interior rows keep every neighbour (base + offset) inside the block.
                values[i] = unsafe { block.get_unchecked(b as usize + o).value() };
            }
        }
        let [v0, v1, v2, v3, v4, v5, v6, v7] = &corner;
        for i in 0..n {
            let c00 = v0[i] + tx[i] * (v1[i] - v0[i]);
            let c01 = v2[i] + tx[i] * (v3[i] - v2[i]);
            let c10 = v4[i] + tx[i] * (v5[i] - v4[i]);
            let c11 = v6[i] + tx[i] * (v7[i] - v6[i]);
            let c0 = c00 + ty[i] * (c01 - c00);
            let c1 = c10 + ty[i] * (c11 - c10);
            out[i] = c0 + tz[i] * (c1 - c0);
        }
    }
}

/// Nearest-voxel flat indices along one output row (`max`: the block's last index per axis, as
/// float), clamped to the block. Multiversioned like `trilinear_row_interior`.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn nearest_row(start: [f64; 3], step: [f64; 3], max: [f64; 3], sz: usize, sy: usize, line: &mut [u32]) {
    nearest_row_kernel(start, step, None, max, sz, sy, line);
}

/// [`nearest_row`] with each sample moved by the row's shift.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn nearest_row_shifted(start: [f64; 3], step: [f64; 3], shift: [&[f32]; 3], max: [f64; 3], sz: usize, sy: usize, line: &mut [u32]) {
    nearest_row_kernel(start, step, Some(shift), max, sz, sy, line);
}

#[inline(always)]
fn nearest_row_kernel(start: [f64; 3], step: [f64; 3], shift: Option<[&[f32]; 3]>, max: [f64; 3], sz: usize, sy: usize, line: &mut [u32]) {
    for (x, slot) in line.iter_mut().enumerate() {
        let s = position(start, step, shift, x);
        let i: [i32; 3] = std::array::from_fn(|k| {
            let nearest = (s[k] + 0.5).floor().clamp(0.0, max[k]);
            // SAFETY: clamped to [0, max] with max < 2^31 (the caller checks the block size);
            // i32 rather than u32 because x86 converts f64 to i32 in vector registers.
            unsafe { nearest.to_int_unchecked::<i32>() }
        });
        *slot = (i[0] * sz as i32 + i[1] * sy as i32 + i[2]) as u32;
    }
}

/// Trilinear sample of a NaN-free block with clamping at its edges (rows that leave the block).
#[inline(always)]
fn trilinear_clamped<V: BlockValue>(block: &[V], sz: usize, sy: usize, max_idx: [i64; 3], s: [f64; 3]) -> f32 {
    let mut i0 = [0usize; 3];
    let mut i1 = [0usize; 3];
    let mut t = [0f32; 3];
    for k in 0..3 {
        let f = floor_i(s[k]);
        let base = f.clamp(0, max_idx[k]);
        i0[k] = base as usize;
        i1[k] = (base + 1).min(max_idx[k]) as usize;
        t[k] = if f < 0 || f > max_idx[k] { 0.0 } else { (s[k] - f as f64) as f32 };
    }
    let v = |z: usize, y: usize, x: usize| block[z * sz + y * sy + x].value();
    let c00 = v(i0[0], i0[1], i0[2]) + t[2] * (v(i0[0], i0[1], i1[2]) - v(i0[0], i0[1], i0[2]));
    let c01 = v(i0[0], i1[1], i0[2]) + t[2] * (v(i0[0], i1[1], i1[2]) - v(i0[0], i1[1], i0[2]));
    let c10 = v(i1[0], i0[1], i0[2]) + t[2] * (v(i1[0], i0[1], i1[2]) - v(i1[0], i0[1], i0[2]));
    let c11 = v(i1[0], i1[1], i0[2]) + t[2] * (v(i1[0], i1[1], i1[2]) - v(i1[0], i1[1], i0[2]));
    let c0 = c00 + t[1] * (c01 - c00);
    let c1 = c10 + t[1] * (c11 - c10);
    c0 + t[0] * (c1 - c0)
}

/// Writes into `index`, for every output voxel, the flat index of its nearest source voxel in
/// a block of `block_shape` starting at `block_lo` (indices clamped to the block).
/// A `shift` moves each output voxel's source position further (see [`resample`]).
pub fn nearest_indices(
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    index: &mut [u32],
) {
    let [_, ny, nx] = out_shape;
    assert_eq!(index.len(), out_shape.iter().product::<usize>());
    if nx == 0 || ny == 0 {
        return;
    }
    assert!(block_shape.iter().product::<usize>() <= i32::MAX as usize, "source block too large");
    let (sy, sz) = (block_shape[2], block_shape[1] * block_shape[2]);
    let step = [affine.m[0][2], affine.m[1][2], affine.m[2][2]];
    let max: [f64; 3] = std::array::from_fn(|k| (block_shape[k] - 1) as f64);
    let plane_len = ny * nx;
    if shift.is_none() {
        let (first, rest) = index.split_at_mut(plane_len);
        if let Some(offsets) = nearest_plane_offsets(block_shape, block_lo, affine, out_shape, first) {
            let first: &[u32] = first;
            rest.par_chunks_mut(plane_len).zip(&offsets[1..]).for_each(|(plane, &offset)| {
                for (o, &i) in plane.iter_mut().zip(first) {
                    *o = (i as i32 + offset) as u32;
                }
            });
            return;
        }
    }
    index.par_chunks_mut(nx).with_min_len(4).enumerate().for_each(|(row, line)| {
        let start = row_start(affine, row, ny, block_lo);
        match shift {
            None => nearest_row(start, step, max, sz, sy, line),
            Some(s) => nearest_row_shifted(start, step, s.row(row, nx), max, sz, sy, line),
        }
    });
}

/// For a plane-separable map (no shift, more than one output plane): writes the nearest block
/// indices of the first output plane into `first` (`ny · nx` values) and returns each output
/// plane's offset from them, so that plane `p`'s index `i` is `first[i] + offsets[p]` — what
/// [`nearest_indices`] writes, without writing it. None for other maps.
pub fn nearest_plane_offsets(
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    out_shape: [usize; 3],
    first: &mut [u32],
) -> Option<Vec<i32>> {
    let [nz, ny, nx] = out_shape;
    if !(affine.plane_separable() && nz > 1 && nx > 0 && ny > 0 && SHARE_PLANES.with(|s| s.get())) {
        return None;
    }
    assert_eq!(first.len(), ny * nx);
    assert!(block_shape.iter().product::<usize>() <= i32::MAX as usize, "source block too large");
    let (sy, sz) = (block_shape[2], block_shape[1] * block_shape[2]);
    let step = [affine.m[0][2], affine.m[1][2], affine.m[2][2]];
    let max: [f64; 3] = std::array::from_fn(|k| (block_shape[k] - 1) as f64);
    // Every output plane has the first plane's in-plane indices; only the source plane differs
    // (the same rounding and clamping as the row kernel, per plane).
    first.par_chunks_mut(nx).with_min_len(4).enumerate().for_each(|(row, line)| {
        nearest_row(row_start(affine, row, ny, block_lo), step, max, sz, sy, line);
    });
    let plane_of = |z: usize| {
        let s0 = row_start(affine, z * ny, ny, block_lo)[0];
        (s0 + 0.5).floor().clamp(0.0, max[0]) as i32 * sz as i32
    };
    let first_plane = plane_of(0);
    Some((0..nz).map(|z| plane_of(z) - first_plane).collect())
}

/// Marker for "outside the array" in uint8 mask blocks (masks hold 0 and 1).
pub const MASK_OUTSIDE: u8 = 255;

/// Nearest-voxel resampling of a float block (the same indices as the label reads).
fn resample_nearest<V: BlockValue>(
    block: &[V],
    block_shape: [usize; 3],
    block_lo: [i64; 3],
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    out: &mut [f32],
) {
    // The gather below indexes without bounds checks; nearest indices are clamped to the block.
    assert!(block.len() >= block_shape.iter().product::<usize>() && block_shape.iter().all(|&n| n > 0));
    let mut index = vec![0u32; out.len()];
    nearest_indices(block_shape, block_lo, affine, shift, out_shape, &mut index);
    out.par_iter_mut().zip(&index).with_min_len(4096).for_each(|(value, &i)| {
        debug_assert!((i as usize) < block.len());
        // SAFETY: nearest_indices clamps every index into the block.
        *value = unsafe { block.get_unchecked(i as usize).value() };
    });
}

/// Block coordinates of the first sample (x = 0) of output row `row` (rows run over z, then y).
#[inline]
fn row_start(affine: &Affine, row: usize, ny: usize, block_lo: [i64; 3]) -> [f64; 3] {
    let s = affine.apply([(row / ny) as f64, (row % ny) as f64, 0.0]);
    std::array::from_fn(|k| s[k] - block_lo[k] as f64)
}

/// `x.floor() as i64` without a libm call (the baseline x86-64 target has no rounding
/// instruction, and floor dominated the resampling profile).
#[inline(always)]
fn floor_i(x: f64) -> i64 {
    let t = x as i64;
    t - ((x < t as f64) as i64)
}

#[inline(always)]
fn lerp(a: f32, b: f32, t: f32) -> f32 {
    // Skipping zero weights keeps a NaN neighbour (padding) from leaking into exact samples.
    if t == 0.0 {
        a
    } else {
        a + t * (b - a)
    }
}

#[inline(always)]
fn trilinear<V: BlockValue>(
    block: &[V],
    sz: usize,
    sy: usize,
    max_idx: [i64; 3],
    nan_outside: Option<([i64; 3], [i64; 3])>,
    s: [f64; 3],
) -> f32 {
    let mut i0 = [0usize; 3];
    let mut d = [0usize; 3];
    let mut t = [0f32; 3];
    for k in 0..3 {
        let f = floor_i(s[k]);
        if f < 0 || f >= max_idx[k] {
            // At (or beyond) the block's far edge: take the edge voxel with no neighbour weight.
            i0[k] = f.clamp(0, max_idx[k]) as usize;
            d[k] = 0;
            t[k] = 0.0;
        } else {
            i0[k] = f as usize;
            d[k] = 1;
            t[k] = (s[k] - f as f64) as f32;
        }
    }
    debug_assert!((i0[0] + d[0]) * sz + (i0[1] + d[1]) * sy + i0[2] + d[2] < block.len());
    // The corner (kz, ky, kx), each 0 or 1: NaN where the block holds padding it cannot store.
    let at = |kz: usize, ky: usize, kx: usize| {
        let c = [i0[0] + kz * d[0], i0[1] + ky * d[1], i0[2] + kx * d[2]];
        if let Some((lo, hi)) = nan_outside {
            if (0..3).any(|k| (c[k] as i64) < lo[k] || (c[k] as i64) >= hi[k]) {
                return f32::NAN;
            }
        }
        // SAFETY: every index is clamped to [0, max_idx] per axis above (d is 0 at the far
        // edge), so the corner is a voxel inside the block.
        unsafe { block.get_unchecked(c[0] * sz + c[1] * sy + c[2]).value() }
    };
    let a = lerp(at(0, 0, 0), at(0, 0, 1), t[2]);
    let a = if t[1] == 0.0 {
        a
    } else {
        lerp(a, lerp(at(0, 1, 0), at(0, 1, 1), t[2]), t[1])
    };
    if t[0] == 0.0 {
        return a;
    }
    let b = lerp(at(1, 0, 0), at(1, 0, 1), t[2]);
    let b = if t[1] == 0.0 {
        b
    } else {
        lerp(b, lerp(at(1, 1, 0), at(1, 1, 1), t[2]), t[1])
    };
    lerp(a, b, t[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spatial(value: Value) -> Result<SpatialConfig> {
        let parsed = spatial_transforms(value).map_err(|e| Error::invalid(e.to_string()))?;
        SpatialConfig::new(&parsed.unwrap_or_default())
    }

    #[test]
    fn reads_the_one_form() {
        let c = spatial(json!({
            "mirror": {"x": 0.5, "y": 0.5, "z": 0.1},
            "transpose": ["x", "y", "x"],
            "rotate": {"z": [-180, 180], "y": [-15, 15]}}))
        .unwrap();
        assert_eq!(c.mirror, [0.1, 0.5, 0.5]);
        assert_eq!(c.transpose, vec![2, 1]);
        assert_eq!(c.rotate, [Some((-180.0, 180.0)), Some((-15.0, 15.0)), None]);
        assert!(spatial(Value::Null).unwrap().is_identity());
    }

    #[test]
    fn rejects_bad_config_naming_the_key() {
        let e = spatial(json!({"twist": {}})).unwrap_err().to_string();
        assert!(e.contains("spatial_transforms") && e.contains("twist"), "{e}");
        let e = spatial(json!({"scale": {"range": [0.0, 1.1]}})).unwrap_err().to_string();
        assert!(e.contains("['scale']['range']"), "{e}");
        let e = spatial(json!({"shear": {"range": 0.9}})).unwrap_err().to_string();
        assert!(e.contains("['shear']['range']"), "{e}");
        let e = spatial(json!({"rotate": {"z": ["a", "b"]}})).unwrap_err().to_string();
        assert!(e.contains("spatial_transforms") && e.contains("string"), "{e}");
        let e = spatial(json!({"rotate": {"z": [10, -10]}})).unwrap_err().to_string();
        assert!(e.contains("['rotate']['z']") && e.contains("greater"), "{e}");
        let e = spatial(json!({"mirror": {"t": 0.5}})).unwrap_err().to_string();
        assert!(e.contains("'t'"), "{e}");
        let e = spatial(json!({"mirror": {"x": 1.5}})).unwrap_err().to_string();
        assert!(e.contains("['mirror']['x']") && e.contains("probability"), "{e}");
    }

    #[test]
    fn zoom_and_shear_draw_within_their_ranges_and_fold_into_the_orientation() {
        let cfg = spatial(json!({"scale": {"range": [0.8, 1.25]}, "shear": {"range": 0.2}})).unwrap();
        let mut seen_zoom = Vec::new();
        for i in 0..50 {
            let d = cfg.draw(&mut SampleRng::new(4, 0, 0, i), None);
            assert!(d.zoom.iter().all(|z| (0.8..=1.25).contains(z)) && d.zoom[0] == d.zoom[1] && d.zoom[1] == d.zoom[2]);
            assert!(d.shear.iter().all(|h| h.abs() <= 0.2));
            assert_eq!(d, cfg.draw(&mut SampleRng::new(4, 0, 0, i), None), "keyed, not sequential");
            let m = d.orientation();
            // orientation = diag(zoom) · (I + shear terms) here (no rotation, transpose, mirror)
            for (term, &(row, column)) in SHEAR_TERMS.iter().enumerate() {
                assert!((m[row][column] - d.zoom[row] * d.shear[term]).abs() < 1e-12);
            }
            seen_zoom.push(d.zoom[0]);
        }
        assert!(seen_zoom.iter().any(|&z| z < 0.95) && seen_zoom.iter().any(|&z| z > 1.1));
        let per_axis = spatial(json!({"scale": {"range": [0.5, 2.0], "per_axis": true}})).unwrap();
        let d = per_axis.draw(&mut SampleRng::new(1, 0, 0, 0), None);
        assert!(d.zoom[0] != d.zoom[1] && d.zoom[1] != d.zoom[2]);
        // 2D patches (singleton z): zoom and shear stay in the y-x plane.
        let d = cfg.draw(&mut SampleRng::new(1, 0, 0, 3), Some(0));
        assert_eq!(d.zoom[0], 1.0);
        for (term, &(row, column)) in SHEAR_TERMS.iter().enumerate() {
            assert!(row != 0 && column != 0 || d.shear[term] == 0.0);
        }
        // A configuration without them keeps its draws.
        let plain = spatial(json!({"rotate": {"z": [-30, 30]}})).unwrap();
        let with = spatial(json!({"rotate": {"z": [-30, 30]}, "scale": {"range": [1.0, 1.0]}})).unwrap();
        let (a, b) = (
            plain.draw(&mut SampleRng::new(9, 0, 0, 1), None),
            with.draw(&mut SampleRng::new(9, 0, 0, 1), None),
        );
        assert_eq!(a.angles_deg, b.angles_deg);
        assert_eq!(a.orientation(), b.orientation());
        assert!(!with.is_identity() && spatial(json!({"scale": {"range": [1.0, 1.0]}})).unwrap().is_identity());
    }

    #[test]
    fn elastic_draws_are_keyed_take_their_probability_and_stay_in_plane_for_2d() {
        let cfg = spatial(json!({"rotate": {"z": [-30, 30]},
                                 "elastic": {"control_point_spacing": [40, 30, 30], "jitter_sigma": 2, "prob": 0.5}}))
        .unwrap();
        let draws: Vec<_> = (0..200).map(|i| cfg.draw(&mut SampleRng::new(5, 0, 0, i), None)).collect();
        let deformed = draws.iter().filter(|d| d.elastic.is_some()).count();
        assert!((60..140).contains(&deformed), "{deformed} of 200 deformed at p = 0.5");
        assert_eq!(draws[7], cfg.draw(&mut SampleRng::new(5, 0, 0, 7), None));
        let e = draws.iter().find_map(|d| d.elastic).unwrap();
        assert_eq!((e.spacing, e.sigma), ([40.0, 30.0, 30.0], [2.0; 3]));
        let planar = cfg.draw(
            &mut SampleRng::new(5, 0, 0, draws.iter().position(|d| d.elastic.is_some()).unwrap() as u64),
            Some(0),
        );
        assert_eq!(planar.elastic.unwrap().sigma, [0.0, 2.0, 2.0], "a 2D patch deforms in its plane");
        // Elastic draws come last: the other draws are those of the same config without it.
        let plain = spatial(json!({"rotate": {"z": [-30, 30]}})).unwrap();
        assert_eq!(plain.draw(&mut SampleRng::new(5, 0, 0, 3), None).angles_deg, draws[3].angles_deg);
        assert!(spatial(json!({"elastic": {"control_point_spacing": 10, "jitter_sigma": 0}}))
            .unwrap()
            .is_identity());
        let e = spatial(json!({"elastic": {"control_point_spacing": "a", "jitter_sigma": 1}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("['elastic']") && e.contains("number or a list"), "{e}");
        let e = spatial(json!({"elastic": {"control_point_spacing": 10, "sigma": 1}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("['elastic']") && e.contains("sigma"), "{e}");
    }

    #[test]
    fn rotation_about_z_turns_the_yx_plane() {
        let r = rotation_matrix([90.0, 0.0, 0.0]);
        assert!((r[0][0] - 1.0).abs() < 1e-12);
        assert!(r[1][2].abs() > 0.99 && r[2][1].abs() > 0.99);
    }

    #[test]
    fn draws_are_keyed_not_sequential() {
        let cfg = spatial(json!({"mirror": {"x": 0.5}, "rotate": {"z": [-180, 180]}, "transpose": ["y", "x"]})).unwrap();
        let a = cfg.draw(&mut SampleRng::new(1, 0, 0, 5), None);
        let b = cfg.draw(&mut SampleRng::new(1, 0, 0, 5), None);
        assert_eq!(a, b);
        let others: Vec<_> = (0..20).map(|i| cfg.draw(&mut SampleRng::new(1, 0, 0, i), None)).collect();
        assert!(others.iter().any(|d| d.angles_deg != a.angles_deg));
    }

    #[test]
    fn planar_draw_rotates_in_plane_only() {
        let cfg = spatial(json!({"rotate": {"x": [-90, 90], "z": [-90, 90]}, "transpose": ["z", "y", "x"]})).unwrap();
        for i in 0..50 {
            let d = cfg.draw(&mut SampleRng::new(3, 0, 0, i), Some(0));
            assert_eq!(d.angles_deg[2], 0.0);
            assert_eq!(d.permutation[0], 0);
        }
    }

    #[test]
    fn linear_resample_of_a_ramp_is_exact() {
        // block value = x index; a half-voxel shift must give x + 0.5.
        let shape = [2, 2, 8];
        let block: Vec<f32> = (0..32).map(|i| (i % 8) as f32).collect();
        let affine = Affine {
            m: IDENTITY,
            b: [0.0, 0.0, 0.5],
        };
        let ramp = |block: &[f32], finite: Option<FiniteRegion>| {
            let mut out = vec![0.0; 4];
            resample(
                block,
                shape,
                [0, 0, 0],
                &affine,
                None,
                [1, 1, 4],
                Interpolation::Linear,
                finite,
                &mut out,
            );
            out
        };
        assert_eq!(ramp(&block, None), vec![0.5, 1.5, 2.5, 3.5]);
        assert_eq!(ramp(&block, Some(FiniteRegion::whole(shape))), vec![0.5, 1.5, 2.5, 3.5]);
        // A NaN outside the finite region is never read by the samples that do not touch it.
        let mut with_nan = block.clone();
        with_nan[7] = f32::NAN;
        let region = FiniteRegion {
            lo: [0, 0, 0],
            hi: [2, 2, 6],
        };
        assert_eq!(ramp(&with_nan, Some(region)), vec![0.5, 1.5, 2.5, 3.5]);
    }

    /// A uint8 block resamples to exactly what the float32 block of its values gives, with every
    /// kernel: plane-shared and per-row, interior and edge rows, linear and nearest.
    #[test]
    fn uint8_blocks_resample_as_their_float_values() {
        let shape = [30usize, 37, 41];
        let bytes: Vec<u8> = (0..shape.iter().product::<usize>()).map(|i| ((i * 7919) % 256) as u8).collect();
        let floats: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
        for (angles, centre) in [
            ([37.0, 0.0, 0.0], [120.0, 148.0, 164.0]),
            ([-140.0, 0.0, 0.0], [40.0, 20.0, 300.0]),
            ([11.0, -23.0, 160.0], [120.0, 148.0, 164.0]),
        ] {
            let affine = Affine::compose([16, 16, 16], [8.0; 3], centre, &rotation_matrix(angles), [8.0; 3], [0.0; 3]);
            for interpolation in [Interpolation::Linear, Interpolation::Nearest] {
                let read = |block: &dyn Fn(&mut [f32])| {
                    let mut shared = vec![0f32; 16 * 16 * 16];
                    block(&mut shared);
                    let mut per_row = vec![0f32; 16 * 16 * 16];
                    without_shared_planes(|| block(&mut per_row));
                    (shared, per_row)
                };
                let whole = Some(FiniteRegion::whole(shape));
                let from_bytes = read(&|out| resample(&bytes, shape, [0; 3], &affine, None, [16; 3], interpolation, whole, out));
                let from_floats = read(&|out| resample(&floats, shape, [0; 3], &affine, None, [16; 3], interpolation, whole, out));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&from_bytes.0),
                    bits(&from_floats.0),
                    "{angles:?} {interpolation:?} shared planes"
                );
                assert_eq!(bits(&from_bytes.1), bits(&from_floats.1), "{angles:?} {interpolation:?} per row");
            }
        }
    }

    /// The vectorised row kernel (whichever CPU version runs here) gives bit for bit what the
    /// scalar kernels give, and the NaN-aware kernel agrees on finite data: results do not
    /// depend on the CPU or on which kernel a row takes.
    #[test]
    fn row_kernels_agree_bit_for_bit() {
        let shape = [40usize, 41, 43];
        let block: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 251) as f32 * 0.37)
            .collect();
        let (sz, sy) = (shape[1] * shape[2], shape[2]);
        let max_idx = shape.map(|n| n as i64 - 1);
        for angles in [[0.0, 0.0, 37.0], [11.0, -23.0, 160.0], [-5.0, 8.0, -91.0]] {
            let affine = Affine::compose(
                [12, 12, 12],
                [8.0; 3],
                [160.0, 164.0, 172.0],
                &rotation_matrix(angles),
                [8.0; 3],
                [0.0; 3],
            );
            let linear = |finite: Option<FiniteRegion>| {
                let mut out = vec![0f32; 12 * 12 * 12];
                resample(
                    &block,
                    shape,
                    [0; 3],
                    &affine,
                    None,
                    [12; 3],
                    Interpolation::Linear,
                    finite,
                    &mut out,
                );
                out
            };
            let (fast, aware) = (linear(Some(FiniteRegion::whole(shape))), linear(None));
            for (row, line) in fast.chunks(12).enumerate() {
                let start = row_start(&affine, row, 12, [0; 3]);
                for (x, &value) in line.iter().enumerate() {
                    let s: [f64; 3] = std::array::from_fn(|k| start[k] + affine.m[k][2] * x as f64);
                    let scalar = trilinear_clamped(&block, sz, sy, max_idx, s);
                    assert_eq!(value.to_bits(), scalar.to_bits(), "{angles:?} row {row} x {x}");
                    assert_eq!(aware[row * 12 + x].to_bits(), scalar.to_bits(), "{angles:?} row {row} x {x}");
                }
            }
        }
    }
}
