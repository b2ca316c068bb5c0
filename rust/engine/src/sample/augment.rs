//! Spatial augmentation: the user's transform config and the per-sample random draw (mirror,
//! transpose, rotation, zoom, shear, elastic) turned into one orientation matrix.

use std::collections::BTreeMap;

use rand::RngExt;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::geometry::{matmul, Mat3, AXES, IDENTITY};
use crate::sample::elastic::{ElasticConfig, ElasticDraw, ElasticJson};
use crate::sample::rng::SampleRng;

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
    /// Checks a draw given by hand (a caller's explicit transform, or a sample re-read from its
    /// metadata): the permutation is one of 0, 1, 2; an explicit rotation matrix is finite and
    /// orthonormal (the read samples a patch of the requested size, which a scaling or shearing
    /// matrix would not); zoom is finite and positive, shear finite and within [`MAX_SHEAR`];
    /// the elastic draw as its config requires.
    pub fn checked(mut self) -> Result<SpatialDraw> {
        let mut sorted = self.permutation;
        sorted.sort_unstable();
        if sorted != [0, 1, 2] {
            return Err(Error::invalid(format!(
                "permutation {:?} is not a permutation of 0, 1, 2",
                self.permutation
            )));
        }
        if let Some(r) = &self.rotation {
            check_rotation(r)?;
        }
        if self.angles_deg.iter().any(|a| !a.is_finite()) {
            return Err(Error::invalid(format!("rotation angles {:?} must be finite", self.angles_deg)));
        }
        if self.zoom.iter().any(|z| !(z.is_finite() && *z > 0.0)) {
            return Err(Error::invalid(format!("zoom {:?} must be finite and positive", self.zoom)));
        }
        if self.shear.iter().any(|s| !(s.is_finite() && s.abs() <= MAX_SHEAR)) {
            return Err(Error::invalid(format!(
                "shear {:?} must be finite and within ±{MAX_SHEAR}",
                self.shear
            )));
        }
        self.elastic = self.elastic.map(ElasticDraw::checked).transpose()?;
        Ok(self)
    }

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

/// A rotation matrix must be finite and orthonormal (a turn, possibly with a reflection).
fn check_rotation(r: &Mat3) -> Result<()> {
    let bad = |why: &str| Error::invalid(format!("rotation_matrix {r:?} {why}"));
    if r.iter().flatten().any(|v| !v.is_finite()) {
        return Err(bad("must be finite"));
    }
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = (0..3).map(|k| r[k][i] * r[k][j]).sum();
            let expected = if i == j { 1.0 } else { 0.0 };
            if (dot - expected).abs() > 1e-6 {
                return Err(bad("must be orthonormal (a rotation)"));
            }
        }
    }
    Ok(())
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
    fn hand_given_draws_are_checked_in_the_engine() {
        let ok = SpatialDraw {
            rotation: Some(rotation_matrix([0.0, 0.0, 30.0])),
            ..SpatialDraw::default()
        };
        assert!(ok.checked().is_ok());
        let cases = [
            (
                SpatialDraw {
                    permutation: [0, 0, 2],
                    ..SpatialDraw::default()
                },
                "permutation",
            ),
            (
                SpatialDraw {
                    rotation: Some([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                    ..SpatialDraw::default()
                },
                "orthonormal",
            ),
            (
                SpatialDraw {
                    rotation: Some([[f64::NAN, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                    ..SpatialDraw::default()
                },
                "finite",
            ),
            (
                SpatialDraw {
                    zoom: [1.0, 0.0, 1.0],
                    ..SpatialDraw::default()
                },
                "zoom",
            ),
            (
                SpatialDraw {
                    shear: [0.0, 0.0, 0.9, 0.0, 0.0, 0.0],
                    ..SpatialDraw::default()
                },
                "shear",
            ),
            (
                SpatialDraw {
                    angles_deg: [f64::INFINITY, 0.0, 0.0],
                    ..SpatialDraw::default()
                },
                "angles",
            ),
        ];
        for (draw, why) in cases {
            let message = draw.checked().unwrap_err().to_string();
            assert!(message.contains(why), "{why}: {message}");
        }
    }
}
