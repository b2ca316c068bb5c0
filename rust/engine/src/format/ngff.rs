//! OME-NGFF multiscale metadata: 0.4 (zarr v2 `.zattrs`) and 0.5 (zarr v3 `zarr.json` → `ome`).
//!
//! Only what sampling needs is kept: axes (name, type, unit) and, per level, the array path and
//! the scale/translation as written. A top-level `coordinateTransformations` is folded into each
//! level. How a translation is read (the corner or the centre of voxel 0) is the
//! [`CoordinateFrame`], a process-wide setting.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::location::Location;

/// One axis of a multiscale image.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Axis name, e.g. `z`.
    pub name: String,
    /// `space`, `channel`, `time`, or `None` when the metadata does not say.
    pub kind: Option<String>,
    /// Unit, e.g. `nanometer`.
    pub unit: Option<String>,
}

impl Axis {
    /// Whether the axis is spatial (declared `space`, or an untyped z/y/x).
    pub fn is_spatial(&self) -> bool {
        match &self.kind {
            Some(kind) => kind == "space",
            None => matches!(self.name.as_str(), "z" | "y" | "x"),
        }
    }
}

/// One resolution level: where its array lives and how its voxels map to the world.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelMeta {
    /// Path of the array relative to the image group, e.g. `s0`.
    pub path: String,
    /// Voxel size per axis (all axes, in metadata order).
    pub scale: Vec<f64>,
    /// The translation as written (world position of voxel 0: its corner or its centre, per
    /// the [`CoordinateFrame`]).
    pub translation: Vec<f64>,
}

/// What an OME-NGFF `translation` marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinateFrame {
    /// The lower corner of voxel 0: a level spans `[t, t + n·voxel]` (the reference library's
    /// current convention, and how the CellMap challenge builds crop bounds). The default.
    Corner,
    /// The centre of voxel 0 (OME-NGFF's own reading): a level spans `[t − voxel/2, t + (n − ½)·voxel]`.
    /// Pyramids whose level translations follow the voxel-centre rule (CellMap's) line up
    /// across levels only in this frame.
    Centre,
}

const FRAME_UNSET: u8 = 0;
const FRAME_CORNER: u8 = 1;
const FRAME_CENTRE: u8 = 2;
static FRAME: AtomicU8 = AtomicU8::new(FRAME_UNSET);

impl CoordinateFrame {
    /// Parses `"corner"` / `"centre"` (also `"center"`).
    pub fn parse(name: &str) -> Result<CoordinateFrame> {
        match name.trim().to_ascii_lowercase().as_str() {
            "corner" => Ok(CoordinateFrame::Corner),
            "centre" | "center" => Ok(CoordinateFrame::Centre),
            other => Err(Error::invalid(format!(
                "coordinate frame must be 'corner' or 'centre', not '{other}'"
            ))),
        }
    }

    /// The name [`CoordinateFrame::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            CoordinateFrame::Corner => "corner",
            CoordinateFrame::Centre => "centre",
        }
    }

    /// The process-wide frame: set by [`CoordinateFrame::set_current`], else
    /// `CELLMAP_COORDINATE_FRAME`, else [`CoordinateFrame::Corner`]. Volumes and writers take it
    /// when they are opened.
    pub fn current() -> CoordinateFrame {
        match FRAME.load(Ordering::Acquire) {
            FRAME_CORNER => CoordinateFrame::Corner,
            FRAME_CENTRE => CoordinateFrame::Centre,
            _ => {
                let frame = std::env::var("CELLMAP_COORDINATE_FRAME")
                    .ok()
                    .and_then(|v| CoordinateFrame::parse(&v).ok())
                    .unwrap_or(CoordinateFrame::Corner);
                frame.set_current();
                frame
            }
        }
    }

    /// Makes this the process-wide frame for volumes and writers opened from now on.
    pub fn set_current(self) {
        let code = match self {
            CoordinateFrame::Corner => FRAME_CORNER,
            CoordinateFrame::Centre => FRAME_CENTRE,
        };
        FRAME.store(code, Ordering::Release);
    }

    /// Offset from a written translation to the centre of voxel 0, per axis.
    pub fn centre_offset(self, voxel_size: f64) -> f64 {
        match self {
            CoordinateFrame::Corner => voxel_size / 2.0,
            CoordinateFrame::Centre => 0.0,
        }
    }
}

/// The first `multiscales` entry of an image group.
#[derive(Debug, Clone, PartialEq)]
pub struct Multiscale {
    /// The image group this was read from.
    pub group: Location,
    /// `0.4`, `0.5`, ...
    pub version: String,
    /// Axes in array order.
    pub axes: Vec<Axis>,
    /// Levels, finest first as listed.
    pub levels: Vec<LevelMeta>,
}

/// Which zarr format an image group is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZarrFormat {
    /// zarr v2 (`.zgroup` / `.zattrs`)
    V2,
    /// zarr v3 (`zarr.json`)
    V3,
}

/// One `multiscales` entry as stored: OME-NGFF 0.4 (zarr v2 `.zattrs`) and 0.5 (zarr v3
/// `zarr.json` → `attributes.ome`), and earlier versions without axes. Lenient where CellMap
/// metadata needs it: keys this crate does not use (`type`, `metadata`, ...) are ignored, and a
/// `version` may sit on the entry or beside it under `ome`. The writer writes this same type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiscaleJson {
    /// `0.4` on 0.4 entries; 0.5 keeps it under `ome`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Name of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Axes in array order (absent before 0.4: z, y, x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axes: Option<Vec<AxisJson>>,
    /// Levels, finest first.
    pub datasets: Vec<LevelJson>,
    /// Transformations applied after each level's own.
    #[serde(rename = "coordinateTransformations", default, skip_serializing_if = "Vec::is_empty")]
    pub coordinate_transformations: Vec<TransformJson>,
}

/// An axis: a bare name (0.3) or a description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AxisJson {
    /// `"z"`
    Name(String),
    /// `{"name": "z", "type": "space", "unit": "nanometer"}`
    Described {
        /// Axis name.
        name: String,
        /// `space`, `channel`, `time`, ...
        #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// Unit, e.g. `nanometer`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
    },
}

/// One level of a multiscale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelJson {
    /// Array path relative to the image group.
    pub path: String,
    /// The level's scale and translation.
    #[serde(rename = "coordinateTransformations", default)]
    pub coordinate_transformations: Vec<TransformJson>,
}

/// A coordinate transformation with inline values (the only kind images here use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TransformJson {
    /// Voxel size per axis.
    Scale {
        /// One value per axis.
        scale: Vec<f64>,
    },
    /// Offset per axis.
    Translation {
        /// One value per axis.
        translation: Vec<f64>,
    },
    /// No change.
    Identity,
}

/// The attributes of an image group that hold its multiscales (other attributes are ignored
/// when read).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ImageAttributesJson {
    /// OME-NGFF 0.5: `ome.multiscales`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ome: Option<OmeJson>,
    /// OME-NGFF 0.4: `multiscales`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiscales: Option<Vec<MultiscaleJson>>,
}

/// `attributes.ome` (OME-NGFF 0.5).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OmeJson {
    /// `0.5`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The multiscales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiscales: Option<Vec<MultiscaleJson>>,
}

/// The multiscale metadata of the image group at `group`, from its attributes (`format` says
/// which document they were read from, for messages).
pub fn multiscale_from_attributes(format: ZarrFormat, attrs: &Value, group: &Location) -> Result<Multiscale> {
    let source = match format {
        ZarrFormat::V3 => group.join("zarr.json"),
        ZarrFormat::V2 => group.join(".zattrs"),
    };
    let parsed =
        ImageAttributesJson::deserialize(attrs).map_err(|e| Error::metadata(&source, format!("malformed OME-NGFF multiscales: {e}")))?;
    // 0.5 nests under "ome"; 0.4-style attributes are accepted in v3 too.
    let (ome_version, nested) = match parsed.ome {
        Some(ome) => (ome.version, ome.multiscales),
        None => (None, None),
    };
    let multiscales = nested.or(parsed.multiscales);
    parse_multiscales(source.as_ref(), group, multiscales, ome_version.as_deref().unwrap_or("0.4"))
}

/// Checks the first of `multiscales` (read from `source`) and resolves its levels.
pub fn parse_multiscales(
    source: &Path,
    group: &Location,
    multiscales: Option<Vec<MultiscaleJson>>,
    default_version: &str,
) -> Result<Multiscale> {
    let bad = |msg: String| Error::metadata(source, msg);
    let first = match multiscales {
        None => return Err(bad("no 'multiscales' metadata: not an OME-NGFF image group".into())),
        Some(list) => list
            .into_iter()
            .next()
            .ok_or_else(|| bad("'multiscales' is an empty list".into()))?,
    };
    let version = first.version.clone().unwrap_or_else(|| default_version.to_string());
    let axes: Vec<Axis> = match first.axes {
        // 0.1-0.3 had no axes: z, y, x.
        None => ["z", "y", "x"]
            .iter()
            .map(|n| Axis {
                name: n.to_string(),
                kind: Some("space".into()),
                unit: None,
            })
            .collect(),
        Some(list) if list.is_empty() => return Err(bad("multiscales[0].axes is an empty list".into())),
        Some(list) => list.into_iter().map(Axis::from).collect(),
    };
    let ndim = axes.len();
    let top = resolve_transforms(&first.coordinate_transformations, ndim, source, "multiscales[0]")?;
    if first.datasets.is_empty() {
        return Err(bad("multiscales[0].datasets is empty".into()));
    }
    let mut levels = Vec::with_capacity(first.datasets.len());
    for (i, ds) in first.datasets.into_iter().enumerate() {
        let (scale, translation) = resolve_transforms(
            &ds.coordinate_transformations,
            ndim,
            source,
            &format!("datasets[{i}] ('{}')", ds.path),
        )?;
        // world = top_scale * (scale * i + translation) + top_translation
        let scale_w: Vec<f64> = scale.iter().zip(&top.0).map(|(s, t)| s * t).collect();
        let trans_w: Vec<f64> = translation
            .iter()
            .zip(&top.0)
            .zip(&top.1)
            .map(|((t, ts), tt)| t * ts + tt)
            .collect();
        if let Some(bad_axis) = scale_w.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(format!(
                "datasets[{i}] ('{}') has a non-positive or non-finite scale on axis '{}'",
                ds.path, axes[bad_axis].name
            )));
        }
        levels.push(LevelMeta {
            path: ds.path,
            scale: scale_w,
            translation: trans_w,
        });
    }
    Ok(Multiscale {
        group: group.clone(),
        version,
        axes,
        levels,
    })
}

impl From<AxisJson> for Axis {
    fn from(axis: AxisJson) -> Axis {
        match axis {
            AxisJson::Name(name) => Axis {
                name,
                kind: None,
                unit: None,
            },
            AxisJson::Described { name, kind, unit } => Axis { name, kind, unit },
        }
    }
}

/// (scale, translation) of a list of transformations applied in order (identity if empty).
fn resolve_transforms(items: &[TransformJson], ndim: usize, source: &Path, context: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut scale = vec![1.0; ndim];
    let mut translation = vec![0.0; ndim];
    let checked = |key: &str, values: &[f64]| -> Result<()> {
        if values.len() != ndim {
            return Err(Error::metadata(
                source,
                format!("{context}: '{key}' has {} values but there are {ndim} axes", values.len()),
            ));
        }
        Ok(())
    };
    for item in items {
        match item {
            TransformJson::Scale { scale: s } => {
                checked("scale", s)?;
                for k in 0..ndim {
                    scale[k] *= s[k];
                    translation[k] *= s[k];
                }
            }
            TransformJson::Translation { translation: t } => {
                checked("translation", t)?;
                for k in 0..ndim {
                    translation[k] += t[k];
                }
            }
            TransformJson::Identity => {}
        }
    }
    Ok((scale, translation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(source: &str, value: Value) -> Result<Multiscale> {
        let list: Option<Vec<MultiscaleJson>> = serde_json::from_value(value).map_err(|e| Error::metadata(source, e))?;
        parse_multiscales(Path::new(source), &Location::from("a"), list, "0.4")
    }

    #[test]
    fn coordinate_frame_names_round_trip_and_offsets() {
        for frame in [CoordinateFrame::Corner, CoordinateFrame::Centre] {
            assert_eq!(CoordinateFrame::parse(frame.name()).unwrap(), frame);
        }
        assert_eq!(CoordinateFrame::parse("Center").unwrap(), CoordinateFrame::Centre);
        assert!(CoordinateFrame::parse("edge").unwrap_err().to_string().contains("'edge'"));
        assert_eq!(CoordinateFrame::Corner.centre_offset(8.0), 4.0);
        assert_eq!(CoordinateFrame::Centre.centre_offset(8.0), 0.0);
    }

    #[test]
    fn parses_levels_with_scale_and_translation() {
        let v = json!([{"version": "0.4", "axes": [
        {"name": "z", "type": "space", "unit": "nanometer"},
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [
          {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0, 4.0]}, {"type": "translation", "translation": [10.0, 20.0, 30.0]}]},
          {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [8.0, 8.0, 8.0]}, {"type": "translation", "translation": [12.0, 22.0, 32.0]}]}
        ]}]);
        let m = parse("a/.zattrs", v).unwrap();
        assert_eq!(m.levels.len(), 2);
        assert_eq!(m.levels[1].scale, vec![8.0; 3]);
        assert_eq!(m.levels[1].translation, vec![12.0, 22.0, 32.0]);
        assert!(m.axes.iter().all(Axis::is_spatial));
        assert_eq!(m.axes[0].unit.as_deref(), Some("nanometer"));
    }

    #[test]
    fn folds_top_level_scale_into_levels() {
        let v = json!([{"axes": ["z", "y", "x"],
            "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}],
            "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0, 4.0]}, {"type": "translation", "translation": [1.0, 1.0, 1.0]}]}]}]);
        let m = parse("a", v).unwrap();
        assert_eq!(m.levels[0].scale, vec![8.0; 3]);
        assert_eq!(m.levels[0].translation, vec![2.0; 3]);
    }

    #[test]
    fn keeps_non_spatial_leading_axes() {
        let v = json!([{"axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 4.0, 4.0]}]}]}]);
        let m = parse("a", v).unwrap();
        assert!(!m.axes[0].is_spatial());
        assert!(m.axes[1].is_spatial());
    }

    #[test]
    fn rejects_wrong_length_and_missing_multiscales() {
        let v = json!([{"axes": ["z", "y", "x"], "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0]}]}]}]);
        let e = parse("g/.zattrs", v).unwrap_err();
        assert!(e.to_string().contains("g/.zattrs"), "{e}");
        assert!(e.to_string().contains("2 values"), "{e}");
        let e = parse("g/.zattrs", Value::Null).unwrap_err();
        assert!(e.to_string().contains("no 'multiscales'"), "{e}");
    }

    #[test]
    fn rejects_non_positive_scale() {
        let v = json!([{"axes": ["z", "y", "x"], "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 0.0, 4.0]}]}]}]);
        let e = parse("g", v).unwrap_err();
        assert!(e.to_string().contains("axis 'y'"), "{e}");
    }

    #[test]
    fn unknown_transformations_and_bad_numbers_are_named() {
        let v = json!([{"datasets": [{"path": "s0", "coordinateTransformations": [{"type": "affine", "affine": [1.0]}]}]}]);
        let e = parse("g/.zattrs", v).unwrap_err().to_string();
        assert!(e.contains("g/.zattrs") && e.contains("affine"), "{e}");
        let v = json!([{"datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": ["4", 4, 4]}]}]}]);
        let e = parse("g/.zattrs", v).unwrap_err().to_string();
        assert!(e.contains("g/.zattrs") && e.contains("string"), "{e}");
    }
}
