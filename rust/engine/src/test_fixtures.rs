//! Fixtures of the read-path tests: temporary directories that clean up after themselves, and
//! small OME-NGFF images written by the engine's own writer (so the tests need no data files and
//! no other zarr implementation).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::dtype::DType;
use crate::format::ngff::{CoordinateFrame, ZarrFormat};
use crate::geometry::WorldBox;
use crate::writer::{ImageWriter, WriterConfig};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory whose name contains `name` (unique per process and call).
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "cellmap-read-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    /// `self / relative`.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What to write: an image whose voxel 0 has its lower corner at `lo` (nm).
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec {
    /// Lower corner of voxel 0 (nm, z y x).
    pub lo: [f64; 3],
    /// Voxel size (nm).
    pub voxel: [f64; 3],
    /// Array shape of the first level (voxels).
    pub shape: [usize; 3],
    /// Chunk shape.
    pub chunk: [usize; 3],
    /// Stored element type.
    pub dtype: DType,
    /// Fill value of the arrays (what absent chunks hold).
    pub fill_value: f64,
    /// 2× downsampled levels after the first.
    pub downsample_levels: usize,
    /// What the written translation marks.
    pub frame: CoordinateFrame,
}

impl ImageSpec {
    /// A float32 image with 4-voxel chunks, fill 0, one level, in the process-wide frame (the
    /// one `Volume::open` and `Dataset::open` read with).
    pub fn new(lo: [f64; 3], voxel: [f64; 3], shape: [usize; 3]) -> ImageSpec {
        ImageSpec {
            lo,
            voxel,
            shape,
            chunk: [4; 3],
            dtype: DType::F32,
            fill_value: 0.0,
            downsample_levels: 0,
            frame: CoordinateFrame::current(),
        }
    }

    /// World box of the first level (voxel edges).
    pub fn bounds(&self) -> WorldBox {
        WorldBox {
            lo: self.lo,
            hi: std::array::from_fn(|k| self.lo[k] + self.shape[k] as f64 * self.voxel[k]),
        }
    }

    fn config(&self, path: &Path, write_shape: [usize; 3]) -> WriterConfig {
        WriterConfig {
            path: crate::io::location::Location::Local(path.to_path_buf()),
            name: None,
            voxel_size: self.voxel,
            bounds: self.bounds(),
            write_shape,
            chunk_shape: self.chunk,
            dtype: self.dtype,
            fill_value: self.fill_value,
            format: ZarrFormat::V2,
            overwrite: false,
            exist_ok: false,
            first_level: 0,
            downsample_levels: self.downsample_levels,
            compression_level: 1,
            tiling: None,
            protected: Vec::new(),
            fsync: false,
            frame: self.frame,
            shard: None,
            downsample: crate::writer::Downsample::Mean,
        }
    }

    /// Writes the image at `path` with voxel `(z, y, x)` of the first level holding
    /// `value([z, y, x])`, and closes it (computing any downsampled levels).
    pub fn write(&self, path: &Path, value: impl Fn([usize; 3]) -> f32) {
        let writer = ImageWriter::create(self.config(path, self.shape)).expect("create the fixture image");
        writer
            .write_boxes(&[[0, 0, 0]], &c_order(self.shape, value))
            .expect("write the fixture image");
        writer.close().expect("close the fixture image");
    }

    /// Writes only the boxes of the chunk shape starting at `starts` (the other chunks are never
    /// written, so they stay absent on disk), with values from `value` (first-level voxels).
    pub fn write_chunks(&self, path: &Path, starts: &[[usize; 3]], value: impl Fn([usize; 3]) -> f32) {
        let writer = ImageWriter::create(self.config(path, self.chunk)).expect("create the fixture image");
        for s in starts {
            let data = c_order(self.chunk, |v| value(std::array::from_fn(|k| s[k] + v[k])));
            writer.write_boxes(&[s.map(|n| n as i64)], &data).expect("write a fixture chunk");
        }
        writer.close().expect("close the fixture image");
    }
}

/// The values `f([z, y, x])` of a block of `shape`, in C order.
pub fn c_order(shape: [usize; 3], f: impl Fn([usize; 3]) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(shape.iter().product());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                out.push(f([z, y, x]));
            }
        }
    }
    out
}

/// Asserts that `actual` equals `expected` value by value (NaN equals NaN), naming the first
/// differing position.
#[track_caller]
pub fn assert_same(actual: &[f32], expected: &[f32], context: &str) {
    assert_eq!(actual.len(), expected.len(), "{context}: lengths differ");
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, e)| !(a == e || (a.is_nan() && e.is_nan())));
    if let Some(i) = first {
        panic!("{context}: value {i} is {} but {} was expected", actual[i], expected[i]);
    }
}
