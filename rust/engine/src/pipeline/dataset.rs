//! One training dataset: a raw volume plus one crop's per-class label volumes, the arrays
//! requested from them, the boxes where samples may be centred, and the per-sample read.

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::{tile_starts, WorldBox, AXES, MAX_VOXEL_COORDINATE};
use crate::io::location::Location;
use crate::pipeline::values::ValuePipeline;
use crate::sample::augment::{Interpolation, SpatialConfig, SpatialDraw, SpatialJson};
use crate::sample::extract::{
    read_packed_group, read_patch, read_patch_group, reads_as_copy, source_region, PatchSpec, ReadOptions, Tally,
};
use crate::source::cache::ChunkCache;
use crate::source::label_cache::LabelCache;
use crate::source::streaming;
use crate::source::volume::{ValueMode, Volume};
use serde::Deserialize;

/// Whether a crop labels a requested class (the sample metadata's `annotated_<class>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Annotation {
    /// The crop labels it.
    Annotated,
    /// Not labelled, but exclusive with labelled classes: 0 where they are present, else NaN.
    Inferred,
    /// Not labelled: NaN everywhere.
    Unknown,
}

impl Annotation {
    /// The table's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Annotation::Annotated => "annotated",
            Annotation::Inferred => "inferred",
            Annotation::Unknown => "unknown",
        }
    }
}

/// What reading one sample found besides its values: per output whether every value is finite,
/// and per target array and class (target-major) the foreground and unknown voxels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleRead {
    /// Per output (inputs, then targets): every value finite.
    pub finite: Vec<bool>,
    /// Per target array and class: foreground and unknown voxels of the delivered patch.
    pub tallies: Vec<Tally>,
}

/// Identity of a level's voxel grid (voxel size, origin, shape): levels with equal keys map
/// world positions to the same voxel indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GridKey([u64; 9]);

impl GridKey {
    fn of(level: &crate::source::volume::Level) -> GridKey {
        let mut k = [0u64; 9];
        for a in 0..3 {
            k[a] = level.voxel_size[a].to_bits();
            k[3 + a] = level.translation[a].to_bits();
            k[6 + a] = level.shape[a];
        }
        GridKey(k)
    }
}

/// A named array request (`input_arrays` / `target_arrays` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct ArraySpec {
    /// Key of the array in each sample.
    pub name: String,
    /// Shape and voxel size.
    pub patch: PatchSpec,
}

/// Where one requested class comes from in this crop.
#[derive(Debug, Clone)]
pub enum ClassSource {
    /// Annotated: a label volume.
    Annotated(Arc<Volume>),
    /// Not annotated in this crop, but mutually exclusive with classes that are: NaN except
    /// where one of those is present, which is a true negative (0).
    Inferred(Vec<Arc<Volume>>),
    /// Not annotated in this crop: all NaN.
    Empty,
}

/// Everything needed to open a dataset.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    /// Display name (defaults to the raw path).
    pub label: Option<String>,
    /// Crop label (e.g. the label group path), recorded with every sample.
    pub crop: String,
    /// Raw multiscale group.
    pub raw_path: Location,
    /// Requested classes with the label group of each annotated one (`None` = unannotated).
    pub classes: Vec<(String, Option<Location>)>,
    /// Per requested class, label groups of annotated classes mutually exclusive with it
    /// (used only when the class itself is not annotated).
    pub exclusive_with: Vec<Vec<Location>>,
    /// Input arrays (read from raw).
    pub inputs: Vec<ArraySpec>,
    /// Target arrays (one channel per class).
    pub targets: Vec<ArraySpec>,
    /// Whether patches may extend outside the data (padded) or must stay inside.
    pub pad: bool,
    /// Value of raw voxels outside the raw volume.
    pub raw_pad_value: f32,
    /// Raw interpolation for resampled reads.
    pub raw_interpolation: Interpolation,
    /// Spatial augmentation.
    pub spatial: SpatialConfig,
    /// Ship targets as uint8 (0, 1, 255 = unknown) instead of float32.
    pub compact_targets: bool,
    /// Value transforms of every input array.
    pub raw_values: ValuePipeline,
    /// Value transforms of every target array.
    pub target_values: TargetValues,
}

/// The value transforms of target arrays: one pipeline for every class, or one per class (the
/// `{class: transform}` form). Either way each class's channel is transformed on its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetValues {
    /// The same pipeline for every class's channel.
    Whole(ValuePipeline),
    /// One pipeline per requested class, on that class's channel.
    PerClass(Vec<ValuePipeline>),
}

impl Default for TargetValues {
    fn default() -> Self {
        TargetValues::Whole(ValuePipeline::default())
    }
}

impl TargetValues {
    /// Whether no target value transform runs in the engine.
    pub fn is_empty(&self) -> bool {
        match self {
            TargetValues::Whole(p) => p.is_empty(),
            TargetValues::PerClass(ps) => ps.iter().all(ValuePipeline::is_empty),
        }
    }
}

/// Stream ids of value-transform draws: inputs count from 0, targets from here.
const TARGET_STREAM: u64 = 1 << 20;

/// An opened dataset.
pub struct Dataset {
    /// Its configuration.
    pub config: DatasetConfig,
    /// The raw volume.
    pub raw: Arc<Volume>,
    /// Per requested class, its source.
    pub sources: Vec<ClassSource>,
    /// Level of the raw volume used by each input array.
    pub input_levels: Vec<usize>,
    /// Per target array, per class, the label level used (None for Empty classes).
    pub target_levels: Vec<Vec<Option<usize>>>,
    /// Intersection of the raw and annotated label boxes.
    pub bounding_box: WorldBox,
    /// Box of valid sample centres (`None`: no patch fits and `pad` is false).
    pub sampling_box: Option<WorldBox>,
    /// Sample grid: count per axis and spacing (nm).
    pub grid: [usize; 3],
    grid_step: [f64; 3],
    /// Singleton axis shared by every array (2D patches), if any.
    pub planar_axis: Option<usize>,
    /// Where the crop's label classes are held decoded (see [`LabelCache`]).
    labels: Arc<LabelCache>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("raw", &self.config.raw_path)
            .field("len", &self.len())
            .finish()
    }
}

impl Dataset {
    /// Opens the raw and label volumes and checks the request against them.
    pub fn open(config: DatasetConfig, cache: Arc<ChunkCache>) -> Result<Dataset> {
        if config.inputs.is_empty() {
            return Err(Error::invalid("input_arrays is empty: at least one input array is required"));
        }
        let raw = Arc::new(Volume::open(&config.raw_path, cache.clone())?);
        let mut sources = Vec::with_capacity(config.classes.len());
        let open_labels = |class: &str, p: &Location| -> Result<Arc<Volume>> {
            let vol = Volume::open(p, cache.clone()).map_err(|e| match e {
                Error::NotFound { path, .. } => Error::NotFound {
                    path,
                    detail: format!(" (label folder of class '{class}')"),
                },
                other => other,
            })?;
            if vol.levels.iter().any(|l| l.dtype.is_float()) {
                return Err(Error::metadata(
                    &vol.path,
                    format!("class '{class}': labels must be integer masks or instance ids, not floating point"),
                ));
            }
            Ok(Arc::new(vol))
        };
        for (c, (class, path)) in config.classes.iter().enumerate() {
            let related = config.exclusive_with.get(c).map(Vec::as_slice).unwrap_or_default();
            if path.is_none() && !related.is_empty() {
                let volumes = related.iter().map(|p| open_labels(class, p)).collect::<Result<Vec<_>>>()?;
                sources.push(ClassSource::Inferred(volumes));
                continue;
            }
            sources.push(match path {
                Some(p) => ClassSource::Annotated(open_labels(class, p)?),
                None => ClassSource::Empty,
            });
        }
        let input_levels = config.inputs.iter().map(|a| raw.pick_level(a.patch.voxel_size)).collect();
        let target_levels = config
            .targets
            .iter()
            .map(|a| {
                sources
                    .iter()
                    .map(|s| match s {
                        ClassSource::Annotated(v) => Some(v.pick_level(a.patch.voxel_size)),
                        ClassSource::Inferred(_) | ClassSource::Empty => None,
                    })
                    .collect()
            })
            .collect();

        let mut bbox = raw.levels[0].world_box();
        for ((class, _), source) in config.classes.iter().zip(&sources) {
            if let ClassSource::Annotated(v) = source {
                bbox = bbox.intersect(&v.levels[0].world_box()).ok_or_else(|| {
                    Error::invalid(format!(
                        "labels of class '{class}' at {} do not overlap the raw volume {}",
                        v.path, raw.path
                    ))
                })?;
            }
        }
        let all_arrays: Vec<&ArraySpec> = config.inputs.iter().chain(&config.targets).collect();
        let mut patch_size = [0.0f64; 3];
        for a in &all_arrays {
            let s = a.patch.world_size();
            for k in 0..3 {
                patch_size[k] = patch_size[k].max(s[k]);
            }
        }
        // Every array's voxel arithmetic must stay exact over the data's box (metadata with an
        // absurd translation or voxel size is rejected here rather than overflowing later).
        for a in &all_arrays {
            for (k, axis) in AXES.iter().enumerate() {
                let reach = bbox.lo[k].abs().max(bbox.hi[k].abs());
                let far = reach / a.patch.voxel_size[k];
                if far.is_nan() || far >= MAX_VOXEL_COORDINATE {
                    return Err(Error::invalid(format!(
                        "array '{}': the data ({} and its labels) reaches {reach:e} nm on axis '{axis}', {far:e} of its {} nm voxels from the origin; at most 2^52 are supported",
                        a.name,
                        raw.path,
                        a.patch.voxel_size[k]
                    )));
                }
            }
        }
        let (centres, fits) = bbox.centres_for_patch(patch_size);
        let sampling_box = (config.pad || fits.iter().all(|f| *f)).then_some(centres);
        // Samples lie on a grid at the first target's (else first input's) voxel size.
        let grid_array = config.targets.first().unwrap_or(&config.inputs[0]);
        let grid_step = grid_array.patch.voxel_size;
        let grid = match &sampling_box {
            Some(b) => std::array::from_fn(|k| ((b.hi[k] - b.lo[k]) / grid_step[k] + 1e-9).floor() as usize + 1),
            None => [0; 3],
        };
        let planar_axis = (0..3).find(|&k| all_arrays.iter().all(|a| a.patch.shape[k] == 1));
        Ok(Dataset {
            config,
            raw,
            sources,
            input_levels,
            target_levels,
            bounding_box: bbox,
            sampling_box,
            grid,
            grid_step,
            planar_axis,
            labels: LabelCache::global(),
        })
    }

    /// Number of grid samples.
    pub fn len(&self) -> usize {
        self.grid.iter().product()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Indices of the samples whose grid positions step by `step` per axis, the last on each
    /// axis moved to the far end (never dropped): patches of `step` grid positions centred on
    /// them cover the whole sampling grid. Uses the one tiling rule, [`tile_starts`].
    pub fn tile_indices(&self, step: [usize; 3]) -> Vec<u64> {
        if self.is_empty() {
            return Vec::new();
        }
        let positions: [Vec<u64>; 3] = std::array::from_fn(|k| {
            let step = step[k].max(1);
            // Tiles of `step` positions over `grid - 1 + step` positions start at the centres.
            tile_starts((self.grid[k] - 1 + step) as u64, step, 0)
                .into_iter()
                .map(|s| s.max(0) as u64)
                .collect()
        });
        let g = self.grid.map(|n| n as u64);
        let mut out = Vec::with_capacity(positions.iter().map(Vec::len).product());
        for &z in &positions[0] {
            for &y in &positions[1] {
                for &x in &positions[2] {
                    out.push((z * g[1] + y) * g[2] + x);
                }
            }
        }
        out
    }

    /// World centre of grid sample `index` (centred grid over the sampling box).
    pub fn centre(&self, index: usize) -> Result<[f64; 3]> {
        let b = self
            .sampling_box
            .ok_or_else(|| Error::invalid(format!("{}: no sample fits in this dataset (pad=False)", self.config.raw_path)))?;
        if index >= self.len() {
            return Err(Error::invalid(format!(
                "sample index {index} is out of range for a dataset of {} samples",
                self.len()
            )));
        }
        let idx = [
            index / (self.grid[1] * self.grid[2]),
            (index / self.grid[2]) % self.grid[1],
            index % self.grid[2],
        ];
        Ok(std::array::from_fn(|k| {
            let used = (self.grid[k] - 1) as f64 * self.grid_step[k];
            b.lo[k] + (b.hi[k] - b.lo[k] - used) / 2.0 + idx[k] as f64 * self.grid_step[k]
        }))
    }

    /// Whether each requested class is annotated (has a label volume) in this crop.
    pub fn annotated_classes(&self) -> Vec<bool> {
        self.sources.iter().map(|s| matches!(s, ClassSource::Annotated(_))).collect()
    }

    /// Per requested class, whether this crop labels it.
    pub fn annotation(&self) -> Vec<Annotation> {
        self.sources
            .iter()
            .map(|s| match s {
                ClassSource::Annotated(_) => Annotation::Annotated,
                ClassSource::Inferred(_) => Annotation::Inferred,
                ClassSource::Empty => Annotation::Unknown,
            })
            .collect()
    }

    /// Number of target channels (requested classes).
    pub fn n_classes(&self) -> usize {
        self.sources.len()
    }

    /// How raw arrays and label arrays are read.
    fn read_options(&self) -> (ReadOptions, ReadOptions) {
        let raw = ReadOptions {
            interpolation: self.config.raw_interpolation,
            mode: ValueMode::Raw,
            pad: self.config.pad,
            pad_value: self.config.raw_pad_value,
        };
        let labels = ReadOptions {
            interpolation: Interpolation::Nearest,
            mode: ValueMode::Foreground,
            pad: self.config.pad,
            pad_value: f32::NAN,
        };
        (raw, labels)
    }

    /// Whether any of the dataset's volumes reads ahead (is read from an object store).
    pub fn reads_ahead(&self) -> bool {
        self.raw.reads_ahead()
            || self.sources.iter().any(|s| match s {
                ClassSource::Annotated(v) => v.reads_ahead(),
                ClassSource::Inferred(vs) => vs.iter().any(|v| v.reads_ahead()),
                ClassSource::Empty => false,
            })
    }

    /// Starts the requests for the chunks one sample will read (remote volumes only), so that
    /// a batch's requests are in flight together.
    pub fn prefetch_sample(&self, centre: [f64; 3], draw: &SpatialDraw) {
        let request = |volume: &Volume, level: usize, spec: &ArraySpec, options: &ReadOptions| {
            if !volume.reads_ahead() {
                return;
            }
            if let Some(region) = source_region(volume, level, &spec.patch, centre, draw, options) {
                volume.prefetch(
                    level,
                    crate::geometry::chunks_meeting(region, volume.levels[level].chunk_shape.map(|c| c as usize)),
                );
            }
        };
        let (raw_options, label_options) = self.read_options();
        for (i, spec) in self.config.inputs.iter().enumerate() {
            request(&self.raw, self.input_levels[i], spec, &raw_options);
        }
        for (t, spec) in self.config.targets.iter().enumerate() {
            for (c, source) in self.sources.iter().enumerate() {
                match source {
                    ClassSource::Annotated(vol) => {
                        if let Some(level) = self.target_levels[t][c] {
                            request(vol, level, spec, &label_options);
                        }
                    }
                    ClassSource::Inferred(related) => {
                        for vol in related {
                            request(vol, vol.pick_level(spec.patch.voxel_size), spec, &label_options);
                        }
                    }
                    ClassSource::Empty => {}
                }
            }
        }
    }

    /// Reads every array of one sample into `outputs` (inputs first, then targets; each
    /// target buffer holds `n_classes` channels). Returns, per output, whether every value read
    /// is finite (see [`ReadInfo::finite`](crate::sample::extract::ReadInfo); targets: false), and per
    /// target array and class (target-major) its foreground and unknown voxels, counted as the
    /// labels were written.
    pub fn read_sample(&self, centre: [f64; 3], draw: &SpatialDraw, outputs: &mut [&mut [f32]]) -> Result<SampleRead> {
        let n_inputs = self.config.inputs.len();
        let (raw_options, label_options) = self.read_options();
        let (input_bufs, target_bufs) = outputs.split_at_mut(n_inputs);
        let mut finite: Vec<bool> = input_bufs
            .par_iter_mut()
            .enumerate()
            .map(|(i, buf)| {
                let spec = &self.config.inputs[i];
                let level = self.input_levels[i];
                let options = self.copy_padding(level, &spec.patch, centre, draw, raw_options);
                read_patch(&self.raw, level, &spec.patch, centre, draw, &options, buf).map(|info| info.finite)
            })
            .collect::<Result<_>>()?;
        finite.resize(n_inputs + target_bufs.len(), false);
        let n_classes = self.sources.len();
        let mut tallies = vec![Tally::default(); target_bufs.len() * n_classes];
        for (t, buf) in target_bufs.iter_mut().enumerate() {
            let spec = &self.config.targets[t];
            let n = spec.patch.len();
            let tallies = &mut tallies[t * n_classes..(t + 1) * n_classes];
            let mut channels: Vec<Option<&mut [f32]>> = buf.chunks_mut(n).map(Some).collect();
            // Annotated classes whose chosen levels share one voxel grid are read together.
            let mut groups: Vec<(GridKey, Vec<usize>)> = Vec::new();
            for (c, source) in self.sources.iter().enumerate() {
                if let ClassSource::Annotated(vol) = source {
                    let level = self.target_levels[t][c].expect("annotated class has a level");
                    let key = GridKey::of(&vol.levels[level]);
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, members)) => members.push(c),
                        None => groups.push((key, vec![c])),
                    }
                }
            }
            for (_, members) in &groups {
                let volumes: Vec<(&Volume, usize)> = members
                    .iter()
                    .map(|&c| match &self.sources[c] {
                        ClassSource::Annotated(vol) => (vol.as_ref(), self.target_levels[t][c].expect("annotated class has a level")),
                        _ => unreachable!("groups hold annotated classes only"),
                    })
                    .collect();
                let mut outs: Vec<&mut [f32]> = members.iter().map(|&c| channels[c].take().expect("channel used once")).collect();
                let counted = self.read_labels(&volumes, &spec.patch, centre, draw, &label_options, &mut outs)?;
                for (&c, tally) in members.iter().zip(counted) {
                    tallies[c] = tally;
                }
            }
            let rest: Vec<(usize, &mut [f32])> = channels
                .into_iter()
                .enumerate()
                .filter_map(|(c, ch)| ch.map(|ch| (c, ch)))
                .collect();
            let counted: Vec<(usize, Tally)> = rest
                .into_par_iter()
                .map(|(c, channel)| match &self.sources[c] {
                    ClassSource::Inferred(related) => {
                        // Read back at once below: kept in the cache.
                        channel.fill(f32::NAN);
                        let mut present = vec![0f32; n];
                        for vol in related {
                            let level = vol.pick_level(spec.patch.voxel_size);
                            self.read_labels(
                                &[(vol.as_ref(), level)],
                                &spec.patch,
                                centre,
                                draw,
                                &label_options,
                                &mut [&mut present],
                            )?;
                            for (value, p) in channel.iter_mut().zip(&present) {
                                if *p == 1.0 {
                                    *value = 0.0;
                                }
                            }
                        }
                        // True negatives (0) or unknown: no foreground.
                        let unknown = channel.iter().filter(|v| v.is_nan()).count() as u64;
                        Ok((c, Tally { foreground: 0, unknown }))
                    }
                    ClassSource::Empty => {
                        streaming::fill_patch(channel, f32::NAN);
                        Ok((c, Tally::padding(n, f32::NAN)))
                    }
                    ClassSource::Annotated(_) => unreachable!("annotated classes were read in groups"),
                })
                .collect::<Result<_>>()?;
            for (c, tally) in counted {
                tallies[c] = tally;
            }
        }
        Ok(SampleRead { finite, tallies })
    }

    /// The raw read options of one input read: a copy of integer data that would pad with NaN
    /// before the value transforms replace NaN (the split's default `NaNtoNum`) pads with the
    /// replacement instead, so the read is finite and that pass over the patch is skipped; the
    /// values are the same. Resampled reads keep NaN padding, which interpolation spreads.
    fn copy_padding(&self, level: usize, patch: &PatchSpec, centre: [f64; 3], draw: &SpatialDraw, options: ReadOptions) -> ReadOptions {
        let lvl = &self.raw.levels[level];
        match self.config.raw_values.nan_replacement() {
            Some(value) if options.pad_value.is_nan() && !lvl.dtype.is_float() && reads_as_copy(lvl, patch, centre, draw) => ReadOptions {
                pad_value: value,
                ..options
            },
            _ => options,
        }
    }

    /// Reads label classes that share one voxel grid: from their crop held decoded in the label
    /// cache (built on first use), or chunk by chunk when the crop is not held (too large for
    /// the cache's budget, remote, or its chunks failed to decode: the chunk reads then report
    /// the failure for the samples that touch it).
    fn read_labels(
        &self,
        volumes: &[(&Volume, usize)],
        patch: &PatchSpec,
        centre: [f64; 3],
        draw: &SpatialDraw,
        options: &ReadOptions,
        outs: &mut [&mut [f32]],
    ) -> Result<Vec<Tally>> {
        match self.labels.get(volumes)? {
            Some(crop) => {
                let (volume, level) = volumes[0];
                read_packed_group(&crop, &volume.levels[level], patch, centre, draw, options, outs)
            }
            None => read_patch_group(volumes, patch, centre, draw, options, outs),
        }
    }

    /// Applies the engine's value transforms to one sample's arrays (as [`Dataset::read_sample`]
    /// left them: inputs first, then targets), drawing from the sample's `value_seed`; `finite`
    /// is what `read_sample` returned (ops that only replace non-finite values are skipped on
    /// arrays known to hold none).
    pub fn apply_values(&self, value_seed: u64, outputs: &mut [&mut [f32]], read: &mut SampleRead) {
        let finite = &read.finite;
        if self.config.raw_values.is_empty() && self.config.target_values.is_empty() {
            return;
        }
        let n_inputs = self.config.inputs.len();
        for (i, out) in outputs.iter_mut().enumerate() {
            let shape = &self.sample_shape(i);
            if i < n_inputs {
                self.config
                    .raw_values
                    .apply_known(out, shape, value_seed, i as u64, finite.get(i).copied().unwrap_or(false));
                continue;
            }
            // Target transforms see one class at a time, as in the reference library (a blur never
            // mixes classes, a contrast uses each class's own mean).
            let stream = TARGET_STREAM * (1 + (i - n_inputs) as u64);
            let mut channel_shape = shape.clone();
            channel_shape[0] = 1;
            let n: usize = channel_shape.iter().product();
            for (c, channel) in out.chunks_mut(n.max(1)).enumerate() {
                let pipeline = match &self.config.target_values {
                    TargetValues::Whole(p) => p,
                    TargetValues::PerClass(pipelines) => match pipelines.get(c) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                pipeline.apply(channel, &channel_shape, value_seed, stream + 1 + c as u64);
                // The transforms may change what a voxel holds: the counts follow the values.
                if !pipeline.is_empty() {
                    read.tallies[(i - n_inputs) * self.sources.len() + c] = Tally::of(channel);
                }
            }
        }
    }

    /// Per-sample tensor shape of each array (inputs then targets): channel first, singleton
    /// spatial axes squeezed (so `(1, 256, 256)` gives `[1, 256, 256]` inputs).
    pub fn sample_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let specs = self.config.inputs.iter().chain(&self.config.targets);
        specs.enumerate().map(|(i, a)| (a.name.clone(), self.sample_shape(i))).collect()
    }

    /// The per-sample tensor shape of array `i` (inputs, then targets); see [`Dataset::sample_shapes`].
    fn sample_shape(&self, i: usize) -> Vec<usize> {
        let n_inputs = self.config.inputs.len();
        let (channels, spec) = if i < n_inputs {
            (1, &self.config.inputs[i].patch)
        } else {
            (self.n_classes(), &self.config.targets[i - n_inputs].patch)
        };
        let mut shape = vec![channels];
        shape.extend(spec.shape.iter().copied().filter(|&n| n != 1));
        shape
    }

    /// Level read for each array (inputs, then targets: level of the first annotated class or -1).
    pub fn array_levels(&self) -> Vec<i64> {
        let mut levels: Vec<i64> = self.input_levels.iter().map(|&l| l as i64).collect();
        levels.extend(
            self.target_levels
                .iter()
                .map(|per_class| per_class.iter().flatten().next().map_or(-1, |&l| l as i64)),
        );
        levels
    }

    /// Axis names of a sample tensor of array `spec` (channel + non-singleton spatial axes).
    pub fn dim_names(spec: &PatchSpec) -> Vec<String> {
        let mut names = vec!["c".to_string()];
        names.extend((0..3).filter(|&k| spec.shape[k] != 1).map(|k| AXES[k].to_string()));
        names
    }
}

/// One `input_arrays` / `target_arrays` entry as the Python layer sends it (already 3D).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArrayJson {
    name: String,
    shape: [usize; 3],
    scale: [f64; 3],
}

/// One requested class: name, label group (null: not annotated here), label groups of the
/// annotated classes mutually exclusive with it.
#[derive(Debug, Deserialize)]
struct ClassJson(String, Option<Location>, #[serde(default)] Vec<Location>);

fn default_pad() -> bool {
    true
}

fn default_interpolation() -> String {
    "linear".into()
}

/// A dataset's configuration as the Python layer sends it (`cellmap_data/dataset.py`): parsed
/// once, typed; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetJson {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    crop: String,
    raw_path: Location,
    #[serde(default)]
    classes: Vec<ClassJson>,
    #[serde(default)]
    inputs: Vec<ArrayJson>,
    #[serde(default)]
    targets: Vec<ArrayJson>,
    #[serde(default = "default_pad")]
    pad: bool,
    /// `null` (JSON has no NaN) or absent: NaN.
    #[serde(default)]
    raw_pad_value: Option<f32>,
    #[serde(default = "default_interpolation")]
    raw_interpolation: String,
    /// The spatial transforms in the engine's one form (the Python layer translates the
    /// reference library's dialects into it).
    #[serde(default, deserialize_with = "crate::sample::augment::spatial_transforms")]
    spatial: Option<SpatialJson>,
    #[serde(default)]
    compact_targets: bool,
    #[serde(default)]
    raw_values: ValuePipeline,
    #[serde(default)]
    target_values: TargetValues,
}

impl ArraySpec {
    fn from_parsed(array: ArrayJson) -> Result<ArraySpec> {
        let patch = PatchSpec::new(array.shape, array.scale).map_err(|e| Error::invalid(format!("array '{}': {e}", array.name)))?;
        Ok(ArraySpec { name: array.name, patch })
    }

    /// Parses `{"name": ..., "shape": [z, y, x], "scale": [z, y, x]}` (already 3D).
    pub fn from_json(value: &serde_json::Value) -> Result<ArraySpec> {
        let array = ArrayJson::deserialize(value).map_err(|e| Error::invalid(format!("array spec {value}: {e}")))?;
        Self::from_parsed(array)
    }
}

impl DatasetConfig {
    /// The display name: `label` or the raw path.
    pub fn name(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.raw_path.to_string())
    }

    /// Parses the configuration the Python layer sends (see `cellmap_data/dataset.py`); each
    /// concern is validated once, here (array specs, interpolation, spatial config, value ops).
    pub fn from_json(value: &serde_json::Value) -> Result<DatasetConfig> {
        let parsed = DatasetJson::deserialize(value).map_err(|e| Error::invalid(format!("dataset configuration: {e}")))?;
        let arrays = |list: Vec<ArrayJson>| list.into_iter().map(ArraySpec::from_parsed).collect::<Result<Vec<_>>>();
        let (classes, exclusive_with) = parsed
            .classes
            .into_iter()
            .map(|ClassJson(name, path, related)| ((name, path), related))
            .unzip();
        let pipelines = match &parsed.target_values {
            TargetValues::Whole(p) => std::slice::from_ref(p),
            TargetValues::PerClass(ps) => ps.as_slice(),
        };
        for (what, op) in pipelines
            .iter()
            .flat_map(|p| p.ops.iter().map(|op| ("target", op)))
            .chain(parsed.raw_values.ops.iter().map(|op| ("raw", op)))
        {
            op.validate().map_err(|e| Error::invalid(format!("{what} value transforms: {e}")))?;
        }
        if parsed.compact_targets && !parsed.target_values.is_empty() {
            return Err(Error::invalid(
                "compact (uint8) targets cannot carry engine value transforms: they are expanded on the device",
            ));
        }
        Ok(DatasetConfig {
            label: parsed.name,
            crop: parsed.crop,
            raw_path: parsed.raw_path,
            classes,
            exclusive_with,
            inputs: arrays(parsed.inputs)?,
            targets: arrays(parsed.targets)?,
            pad: parsed.pad,
            raw_pad_value: parsed.raw_pad_value.unwrap_or(f32::NAN),
            raw_interpolation: Interpolation::parse(&parsed.raw_interpolation)?,
            spatial: SpatialConfig::new(&parsed.spatial.unwrap_or_default())?,
            compact_targets: parsed.compact_targets,
            raw_values: parsed.raw_values,
            target_values: parsed.target_values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::DType;
    use crate::test_fixtures::{assert_same, c_order, ImageSpec, TempDir};
    use serde_json::{json, Value};
    use std::path::Path;
    use std::path::PathBuf;

    /// A raw volume of 16³ float32 voxels of 4 nm from the origin, voxel (z, y, x) holding
    /// 256 z + 16 y + x, and one crop of 8 × 8 × 9 uint8 voxels from (16, 16, 16) nm with two
    /// mutually exclusive classes: `mito` where the crop's x index is below 4, `er` where its
    /// y index is at least 5 and its x index at least 4.
    struct Crop {
        dir: TempDir,
        raw: PathBuf,
        mito: PathBuf,
        er: PathBuf,
    }

    fn label_spec() -> ImageSpec {
        let mut spec = ImageSpec::new([16.0; 3], [4.0; 3], [8, 8, 9]);
        spec.dtype = DType::U8;
        spec
    }

    fn crop(name: &str) -> Crop {
        let dir = TempDir::new(name);
        let raw = dir.join("data.zarr").join("raw");
        let mut spec = ImageSpec::new([0.0; 3], [4.0; 3], [16; 3]);
        spec.chunk = [8; 3];
        spec.write(&raw, |[z, y, x]| (256 * z + 16 * y + x) as f32);
        let labels = dir.join("data.zarr").join("crop1");
        let (mito, er) = (labels.join("mito"), labels.join("er"));
        label_spec().write(&mito, |[_, _, x]| f32::from(u8::from(x < 4)));
        label_spec().write(&er, |[_, y, x]| f32::from(u8::from(y >= 5 && x >= 4)));
        Crop { dir, raw, mito, er }
    }

    fn s(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    /// Raw 4³ patches of 4 nm; targets 4³ of 4 nm for `mito` and `er` (annotated), `nuc` (not
    /// annotated, exclusive with both) and `golgi` (not annotated, nothing known).
    fn config_json(c: &Crop) -> Value {
        json!({
            "raw_path": s(&c.raw),
            "crop": "crop1",
            "classes": [["mito", s(&c.mito), []], ["er", s(&c.er), []], ["nuc", null, [s(&c.mito), s(&c.er)]], ["golgi", null, []]],
            "inputs": [{"name": "raw", "shape": [4, 4, 4], "scale": [4.0, 4.0, 4.0]}],
            "targets": [{"name": "labels", "shape": [4, 4, 4], "scale": [4.0, 4.0, 4.0]}],
        })
    }

    fn open(config: &Value) -> Result<Dataset> {
        Dataset::open(DatasetConfig::from_json(config)?, ChunkCache::global())
    }

    #[test]
    fn configuration_is_typed_and_names_the_offending_key() {
        let base = serde_json::json!({"raw_path": "/nowhere", "inputs": [{"name": "raw", "shape": [4, 4, 4], "scale": [8.0, 8.0, 8.0]}]});
        let config = DatasetConfig::from_json(&base).unwrap();
        assert!(config.pad && config.raw_pad_value.is_nan() && config.classes.is_empty());
        assert_eq!(config.inputs[0].patch.shape, [4, 4, 4]);
        let mut unknown = base.clone();
        unknown["padding"] = serde_json::json!(true);
        let message = DatasetConfig::from_json(&unknown).unwrap_err().to_string();
        assert!(message.contains("padding"), "{message}");
        let mut short = base.clone();
        short["inputs"][0]["shape"] = serde_json::json!([4, 4]);
        let message = DatasetConfig::from_json(&short).unwrap_err().to_string();
        assert!(message.contains("dataset configuration") && message.contains('3'), "{message}");
        let mut compact = base;
        compact["compact_targets"] = serde_json::json!(true);
        compact["target_values"] = serde_json::json!({"whole": [{"op": "binarize", "threshold": 0.5}]});
        assert!(DatasetConfig::from_json(&compact).unwrap_err().to_string().contains("compact"));
    }

    #[test]
    fn missing_raw_path_is_not_found_naming_it() {
        let c = crop("no-raw");
        let mut config = config_json(&c);
        let absent = c.dir.join("absent.zarr").join("raw");
        config["raw_path"] = json!(s(&absent));
        match open(&config) {
            Err(Error::NotFound { path, .. }) => assert_eq!(path, s(&absent)),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn missing_label_folder_is_not_found_naming_the_class() {
        let c = crop("no-labels");
        let mut config = config_json(&c);
        let absent = c.dir.join("data.zarr").join("crop1").join("lyso");
        config["classes"][1] = json!(["lyso", s(&absent), []]);
        match open(&config) {
            Err(Error::NotFound { path, detail }) => {
                assert_eq!(path, s(&absent));
                assert!(detail.contains("class 'lyso'"), "{detail}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn labels_that_miss_the_raw_volume_are_rejected() {
        let c = crop("far-labels");
        let far = c.dir.join("data.zarr").join("crop2").join("mito");
        let mut spec = label_spec();
        spec.lo = [200.0, 0.0, 0.0];
        spec.write(&far, |_| 1.0);
        let mut config = config_json(&c);
        config["classes"] = json!([["mito", s(&far), []]]);
        match open(&config) {
            Err(Error::InvalidArgument(message)) => {
                assert!(message.contains("do not overlap"), "{message}");
                assert!(message.contains(s(&far)), "{message}");
            }
            other => panic!("expected an invalid-argument error, got {other:?}"),
        }
    }

    #[test]
    fn float_labels_are_rejected() {
        let c = crop("float-labels");
        let float = c.dir.join("data.zarr").join("crop1").join("prob");
        let mut spec = label_spec();
        spec.dtype = DType::F32;
        spec.write(&float, |_| 0.5);
        let mut config = config_json(&c);
        config["classes"][0] = json!(["prob", s(&float), []]);
        match open(&config) {
            Err(Error::Metadata { path, message }) => {
                assert_eq!(path, s(&float));
                assert!(message.contains("class 'prob'") && message.contains("floating point"), "{message}");
            }
            other => panic!("expected a metadata error, got {other:?}"),
        }
    }

    #[test]
    fn sampling_box_is_the_shared_box_shrunk_by_half_a_patch() {
        let c = crop("boxes");
        let d = open(&config_json(&c)).unwrap();
        // Raw [0, 64)³ ∩ crop [16, 48) × [16, 48) × [16, 52); patches are 16 nm wide.
        assert_eq!(
            d.bounding_box,
            WorldBox {
                lo: [16.0; 3],
                hi: [48.0, 48.0, 52.0]
            }
        );
        assert_eq!(
            d.sampling_box,
            Some(WorldBox {
                lo: [24.0; 3],
                hi: [40.0, 40.0, 44.0]
            })
        );
        assert_eq!(d.annotated_classes(), vec![true, true, false, false]);
    }

    #[test]
    fn sample_grid_is_centred_in_the_sampling_box_on_the_first_targets_voxels() {
        let c = crop("grid");
        let mut config = config_json(&c);
        // Targets of 8 nm voxels (2 × 8 = 16 nm, as wide as the 4 nm inputs).
        config["targets"] = json!([{"name": "labels", "shape": [2, 2, 2], "scale": [8.0, 8.0, 8.0]}]);
        let d = open(&config).unwrap();
        // Centres span 16 nm in z and y (3 steps of 8 nm fit: 24, 32, 40) and 20 nm in x, where
        // the 3 centres 16 nm apart leave 2 nm on each side: 26, 34, 42.
        assert_eq!(d.grid, [3, 3, 3]);
        assert_eq!(d.len(), 27);
        assert_eq!(d.centre(0).unwrap(), [24.0, 24.0, 26.0]);
        assert_eq!(d.centre(15).unwrap(), [32.0, 40.0, 26.0]);
        assert_eq!(d.centre(26).unwrap(), [40.0, 40.0, 42.0]);
        assert!(d.centre(27).unwrap_err().to_string().contains("out of range"));
    }

    #[test]
    fn without_padding_a_patch_larger_than_the_crop_leaves_no_sample() {
        let c = crop("no-fit");
        let mut config = config_json(&c);
        config["pad"] = json!(false);
        config["inputs"] = json!([{"name": "raw", "shape": [12, 12, 12], "scale": [4.0, 4.0, 4.0]}]);
        let d = open(&config).unwrap();
        assert_eq!(d.sampling_box, None);
        assert_eq!(d.len(), 0);
        assert!(d.is_empty());
        assert!(d.centre(0).is_err());
    }

    #[test]
    fn with_padding_a_patch_larger_than_the_crop_is_centred_on_it() {
        let c = crop("pad-fit");
        let mut config = config_json(&c);
        config["inputs"] = json!([{"name": "raw", "shape": [12, 12, 12], "scale": [4.0, 4.0, 4.0]}]);
        let d = open(&config).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.centre(0).unwrap(), [32.0, 32.0, 34.0]);
    }

    /// Reads the sample centred at (32, 36, 28) nm: crop voxels z 2..6, y 3..7, x 1..5 and raw
    /// voxels z 6..10, y 7..11, x 5..9. Returns (raw, [mito, er, nuc, golgi]).
    fn read_centre_sample(d: &Dataset) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut raw = vec![0f32; 64];
        let mut labels = vec![0f32; 4 * 64];
        d.read_sample(
            [32.0, 36.0, 28.0],
            &SpatialDraw::default(),
            &mut [raw.as_mut_slice(), labels.as_mut_slice()],
        )
        .unwrap();
        (raw, labels.chunks(64).map(<[f32]>::to_vec).collect())
    }

    fn mito_at([_, _, c]: [usize; 3]) -> bool {
        1 + c < 4
    }

    fn er_at([_, b, c]: [usize; 3]) -> bool {
        3 + b >= 5 && 1 + c >= 4
    }

    #[test]
    fn read_sample_gives_the_raw_values_under_the_patch() {
        let c = crop("read-raw");
        let d = open(&config_json(&c)).unwrap();
        let (raw, _) = read_centre_sample(&d);
        assert_same(
            &raw,
            &c_order([4; 3], |[a, b, c]| (256 * (6 + a) + 16 * (7 + b) + 5 + c) as f32),
            "raw",
        );
    }

    #[test]
    fn read_sample_of_annotated_classes_gives_their_masks() {
        let c = crop("read-annotated");
        let d = open(&config_json(&c)).unwrap();
        let (_, labels) = read_centre_sample(&d);
        assert_same(&labels[0], &c_order([4; 3], |v| f32::from(u8::from(mito_at(v)))), "mito");
        assert_same(&labels[1], &c_order([4; 3], |v| f32::from(u8::from(er_at(v)))), "er");
        assert!(
            labels[0].contains(&1.0) && labels[0].contains(&0.0),
            "the patch crosses the mito boundary"
        );
        assert!(
            labels[1].contains(&1.0) && labels[1].contains(&0.0),
            "the patch crosses the er boundary"
        );
    }

    #[test]
    fn read_sample_of_an_unannotated_class_is_unknown_everywhere() {
        let c = crop("read-empty");
        let d = open(&config_json(&c)).unwrap();
        let (_, labels) = read_centre_sample(&d);
        assert!(labels[3].iter().all(|v| v.is_nan()), "{:?}", labels[3]);
    }

    #[test]
    fn read_sample_of_an_exclusive_class_is_zero_where_a_related_class_is_present() {
        let c = crop("read-inferred");
        let d = open(&config_json(&c)).unwrap();
        let (_, labels) = read_centre_sample(&d);
        let expected = c_order([4; 3], |v| if mito_at(v) || er_at(v) { 0.0 } else { f32::NAN });
        assert_same(&labels[2], &expected, "nuc");
        assert!(labels[2].iter().any(|v| v.is_nan()), "somewhere neither related class is present");
    }
}
