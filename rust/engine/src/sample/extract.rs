//! Reads one patch of one array: composes the single affine map for the request, then takes
//! the fast path (strided copy straight from decoded chunks) when that map is axis-aligned at
//! the level's resolution, else the general path (gather the voxels the kernel can reach, resample).

use std::rc::Rc;

use multiversion::multiversion;

use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::geometry::{Affine, MAX_VOXEL_COORDINATE};
use crate::sample::augment::{Interpolation, SpatialDraw};
use crate::sample::elastic::{ElasticDraw, SourceShift};
use crate::sample::resample::{nearest_indices, nearest_plane_offsets, resample, resample_nan_padded, FiniteRegion, MASK_OUTSIDE};
use crate::source::label_cache::PackedLabels;
use crate::source::streaming;
use crate::source::volume::{Level, ValueMode, Volume};

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
    /// Whether every value written is finite (no NaN or infinity): integer data read without
    /// NaN padding. Value transforms that only replace non-finite values can then be skipped.
    pub finite: bool,
}

/// Whether a read of `spec` at `centre` with `draw` from `lvl` is a plain copy of source voxels
/// (axis-aligned at the level's resolution, not deformed): each output voxel then holds one
/// source voxel or the padding, and no kernel mixes padding into values.
pub fn reads_as_copy(lvl: &Level, spec: &PatchSpec, centre: [f64; 3], draw: &SpatialDraw) -> bool {
    let affine = patch_affine(lvl, spec, centre, draw);
    affine.axis_aligned_unit().is_some() && source_shift(&affine, spec, draw).is_none()
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
    let lvl = volume.levels.get(level).ok_or_else(|| {
        Error::invalid(format!(
            "{}: level {level} does not exist ({} levels)",
            volume.path,
            volume.levels.len()
        ))
    })?;
    let mut affine = patch_affine(lvl, spec, centre, draw);
    if options.mode == ValueMode::Foreground
        && options.interpolation == Interpolation::Nearest
        && (draw.elastic.is_some() || affine.axis_aligned_unit().is_none())
    {
        // Label reads that resample share one mechanism with multi-class reads: uint8 mask
        // blocks and precomputed nearest indices.
        read_patch_group(&[(volume, level)], spec, centre, draw, options, &mut [out])?;
        return Ok(ReadInfo {
            level,
            fast_path: false,
            finite: false,
        });
    }
    let shift = source_shift(&affine, spec, draw);
    check_source_reach(&affine, shift.as_deref(), lvl, spec)?;
    if let Some(axes) = affine.axis_aligned_unit().filter(|_| shift.is_none()) {
        let AlignedCopy {
            start,
            region,
            base,
            strides,
        } = aligned_copy(&affine, axes, spec, lvl.shape, options.pad);
        volume.gather(level, start, region, out, base, strides, options.mode, options.pad_value)?;
        let inside = (0..3).all(|j| start[j] >= 0 && start[j] + region[j] as i64 <= lvl.shape[j] as i64);
        let data_finite = options.mode == ValueMode::Foreground || !lvl.dtype.is_float();
        let finite = data_finite && (inside || options.pad_value.is_finite());
        return Ok(ReadInfo {
            level,
            fast_path: true,
            finite,
        });
    }
    let (block_lo, block_shape) = source_block(&mut affine, shift.as_deref(), lvl.shape, spec, options);
    let block_len: usize = block_shape.iter().product();
    let spans = row_spans(&affine, shift.as_deref(), spec.shape, block_lo, block_shape, options.interpolation);
    // The block's voxels inside the array, in block indices (the rest is padding).
    let inside = FiniteRegion {
        lo: std::array::from_fn(|k| (-block_lo[k]).clamp(0, block_shape[k] as i64)),
        hi: std::array::from_fn(|k| (lvl.shape[k] as i64 - block_lo[k]).clamp(0, block_shape[k] as i64)),
    };
    let wholly_inside = inside == FiniteRegion::whole(block_shape);
    let pad = options.pad_value;
    let pad_byte = (pad.is_sign_positive() && pad <= 255.0 && pad.fract() == 0.0).then_some(pad as u8);
    let nan_padded = !wholly_inside && pad.is_nan() && options.interpolation == Interpolation::Linear;
    if options.mode == ValueMode::Raw && lvl.dtype == DType::U8 && (wholly_inside || pad_byte.is_some() || nan_padded) {
        // uint8 data: the block keeps the stored bytes (a quarter of the float block's memory
        // traffic; the kernels convert each byte exactly), with the padding as its byte or,
        // when it is NaN, read as NaN by the kernels outside the array.
        let mut scratch = take_scratch(&MASK_SCRATCH, block_len);
        let block = &mut scratch[..block_len];
        let gathered = volume.gather_spans(level, block_lo, block_shape, block, &spans, ValueMode::Raw, pad_byte.unwrap_or(0));
        let whole = wholly_inside || pad_byte.is_some();
        if gathered.is_ok() {
            let (shift, shape) = (shift.as_deref(), spec.shape);
            if whole {
                let finite = Some(FiniteRegion::whole(block_shape));
                resample(
                    block,
                    block_shape,
                    block_lo,
                    &affine,
                    shift,
                    shape,
                    options.interpolation,
                    finite,
                    out,
                );
            } else {
                resample_nan_padded(block, block_shape, block_lo, &affine, shift, shape, inside, out);
            }
        }
        return_scratch(&MASK_SCRATCH, scratch);
        return gathered.map(|_| ReadInfo {
            level,
            fast_path: false,
            finite: whole,
        });
    }
    let mut scratch = take_scratch(&SCRATCH, block_len);
    let block = &mut scratch[..block_len];
    let gathered = volume.gather_spans(level, block_lo, block_shape, block, &spans, options.mode, options.pad_value);
    let mut all_finite = false;
    if gathered.is_ok() {
        // Integer data cannot hold NaN; float data is scanned (inside the array only).
        let data_finite = options.mode == ValueMode::Foreground || !lvl.dtype.is_float() || !has_nan(block, &spans, block_shape, &inside);
        let finite = match (data_finite, options.pad_value.is_nan()) {
            (false, _) => None,
            (true, false) => Some(FiniteRegion::whole(block_shape)),
            (true, true) => Some(inside),
        };
        all_finite = finite == Some(FiniteRegion::whole(block_shape));
        resample(
            block,
            block_shape,
            block_lo,
            &affine,
            shift.as_deref(),
            spec.shape,
            options.interpolation,
            finite,
            out,
        );
    }
    return_scratch(&SCRATCH, scratch);
    gathered.map(|_| ReadInfo {
        level,
        fast_path: false,
        finite: all_finite,
    })
}

thread_local! {
    /// Reused source-block buffers: rotated reads gather megabytes per array, and fresh large
    /// allocations cost a page fault per 4 KiB.
    static SCRATCH: ScratchStack<f32> = const { std::cell::RefCell::new(Vec::new()) };
    static MASK_SCRATCH: ScratchStack<u8> = const { std::cell::RefCell::new(Vec::new()) };
    static INDEX_SCRATCH: ScratchStack<u32> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's free scratch buffers. A stack rather than one slot: while a read waits on its
/// rayon tasks, this thread may run another sample's read, which then needs buffers of its own.
type ScratchStack<T> = std::cell::RefCell<Vec<Vec<T>>>;
type Scratch<T> = std::thread::LocalKey<ScratchStack<T>>;

/// Buffers a thread keeps per kind (nested reads rarely go deeper).
const SCRATCH_KEPT: usize = 4;

/// Scratch element types, with the value debug builds fill taken buffers with: a kernel that
/// read a voxel the gather did not write would then produce NaN or padding in tests.
trait ScratchElement: Copy + Default + 'static {
    const POISON: Self;
}
impl ScratchElement for f32 {
    const POISON: f32 = f32::NAN;
}
impl ScratchElement for u8 {
    const POISON: u8 = 0xA5;
}
impl ScratchElement for u32 {
    const POISON: u32 = u32::MAX;
}

/// Takes a free buffer from this thread's `pool` (at least `len` long).
fn take_scratch<T: ScratchElement>(pool: &'static Scratch<T>, len: usize) -> Vec<T> {
    let mut v = pool.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if v.len() < len {
        // Every element that is read is written first, so growth is the only fill needed.
        v.resize(len, T::default());
    }
    if cfg!(debug_assertions) {
        v.fill(T::POISON);
    }
    v
}

/// Gives a scratch buffer back to this thread's `pool`.
fn return_scratch<T>(pool: &'static Scratch<T>, v: Vec<T>) {
    pool.with(|s| {
        let mut stack = s.borrow_mut();
        if stack.len() < SCRATCH_KEPT {
            stack.push(v);
        }
    });
}

/// Largest source box a patch may read, in voxels of the level (2^30: 4 GiB as float32).
const MAX_SOURCE_VOXELS: f64 = (1u64 << 30) as f64;

/// The sample's elastic deformation as a shift of every output voxel's source position; none
/// when the field is zero, so that a zero-amplitude deformation reads exactly as no deformation
/// (an axis-aligned read stays a copy). The last shift a thread computed is kept: a sample's
/// raw and label reads on one grid share it, and its buffers are reused for the next one.
fn source_shift(affine: &Affine, spec: &PatchSpec, draw: &SpatialDraw) -> Option<Rc<SourceShift>> {
    let key = ShiftKey {
        elastic: draw.elastic?,
        shape: spec.shape,
        voxel_size: spec.voxel_size,
        linear: affine.m,
    };
    // The slot is emptied before the evaluation (which runs rayon tasks: this thread may read
    // another sample meanwhile) and refilled after it.
    let last = LAST_SHIFT.with(|slot| slot.borrow_mut().take());
    let shift = match last {
        Some((k, shift)) if k == key => shift,
        last => {
            let buffers = last.and_then(|(_, s)| Rc::try_unwrap(s).ok()).map(|s| s.shift).unwrap_or_default();
            Rc::new(key.elastic.source_shift_into(affine, spec.shape, spec.voxel_size, buffers))
        }
    };
    LAST_SHIFT.with(|slot| *slot.borrow_mut() = Some((key, shift.clone())));
    Some(shift).filter(|s| s.reach.iter().any(|r| *r > 0.0))
}

/// What a source shift depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ShiftKey {
    elastic: ElasticDraw,
    shape: [usize; 3],
    voxel_size: [f64; 3],
    linear: [[f64; 3]; 3],
}

thread_local! {
    static LAST_SHIFT: std::cell::RefCell<Option<(ShiftKey, Rc<SourceShift>)>> = const { std::cell::RefCell::new(None) };
}

/// The source box the output voxels' positions lie in: the affine's footprint widened by the
/// shift's reach.
fn shifted_bounds(affine: &Affine, shift: Option<&SourceShift>, shape: [usize; 3]) -> ([f64; 3], [f64; 3]) {
    let (lo, hi) = affine.source_bounds(shape);
    let reach = shift.map_or([0.0; 3], |s| s.reach);
    (std::array::from_fn(|k| lo[k] - reach[k]), std::array::from_fn(|k| hi[k] + reach[k]))
}

/// Refuses a read whose source box is beyond the voxel arithmetic (coordinates past 2^52) or
/// absurdly large: metadata with a voxel size far from the requested one, named in the error.
fn check_source_reach(affine: &Affine, shift: Option<&SourceShift>, lvl: &crate::source::volume::Level, spec: &PatchSpec) -> Result<()> {
    let (lo, hi) = shifted_bounds(affine, shift, spec.shape);
    let in_range = (0..3).all(|k| lo[k].abs() < MAX_VOXEL_COORDINATE && hi[k].abs() < MAX_VOXEL_COORDINATE);
    let voxels: f64 = (0..3).map(|k| (hi[k] - lo[k]).abs() + 2.0).product();
    if in_range && voxels <= MAX_SOURCE_VOXELS {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{}: a patch of {:?} voxels of {:?} nm spans source voxels {lo:?} to {hi:?} of this level (voxel size {:?} nm, {voxels:e} voxels); the level's voxel size or translation, or the requested scale, is out of range",
        lvl.path,
        spec.shape,
        spec.voxel_size,
        lvl.voxel_size
    )))
}

/// An axis-aligned read at the level's resolution as a strided copy: the source box, and
/// where each source voxel goes in the output (`base` + strides, negative for mirrored axes).
#[derive(Clone, Copy)]
struct AlignedCopy {
    start: [i64; 3],
    region: [usize; 3],
    base: isize,
    strides: [isize; 3],
}

fn aligned_copy(affine: &Affine, axes: [(usize, i64); 3], spec: &PatchSpec, level_shape: [u64; 3], pad: bool) -> AlignedCopy {
    // Snap to the source grid. Halves snap upwards (as the nearest kernel does), so a plain
    // and a mirrored read of a patch half a voxel off the grid cover the same voxels on either
    // side of voxel 0.
    let b: [i64; 3] = std::array::from_fn(|j| (affine.b[j] + 0.5).floor() as i64);
    let mut copy = AlignedCopy {
        start: [0; 3],
        region: [0; 3],
        base: 0,
        strides: [0; 3],
    };
    let out_strides = [(spec.shape[1] * spec.shape[2]) as isize, spec.shape[2] as isize, 1];
    for (k, &(j, sign)) in axes.iter().enumerate() {
        let n = spec.shape[k];
        copy.region[j] = n;
        if sign > 0 {
            copy.start[j] = b[j];
            copy.strides[j] = out_strides[k];
        } else {
            copy.start[j] = b[j] - (n as i64 - 1);
            copy.strides[j] = -out_strides[k];
            copy.base += (n as isize - 1) * out_strides[k];
        }
    }
    if !pad {
        copy.start = std::array::from_fn(|j| clamp_start(copy.start[j], copy.region[j], level_shape[j]));
    }
    copy
}

/// The voxel box of `level` a read of the patch centred at `centre` gathers, clipped to the
/// array (`None` when it lies wholly outside). Used to request a batch's chunks ahead of its
/// reads; an elastic field's extra reach is left out (chunks it adds are read on demand).
pub fn source_region(
    volume: &Volume,
    level: usize,
    spec: &PatchSpec,
    centre: [f64; 3],
    draw: &SpatialDraw,
    options: &ReadOptions,
) -> Option<[(u64, u64); 3]> {
    let lvl = &volume.levels[level];
    let mut affine = patch_affine(lvl, spec, centre, draw);
    let (lo, shape) = match affine.axis_aligned_unit() {
        Some(axes) => {
            let copy = aligned_copy(&affine, axes, spec, lvl.shape, options.pad);
            (copy.start, copy.region)
        }
        None => source_block(&mut affine, None, lvl.shape, spec, options),
    };
    let clipped: [(u64, u64); 3] = std::array::from_fn(|k| {
        let a = lo[k].clamp(0, lvl.shape[k] as i64) as u64;
        let b = (lo[k] + shape[k] as i64).clamp(0, lvl.shape[k] as i64) as u64;
        (a, b)
    });
    clipped.iter().all(|(a, b)| b > a).then_some(clipped)
}

/// The source box the general path gathers (voxels every output sample may touch), moved
/// inside the array when `pad` is false (the affine is moved with it).
fn source_block(
    affine: &mut Affine,
    shift: Option<&SourceShift>,
    level_shape: [u64; 3],
    spec: &PatchSpec,
    options: &ReadOptions,
) -> ([i64; 3], [usize; 3]) {
    let (lo, hi) = shifted_bounds(affine, shift, spec.shape);
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
) -> Result<Vec<Tally>> {
    let Some(&(first, first_level)) = volumes.first() else {
        return Ok(Vec::new());
    };
    let lvl = &first.levels[first_level];
    let mut affine = patch_affine(lvl, spec, centre, draw);
    let shift = source_shift(&affine, spec, draw);
    check_source_reach(&affine, shift.as_deref(), lvl, spec)?;
    let shareable = options.mode == ValueMode::Foreground
        && options.interpolation == Interpolation::Nearest
        && (shift.is_some() || affine.axis_aligned_unit().is_none());
    if !shareable {
        // A zero field reads as no deformation (an axis-aligned label read stays a copy).
        let draw = SpatialDraw {
            elastic: draw.elastic.filter(|_| shift.is_some()),
            ..*draw
        };
        let mut tallies = Vec::with_capacity(outs.len());
        for ((volume, level), out) in volumes.iter().zip(outs.iter_mut()) {
            read_patch(volume, *level, spec, centre, &draw, options, out)?;
            tallies.push(Tally::of(out));
        }
        return Ok(tallies);
    }
    let nearest = NearestBlock::of(&mut affine, shift.as_deref(), lvl.shape, spec, options);
    let (block_lo, block_shape, spans) = (nearest.lo, nearest.shape, &nearest.spans);
    let block_len = block_shape.iter().product::<usize>();
    let mut mask = take_scratch(&MASK_SCRATCH, block_len);
    let mut packed = take_scratch(&MASK_SCRATCH, block_len);
    let mut result = Ok(());
    let mut tallies = Vec::with_capacity(outs.len());
    // Classes are packed as bits of one byte per source voxel, so each output voxel needs one
    // lookup for up to seven classes instead of one per class.
    'groups: for (group, group_outs) in volumes.chunks(PACKED_CLASSES).zip(outs.chunks_mut(PACKED_CLASSES)) {
        for (bit, (volume, level)) in group.iter().enumerate() {
            result = volume.gather_spans(
                *level,
                block_lo,
                block_shape,
                &mut mask[..block_len],
                spans,
                options.mode,
                MASK_OUTSIDE,
            );
            if result.is_err() {
                break 'groups;
            }
            pack_bit(&mask[..block_len], &mut packed[..block_len], spans, block_shape[2], bit as u32);
        }
        tallies.extend(nearest.unpack(&packed[..block_len], spec.len(), options.pad_value, group_outs));
    }
    return_scratch(&MASK_SCRATCH, mask);
    return_scratch(&MASK_SCRATCH, packed);
    return_scratch(&INDEX_SCRATCH, nearest.index);
    result.map(|()| tallies)
}

/// The source block a nearest-neighbour label read gathers: its box, the span of each row the
/// output reaches, and the nearest block indices of the output voxels (a scratch buffer the
/// caller gives back): of every voxel, or, for a plane-separable map, of the first output plane
/// with each plane's offset from it.
struct NearestBlock {
    lo: [i64; 3],
    shape: [usize; 3],
    spans: Vec<[u32; 2]>,
    index: Vec<u32>,
    plane_offsets: Option<Vec<i32>>,
}

impl NearestBlock {
    fn of(
        affine: &mut Affine,
        shift: Option<&SourceShift>,
        level_shape: [u64; 3],
        spec: &PatchSpec,
        options: &ReadOptions,
    ) -> NearestBlock {
        let (lo, shape) = source_block(affine, shift, level_shape, spec, options);
        let spans = row_spans(affine, shift, spec.shape, lo, shape, options.interpolation);
        let plane_len = spec.shape[1] * spec.shape[2];
        let mut index = take_scratch(&INDEX_SCRATCH, spec.len());
        let plane_offsets = match shift {
            None => nearest_plane_offsets(shape, lo, affine, spec.shape, &mut index[..plane_len]),
            Some(_) => None,
        };
        if plane_offsets.is_none() {
            nearest_indices(shape, lo, affine, shift, spec.shape, &mut index[..spec.len()]);
        }
        NearestBlock {
            lo,
            shape,
            spans,
            index,
            plane_offsets,
        }
    }

    /// The classes packed in `packed` (this block's bytes) at every output voxel; see
    /// [`unpack_bits`].
    fn unpack(&self, packed: &[u8], out_len: usize, pad_value: f32, outs: &mut [&mut [f32]]) -> Vec<Tally> {
        let mut tallies = vec![Tally::default(); outs.len()];
        match &self.plane_offsets {
            None => unpack_bits(packed, &self.index[..out_len], 0, 0, pad_value, outs, &mut tallies),
            Some(offsets) => {
                let plane_len = out_len / offsets.len();
                for (p, &offset) in offsets.iter().enumerate() {
                    unpack_bits(
                        packed,
                        &self.index[..plane_len],
                        offset,
                        p * plane_len,
                        pad_value,
                        outs,
                        &mut tallies,
                    );
                }
            }
        }
        tallies
    }
}

/// Reads the same patch of every class of a held crop ([`PackedLabels`], whose grid is
/// `level`'s): what [`read_patch_group`] reads from the crop's label chunks, bit for bit, with
/// the packed block copied from the crop instead of gathered and packed class by class (and an
/// axis-aligned read copied straight from the crop's bits).
pub fn read_packed_group(
    crop: &PackedLabels,
    lvl: &Level,
    spec: &PatchSpec,
    centre: [f64; 3],
    draw: &SpatialDraw,
    options: &ReadOptions,
    outs: &mut [&mut [f32]],
) -> Result<Vec<Tally>> {
    debug_assert_eq!(crop.shape, lvl.shape.map(|n| n as usize), "the crop is held on the level's grid");
    let mut affine = patch_affine(lvl, spec, centre, draw);
    let shift = source_shift(&affine, spec, draw);
    check_source_reach(&affine, shift.as_deref(), lvl, spec)?;
    if shift.is_none() {
        if let Some(axes) = affine.axis_aligned_unit() {
            let copy = aligned_copy(&affine, axes, spec, lvl.shape, options.pad);
            let tallies = outs
                .iter_mut()
                .enumerate()
                .map(|(c, out)| {
                    copy_bits(
                        &crop.planes[c / PACKED_CLASSES],
                        crop.shape,
                        &copy,
                        (c % PACKED_CLASSES) as u32,
                        options.pad_value,
                        out,
                    )
                })
                .collect();
            return Ok(tallies);
        }
    }
    let nearest = NearestBlock::of(&mut affine, shift.as_deref(), lvl.shape, spec, options);
    let block_len = nearest.shape.iter().product::<usize>();
    let mut packed = take_scratch(&MASK_SCRATCH, block_len);
    let mut tallies = Vec::with_capacity(outs.len());
    for (plane, group_outs) in crop.planes.iter().zip(outs.chunks_mut(PACKED_CLASSES)) {
        copy_plane_block(
            plane,
            crop.shape,
            nearest.lo,
            nearest.shape,
            &nearest.spans,
            &mut packed[..block_len],
        );
        tallies.extend(nearest.unpack(&packed[..block_len], spec.len(), options.pad_value, group_outs));
    }
    return_scratch(&MASK_SCRATCH, packed);
    return_scratch(&INDEX_SCRATCH, nearest.index);
    Ok(tallies)
}

/// Copies the spans of a source block from a packed plane of `shape`, marking the voxels outside
/// it as padding: the block [`read_patch_group`] packs from the chunks, byte for byte.
fn copy_plane_block(plane: &[u8], shape: [usize; 3], block_lo: [i64; 3], block_shape: [usize; 3], spans: &[[u32; 2]], block: &mut [u8]) {
    let [bz, by, bx] = block_shape;
    for z in 0..bz {
        let sz = block_lo[0] + z as i64;
        for y in 0..by {
            let [a, b] = spans[z * by + y];
            if a >= b {
                continue;
            }
            let row = &mut block[(z * by + y) * bx..][a as usize..b as usize];
            let sy = block_lo[1] + y as i64;
            if sz < 0 || sz >= shape[0] as i64 || sy < 0 || sy >= shape[1] as i64 {
                row.fill(PACKED_OUTSIDE);
                continue;
            }
            let (x0, x1) = (block_lo[2] + a as i64, block_lo[2] + b as i64);
            let (in0, in1) = inside_span(x0, x1, shape[2]);
            let src = (sz as usize * shape[1] + sy as usize) * shape[2];
            let (before, rest) = row.split_at_mut((in0 - x0) as usize);
            before.fill(PACKED_OUTSIDE);
            let (inside, after) = rest.split_at_mut((in1 - in0) as usize);
            if in1 > in0 {
                inside.copy_from_slice(&plane[src + in0 as usize..src + in1 as usize]);
            }
            after.fill(PACKED_OUTSIDE);
        }
    }
}

/// The part `[in0, in1)` of the row span `[x0, x1)` that lies in `[0, len)` (empty, at a
/// position inside the span, when none does).
fn inside_span(x0: i64, x1: i64, len: usize) -> (i64, i64) {
    let in0 = x0.max(0).min(x1);
    (in0, x1.min(len as i64).max(in0))
}

/// An axis-aligned read of one class from a packed plane: bit `bit` of each voxel of the copy's
/// source box as 0.0 / 1.0 at its output position, `pad_value` outside the grid (what
/// [`Volume::gather`] writes from the label chunks in foreground mode).
fn copy_bits(plane: &[u8], shape: [usize; 3], copy: &AlignedCopy, bit: u32, pad_value: f32, out: &mut [f32]) -> Tally {
    let AlignedCopy {
        start,
        region,
        base,
        strides,
    } = *copy;
    let stream = streaming::worth_streaming(region.iter().product());
    let mut tally = Tally::default();
    for z in 0..region[0] {
        let sz = start[0] + z as i64;
        for y in 0..region[1] {
            let sy = start[1] + y as i64;
            let row = base + z as isize * strides[0] + y as isize * strides[1];
            let inside_row = sz >= 0 && sz < shape[0] as i64 && sy >= 0 && sy < shape[1] as i64;
            let src = if inside_row {
                (sz as usize * shape[1] + sy as usize) * shape[2]
            } else {
                0
            };
            if strides[2] == 1 {
                let dst = &mut out[row as usize..row as usize + region[2]];
                let x0 = start[2];
                let (in0, in1) = if inside_row {
                    inside_span(x0, x0 + region[2] as i64, shape[2])
                } else {
                    (x0, x0)
                };
                let (before, rest) = dst.split_at_mut((in0 - x0) as usize);
                before.fill(pad_value);
                let (inside, after) = rest.split_at_mut((in1 - in0) as usize);
                if in1 > in0 {
                    tally.add(bits_to_floats(
                        &plane[src + in0 as usize..src + in1 as usize],
                        bit,
                        pad_value,
                        inside,
                        stream,
                    ));
                }
                after.fill(pad_value);
                tally.add(Tally::padding(before.len() + after.len(), pad_value));
            } else {
                for x in 0..region[2] {
                    let sx = start[2] + x as i64;
                    let value = if inside_row && sx >= 0 && sx < shape[2] as i64 {
                        let one = plane[src + sx as usize] >> bit & 1;
                        tally.foreground += u64::from(one);
                        f32::from(one)
                    } else {
                        tally.add(Tally::padding(1, pad_value));
                        pad_value
                    };
                    out[(row + x as isize * strides[2]) as usize] = value;
                }
            }
        }
    }
    streaming::store_fence();
    tally
}

/// Classes per packed byte: bits 0..7 hold the classes' masks, the top bit marks padding.
const PACKED_CLASSES: usize = crate::source::label_cache::CLASSES_PER_PLANE;
const PACKED_OUTSIDE: u8 = 0x80;

/// Puts one class's mask (0, 1, or `MASK_OUTSIDE`) into bit `bit` of the packed block, over
/// the gathered spans. Bit 0 starts each byte afresh and records padding (the classes of a
/// group share one grid, so padding is the same for all).
fn pack_bit(mask: &[u8], packed: &mut [u8], spans: &[[u32; 2]], row_len: usize, bit: u32) {
    for (row, &[a, b]) in spans.iter().enumerate() {
        let range = row * row_len + a as usize..row * row_len + b as usize;
        let (m, p) = (&mask[range.clone()], &mut packed[range]);
        if bit == 0 {
            p.iter_mut()
                .zip(m)
                .for_each(|(p, &m)| *p = if m == MASK_OUTSIDE { PACKED_OUTSIDE } else { m });
        } else {
            p.iter_mut()
                .zip(m)
                .for_each(|(p, &m)| *p |= if m == MASK_OUTSIDE { 0 } else { m << bit });
        }
    }
}

/// Writes each class of a packed block at the nearest-voxel `index` (moved by `offset`) of the
/// output voxels from `first` on (`pad_value` where the voxel is padding), adding each class's
/// foreground and padding to `tallies` as it goes. Tiles of voxels: one pass of random byte loads, then per class a straight
/// bit-to-float pass that vectorises.
fn unpack_bits(packed: &[u8], index: &[u32], offset: i32, first: usize, pad_value: f32, outs: &mut [&mut [f32]], tallies: &mut [Tally]) {
    const TILE: usize = 256;
    let stream = outs.first().is_some_and(|out| streaming::worth_streaming(out.len()));
    let mut bytes = [0u8; TILE];
    for (t, tile) in index.chunks(TILE).enumerate() {
        let bytes = &mut bytes[..tile.len()];
        for (b, &i) in bytes.iter_mut().zip(tile) {
            let i = (i as i32 + offset) as usize;
            debug_assert!(i < packed.len());
            // SAFETY: the nearest indices (plus the plane's offset) are clamped into the block.
            *b = unsafe { *packed.get_unchecked(i) };
        }
        let at = first + t * TILE;
        for (bit, (out, tally)) in outs.iter_mut().zip(tallies.iter_mut()).enumerate() {
            tally.add(bits_to_floats(bytes, bit as u32, pad_value, &mut out[at..at + tile.len()], stream));
        }
    }
    streaming::store_fence();
}

/// Bit `bit` of each packed byte as 0.0 / 1.0, or `pad_value` where the byte marks padding;
/// returns the ones and the padded voxels (counted in the same pass). Long runs are streamed
/// past the cache when `stream` (a large patch, on a CPU that can: see [`streaming`]; the
/// caller fences), with the same values and counts.
fn bits_to_floats(bytes: &[u8], bit: u32, pad_value: f32, out: &mut [f32], stream: bool) -> Tally {
    #[cfg(target_arch = "x86_64")]
    if stream && bytes.len() >= streaming::STREAMING_MIN {
        // SAFETY: AVX2 is available (checked just above).
        return unsafe { bits_to_floats_streaming(bytes, bit, pad_value, out) };
    }
    bits_to_floats_plain(bytes, bit, pad_value, out)
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn bits_to_floats_plain(bytes: &[u8], bit: u32, pad_value: f32, out: &mut [f32]) -> Tally {
    let (mut ones, mut padded) = (0u32, 0u32);
    for (o, &b) in out.iter_mut().zip(bytes) {
        let pad = b & PACKED_OUTSIDE != 0;
        // A padding byte is exactly PACKED_OUTSIDE: its class bits are clear.
        let one = u32::from(b >> bit & 1);
        ones += one;
        padded += u32::from(pad);
        *o = if pad { pad_value } else { one as f32 };
    }
    let mut tally = Tally {
        foreground: u64::from(ones),
        unknown: 0,
    };
    tally.add(Tally::padding(padded as usize, pad_value));
    tally
}

/// [`bits_to_floats_plain`] eight voxels at a time, the floats written with streaming stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bits_to_floats_streaming(bytes: &[u8], bit: u32, pad_value: f32, out: &mut [f32]) -> Tally {
    use std::arch::x86_64::*;
    let n = bytes.len().min(out.len());
    let head = streaming::unaligned_head(&out[..n]);
    let mut tally = bits_to_floats_plain(&bytes[..head], bit, pad_value, &mut out[..head]);
    let shift = _mm_cvtsi32_si128(bit as i32);
    let low_bit = _mm256_set1_epi32(1);
    let outside = _mm256_set1_epi32(i32::from(PACKED_OUTSIDE));
    let pad = _mm256_set1_ps(pad_value);
    let (mut ones, mut padded) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = head;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices; out + i is 32-byte aligned (after the head,
        // in steps of 8 floats).
        unsafe {
            let values = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().add(i).cast()));
            let one = _mm256_and_si256(_mm256_srl_epi32(values, shift), low_bit);
            let is_pad = _mm256_cmpeq_epi32(_mm256_and_si256(values, outside), outside);
            let floats = _mm256_blendv_ps(_mm256_cvtepi32_ps(one), pad, _mm256_castsi256_ps(is_pad));
            _mm256_stream_ps(out.as_mut_ptr().add(i), floats);
            ones = _mm256_add_epi32(ones, one);
            // A padding lane's mask is -1.
            padded = _mm256_sub_epi32(padded, is_pad);
        }
        i += 8;
    }
    let lanes = |v: __m256i| -> u64 {
        let mut out = [0u32; 8];
        // SAFETY: `out` holds 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        out.iter().map(|&x| u64::from(x)).sum()
    };
    tally.add(Tally {
        foreground: lanes(ones),
        unknown: 0,
    });
    tally.add(Tally::padding(lanes(padded) as usize, pad_value));
    tally.add(bits_to_floats_plain(&bytes[i..n], bit, pad_value, &mut out[i..n]));
    tally
}

/// What a class's patch holds: foreground voxels (value > 0) and unknown ones (NaN), counted
/// while the patch is written (the sample metadata's `foreground_<class>` / `unknown_<class>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Voxels whose value is above 0.
    pub foreground: u64,
    /// Voxels whose value is NaN.
    pub unknown: u64,
}

impl Tally {
    /// Counts a written patch (the paths that do not count as they write).
    pub fn of(values: &[f32]) -> Tally {
        let (mut foreground, mut unknown) = (0u64, 0u64);
        for v in values {
            foreground += u64::from(*v > 0.0);
            unknown += u64::from(v.is_nan());
        }
        Tally { foreground, unknown }
    }

    /// `n` voxels of padding `value`.
    pub fn padding(n: usize, value: f32) -> Tally {
        Tally {
            foreground: if value > 0.0 { n as u64 } else { 0 },
            unknown: if value.is_nan() { n as u64 } else { 0 },
        }
    }

    /// Adds another part's counts.
    pub fn add(&mut self, other: Tally) {
        self.foreground += other.foreground;
        self.unknown += other.unknown;
    }
}

/// Whether the gathered voxels (the rows' spans) of a block that lie in `region` hold a NaN.
fn has_nan(block: &[f32], spans: &[[u32; 2]], block_shape: [usize; 3], region: &FiniteRegion) -> bool {
    let [_, by, bx] = block_shape;
    let rows = (region.lo[0]..region.hi[0]).flat_map(|z| (region.lo[1]..region.hi[1]).map(move |y| z as usize * by + y as usize));
    rows.into_iter().any(|row| {
        let [a, b] = spans[row];
        let (a, b) = ((a as i64).max(region.lo[2]), (b as i64).min(region.hi[2]));
        // OR-reduction rather than a short-circuit so the scan of a row vectorises.
        a < b
            && block[row * bx + a as usize..row * bx + b as usize]
                .iter()
                .fold(false, |seen, v| seen | v.is_nan())
    })
}

/// For each row `(z, y)` of a source block, the x range `[lo, hi)` (block coordinates) of the
/// voxels an output sample's kernel can touch: those whose pre-image under the map lies in the
/// output grid widened by the kernel's reach. A patch turned 45° needs about half of its
/// bounding box, so the rest is neither copied nor converted. A singular map keeps whole rows.
/// A shift widens each span by its reach.
fn row_spans(
    affine: &Affine,
    shift: Option<&SourceShift>,
    out_shape: [usize; 3],
    block_lo: [i64; 3],
    block_shape: [usize; 3],
    interpolation: Interpolation,
) -> Vec<[u32; 2]> {
    let [bz, by, bx] = block_shape;
    let Some(inv) = affine.inverse_linear() else {
        return vec![[0, bx as u32]; bz * by];
    };
    // A touched voxel lies within one source voxel per axis of its sample (trilinear), or half
    // a voxel (nearest); the inverse map turns that into output voxels.
    let reach = match interpolation {
        Interpolation::Linear => 1.0,
        Interpolation::Nearest => 0.5,
    };
    let shift_reach = shift.map_or([0.0; 3], |s| s.reach);
    let margin: [f64; 3] = std::array::from_fn(|k| (0..3).map(|j| inv[k][j].abs() * (reach + shift_reach[j])).sum::<f64>());
    let limits: [(f64, f64); 3] = std::array::from_fn(|k| (-margin[k], out_shape[k] as f64 - 1.0 + margin[k]));
    // Along a row the pre-image moves by g = inv[k][2] per voxel; 1/g once, not per row.
    let flat: [bool; 3] = std::array::from_fn(|k| inv[k][2].abs() < 1e-12);
    let inv_g: [f64; 3] = std::array::from_fn(|k| if flat[k] { 0.0 } else { 1.0 / inv[k][2] });
    let last_x = (bx - 1) as f64;
    let mut spans = Vec::with_capacity(bz * by);
    for z in 0..bz {
        let pz = (block_lo[0] + z as i64) as f64 - affine.b[0];
        for y in 0..by {
            let py = (block_lo[1] + y as i64) as f64 - affine.b[1];
            let px = block_lo[2] as f64 - affine.b[2];
            // Pre-image of source voxel (z, y, x) along the row: o_k = c_k + g_k·x.
            let (mut lo, mut hi) = (0.0f64, last_x);
            for k in 0..3 {
                let c = inv[k][0] * pz + inv[k][1] * py + inv[k][2] * px;
                let (a, b) = limits[k];
                if flat[k] {
                    if c < a - 1e-9 || c > b + 1e-9 {
                        hi = -1.0;
                    }
                } else {
                    let (x0, x1) = ((a - c) * inv_g[k], (b - c) * inv_g[k]);
                    lo = lo.max(x0.min(x1));
                    hi = hi.min(x0.max(x1));
                }
            }
            if lo > hi {
                spans.push([0, 0]);
            } else {
                // A voxel of slack on each side absorbs rounding in the kernels' positions.
                let first = (lo.floor() - 1.0).max(0.0);
                let last = (hi.ceil() + 1.0).min(last_x);
                spans.push([first as u32, last as u32 + 1]);
            }
        }
    }
    spans
}

/// The output-voxel → source-voxel map of a patch read from `level`.
fn patch_affine(level: &Level, spec: &PatchSpec, centre: [f64; 3], draw: &SpatialDraw) -> Affine {
    Affine::compose(
        spec.shape,
        spec.voxel_size,
        centre,
        &draw.orientation(),
        level.voxel_size,
        level.translation,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::augment::rotation_matrix;

    /// Every voxel a kernel reads (trilinear: floor and floor + 1 per axis; nearest: the
    /// rounded position) lies in its row's span, for turned, scaled and anisotropic maps.
    #[test]
    fn row_spans_cover_every_voxel_the_kernels_read() {
        let cases = [
            ([16, 16, 16], [0.0, 0.0, 45.0], [8.0; 3], [8.0; 3]),
            ([12, 20, 9], [13.0, -27.0, 170.0], [8.0; 3], [8.0; 3]),
            ([1, 24, 24], [0.0, 0.0, 33.0], [8.0; 3], [8.0; 3]),
            ([10, 10, 10], [5.0, 60.0, -80.0], [8.0, 8.0, 8.0], [4.0, 4.0, 4.0]),
            ([10, 10, 10], [-15.0, 15.0, 100.0], [4.0, 4.0, 4.0], [16.0, 8.0, 8.0]),
        ];
        for (shape, angles, out_voxel, src_voxel) in cases {
            for interpolation in [Interpolation::Linear, Interpolation::Nearest] {
                let mut affine = Affine::compose(
                    shape,
                    out_voxel,
                    [500.3, 411.7, 390.1],
                    &rotation_matrix(angles),
                    src_voxel,
                    [0.0; 3],
                );
                let spec = PatchSpec::new(shape, out_voxel).unwrap();
                let options = ReadOptions {
                    interpolation,
                    mode: ValueMode::Raw,
                    pad: true,
                    pad_value: 0.0,
                };
                let (lo, block) = source_block(&mut affine, None, [1000; 3], &spec, &options);
                let spans = row_spans(&affine, None, shape, lo, block, interpolation);
                let mut read = 0usize;
                let mut check = |p: [i64; 3]| {
                    let q: [i64; 3] = std::array::from_fn(|k| (p[k] - lo[k]).clamp(0, block[k] as i64 - 1));
                    let [a, b] = spans[q[0] as usize * block[1] + q[1] as usize];
                    assert!(
                        (a as i64..b as i64).contains(&q[2]),
                        "{angles:?} {interpolation:?}: voxel {q:?} outside span [{a}, {b})"
                    );
                    read += 1;
                };
                for o in 0..shape.iter().product::<usize>() {
                    let idx = [
                        (o / (shape[1] * shape[2])) as f64,
                        (o / shape[2] % shape[1]) as f64,
                        (o % shape[2]) as f64,
                    ];
                    let s = affine.apply(idx);
                    match interpolation {
                        Interpolation::Nearest => check(std::array::from_fn(|k| (s[k] + 0.5).floor() as i64)),
                        Interpolation::Linear => {
                            for corner in 0..8 {
                                check(std::array::from_fn(|k| s[k].floor() as i64 + (corner >> k & 1)));
                            }
                        }
                    }
                }
                assert!(read > 0);
                let spanned: u64 = spans.iter().map(|[a, b]| (b - a) as u64).sum();
                let total = block.iter().product::<usize>() as u64;
                assert!(spanned <= total);
                if angles[2] == 45.0 && interpolation == Interpolation::Linear {
                    // The point of the spans: a patch turned 45° needs far less than its box.
                    assert!((spanned as f64) < 0.75 * total as f64, "{spanned} of {total}");
                }
            }
        }
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use crate::format::dtype::DType;
    use crate::format::ngff::CoordinateFrame;
    use crate::sample::augment::rotation_matrix;
    use crate::sample::elastic::ElasticDraw;
    use crate::sample::resample::resample;
    use crate::source::cache::ChunkCache;
    use crate::test_fixtures::{assert_same, c_order, ImageSpec, TempDir};

    const N: usize = 12;
    const VOXEL: f64 = 2.0;

    /// The value written at voxel (z, y, x) of the numbered volume: a linear field, so
    /// trilinear interpolation reproduces it exactly at any position.
    fn field(p: [f64; 3]) -> f64 {
        144.0 * p[0] + 12.0 * p[1] + p[2]
    }

    /// 12³ float32 voxels of 2 nm (corner of voxel 0 at the origin, 4-voxel chunks) holding
    /// `field` of the voxel index.
    fn numbered(dir: &TempDir) -> Volume {
        let path = dir.join("n.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [VOXEL; 3], [N; 3]);
        spec.frame = CoordinateFrame::Corner;
        spec.write(&path, |v| field(v.map(|i| i as f64)) as f32);
        Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Corner).unwrap()
    }

    /// The same grid as uint8 masks: `mask(v)` is 1 where `pattern` holds.
    fn masks(dir: &TempDir, name: &str, pattern: fn([usize; 3]) -> bool) -> Volume {
        let path = dir.join("m.zarr").join(name);
        let mut spec = ImageSpec::new([0.0; 3], [VOXEL; 3], [N; 3]);
        spec.dtype = DType::U8;
        spec.frame = CoordinateFrame::Corner;
        spec.write(&path, |v| f32::from(u8::from(pattern(v))));
        Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Corner).unwrap()
    }

    /// World centre of a patch of `shape` whose voxel 0 lies on source voxel `start`.
    fn centre_at(start: [f64; 3], shape: [usize; 3]) -> [f64; 3] {
        std::array::from_fn(|k| (start[k] + shape[k] as f64 / 2.0) * VOXEL)
    }

    fn options(interpolation: Interpolation, pad: bool) -> ReadOptions {
        ReadOptions {
            interpolation,
            mode: ValueMode::Raw,
            pad,
            pad_value: -5.0,
        }
    }

    fn read(volume: &Volume, shape: [usize; 3], centre: [f64; 3], draw: &SpatialDraw, options: &ReadOptions) -> (Vec<f32>, bool) {
        let spec = PatchSpec::new(shape, [VOXEL; 3]).unwrap();
        let mut out = vec![0f32; spec.len()];
        let info = read_patch(volume, 0, &spec, centre, draw, options, &mut out).unwrap();
        (out, info.fast_path)
    }

    /// The patch of `shape` starting at source voxel `start`, voxels outside the array `pad`.
    fn expected_copy(start: [i64; 3], shape: [usize; 3], pad: f32) -> Vec<f32> {
        c_order(shape, |v| {
            let p: [i64; 3] = std::array::from_fn(|k| start[k] + v[k] as i64);
            if p.iter().all(|&i| (0..N as i64).contains(&i)) {
                field(p.map(|i| i as f64)) as f32
            } else {
                pad
            }
        })
    }

    /// A draw turned by a thousandth of a degree about x: no longer axis-aligned (so it takes
    /// the resampling path) but moving no sample of a small patch by more than 1e-4 voxels.
    fn hair_turn() -> SpatialDraw {
        SpatialDraw {
            angles_deg: [0.0, 0.0, 1e-3],
            ..SpatialDraw::default()
        }
    }

    #[test]
    fn axis_aligned_read_copies_the_voxels_under_the_patch() {
        let dir = TempDir::new("copy");
        let volume = numbered(&dir);
        let shape = [4, 5, 6];
        let (out, fast) = read(
            &volume,
            shape,
            centre_at([2.0, 3.0, 4.0], shape),
            &SpatialDraw::default(),
            &options(Interpolation::Linear, true),
        );
        assert!(fast, "an identity read at the level's voxel size is a copy");
        assert_same(&out, &expected_copy([2, 3, 4], shape, -5.0), "copy");
    }

    #[test]
    fn read_partly_outside_the_array_is_padded() {
        let dir = TempDir::new("pad");
        let volume = numbered(&dir);
        let shape = [4, 4, 4];
        let (out, _) = read(
            &volume,
            shape,
            centre_at([-2.0, 9.0, 0.0], shape),
            &SpatialDraw::default(),
            &options(Interpolation::Linear, true),
        );
        assert_same(&out, &expected_copy([-2, 9, 0], shape, -5.0), "padded copy");
    }

    #[test]
    fn read_without_padding_is_moved_inside_the_array() {
        let dir = TempDir::new("nopad");
        let volume = numbered(&dir);
        let shape = [4, 4, 4];
        let (out, _) = read(
            &volume,
            shape,
            centre_at([-2.0, 9.0, 0.0], shape),
            &SpatialDraw::default(),
            &options(Interpolation::Linear, false),
        );
        // z from -2 up to 0, y from 9 down to 12 - 4 = 8.
        assert_same(&out, &expected_copy([0, 8, 0], shape, -5.0), "moved copy");
    }

    #[test]
    fn mirrored_read_is_the_flipped_plain_read() {
        let dir = TempDir::new("mirror");
        let volume = numbered(&dir);
        let shape = [3, 4, 5];
        let start = [1i64, 2, 3];
        let centre = centre_at(start.map(|s| s as f64), shape);
        for axis in 0..3 {
            let mut draw = SpatialDraw::default();
            draw.mirror[axis] = true;
            let (out, fast) = read(&volume, shape, centre, &draw, &options(Interpolation::Linear, true));
            assert!(fast, "a mirror is a strided copy");
            let expected = c_order(shape, |v| {
                let mut p: [f64; 3] = std::array::from_fn(|k| (start[k] + v[k] as i64) as f64);
                p[axis] = (start[axis] + (shape[axis] - 1 - v[axis]) as i64) as f64;
                field(p) as f32
            });
            assert_same(&out, &expected, &format!("mirrored along axis {axis}"));
        }
    }

    #[test]
    fn transposed_read_is_the_permuted_plain_read() {
        let dir = TempDir::new("transpose");
        let volume = numbered(&dir);
        let shape = [4, 4, 4];
        let start = [3.0, 1.0, 5.0];
        let centre = centre_at(start, shape);
        // Output axis k walks world axis permutation[k]: output (a, b, c) is world (b, c, a).
        let draw = SpatialDraw {
            permutation: [2, 0, 1],
            ..SpatialDraw::default()
        };
        let (out, fast) = read(&volume, shape, centre, &draw, &options(Interpolation::Linear, true));
        assert!(fast, "a transpose is a strided copy");
        let expected = c_order(shape, |[a, b, c]| {
            field([start[0] + b as f64, start[1] + c as f64, start[2] + a as f64]) as f32
        });
        assert_same(&out, &expected, "transposed");
    }

    #[test]
    fn quarter_turn_is_a_copy_of_the_rotated_plain_read() {
        let dir = TempDir::new("quarter");
        let volume = numbered(&dir);
        let shape = [2, 4, 4];
        let start = [4.0, 2.0, 6.0];
        let draw = SpatialDraw {
            angles_deg: [90.0, 0.0, 0.0],
            ..SpatialDraw::default()
        };
        let (out, fast) = read(
            &volume,
            shape,
            centre_at(start, shape),
            &draw,
            &options(Interpolation::Linear, true),
        );
        assert!(fast, "a quarter turn is axis-aligned");
        // About z: the output y axis walks world x, the output x axis walks world -y.
        let expected = c_order(shape, |[a, b, c]| {
            field([start[0] + a as f64, start[1] + (3 - c) as f64, start[2] + b as f64]) as f32
        });
        assert_same(&out, &expected, "quarter turn");
    }

    #[test]
    fn resampling_path_agrees_with_the_copy_for_nearest_reads_padding_included() {
        let dir = TempDir::new("nearest-agree");
        let volume = numbered(&dir);
        let shape = [4, 5, 6];
        let start = [-2i64, 9, 1];
        let centre = centre_at(start.map(|s| s as f64), shape);
        let expected = expected_copy(start, shape, -5.0);
        let (copy, fast) = read(
            &volume,
            shape,
            centre,
            &SpatialDraw::default(),
            &options(Interpolation::Nearest, true),
        );
        assert!(fast);
        assert_same(&copy, &expected, "copy");
        let (turned, fast) = read(&volume, shape, centre, &hair_turn(), &options(Interpolation::Nearest, true));
        assert!(!fast, "a turn off the axes is resampled");
        assert_same(&turned, &expected, "resampled");
    }

    #[test]
    fn resampling_path_agrees_with_the_copy_for_linear_reads_inside_the_array() {
        let dir = TempDir::new("linear-agree");
        let volume = numbered(&dir);
        let shape = [4, 5, 6];
        let start = [3i64, 2, 4];
        let centre = centre_at(start.map(|s| s as f64), shape);
        let (turned, fast) = read(&volume, shape, centre, &hair_turn(), &options(Interpolation::Linear, true));
        assert!(!fast);
        for (i, (t, e)) in turned.iter().zip(expected_copy(start, shape, -5.0)).enumerate() {
            assert!((t - e).abs() < 0.02, "voxel {i}: {t} vs {e}");
        }
    }

    /// Rotated reads of uint8 data (source blocks kept as bytes) equal the reads of the same
    /// values stored as uint16 (float blocks) bit for bit: inside the array, across its edges
    /// with NaN, byte and non-byte padding, linear and nearest, plane-shared and general turns.
    #[test]
    fn uint8_source_blocks_read_what_float_blocks_read() {
        let dir = TempDir::new("u8-blocks");
        let value = |v: [usize; 3]| ((v[0] * 7919 + v[1] * 104_729 + v[2] * 1_299_709) % 256) as f32;
        let open = |name: &str, dtype: DType| {
            let path = dir.join("b.zarr").join(name);
            let mut spec = ImageSpec::new([0.0; 3], [VOXEL; 3], [N; 3]);
            spec.dtype = dtype;
            spec.frame = CoordinateFrame::Corner;
            spec.write(&path, value);
            Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Corner).unwrap()
        };
        let (bytes, words) = (open("u8", DType::U8), open("u16", DType::U16));
        let bits = |v: &[f32]| {
            v.iter()
                .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                .collect::<Vec<_>>()
        };
        // No turn and a quarter turn are copies (uint8 rows put together across chunk seams);
        // the others resample.
        for angles in [
            [0.0, 0.0, 0.0],
            [90.0, 0.0, 0.0],
            [33.0, 0.0, 0.0],
            [-150.0, 0.0, 0.0],
            [17.0, -40.0, 100.0],
        ] {
            let draw = SpatialDraw {
                angles_deg: angles,
                ..SpatialDraw::default()
            };
            if angles == [0.0; 3] {
                assert!(reads_as_copy(
                    &bytes.levels[0],
                    &PatchSpec::new([5, 7, 6], [VOXEL; 3]).unwrap(),
                    [12.0; 3],
                    &draw
                ));
            }
            for centre in [[12.0, 12.0, 12.0], [3.0, 20.0, 5.0], [22.0, 1.0, 23.0]] {
                for pad_value in [f32::NAN, 0.0, 7.0, -5.0, 2.5, -0.0] {
                    for interpolation in [Interpolation::Linear, Interpolation::Nearest] {
                        let options = ReadOptions {
                            interpolation,
                            mode: ValueMode::Raw,
                            pad: true,
                            pad_value,
                        };
                        let (a, _) = read(&bytes, [5, 7, 6], centre, &draw, &options);
                        let (b, _) = read(&words, [5, 7, 6], centre, &draw, &options);
                        assert_eq!(bits(&a), bits(&b), "{angles:?} at {centre:?}, pad {pad_value}, {interpolation:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn linear_resampling_reproduces_a_linear_field_under_rotation() {
        let dir = TempDir::new("rotate");
        let volume = numbered(&dir);
        let shape = [4, 6, 6];
        let centre = [12.0, 12.0, 12.0];
        let angles = [30.0, 20.0, 0.0];
        let draw = SpatialDraw {
            angles_deg: angles,
            ..SpatialDraw::default()
        };
        let (out, fast) = read(&volume, shape, centre, &draw, &options(Interpolation::Linear, true));
        assert!(!fast);
        // World position of output voxel o: centre + R · ((o - (n - 1) / 2) · voxel); its source
        // index is (world - 1 nm) / 2 nm (voxel centres sit at 1, 3, 5, ... nm).
        let r = rotation_matrix(angles);
        let expected = c_order(shape, |o| {
            let offset: [f64; 3] = std::array::from_fn(|k| (o[k] as f64 - (shape[k] as f64 - 1.0) / 2.0) * VOXEL);
            let source: [f64; 3] = std::array::from_fn(|j| {
                let world = centre[j] + (0..3).map(|k| r[j][k] * offset[k]).sum::<f64>();
                (world - VOXEL / 2.0) / VOXEL
            });
            assert!(source.iter().all(|&s| s > 0.0 && s < (N - 1) as f64), "the patch stays inside");
            field(source) as f32
        });
        for (i, (a, e)) in out.iter().zip(&expected).enumerate() {
            assert!((a - e).abs() < 0.02, "voxel {i}: {a} vs {e}");
        }
    }

    #[test]
    fn turned_label_group_read_agrees_with_the_mask_of_each_class() {
        let dir = TempDir::new("labels");
        let even: fn([usize; 3]) -> bool = |[z, y, x]| (z + y + x) % 2 == 0;
        let corner: fn([usize; 3]) -> bool = |[z, y, x]| z < 3 && y < 6 && x >= 4;
        let volumes = [masks(&dir, "even", even), masks(&dir, "corner", corner)];
        let shape = [4, 5, 6];
        let start = [-1i64, 1, 8];
        let centre = centre_at(start.map(|s| s as f64), shape);
        for draw in [SpatialDraw::default(), hair_turn()] {
            let outs = label_group_read(&volumes, shape, centre, &draw);
            for (out, pattern, name) in [(&outs[0], even, "even"), (&outs[1], corner, "corner")] {
                let expected = c_order(shape, |v| {
                    let p: [i64; 3] = std::array::from_fn(|k| start[k] + v[k] as i64);
                    if p.iter().all(|&i| (0..N as i64).contains(&i)) {
                        f32::from(u8::from(pattern(p.map(|i| i as usize))))
                    } else {
                        f32::NAN
                    }
                });
                assert_same(out, &expected, &format!("{name} with {:?}", draw.angles_deg));
            }
        }
    }

    /// Maps that keep z planes apart (rotations about z, in-plane mirrors and transposes, a z
    /// mirror or zoom) share in-plane work between output planes; the values are the per-row
    /// kernels' bit for bit: trilinear raw with NaN padding at every edge, nearest labels.
    #[test]
    fn shared_plane_reads_equal_the_per_row_kernels_bit_for_bit() {
        let dir = TempDir::new("planes");
        let path = dir.join("r.zarr").join("raw");
        let mut image = ImageSpec::new([0.0; 3], [VOXEL; 3], [N; 3]);
        image.frame = CoordinateFrame::Corner;
        // An irregular field: a kernel that mixed its terms differently would round differently.
        image.write(&path, |[z, y, x]| {
            ((z * 7919 + y * 104_729 + x * 1299) % 1013) as f32 * 0.37 + 1.0 / (1 + x + y) as f32
        });
        let raw = Volume::open_in_frame(&path, ChunkCache::global(), CoordinateFrame::Corner).unwrap();
        let labels = [
            masks(&dir, "a", |[z, y, x]| (z + 2 * y + 3 * x) % 4 == 0),
            masks(&dir, "b", |[z, y, _]| z > 5 && y < 7),
        ];
        let group: Vec<(&Volume, usize)> = labels.iter().map(|v| (v, 0)).collect();
        let mut checked = 0;
        for (case, angle) in [0.0, 17.0, -133.0, 90.0, 45.0, 180.0].iter().enumerate() {
            for (mirror, permutation, zoom) in [
                ([false; 3], [0, 1, 2], [1.0; 3]),
                ([true, false, true], [0, 2, 1], [1.0; 3]),
                ([false, true, false], [0, 1, 2], [0.7, 1.0, 1.0]),
                ([true, true, true], [0, 2, 1], [1.3, 0.9, 1.1]),
            ] {
                let draw = SpatialDraw {
                    mirror,
                    permutation,
                    angles_deg: [*angle, 0.0, 0.0],
                    zoom,
                    ..SpatialDraw::default()
                };
                for (shape, centre) in [
                    ([7, 9, 8], [12.0, 12.0, 12.0]),
                    ([5, 6, 11], [3.0, 20.0, -1.0]),
                    ([9, 4, 4], [23.0, 2.0, 15.0]),
                ] {
                    let spec = PatchSpec::new(shape, [VOXEL; 3]).unwrap();
                    let lvl = &raw.levels[0];
                    if !patch_affine(lvl, &spec, centre, &draw).plane_separable() {
                        continue;
                    }
                    checked += 1;
                    let raw_options = ReadOptions {
                        interpolation: Interpolation::Linear,
                        mode: ValueMode::Raw,
                        pad: true,
                        pad_value: f32::NAN,
                    };
                    let label_options = ReadOptions {
                        interpolation: Interpolation::Nearest,
                        mode: ValueMode::Foreground,
                        pad: true,
                        pad_value: f32::NAN,
                    };
                    let read_all = || {
                        let mut values = vec![0f32; spec.len()];
                        read_patch(&raw, 0, &spec, centre, &draw, &raw_options, &mut values).unwrap();
                        let mut masks = vec![vec![0f32; spec.len()]; 2];
                        let mut outs: Vec<&mut [f32]> = masks.iter_mut().map(|m| m.as_mut_slice()).collect();
                        read_patch_group(&group, &spec, centre, &draw, &label_options, &mut outs).unwrap();
                        (values, masks)
                    };
                    let (shared, shared_masks) = read_all();
                    let (rows, row_masks) = crate::sample::resample::without_shared_planes(read_all);
                    let context = format!("case {case}, {draw:?}, shape {shape:?}, centre {centre:?}");
                    assert!(
                        shared.iter().any(|v| v.is_nan()) || centre == [12.0; 3],
                        "{context}: edge cases pad"
                    );
                    assert_same(&shared, &rows, &context);
                    for (a, b) in shared_masks.iter().zip(&row_masks) {
                        assert_same(a, b, &context);
                    }
                }
            }
        }
        assert!(checked >= 40, "{checked} separable reads checked");
    }

    /// A crop held in the label cache reads, bit for bit, what its chunks read: nine classes (two
    /// planes), plain, mirrored, transposed, turned, zoomed and deformed patches, centred inside,
    /// across the edge and wholly outside the crop, padded or moved inside.
    #[test]
    fn held_crops_read_what_their_chunks_read_bit_for_bit() {
        use crate::source::label_cache::PackedLabels;
        let dir = TempDir::new("held");
        let patterns: [fn([usize; 3]) -> bool; 9] = [
            |[z, y, x]| (z + y + x) % 2 == 0,
            |[z, y, x]| z < 3 && y < 6 && x >= 4,
            |[z, _, _]| z % 3 == 1,
            |[_, y, _]| y > 7,
            |[z, y, x]| (z * 7 + y * 3 + x) % 5 < 2,
            |[_, _, x]| x == 0 || x == N - 1,
            |[z, y, _]| z == y,
            |_| true,
            |_| false,
        ];
        let volumes: Vec<Volume> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| masks(&dir, &format!("c{i}"), *p))
            .collect();
        let group: Vec<(&Volume, usize)> = volumes.iter().map(|v| (v, 0)).collect();
        let crop = PackedLabels::build(&group, &std::sync::atomic::AtomicU64::new(0)).unwrap();
        assert_eq!((crop.planes.len(), crop.nbytes()), (2, 2 * N * N * N));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        for case in 0..240 {
            let shape = [1 + next(7) as usize, 1 + next(9) as usize, 1 + next(8) as usize];
            let draw = SpatialDraw {
                mirror: [next(2) == 1, next(2) == 1, next(2) == 1],
                permutation: [[0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]][next(4) as usize],
                angles_deg: match case % 4 {
                    0 => [0.0; 3],
                    1 => [0.0, 0.0, next(360) as f64 - 180.0],
                    _ => [next(60) as f64 - 30.0, next(60) as f64 - 30.0, next(360) as f64],
                },
                zoom: if case % 5 == 0 { [1.0, 1.25, 0.8] } else { [1.0; 3] },
                elastic: (case % 6 == 5).then(|| elastic(next(1000), 0.8)),
                ..SpatialDraw::default()
            };
            // From wholly inside to far outside the crop (which spans 0..24 nm per axis).
            let reach = [20.0, 40.0, 400.0][case % 3];
            let centre: [f64; 3] = std::array::from_fn(|_| next((2.0 * reach) as u64) as f64 - reach / 2.0 + 12.0);
            for pad in [true, false] {
                let spec = PatchSpec::new(shape, [VOXEL; 3]).unwrap();
                let options = ReadOptions {
                    interpolation: Interpolation::Nearest,
                    mode: ValueMode::Foreground,
                    pad,
                    pad_value: f32::NAN,
                };
                let mut from_chunks = vec![vec![0f32; spec.len()]; patterns.len()];
                let mut held = vec![vec![0f32; spec.len()]; patterns.len()];
                let mut a: Vec<&mut [f32]> = from_chunks.iter_mut().map(|o| o.as_mut_slice()).collect();
                let tallies_from_chunks = read_patch_group(&group, &spec, centre, &draw, &options, &mut a).unwrap();
                let mut b: Vec<&mut [f32]> = held.iter_mut().map(|o| o.as_mut_slice()).collect();
                let tallies = read_packed_group(&crop, &volumes[0].levels[0], &spec, centre, &draw, &options, &mut b).unwrap();
                for (c, (x, y)) in held.iter().zip(&from_chunks).enumerate() {
                    let context = format!("case {case}, class {c}, pad {pad}, centre {centre:?}, {draw:?}");
                    assert_same(x, y, &context);
                    // Counted while written: what a pass over the written patch counts.
                    assert_eq!(tallies[c], Tally::of(x), "{context}");
                    assert_eq!(tallies_from_chunks[c], Tally::of(y), "{context}");
                }
            }
        }
    }

    #[test]
    fn mirrored_read_of_a_half_voxel_offset_patch_is_the_flipped_plain_read() {
        let dir = TempDir::new("mirror-half");
        let volume = numbered(&dir);
        let shape = [1, 1, 4];
        // Voxel 0 of the patch half-way between source voxels -2 and -1 (x); the plain read
        // snaps it to one of them, and the mirrored read must cover the same four voxels.
        let centre = centre_at([5.0, 5.0, -1.5], shape);
        let opts = options(Interpolation::Linear, true);
        let (plain, _) = read(&volume, shape, centre, &SpatialDraw::default(), &opts);
        let draw = SpatialDraw {
            mirror: [false, false, true],
            ..SpatialDraw::default()
        };
        let (mirrored, _) = read(&volume, shape, centre, &draw, &opts);
        let flipped: Vec<f32> = plain.iter().rev().copied().collect();
        assert_same(&mirrored, &flipped, "mirrored vs flipped plain");
    }

    fn elastic(seed: u64, sigma: f64) -> ElasticDraw {
        ElasticDraw {
            seed,
            spacing: [8.0, 6.0, 10.0],
            sigma: [sigma; 3],
        }
    }

    /// The label group read (level 0 of each volume, NaN padding) of a patch of `shape`.
    fn label_group_read(volumes: &[Volume], shape: [usize; 3], centre: [f64; 3], draw: &SpatialDraw) -> Vec<Vec<f32>> {
        let spec = PatchSpec::new(shape, [VOXEL; 3]).unwrap();
        let label_options = ReadOptions {
            interpolation: Interpolation::Nearest,
            mode: ValueMode::Foreground,
            pad: true,
            pad_value: f32::NAN,
        };
        let mut outs = vec![vec![0f32; spec.len()]; volumes.len()];
        let group: Vec<(&Volume, usize)> = volumes.iter().map(|v| (v, 0)).collect();
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        read_patch_group(&group, &spec, centre, draw, &label_options, &mut slices).unwrap();
        outs
    }

    #[test]
    fn zero_amplitude_elastic_read_equals_the_affine_read_bit_for_bit() {
        let dir = TempDir::new("elastic-zero");
        let volume = numbered(&dir);
        let labels = [masks(&dir, "even", |[z, y, x]| (z + y + x) % 2 == 0)];
        let shape = [5, 6, 7];
        let centre = [11.0, 12.5, 13.0];
        for angles in [[0.0, 0.0, 0.0], [20.0, -35.0, 70.0]] {
            let plain = SpatialDraw {
                angles_deg: angles,
                ..SpatialDraw::default()
            };
            let deformed = SpatialDraw {
                elastic: Some(elastic(3, 0.0)),
                ..plain
            };
            for interpolation in [Interpolation::Linear, Interpolation::Nearest] {
                let (a, _) = read(&volume, shape, centre, &plain, &options(interpolation, true));
                let (b, _) = read(&volume, shape, centre, &deformed, &options(interpolation, true));
                assert_same(&b, &a, &format!("{angles:?} {interpolation:?}"));
            }
            assert_same(
                &label_group_read(&labels, shape, centre, &deformed)[0],
                &label_group_read(&labels, shape, centre, &plain)[0],
                &format!("labels {angles:?}"),
            );
        }
    }

    #[test]
    fn zero_shift_changes_no_bit_and_constant_shift_equals_a_shifted_read() {
        let shape = [6usize, 7, 8];
        let block_shape = [14usize, 15, 16];
        let block: Vec<f32> = (0..block_shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 251) as f32)
            .collect();
        let affine = Affine::compose(
            shape,
            [VOXEL; 3],
            [14.0, 15.0, 16.0],
            &rotation_matrix([10.0, 20.0, 30.0]),
            [VOXEL; 3],
            [1.0; 3],
        );
        let d = [1.25f32, -0.75, 2.125];
        let len: usize = shape.iter().product();
        let shift = SourceShift {
            shift: d.map(|v| vec![v; len]),
            reach: d.map(|v| f64::from(v.abs())),
        };
        let moved = Affine {
            m: affine.m,
            b: std::array::from_fn(|k| affine.b[k] + f64::from(d[k])),
        };
        let zero = SourceShift {
            shift: [vec![0.0; len], vec![0.0; len], vec![0.0; len]],
            reach: [0.0; 3],
        };
        for interpolation in [Interpolation::Linear, Interpolation::Nearest] {
            // A zero shift through the shifted kernels changes no bit (NaN-aware and fast rows).
            for finite in [None, Some(FiniteRegion::whole(block_shape))] {
                let mut with_zero = vec![0f32; len];
                let mut plain = vec![0f32; len];
                resample(
                    &block,
                    block_shape,
                    [0; 3],
                    &affine,
                    Some(&zero),
                    shape,
                    interpolation,
                    finite,
                    &mut with_zero,
                );
                resample(&block, block_shape, [0; 3], &affine, None, shape, interpolation, finite, &mut plain);
                assert_same(&with_zero, &plain, &format!("zero shift {interpolation:?} {finite:?}"));
            }
            let mut shifted = vec![0f32; len];
            let mut expected = vec![0f32; len];
            let whole = Some(FiniteRegion::whole(block_shape));
            resample(
                &block,
                block_shape,
                [0; 3],
                &affine,
                Some(&shift),
                shape,
                interpolation,
                whole,
                &mut shifted,
            );
            resample(
                &block,
                block_shape,
                [0; 3],
                &moved,
                None,
                shape,
                interpolation,
                whole,
                &mut expected,
            );
            for (i, (a, e)) in shifted.iter().zip(&expected).enumerate() {
                assert!((a - e).abs() <= 1e-3 * e.abs().max(1.0), "{interpolation:?} voxel {i}: {a} vs {e}");
            }
        }
    }

    /// A deformed read of a linear field gives the field at each displaced position: the
    /// displacement is applied in the right frame, and the gathered block covers every voxel the
    /// kernel reaches (debug builds fill the scratch block with NaN, which would show here).
    #[test]
    fn deformed_read_samples_the_displaced_positions_and_gathers_all_it_touches() {
        let dir = TempDir::new("elastic-reach");
        let volume = numbered(&dir);
        let shape = [6, 6, 6];
        let centre = [12.0; 3];
        let mut moved_far = false;
        for seed in 0..6 {
            let draw = SpatialDraw {
                elastic: Some(elastic(seed, 1.6)),
                ..SpatialDraw::default()
            };
            let displacement = draw.elastic.unwrap().field_nm(shape, [VOXEL; 3]);
            let (out, _) = read(&volume, shape, centre, &draw, &options(Interpolation::Linear, true));
            for (o, value) in out.iter().enumerate() {
                let index = [o / 36, o / 6 % 6, o % 6];
                // World position: centre + voxel offset + displacement (no rotation here).
                let source: [f64; 3] = std::array::from_fn(|k| {
                    let world = centre[k] + (index[k] as f64 - 2.5) * VOXEL + f64::from(displacement[k][o]);
                    (world - VOXEL / 2.0) / VOXEL
                });
                moved_far |= displacement.iter().any(|f| f[o].abs() > VOXEL as f32);
                assert!(source.iter().all(|s| *s > 0.0 && *s < (N - 1) as f64));
                let expected = field(source);
                assert!(!value.is_nan(), "seed {seed} voxel {o}: an ungathered voxel was read");
                assert!(
                    (f64::from(*value) - expected).abs() < 0.05,
                    "seed {seed} voxel {o}: {value} vs {expected}"
                );
            }
        }
        assert!(moved_far, "some field moves voxels by more than one voxel");
    }

    #[test]
    fn deformed_labels_stay_labels_and_follow_the_raw() {
        let dir = TempDir::new("elastic-labels");
        let volume = numbered(&dir);
        // The label is a threshold of the raw field: where the raw exceeds 800.
        let labels = [masks(&dir, "high", |[z, y, x]| field([z as f64, y as f64, x as f64]) > 800.0)];
        let shape = [6, 6, 6];
        let centre = [12.0; 3];
        for seed in 0..4 {
            let draw = SpatialDraw {
                angles_deg: [0.0, 0.0, 25.0],
                elastic: Some(elastic(seed, 2.0)),
                ..SpatialDraw::default()
            };
            let (raw, _) = read(&volume, shape, centre, &draw, &options(Interpolation::Nearest, true));
            let label = &label_group_read(&labels, shape, centre, &draw)[0];
            for (r, l) in raw.iter().zip(label) {
                assert!(*l == 0.0 || *l == 1.0, "a label value {l}");
                assert_eq!(*l == 1.0, f64::from(*r) > 800.0, "label and raw disagree: {l} vs {r}");
            }
        }
    }

    #[test]
    fn streamed_bits_equal_the_plain_loop_bit_for_bit() {
        // Bytes with every class bit pattern and padding bytes, at every offset and length
        // around the streaming threshold and the cache-line boundaries.
        let bytes: Vec<u8> = (0..700u32)
            .map(|i| {
                if i % 11 == 3 {
                    PACKED_OUTSIDE
                } else {
                    (i.wrapping_mul(2_654_435_761) >> 9) as u8 & 0x7f
                }
            })
            .collect();
        for bit in 0..PACKED_CLASSES as u32 {
            for pad_value in [f32::NAN, 0.0, 2.5] {
                for (start, len) in [(0, 0), (3, 5), (0, 31), (1, 32), (5, 33), (13, 64), (0, 300), (7, 650)] {
                    let mut plain = vec![-1.0f32; 700];
                    let mut streamed = vec![-1.0f32; 700];
                    let t_plain = bits_to_floats_plain(&bytes[start..start + len], bit, pad_value, &mut plain[start..start + len]);
                    let t_streamed = bits_to_floats(&bytes[start..start + len], bit, pad_value, &mut streamed[start..start + len], true);
                    streaming::store_fence();
                    assert_eq!(t_plain, t_streamed, "bit {bit} start {start} len {len}");
                    let same = plain.iter().zip(&streamed).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "bit {bit} pad {pad_value} start {start} len {len}");
                }
            }
        }
    }
}
