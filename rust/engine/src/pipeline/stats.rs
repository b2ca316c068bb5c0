//! The class statistics table: per (dataset, crop, class) counts, fractions and weights, as an
//! Arrow record batch (Python reads it as a Polars DataFrame through the Arrow PyCapsule
//! interface, without copying).

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int32Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{Field, Schema};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::AXES;
use crate::io::location::Location;
use crate::pipeline::labels::{count_label_group, ClassCounts, CountOptions, Progress};

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
    pub label_path: Option<Location>,
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
    type Key = (Location, [u64; 3]);
    let key = |path: &Location, vs: [f64; 3]| -> Key { (path.clone(), vs.map(f64::to_bits)) };
    let mut unique: Vec<(Location, [f64; 3])> = Vec::new();
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

/// Counts `entries` ([`compute_class_stats`]) and tabulates them ([`class_stats_table`]).
pub fn class_stats(entries: &[StatsEntry], options: &CountOptions, progress: Option<&Progress>) -> Result<RecordBatch> {
    class_stats_table(&compute_class_stats(entries, options, progress)?)
}

/// The class statistics table, one row per entry:
///
/// | column | type | meaning |
/// |---|---|---|
/// | `dataset`, `crop`, `class` | utf8 | labels of the entry |
/// | `annotated` | bool | the crop annotates the class |
/// | `label_path` | utf8 (null if unannotated) | label group |
/// | `level` | i32 (null) | label level the counts were taken at |
/// | `count_source` | utf8 (null) | `metadata`, `metadata_s0`, `cache` or `scan` |
/// | `voxel_size_{z,y,x}` | f64 (null) | voxel size of that level, nm |
/// | `shape_{z,y,x}` | u64 (null) | shape of that level, voxels |
/// | `box_lo_{z,y,x}`, `box_hi_{z,y,x}` | f64 (null) | world box of that level, nm |
/// | `train_voxel_size_{z,y,x}` | f64 | training voxel size, nm |
/// | `foreground_voxels`, `total_voxels` | f64 | at the training resolution (0 if unannotated) |
/// | `fraction` | f64 (null if unannotated) | foreground / total |
/// | `weight` | f64 (null if unannotated) | background / foreground, capped ([`crate::pipeline::labels::class_weight`]) |
pub fn class_stats_table(rows: &[StatsRow]) -> Result<RecordBatch> {
    let mut columns: Vec<(String, ArrayRef)> = Vec::new();
    let mut push = |name: String, array: ArrayRef| columns.push((name, array));
    let text = |f: &dyn Fn(&StatsRow) -> Option<String>| -> ArrayRef { Arc::new(rows.iter().map(f).collect::<StringArray>()) };
    let counted =
        |f: &dyn Fn(&ClassCounts) -> f64| -> ArrayRef { Arc::new(rows.iter().map(|r| r.counts.as_ref().map(f)).collect::<Float64Array>()) };
    push("dataset".into(), text(&|r| Some(r.entry.dataset.clone())));
    push("crop".into(), text(&|r| Some(r.entry.crop.clone())));
    push("class".into(), text(&|r| Some(r.entry.class.clone())));
    push(
        "annotated".into(),
        Arc::new(rows.iter().map(|r| Some(r.counts.is_some())).collect::<BooleanArray>()),
    );
    push("label_path".into(), text(&|r| r.entry.label_path.as_ref().map(|p| p.to_string())));
    push(
        "level".into(),
        Arc::new(
            rows.iter()
                .map(|r| r.counts.as_ref().map(|c| c.level as i32))
                .collect::<Int32Array>(),
        ),
    );
    push(
        "count_source".into(),
        text(&|r| r.counts.as_ref().map(|c| c.source.as_str().to_string())),
    );
    for (k, axis) in AXES.iter().enumerate() {
        push(format!("voxel_size_{axis}"), counted(&|c| c.voxel_size[k]));
    }
    for (k, axis) in AXES.iter().enumerate() {
        let shape: UInt64Array = rows.iter().map(|r| r.counts.as_ref().map(|c| c.shape[k])).collect();
        push(format!("shape_{axis}"), Arc::new(shape));
    }
    for (k, axis) in AXES.iter().enumerate() {
        push(format!("box_lo_{axis}"), counted(&|c| c.world_box.lo[k]));
    }
    for (k, axis) in AXES.iter().enumerate() {
        push(format!("box_hi_{axis}"), counted(&|c| c.world_box.hi[k]));
    }
    for (k, axis) in AXES.iter().enumerate() {
        let vs: Float64Array = rows.iter().map(|r| Some(r.entry.training_voxel_size[k])).collect();
        push(format!("train_voxel_size_{axis}"), Arc::new(vs));
    }
    let summed = |f: &dyn Fn(&ClassCounts) -> f64| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(|r| Some(r.counts.as_ref().map_or(0.0, f)))
                .collect::<Float64Array>(),
        )
    };
    push("foreground_voxels".into(), summed(&|c| c.foreground));
    push("total_voxels".into(), summed(&|c| c.total));
    push("fraction".into(), counted(&ClassCounts::fraction));
    push("weight".into(), counted(&ClassCounts::weight));
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(name, array.data_type().clone(), array.null_count() > 0 || name_may_be_null(name)))
        .collect();
    let arrays = columns.into_iter().map(|(_, a)| a).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| Error::invalid(format!("building the class statistics table: {e}")))
}

/// Columns that are null for an unannotated class (declared nullable even when no row is).
fn name_may_be_null(name: &str) -> bool {
    !matches!(
        name,
        "dataset" | "crop" | "class" | "annotated" | "foreground_voxels" | "total_voxels"
    ) && !name.starts_with("train_voxel_size_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::WorldBox;
    use crate::pipeline::labels::{CountSource, CLASS_WEIGHT_CAP};
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
            label_path: path.map(Location::from),
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
        let batch = class_stats_table(&rows).unwrap();
        assert_eq!(batch.num_rows(), 3);
        let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).clone();
        assert_eq!(col("class").data_type(), &ADataType::Utf8);
        assert_eq!(col("class").as_string::<i32>().value(2), "nuc");
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
        assert_eq!(col("count_source").as_string::<i32>().value(0), "scan");
    }

    #[test]
    fn empty_table_has_every_column() {
        let batch = class_stats_table(&[]).unwrap();
        assert_eq!((batch.num_rows(), batch.num_columns()), (0, 26));
    }
}
