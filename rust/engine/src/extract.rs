//! Reads one patch of one array: composes the single affine map for the request, then takes
//! the fast path (strided copy straight from decoded chunks) when that map is axis-aligned at
//! the level's resolution, else the general path (gather the source box once, resample).

use crate::augment::{nearest_indices, resample, Interpolation, SpatialDraw, MASK_OUTSIDE};
use crate::error::{Error, Result};
use crate::geometry::Affine;
use crate::volume::{ValueMode, Volume};

/// What to read: output shape (z, y, x; a 1 marks a 2D slice) and voxel size in nm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchSpec {
    /// Output voxels per axis.
    pub shape: [usize; 3],
    /// Output voxel size per axis (nm).
    pub voxel_size: [f64; 3],
}

impl PatchSpec {
    /// Validates and builds a spec.
    pub fn new(shape: [usize; 3], voxel_size: [f64; 3]) -> Result<PatchSpec> {
        if shape.contains(&0) {
            return Err(Error::invalid(format!("array shape {shape:?} has a zero-length axis")));
        }
        if voxel_size.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::invalid(format!("array scale {voxel_size:?} must be positive and finite")));
        }
        Ok(PatchSpec { shape, voxel_size })
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the patch is empty (never true for a validated spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// World extent in nm.
    pub fn world_size(&self) -> [f64; 3] {
        std::array::from_fn(|k| self.shape[k] as f64 * self.voxel_size[k])
    }
}

/// How values are read and what fills voxels outside the array.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadOptions {
    /// Interpolation for the general path.
    pub interpolation: Interpolation,
    /// Value conversion (raw value or foreground mask).
    pub mode: ValueMode,
    /// Fill outside the array with `pad_value` (true) or move the read inside (false).
    pub pad: bool,
    /// Value for voxels outside the array.
    pub pad_value: f32,
}

/// What a read did (for metadata and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadInfo {
    /// Level read.
    pub level: usize,
    /// Whether the strided-copy fast path was used.
    pub fast_path: bool,
}

/// Reads the patch centred at `centre` (nm) into `out` (C order, `spec.len()` values).
pub fn read_patch(
    volume: &Volume,
    level: usize,
    spec: &PatchSpec,
    centre: [f64; 3],
    draw: &SpatialDraw,
    options: &ReadOptions,
    out: &mut [f32],
) -> Result<ReadInfo> {
    debug_assert_eq!(out.len(), spec.len());
    let lvl = &volume.levels[level];
    let mut affine = Affine::compose(spec.shape, spec.voxel_size, centre, &draw.orientation(), lvl.voxel_size, lvl.translation);
    if let Some(axes) = affine.axis_aligned_unit() {
        // Snap to the source grid: an axis-aligned read at the level's resolution is a copy.
        let b: [i64; 3] = std::array::from_fn(|j| affine.b[j].round() as i64);
        let mut start = [0i64; 3];
        let mut region = [0usize; 3];
        let mut strides = [0isize; 3];
        let mut base = 0isize;
        let out_strides = [(spec.shape[1] * spec.shape[2]) as isize, spec.shape[2] as isize, 1];
        for (k, &(j, sign)) in axes.iter().enumerate() {
            let n = spec.shape[k];
            region[j] = n;
            if sign > 0 {
                start[j] = b[j];
                strides[j] = out_strides[k];
            } else {
                start[j] = b[j] - (n as i64 - 1);
                strides[j] = -out_strides[k];
                base += (n as isize - 1) * out_strides[k];
            }
        }
        if !options.pad {
            for j in 0..3 {
                start[j] = clamp_start(start[j], region[j], lvl.shape[j]);
            }
        }
        volume.gather(level, start, region, out, base, strides, options.mode, options.pad_value)?;
        return Ok(ReadInfo { level, fast_path: true });
    }
    if options.mode == ValueMode::Foreground && options.interpolation == Interpolation::Nearest {
        // Label reads share one mechanism with multi-class reads: uint8 mask blocks and
        // precomputed nearest indices.
        read_patch_group(&[(volume, level)], spec, centre, draw, options, &mut [out])?;
        return Ok(ReadInfo { level, fast_path: false });
    }
    let (block_lo, block_shape) = source_block(&mut affine, lvl.shape, spec, options);
    let block_len: usize = block_shape.iter().product();
    let strides = [(block_shape[1] * block_shape[2]) as isize, block_shape[2] as isize, 1];
    let inside = (0..3).all(|k| block_lo[k] >= 0 && block_lo[k] + block_shape[k] as i64 <= lvl.shape[k] as i64);
    let mut scratch = take_scratch(&SCRATCH, block_len);
    let block = &mut scratch[..block_len];
    let gathered = volume.gather(level, block_lo, block_shape, block, 0, strides, options.mode, options.pad_value);
    if gathered.is_ok() {
        // Integer data read entirely from inside the array cannot hold NaN.
        let finite = inside && (options.mode == ValueMode::Foreground || !lvl.dtype.is_float());
        resample(block, block_shape, block_lo, &affine, spec.shape, options.interpolation, finite, out);
    }
    return_scratch(&SCRATCH, scratch);
    gathered.map(|_| ReadInfo { level, fast_path: false })
}

thread_local! {
    /// Reused source-block buffer: rotated reads gather megabytes per array, and fresh large
    /// allocations cost a page fault per 4 KiB.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static MASK_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

type Scratch<T> = std::thread::LocalKey<std::cell::RefCell<Vec<T>>>;

/// Takes this thread's scratch buffer from `pool` (at least `len` long). Taking rather than
/// borrowing keeps it safe when rayon runs another read on this thread while this one waits.
fn take_scratch<T: Copy + Default>(pool: &'static Scratch<T>, len: usize) -> Vec<T> {
    let mut v = pool.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() < len {
        // Every element is overwritten by the gather, so growth is the only fill needed.
        v.resize(len, T::default());
    }
    v
}

/// Gives a scratch buffer back to `pool`, keeping the larger of the two.
fn return_scratch<T>(pool: &'static Scratch<T>, v: Vec<T>) {
    pool.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.capacity() < v.capacity() {
            *slot = v;
        }
    });
}

/// The source box the general path gathers (voxels every output sample may touch), moved
/// inside the array when `pad` is false (the affine is moved with it).
fn source_block(affine: &mut Affine, level_shape: [u64; 3], spec: &PatchSpec, options: &ReadOptions) -> ([i64; 3], [usize; 3]) {
    let (lo, hi) = affine.source_bounds(spec.shape);
    let mut block_lo = [0i64; 3];
    let mut block_shape = [0usize; 3];
    for k in 0..3 {
        let (a, b) = match options.interpolation {
            Interpolation::Nearest => ((lo[k] + 0.5).floor() as i64, (hi[k] + 0.5).floor() as i64),
            Interpolation::Linear => (lo[k].floor() as i64, hi[k].floor() as i64 + 1),
        };
        block_lo[k] = a;
        block_shape[k] = (b - a + 1) as usize;
    }
    if !options.pad {
        for k in 0..3 {
            let moved = clamp_start(block_lo[k], block_shape[k], level_shape[k]);
            affine.b[k] += (moved - block_lo[k]) as f64;
            block_lo[k] = moved;
        }
    }
    (block_lo, block_shape)
}

/// Reads the same patch from label volumes whose chosen levels share one voxel grid (the
/// classes of one crop, or a single volume): the nearest source index of every output voxel is
/// computed once and used for every class, each gathered as a uint8 mask block (4× smaller than
/// floats). Falls back to `read_patch` per volume when the read is axis-aligned (already a copy)
/// or not a nearest-neighbour mask read.
pub fn read_patch_group(
    volumes: &[(&Volume, usize)],
    spec: &PatchSpec,
    centre: [f64; 3],
    draw: &SpatialDraw,
    options: &ReadOptions,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let Some(&(first, first_level)) = volumes.first() else { return Ok(()) };
    let lvl = &first.levels[first_level];
    let mut affine = Affine::compose(spec.shape, spec.voxel_size, centre, &draw.orientation(), lvl.voxel_size, lvl.translation);
    let shareable = options.mode == ValueMode::Foreground
        && options.interpolation == Interpolation::Nearest
        && affine.axis_aligned_unit().is_none();
    if !shareable {
        for ((volume, level), out) in volumes.iter().zip(outs.iter_mut()) {
            read_patch(volume, *level, spec, centre, draw, options, out)?;
        }
        return Ok(());
    }
    let (block_lo, block_shape) = source_block(&mut affine, lvl.shape, spec, options);
    let block_len: usize = block_shape.iter().product();
    let strides = [(block_shape[1] * block_shape[2]) as isize, block_shape[2] as isize, 1];
    let index = nearest_indices(block_shape, block_lo, &affine, spec.shape);
    let mut mask = take_scratch(&MASK_SCRATCH, block_len);
    let mut result = Ok(());
    for ((volume, level), out) in volumes.iter().zip(outs.iter_mut()) {
        result = volume.gather(*level, block_lo, block_shape, &mut mask[..block_len], 0, strides, options.mode, MASK_OUTSIDE);
        if result.is_err() {
            break;
        }
        for (value, &i) in out.iter_mut().zip(&index) {
            let m = mask[i as usize];
            *value = if m == MASK_OUTSIDE { options.pad_value } else { m as f32 };
        }
    }
    return_scratch(&MASK_SCRATCH, mask);
    result
}

/// Moves a run of `len` voxels starting at `start` inside `[0, size)` when it fits.
fn clamp_start(start: i64, len: usize, size: u64) -> i64 {
    let (len, size) = (len as i64, size as i64);
    if len >= size {
        // Does not fit: centre it (the excess is padded on both sides).
        return -((len - size) / 2);
    }
    start.clamp(0, size - len)
}
