//! OME-NGFF multiscale metadata: 0.4 (zarr v2 `.zattrs`) and 0.5 (zarr v3 `zarr.json` → `ome`).
//!
//! Only what sampling needs is kept: axes (name, type, unit) and, per level, the array path and
//! the scale/translation as written. A top-level `coordinateTransformations` is folded into each
//! level. How a translation is read (the corner or the centre of voxel 0) is the
//! [`CoordinateFrame`], a process-wide setting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::Value;

use crate::error::{Error, Result};

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
#[derive(Debug, Clone, PartialEq)]
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
    pub group: PathBuf,
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

/// Reads and parses a JSON file, naming it in any error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::metadata(path, format!("malformed JSON: {e}")))
}

/// Reads the attributes of a group or array at `node` (v3 `zarr.json` attributes, else v2 `.zattrs`).
pub fn read_attributes(node: &Path) -> Result<(ZarrFormat, Value)> {
    let v3 = node.join("zarr.json");
    if v3.is_file() {
        let doc = read_json(&v3)?;
        let attrs = doc.get("attributes").cloned().unwrap_or(Value::Object(Default::default()));
        return Ok((ZarrFormat::V3, attrs));
    }
    let v2 = node.join(".zattrs");
    if v2.is_file() {
        return Ok((ZarrFormat::V2, read_json(&v2)?));
    }
    if node.join(".zgroup").is_file() || node.join(".zarray").is_file() {
        return Ok((ZarrFormat::V2, Value::Object(Default::default())));
    }
    if !node.exists() {
        return Err(Error::not_found(node));
    }
    Err(Error::metadata(
        node,
        "not a zarr group or array (no zarr.json, .zgroup or .zattrs)",
    ))
}

/// Opens the multiscale metadata of the image group at `group`.
pub fn read_multiscale(group: &Path) -> Result<Multiscale> {
    let (format, attrs) = read_attributes(group)?;
    let (source, multiscales) = match format {
        ZarrFormat::V3 => {
            let file = group.join("zarr.json");
            // 0.5 nests under "ome"; accept 0.4-style attributes in v3 too.
            match attrs.get("ome").and_then(|o| o.get("multiscales")) {
                Some(m) => (file, m.clone()),
                None => (file, attrs.get("multiscales").cloned().unwrap_or(Value::Null)),
            }
        }
        ZarrFormat::V2 => (group.join(".zattrs"), attrs.get("multiscales").cloned().unwrap_or(Value::Null)),
    };
    let default_version = attrs
        .get("ome")
        .and_then(|o| o.get("version"))
        .and_then(Value::as_str)
        .unwrap_or("0.4")
        .to_string();
    parse_multiscales(&source, group, &multiscales, &default_version)
}

/// Parses a `multiscales` JSON value (the list) read from `source`.
pub fn parse_multiscales(source: &Path, group: &Path, value: &Value, default_version: &str) -> Result<Multiscale> {
    let bad = |msg: String| Error::metadata(source, msg);
    let first = match value {
        Value::Array(items) if !items.is_empty() => &items[0],
        Value::Array(_) => return Err(bad("'multiscales' is an empty list".into())),
        Value::Null => return Err(bad("no 'multiscales' metadata: not an OME-NGFF image group".into())),
        _ => return Err(bad("'multiscales' must be a list".into())),
    };
    let version = first.get("version").and_then(Value::as_str).unwrap_or(default_version).to_string();
    let axes = parse_axes(first.get("axes"), source)?;
    let ndim = axes.len();
    let top = parse_transforms(first.get("coordinateTransformations"), ndim, source, "multiscales[0]")?;
    let datasets = first
        .get("datasets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("multiscales[0] has no 'datasets' list".into()))?;
    if datasets.is_empty() {
        return Err(bad("multiscales[0].datasets is empty".into()));
    }
    let mut levels = Vec::with_capacity(datasets.len());
    for (i, ds) in datasets.iter().enumerate() {
        let path = ds
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("datasets[{i}] has no 'path'")))?
            .to_string();
        let (scale, translation) = parse_transforms(
            ds.get("coordinateTransformations"),
            ndim,
            source,
            &format!("datasets[{i}] ('{path}')"),
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
                "datasets[{i}] ('{path}') has a non-positive or non-finite scale on axis '{}'",
                axes[bad_axis].name
            )));
        }
        levels.push(LevelMeta {
            path,
            scale: scale_w,
            translation: trans_w,
        });
    }
    Ok(Multiscale {
        group: group.to_path_buf(),
        version,
        axes,
        levels,
    })
}

fn parse_axes(value: Option<&Value>, source: &Path) -> Result<Vec<Axis>> {
    let items = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        // 0.1-0.3 had no axes: default to zyx.
        None => {
            return Ok(["z", "y", "x"]
                .iter()
                .map(|n| Axis {
                    name: n.to_string(),
                    kind: Some("space".into()),
                    unit: None,
                })
                .collect())
        }
        _ => return Err(Error::metadata(source, "multiscales[0].axes must be a non-empty list")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(name) => Ok(Axis {
                name: name.clone(),
                kind: None,
                unit: None,
            }),
            Value::Object(map) => {
                let name = map
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::metadata(source, format!("axes[{i}] has no 'name'")))?;
                Ok(Axis {
                    name: name.to_string(),
                    kind: map.get("type").and_then(Value::as_str).map(str::to_string),
                    unit: map.get("unit").and_then(Value::as_str).map(str::to_string),
                })
            }
            _ => Err(Error::metadata(source, format!("axes[{i}] must be a string or an object"))),
        })
        .collect()
}

/// Returns (scale, translation) from a coordinateTransformations list (identity if absent).
fn parse_transforms(value: Option<&Value>, ndim: usize, source: &Path, context: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut scale = vec![1.0; ndim];
    let mut translation = vec![0.0; ndim];
    let Some(value) = value else { return Ok((scale, translation)) };
    let items = value
        .as_array()
        .ok_or_else(|| Error::metadata(source, format!("{context}: coordinateTransformations must be a list")))?;
    for item in items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
        let numbers = |key: &str| -> Result<Vec<f64>> {
            let list = item
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::metadata(source, format!("{context}: '{kind}' transform has no '{key}' list")))?;
            let nums: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
            let nums = nums.ok_or_else(|| Error::metadata(source, format!("{context}: '{key}' must hold numbers")))?;
            if nums.len() != ndim {
                return Err(Error::metadata(
                    source,
                    format!("{context}: '{key}' has {} values but there are {ndim} axes", nums.len()),
                ));
            }
            Ok(nums)
        };
        match kind {
            "scale" => {
                let s = numbers("scale")?;
                for k in 0..ndim {
                    scale[k] *= s[k];
                    translation[k] *= s[k];
                }
            }
            "translation" => {
                let t = numbers("translation")?;
                for k in 0..ndim {
                    translation[k] += t[k];
                }
            }
            "identity" => {}
            other => {
                return Err(Error::metadata(
                    source,
                    format!("{context}: unsupported coordinate transformation '{other}'"),
                ))
            }
        }
    }
    Ok((scale, translation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let m = parse_multiscales(Path::new("a/.zattrs"), Path::new("a"), &v, "0.4").unwrap();
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
        let m = parse_multiscales(Path::new("a"), Path::new("a"), &v, "0.4").unwrap();
        assert_eq!(m.levels[0].scale, vec![8.0; 3]);
        assert_eq!(m.levels[0].translation, vec![2.0; 3]);
    }

    #[test]
    fn keeps_non_spatial_leading_axes() {
        let v = json!([{"axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 4.0, 4.0]}]}]}]);
        let m = parse_multiscales(Path::new("a"), Path::new("a"), &v, "0.4").unwrap();
        assert!(!m.axes[0].is_spatial());
        assert!(m.axes[1].is_spatial());
    }

    #[test]
    fn rejects_wrong_length_and_missing_multiscales() {
        let v = json!([{"axes": ["z", "y", "x"], "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0]}]}]}]);
        let e = parse_multiscales(Path::new("g/.zattrs"), Path::new("g"), &v, "0.4").unwrap_err();
        assert!(e.to_string().contains("g/.zattrs"), "{e}");
        assert!(e.to_string().contains("2 values"), "{e}");
        let e = parse_multiscales(Path::new("g/.zattrs"), Path::new("g"), &Value::Null, "0.4").unwrap_err();
        assert!(e.to_string().contains("no 'multiscales'"), "{e}");
    }

    #[test]
    fn rejects_non_positive_scale() {
        let v = json!([{"axes": ["z", "y", "x"], "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 0.0, 4.0]}]}]}]);
        let e = parse_multiscales(Path::new("g"), Path::new("g"), &v, "0.4").unwrap_err();
        assert!(e.to_string().contains("axis 'y'"), "{e}");
    }
}
