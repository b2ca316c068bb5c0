//! Polars tables: per (dataset, crop, class) counts, fractions and weights, and the per-sample
//! metadata table of batches; plus the hand-over of a polars `DataFrame` to an Arrow
//! `RecordBatch` through the Arrow C data interface (no copy of the column buffers).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{make_array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow_schema::{Field as ArrowField, Schema};
use polars::prelude::{Column, CompatLevel, DataFrame, IntoColumn, NamedFrom, Series};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::AXES;
use crate::labels::{count_label_group, ClassCounts, CountOptions, Progress};

/// One row request of the class statistics table.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsEntry {
    /// Dataset label (the raw image path).
    pub dataset: String,
    /// Crop label (the crop group path).
    pub crop: String,
    /// Class name.
    pub class: String,
    /// Label group of the class in this crop; `None` when the crop does not annotate it.
    pub label_path: Option<PathBuf>,
    /// Voxel size (z, y, x, nm) training reads the class at; counts are in these voxels.
    pub training_voxel_size: [f64; 3],
}

/// A [`StatsEntry`] with its counts (`None` for an unannotated class).
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRow {
    /// The request.
    pub entry: StatsEntry,
    /// Its counts.
    pub counts: Option<ClassCounts>,
}

/// Counts every entry, each distinct (label group, training voxel size) once, in parallel (run
/// it inside a rayon pool). Fails on the first label volume that cannot be read, naming it.
pub fn compute_class_stats(entries: &[StatsEntry], options: &CountOptions, progress: Option<&Progress>) -> Result<Vec<StatsRow>> {
    type Key = (PathBuf, [u64; 3]);
    let key = |path: &PathBuf, vs: [f64; 3]| -> Key { (path.clone(), vs.map(f64::to_bits)) };
    let mut unique: Vec<(PathBuf, [f64; 3])> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for e in entries {
        if let Some(p) = &e.label_path {
            index.entry(key(p, e.training_voxel_size)).or_insert_with(|| {
                unique.push((p.clone(), e.training_voxel_size));
                unique.len() - 1
            });
        }
    }
    let counts: Vec<ClassCounts> = unique
        .par_iter()
        .map(|(path, vs)| count_label_group(path, *vs, options, progress))
        .collect::<Result<_>>()?;
    Ok(entries
        .iter()
        .map(|e| StatsRow {
            entry: e.clone(),
            counts: e.label_path.as_ref().map(|p| counts[index[&key(p, e.training_voxel_size)]].clone()),
        })
        .collect())
}

/// Counts `entries` ([`compute_class_stats`]) and tabulates them ([`class_stats_frame`]).
pub fn class_stats(entries: &[StatsEntry], options: &CountOptions, progress: Option<&Progress>) -> Result<DataFrame> {
    class_stats_frame(&compute_class_stats(entries, options, progress)?)
}

fn polars_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("building the {what} table: {e}"))
}

/// The class statistics table, one row per entry:
///
/// | column | dtype | meaning |
/// |---|---|---|
/// | `dataset`, `crop`, `class` | str | labels of the entry |
/// | `annotated` | bool | the crop annotates the class |
/// | `label_path` | str (null if unannotated) | label group |
/// | `level` | i32 (null) | label level the counts were taken at |
/// | `count_source` | str (null) | `metadata`, `metadata_s0`, `cache` or `scan` |
/// | `voxel_size_{z,y,x}` | f64 (null) | voxel size of that level, nm |
/// | `shape_{z,y,x}` | u64 (null) | shape of that level, voxels |
/// | `box_lo_{z,y,x}`, `box_hi_{z,y,x}` | f64 (null) | world box of that level, nm |
/// | `train_voxel_size_{z,y,x}` | f64 | training voxel size, nm |
/// | `foreground_voxels`, `total_voxels` | f64 | at the training resolution (0 if unannotated) |
/// | `fraction` | f64 (null if unannotated) | foreground / total |
/// | `weight` | f64 (null if unannotated) | background / foreground, capped ([`crate::labels::class_weight`]) |
pub fn class_stats_frame(rows: &[StatsRow]) -> Result<DataFrame> {
    let n = rows.len();
    let text = |f: &dyn Fn(&StatsRow) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let counts = |f: &dyn Fn(&ClassCounts) -> f64| rows.iter().map(|r| r.counts.as_ref().map(f)).collect::<Vec<Option<f64>>>();
    let mut columns: Vec<Column> = vec![
        Series::new("dataset".into(), text(&|r| r.entry.dataset.clone())).into_column(),
        Series::new("crop".into(), text(&|r| r.entry.crop.clone())).into_column(),
        Series::new("class".into(), text(&|r| r.entry.class.clone())).into_column(),
        Series::new("annotated".into(), rows.iter().map(|r| r.counts.is_some()).collect::<Vec<bool>>()).into_column(),
        Series::new(
            "label_path".into(),
            rows.iter()
                .map(|r| r.entry.label_path.as_ref().map(|p| p.display().to_string()))
                .collect::<Vec<Option<String>>>(),
        )
        .into_column(),
        Series::new(
            "level".into(),
            rows.iter()
                .map(|r| r.counts.as_ref().map(|c| c.level as i32))
                .collect::<Vec<Option<i32>>>(),
        )
        .into_column(),
        Series::new(
            "count_source".into(),
            rows.iter()
                .map(|r| r.counts.as_ref().map(|c| c.source.as_str().to_string()))
                .collect::<Vec<Option<String>>>(),
        )
        .into_column(),
    ];
    for (k, axis) in AXES.iter().enumerate() {
        columns.push(Series::new(format!("voxel_size_{axis}").into(), counts(&|c| c.voxel_size[k])).into_column());
    }
    for (k, axis) in AXES.iter().enumerate() {
        let shape: Vec<Option<u64>> = rows.iter().map(|r| r.counts.as_ref().map(|c| c.shape[k])).collect();
        columns.push(Series::new(format!("shape_{axis}").into(), shape).into_column());
    }
    for (k, axis) in AXES.iter().enumerate() {
        columns.push(Series::new(format!("box_lo_{axis}").into(), counts(&|c| c.world_box.lo[k])).into_column());
    }
    for (k, axis) in AXES.iter().enumerate() {
        columns.push(Series::new(format!("box_hi_{axis}").into(), counts(&|c| c.world_box.hi[k])).into_column());
    }
    for (k, axis) in AXES.iter().enumerate() {
        let vs: Vec<f64> = rows.iter().map(|r| r.entry.training_voxel_size[k]).collect();
        columns.push(Series::new(format!("train_voxel_size_{axis}").into(), vs).into_column());
    }
    let fg: Vec<f64> = rows.iter().map(|r| r.counts.as_ref().map_or(0.0, |c| c.foreground)).collect();
    let total: Vec<f64> = rows.iter().map(|r| r.counts.as_ref().map_or(0.0, |c| c.total)).collect();
    columns.push(Series::new("foreground_voxels".into(), fg).into_column());
    columns.push(Series::new("total_voxels".into(), total).into_column());
    columns.push(Series::new("fraction".into(), counts(&ClassCounts::fraction)).into_column());
    columns.push(Series::new("weight".into(), counts(&ClassCounts::weight)).into_column());
    DataFrame::new(n, columns).map_err(|e| polars_error("class statistics", e))
}

/// Hands a polars `DataFrame` over as an arrow-rs `RecordBatch` through the Arrow C data
/// interface: column buffers are shared, not copied (strings become `large_utf8`).
pub fn to_record_batch(df: &DataFrame) -> Result<RecordBatch> {
    let compat = CompatLevel::oldest();
    let mut fields: Vec<ArrowField> = Vec::with_capacity(df.width());
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(df.width());
    for column in df.columns() {
        let name = column.name().to_string();
        let fail = |e: &dyn std::fmt::Display| Error::invalid(format!("exporting column '{name}' to Arrow: {e}"));
        let field = column.field().to_arrow(compat);
        let array = column.clone().rechunk_to_arrow(compat);
        let c_schema = polars_arrow::ffi::export_field_to_c(&field);
        let c_array = polars_arrow::ffi::export_array_to_c(array);
        // SAFETY: polars-arrow's `ArrowSchema`/`ArrowArray` and arrow-rs's `FFI_ArrowSchema`/
        // `FFI_ArrowArray` are both the `#[repr(C)]` structs of the Arrow C data interface; the
        // release callbacks they carry stay with the values, so ownership moves across intact.
        let (c_schema, c_array): (arrow::ffi::FFI_ArrowSchema, arrow::ffi::FFI_ArrowArray) = unsafe {
            (
                std::mem::transmute::<polars_arrow::ffi::ArrowSchema, arrow::ffi::FFI_ArrowSchema>(c_schema),
                std::mem::transmute::<polars_arrow::ffi::ArrowArray, arrow::ffi::FFI_ArrowArray>(c_array),
            )
        };
        let arrow_field = ArrowField::try_from(&c_schema).map_err(|e| fail(&e))?;
        // SAFETY: `c_array` and `c_schema` were just exported together by polars-arrow.
        let data = unsafe { arrow::ffi::from_ffi(c_array, &c_schema) }.map_err(|e| fail(&e))?;
        fields.push(arrow_field);
        arrays.push(make_array(data));
    }
    let options = RecordBatchOptions::new().with_row_count(Some(df.height()));
    RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)
        .map_err(|e| Error::invalid(format!("building the Arrow record batch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::SpatialDraw;
    use crate::geometry::WorldBox;
    use crate::labels::{CountSource, CLASS_WEIGHT_CAP};
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int32Type, UInt64Type};
    use arrow_array::Array;
    use arrow_schema::DataType as ADataType;

    fn counts(fg: f64, total: f64) -> ClassCounts {
        ClassCounts {
            path: "/d/crop1/mito".into(),
            level: 1,
            level_path: "/d/crop1/mito/s1".into(),
            voxel_size: [8.0, 8.0, 8.0],
            shape: [4, 5, 6],
            world_box: WorldBox {
                lo: [0.0, 10.0, 20.0],
                hi: [32.0, 50.0, 68.0],
            },
            level_foreground: fg as u64,
            level_unknown: 0,
            training_voxel_size: [8.0; 3],
            ratio: 1.0,
            foreground: fg,
            total,
            source: CountSource::Scan,
        }
    }

    fn entry(class: &str, path: Option<&str>) -> StatsEntry {
        StatsEntry {
            dataset: "/d/raw".into(),
            crop: "/d/crop1".into(),
            class: class.into(),
            label_path: path.map(PathBuf::from),
            training_voxel_size: [8.0; 3],
        }
    }

    #[test]
    fn class_table_has_one_typed_row_per_entry() {
        let rows = vec![
            StatsRow {
                entry: entry("mito", Some("/d/crop1/mito")),
                counts: Some(counts(12.0, 120.0)),
            },
            StatsRow {
                entry: entry("er", Some("/d/crop1/er")),
                counts: Some(counts(0.0, 120.0)),
            },
            StatsRow {
                entry: entry("nuc", None),
                counts: None,
            },
        ];
        let df = class_stats_frame(&rows).unwrap();
        assert_eq!(df.height(), 3);
        let batch = to_record_batch(&df).unwrap();
        assert_eq!(batch.num_rows(), 3);
        let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).clone();
        assert_eq!(col("class").data_type(), &ADataType::LargeUtf8);
        assert_eq!(col("class").as_string::<i64>().value(2), "nuc");
        assert!(!col("annotated").as_boolean().value(2));
        let weight = col("weight");
        let weight = weight.as_primitive::<Float64Type>();
        assert_eq!((weight.value(0), weight.value(1), weight.is_null(2)), (9.0, CLASS_WEIGHT_CAP, true));
        assert_eq!(col("fraction").as_primitive::<Float64Type>().value(0), 0.1);
        assert_eq!(col("shape_x").as_primitive::<UInt64Type>().value(0), 6);
        assert!(col("shape_x").is_null(2));
        assert_eq!(col("level").as_primitive::<Int32Type>().value(0), 1);
        assert_eq!(col("box_hi_y").as_primitive::<Float64Type>().value(1), 50.0);
        assert_eq!(col("total_voxels").as_primitive::<Float64Type>().value(2), 0.0);
        assert_eq!(col("count_source").as_string::<i64>().value(0), "scan");
    }

    #[test]
    fn empty_table_exports() {
        let df = class_stats_frame(&[]).unwrap();
        let batch = to_record_batch(&df).unwrap();
        assert_eq!((batch.num_rows(), batch.num_columns()), (0, df.width()));
    }
}
