//! Turns sample indices into sample requests: the centre and every random draw of a sample
//! come from its own keyed RNG stream, so batches do not depend on thread count or order.

use crate::error::{Error, Result};
use crate::pipeline::batch::SampleRequest;
use crate::pipeline::dataset::Dataset;
use crate::pipeline::read_policy::ReadErrorPolicy;
use crate::sample::augment::SpatialDraw;
use crate::sample::rng::SampleRng;

/// Keys of the random streams: one run = (seed, epoch, rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamKey {
    /// User seed.
    pub seed: u64,
    /// Epoch number.
    pub epoch: u64,
    /// Distributed rank.
    pub rank: u64,
}

/// The request for grid sample `index` of `dataset`; with `augment`, the dataset's spatial
/// config is drawn from the sample's stream (keyed by `stream_index`).
pub fn request(dataset: &Dataset, index: usize, key: StreamKey, stream_index: u64, augment: bool) -> Result<SampleRequest> {
    let centre = dataset.centre(index)?;
    let mut rng = SampleRng::new(key.seed, key.epoch, key.rank, stream_index);
    let draw = if augment {
        dataset.config.spatial.draw(&mut rng, dataset.planar_axis)
    } else {
        SpatialDraw::default()
    };
    Ok(SampleRequest {
        index: index as u64,
        centre,
        draw,
        value_seed: rng.next_seed(),
        padding: false,
    })
}

/// The requests of one batch of `dataset`: sample `indices[i]` draws its augmentation from
/// stream `streams[i]` when given (one per index), else from its own index.
pub fn requests(
    dataset: &Dataset,
    indices: &[usize],
    streams: Option<&[u64]>,
    key: StreamKey,
    augment: bool,
) -> Result<Vec<SampleRequest>> {
    if let Some(streams) = streams.filter(|s| s.len() != indices.len()) {
        return Err(Error::invalid(format!(
            "stream_indices has {} entries for {} indices; give one per index",
            streams.len(),
            indices.len()
        )));
    }
    indices
        .iter()
        .enumerate()
        .map(|(i, &index)| request(dataset, index, key, streams.map_or(index as u64, |s| s[i]), augment))
        .collect()
}

/// Requests for patches centred at world `centres` (z, y, x), without augmentation, labelled
/// `indices` (one per centre).
pub fn centred_requests(centres: &[[f64; 3]], indices: &[u64]) -> Result<Vec<SampleRequest>> {
    if centres.len() != indices.len() {
        return Err(Error::invalid(format!(
            "{} centres and {} indices: give one index per centre",
            centres.len(),
            indices.len()
        )));
    }
    Ok(centres
        .iter()
        .zip(indices)
        .map(|(&centre, &index)| SampleRequest {
            index,
            centre,
            draw: SpatialDraw::default(),
            value_seed: 0,
            padding: false,
        })
        .collect())
}

/// The sample that replaces a failed one when reads skip failures: attempt `attempt` (1, 2,
/// ...) for planned stream `stream` draws a grid index of the same dataset (of `len` samples)
/// from its own keyed stream, and returns it with the stream its draws are keyed by. The same
/// seed gives the same replacements, whatever the thread count.
pub fn replacement(key: StreamKey, stream: u64, attempt: u32, len: usize) -> (usize, u64) {
    // A rank no process has, so replacement draws never collide with sample streams.
    let mut rng = SampleRng::new(key.seed, key.epoch, u64::MAX / 2 + u64::from(attempt), stream);
    let index = rng.below(len.max(1) as u64) as usize;
    (index, stream | (u64::from(attempt) << 48))
}

/// One planned sample of an epoch: which dataset of the collection, which grid sample, and the
/// stream index its random draws are keyed by (its position in the whole epoch's plan, so a
/// sample is drawn identically whichever rank or worker reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSample {
    /// Dataset index in the collection.
    pub dataset: usize,
    /// Grid sample index within the dataset.
    pub index: usize,
    /// Stream index for the sample's RNG.
    pub stream: u64,
    /// A repeat of an earlier sample of the epoch, added so every rank reads the same number
    /// of samples (see [`EpochShape`]); metrics can leave it out.
    pub padding: bool,
}

impl PlannedSample {
    /// A planned sample that is not padding.
    pub fn new(dataset: usize, index: usize, stream: u64) -> PlannedSample {
        PlannedSample {
            dataset,
            index,
            stream,
            padding: false,
        }
    }
}

fn epoch_rng(seed: u64, epoch: u64, salt: u64) -> SampleRng {
    // Plan-level draws use a reserved rank value so they never collide with sample streams.
    SampleRng::new(seed, epoch, u64::MAX - salt, 0)
}

fn permutation(n: usize, rng: &mut SampleRng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

fn locate(sizes: &[usize], mut global: usize) -> (usize, usize) {
    for (d, &n) in sizes.iter().enumerate() {
        if global < n {
            return (d, global);
        }
        global -= n;
    }
    unreachable!("global index within the total size")
}

/// Uniform plan over the concatenated datasets (`sizes`). `count = None` takes every sample once
/// (in order unless `shuffle`); `Some(k)` takes `k` samples made of whole random permutations
/// (each sample at most once per pass over the data), so short epochs still spread evenly.
pub fn uniform_plan(sizes: &[usize], count: Option<usize>, shuffle: bool, seed: u64, epoch: u64) -> Result<Vec<PlannedSample>> {
    let total: usize = sizes.iter().sum();
    if total == 0 {
        return Err(Error::invalid(
            "cannot sample from an empty dataset (no sample fits: check pad and array shapes)",
        ));
    }
    let mut rng = epoch_rng(seed, epoch, 1);
    let count = count.unwrap_or(total);
    let mut order = Vec::with_capacity(count);
    while order.len() < count {
        let block = if shuffle || count != total {
            permutation(total, &mut rng)
        } else {
            (0..total).collect()
        };
        order.extend(block.into_iter().take(count - order.len()));
    }
    Ok(order
        .into_iter()
        .enumerate()
        .map(|(pos, g)| {
            let (dataset, index) = locate(sizes, g);
            PlannedSample::new(dataset, index, pos as u64)
        })
        .collect())
}

/// Class-balanced plan: each step takes the annotated class seen least so far (ties broken at
/// random), a random dataset (crop) annotating it, and a random sample of that dataset; every
/// class the chosen crop annotates counts as seen. `annotated[d][c]` says whether dataset `d`
/// annotates class `c`.
pub fn class_balanced_plan(sizes: &[usize], annotated: &[Vec<bool>], count: usize, seed: u64, epoch: u64) -> Result<Vec<PlannedSample>> {
    if sizes.len() != annotated.len() {
        return Err(Error::invalid("one row of annotated classes is needed per dataset"));
    }
    let n_classes = annotated.first().map_or(0, Vec::len);
    let usable = |d: usize| sizes[d] > 0;
    let active: Vec<usize> = (0..n_classes)
        .filter(|&c| (0..sizes.len()).any(|d| usable(d) && annotated[d][c]))
        .collect();
    if active.is_empty() {
        return Err(Error::invalid(
            "class-balanced sampling needs at least one class annotated in a non-empty dataset",
        ));
    }
    let mut rng = epoch_rng(seed, epoch, 2);
    let mut seen = vec![0u64; n_classes];
    let mut plan = Vec::with_capacity(count);
    for pos in 0..count {
        let least = active.iter().map(|&c| seen[c]).min().expect("active is non-empty");
        let ties: Vec<usize> = active.iter().copied().filter(|&c| seen[c] == least).collect();
        let class = ties[rng.below(ties.len() as u64) as usize];
        let crops: Vec<usize> = (0..sizes.len()).filter(|&d| usable(d) && annotated[d][class]).collect();
        let dataset = crops[rng.below(crops.len() as u64) as usize];
        for (c, s) in seen.iter_mut().enumerate() {
            if annotated[dataset][c] {
                *s += 1;
            }
        }
        let index = rng.below(sizes[dataset] as u64) as usize;
        plan.push(PlannedSample::new(dataset, index, pos as u64));
    }
    Ok(plan)
}

/// Disjoint shard `part` of `parts` of a plan (positions part, part + parts, ...), keeping each
/// sample's stream index so the union of all shards equals the unsharded plan.
pub fn shard(plan: &[PlannedSample], part: usize, parts: usize) -> Result<Vec<PlannedSample>> {
    if parts == 0 || part >= parts {
        return Err(Error::invalid(format!("shard {part} of {parts} does not exist")));
    }
    Ok(plan.iter().skip(part).step_by(parts).copied().collect())
}

/// Where an epoch's samples come from.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SampleSource {
    /// Every sample (or `samples` of them), in order or shuffled ([`uniform_plan`]).
    Uniform {
        /// Shuffle the order.
        shuffle: bool,
    },
    /// The class-balanced sampler ([`class_balanced_plan`]).
    Balanced,
    /// A subset of global indices (e.g. validation tiles), in order or shuffled by the keyed
    /// epoch stream, repeated to `samples` when given.
    Subset {
        /// Global indices into the concatenated datasets.
        indices: Vec<usize>,
        /// Shuffle the order.
        shuffle: bool,
    },
    /// Global indices in the given order (a user's own sampler), cut to `samples` when given.
    Given {
        /// Global indices into the concatenated datasets.
        indices: Vec<usize>,
    },
}

/// Everything that decides one epoch's batches: a loader's settings, its rank and worker, its
/// seed and the epoch number. Every random decision comes from the keyed streams.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochSettings {
    /// Where the samples come from.
    pub source: SampleSource,
    /// Samples in the whole epoch, all ranks together (`None`: `iterations` batches for every
    /// rank, or the source's natural count; see [`EpochSettings::planned_samples`]).
    #[serde(default)]
    pub samples: Option<usize>,
    /// Samples per batch.
    pub batch_size: usize,
    /// Drop a last, smaller batch.
    #[serde(default)]
    pub drop_last: bool,
    /// Batches per epoch of each rank (`None`: as many as the samples make).
    #[serde(default)]
    pub iterations: Option<usize>,
    /// This process's rank and the number of ranks.
    #[serde(default)]
    pub rank: usize,
    /// Number of ranks (each reads a disjoint shard of the epoch).
    #[serde(default = "one")]
    pub world_size: usize,
    /// This reader's worker number and the number of workers sharing the rank's batches.
    #[serde(default)]
    pub worker: usize,
    /// Number of workers.
    #[serde(default = "one")]
    pub workers: usize,
    /// User seed.
    pub seed: u64,
    /// Epoch number.
    pub epoch: u64,
    /// What a failing sample read does (`raise`, `skip` or `retry`).
    #[serde(default)]
    pub on_read_error: ReadErrorPolicy,
}

fn one() -> usize {
    1
}

/// How one epoch divides between ranks and into batches: the one place these counts are made
/// (the loader's `len()` reads them, and [`epoch_batches`] builds exactly this shape).
///
/// Every rank reads the same number of samples, as torch's `DistributedSampler` arranges it:
/// without `drop_last` the plan is padded by repeating its first samples until it divides by
/// the world size; with `drop_last` its tail is cut instead. Each rank's share is then cut into
/// batches (a last, smaller batch dropped with `drop_last`), at most `iterations` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochShape {
    /// Samples the epoch's plan holds, all ranks together, before padding or cutting.
    pub planned: usize,
    /// Samples each rank reads (before `iterations` cuts its batches).
    pub per_rank: usize,
    /// Repeated samples added so the ranks' shares are equal (0 with `drop_last`).
    pub padding: usize,
    /// Samples cut from the plan's tail so the shares are equal (0 without `drop_last`).
    pub dropped: usize,
    /// Batches each rank reads.
    pub batches: usize,
    /// Batches this worker of the rank reads (its share of `batches`).
    pub worker_batches: usize,
    /// Samples in this worker's batches.
    pub worker_samples: usize,
}

fn check_settings(s: &EpochSettings) -> Result<()> {
    if s.batch_size == 0 {
        return Err(Error::invalid("batch_size must be at least 1"));
    }
    if s.world_size == 0 || s.rank >= s.world_size {
        return Err(Error::invalid(format!("rank {} is outside a world of {}", s.rank, s.world_size)));
    }
    if s.workers == 0 || s.worker >= s.workers {
        return Err(Error::invalid(format!("worker {} of {} does not exist", s.worker, s.workers)));
    }
    if s.iterations == Some(0) {
        return Err(Error::invalid("iterations must be at least 1"));
    }
    Ok(())
}

impl EpochSettings {
    /// Samples the epoch's plan holds (all ranks together) when the datasets hold `total`:
    /// `samples` when given, else `iterations` batches for every rank, else the source's own
    /// count (every sample, the subset, or the given indices); given indices are never repeated.
    pub fn planned_samples(&self, total: usize) -> usize {
        let wanted = self
            .samples
            .or_else(|| self.iterations.map(|n| n * self.batch_size * self.world_size));
        match &self.source {
            SampleSource::Uniform { .. } | SampleSource::Balanced => wanted.unwrap_or(total),
            SampleSource::Subset { indices, .. } => wanted.unwrap_or(indices.len()),
            SampleSource::Given { indices } => wanted.map_or(indices.len(), |n| n.min(indices.len())),
        }
    }

    /// The epoch's shape when the datasets hold `total` samples.
    pub fn shape(&self, total: usize) -> Result<EpochShape> {
        check_settings(self)?;
        let planned = self.planned_samples(total);
        let world = self.world_size;
        let per_rank = if self.drop_last { planned / world } else { planned.div_ceil(world) };
        let batches = if self.drop_last {
            per_rank / self.batch_size
        } else {
            per_rank.div_ceil(self.batch_size)
        };
        let batches = self.iterations.map_or(batches, |n| batches.min(n));
        let mine = (self.worker..batches).step_by(self.workers);
        Ok(EpochShape {
            planned,
            per_rank,
            padding: (per_rank * world).saturating_sub(planned),
            dropped: planned.saturating_sub(per_rank * world),
            batches,
            worker_batches: mine.len(),
            worker_samples: mine.map(|b| self.batch_size.min(per_rank - b * self.batch_size)).sum(),
        })
    }
}

/// The plan padded or cut to `per_rank × world` samples: padding repeats the plan from its
/// start (keeping each repeated sample's stream, so it is drawn identically) and is marked.
fn equalise(mut plan: Vec<PlannedSample>, shape: &EpochShape, world: usize) -> Vec<PlannedSample> {
    let target = shape.per_rank * world;
    if plan.len() > target {
        plan.truncate(target);
    } else if !plan.is_empty() {
        let originals = plan.len();
        for k in 0..target - originals {
            plan.push(PlannedSample {
                padding: true,
                ..plan[k % originals]
            });
        }
    }
    plan
}

/// The batches this rank and worker read in one epoch, in the [`EpochShape`] of `settings`.
pub fn epoch_batches(sizes: &[usize], annotated: &[Vec<bool>], settings: &EpochSettings) -> Result<Vec<Vec<PlannedSample>>> {
    let s = settings;
    let total: usize = sizes.iter().sum();
    let shape = s.shape(total)?;
    let globals = |indices: &[usize]| -> Result<Vec<(usize, usize)>> {
        indices
            .iter()
            .map(|&g| {
                if g >= total {
                    Err(Error::invalid(format!("sample index {g} is out of range for {total} samples")))
                } else {
                    Ok(locate(sizes, g))
                }
            })
            .collect()
    };
    let plan: Vec<PlannedSample> = match &s.source {
        SampleSource::Uniform { shuffle } => uniform_plan(sizes, Some(shape.planned), *shuffle, s.seed, s.epoch)?,
        SampleSource::Balanced => class_balanced_plan(sizes, annotated, shape.planned, s.seed, s.epoch)?,
        SampleSource::Subset { indices, shuffle } => {
            if indices.is_empty() {
                return Err(Error::invalid("the subset has no samples to load"));
            }
            let mut order = globals(indices)?;
            if *shuffle {
                let mut rng = epoch_rng(s.seed, s.epoch, 3);
                order = permutation(order.len(), &mut rng).into_iter().map(|i| order[i]).collect();
            }
            order
                .iter()
                .cycle()
                .take(shape.planned)
                .enumerate()
                .map(|(pos, &(dataset, index))| PlannedSample::new(dataset, index, pos as u64))
                .collect()
        }
        SampleSource::Given { indices } => globals(indices)?
            .into_iter()
            .take(shape.planned)
            .enumerate()
            .map(|(pos, (dataset, index))| PlannedSample::new(dataset, index, pos as u64))
            .collect(),
    };
    let plan = equalise(plan, &shape, s.world_size);
    let mine = shard(&plan, s.rank, s.world_size)?;
    let mut batches: Vec<Vec<PlannedSample>> = mine.chunks(s.batch_size).map(<[PlannedSample]>::to_vec).collect();
    if s.drop_last && batches.last().is_some_and(|b| b.len() < s.batch_size) {
        batches.pop();
    }
    batches.truncate(shape.batches);
    debug_assert_eq!(batches.len(), shape.batches, "the plan has the epoch's shape");
    Ok(batches.into_iter().skip(s.worker).step_by(s.workers).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centred_requests_need_one_index_per_centre() {
        let err = centred_requests(&[[0.0; 3], [1.0; 3]], &[5]).unwrap_err();
        assert!(err.to_string().contains("2 centres and 1 indices"), "{err}");
        let made = centred_requests(&[[0.0; 3], [1.0, 2.0, 3.0]], &[5, 9]).unwrap();
        assert_eq!(
            made.iter().map(|r| (r.index, r.centre)).collect::<Vec<_>>(),
            vec![(5, [0.0; 3]), (9, [1.0, 2.0, 3.0])]
        );
        assert!(made.iter().all(|r| r.draw == SpatialDraw::default() && !r.padding));
    }

    #[test]
    fn uniform_plan_covers_every_sample_once_per_pass() {
        let plan = uniform_plan(&[3, 5], Some(8), true, 7, 0).unwrap();
        let mut seen: Vec<(usize, usize)> = plan.iter().map(|p| (p.dataset, p.index)).collect();
        seen.sort();
        assert_eq!(seen, vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]);
        assert_ne!(plan, uniform_plan(&[3, 5], Some(8), true, 7, 1).unwrap());
        assert_eq!(plan, uniform_plan(&[3, 5], Some(8), true, 7, 0).unwrap());
    }

    #[test]
    fn sequential_plan_is_in_order() {
        let plan = uniform_plan(&[2, 2], None, false, 0, 0).unwrap();
        assert_eq!(
            plan.iter().map(|p| (p.dataset, p.index)).collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (1, 0), (1, 1)]
        );
    }

    #[test]
    fn class_balanced_plan_balances_rare_classes() {
        // class 1 is annotated only in dataset 2.
        let annotated = vec![vec![true, false], vec![true, false], vec![true, true]];
        let plan = class_balanced_plan(&[10, 10, 10], &annotated, 100, 1, 0).unwrap();
        let from_rare = plan.iter().filter(|p| p.dataset == 2).count();
        assert!(from_rare >= 45, "{from_rare}");
    }

    fn settings(source: SampleSource) -> EpochSettings {
        serde_json::from_value(serde_json::json!({"source": {"kind": "balanced"}, "batch_size": 4, "seed": 9, "epoch": 1}))
            .map(|s: EpochSettings| EpochSettings { source, ..s })
            .unwrap()
    }

    #[test]
    fn epoch_settings_parse_with_defaults_and_reject_unknown_keys() {
        let s = settings(SampleSource::Balanced);
        assert_eq!((s.world_size, s.workers, s.drop_last, s.iterations), (1, 1, false, None));
        let bad = serde_json::from_value::<EpochSettings>(
            serde_json::json!({"source": {"kind": "uniform", "shuffle": true}, "batch_size": 2, "seed": 0, "epoch": 0, "shufle": true}),
        );
        assert!(bad.unwrap_err().to_string().contains("shufle"));
    }

    #[test]
    fn epoch_batches_chunk_drop_last_cut_and_share_between_workers() {
        let mut s = settings(SampleSource::Uniform { shuffle: false });
        s.batch_size = 3;
        let batches = epoch_batches(&[4, 3], &[], &s).unwrap();
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        s.drop_last = true;
        assert_eq!(epoch_batches(&[4, 3], &[], &s).unwrap().len(), 2);
        s.drop_last = false;
        s.iterations = Some(2);
        assert_eq!(epoch_batches(&[4, 3], &[], &s).unwrap().len(), 2);
        s.iterations = None;
        s.workers = 2;
        s.worker = 1;
        let second = epoch_batches(&[4, 3], &[], &s).unwrap();
        assert_eq!(second, vec![batches[1].clone()]);
    }

    #[test]
    fn subsets_shuffle_with_the_keyed_stream_and_repeat_to_the_count() {
        let mut s = settings(SampleSource::Subset {
            indices: vec![0, 2, 4, 6],
            shuffle: true,
        });
        s.batch_size = 8;
        s.samples = Some(8);
        let plan = epoch_batches(&[5, 5], &[], &s).unwrap().concat();
        assert_eq!(plan.len(), 8);
        let picked: Vec<(usize, usize)> = plan.iter().map(|p| (p.dataset, p.index)).collect();
        assert_eq!(&picked[..4], &picked[4..], "repeats in the same shuffled order");
        let mut first: Vec<_> = picked[..4].to_vec();
        first.sort();
        assert_eq!(first, vec![(0, 0), (0, 2), (0, 4), (1, 1)]);
        s.epoch = 2;
        let other: Vec<(usize, usize)> = epoch_batches(&[5, 5], &[], &s)
            .unwrap()
            .concat()
            .iter()
            .map(|p| (p.dataset, p.index))
            .collect();
        assert_ne!(other, picked, "another epoch, another order");
        s.source = SampleSource::Subset {
            indices: vec![10],
            shuffle: false,
        };
        assert!(epoch_batches(&[5, 5], &[], &s).unwrap_err().to_string().contains("out of range"));
    }

    #[test]
    fn ranks_read_disjoint_shards_of_the_same_epoch() {
        let mut s = settings(SampleSource::Uniform { shuffle: true });
        s.samples = Some(12);
        s.batch_size = 2;
        let whole: Vec<PlannedSample> = epoch_batches(&[6, 6], &[], &s).unwrap().concat();
        s.world_size = 2;
        let mut union: Vec<PlannedSample> = (0..2)
            .flat_map(|r| {
                let mut t = s.clone();
                t.rank = r;
                epoch_batches(&[6, 6], &[], &t).unwrap().concat()
            })
            .collect();
        union.sort_by_key(|p| p.stream);
        assert_eq!(union, whole);
    }

    /// Every rank's batches of `s` (uniform, in order) over `n` samples.
    fn rank_batches(s: &EpochSettings, n: usize) -> Vec<Vec<Vec<PlannedSample>>> {
        (0..s.world_size)
            .map(|rank| {
                let mut t = s.clone();
                t.rank = rank;
                epoch_batches(&[n], &[], &t).unwrap()
            })
            .collect()
    }

    #[test]
    fn every_rank_reads_the_shapes_batch_count_and_padding_repeats_the_plans_start() {
        for n in 1..=14 {
            for world in 1..=4 {
                for batch_size in 1..=4 {
                    for drop_last in [false, true] {
                        let mut s = settings(SampleSource::Uniform { shuffle: true });
                        (s.world_size, s.batch_size, s.drop_last) = (world, batch_size, drop_last);
                        let shape = s.shape(n).unwrap();
                        let ranks = rank_batches(&s, n);
                        let case = format!("n={n} world={world} batch={batch_size} drop_last={drop_last}");
                        for batches in &ranks {
                            assert_eq!(batches.len(), shape.batches, "{case}");
                            assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), shape.worker_samples, "{case}");
                            assert!(batches.iter().all(|b| !drop_last || b.len() == batch_size), "{case}");
                        }
                        let whole = {
                            let mut one = s.clone();
                            (one.world_size, one.batch_size, one.drop_last) = (1, n, false);
                            epoch_batches(&[n], &[], &one).unwrap().concat()
                        };
                        let read: Vec<PlannedSample> = ranks.concat().concat();
                        let mut originals: Vec<PlannedSample> = read.iter().filter(|p| !p.padding).copied().collect();
                        originals.sort_by_key(|p| p.stream);
                        let padded: Vec<&PlannedSample> = read.iter().filter(|p| p.padding).collect();
                        if drop_last {
                            assert!(padded.is_empty(), "{case}");
                            let kept = shape.per_rank * world;
                            assert_eq!(shape.dropped, n - kept, "{case}");
                            // Batches drop their tails too: what is read is a subset of the kept prefix.
                            assert!(originals.iter().all(|p| (p.stream as usize) < kept), "{case}");
                        } else {
                            assert_eq!(originals, whole, "{case}: the ranks' union is the unsharded plan");
                            assert_eq!(padded.len(), shape.padding, "{case}");
                            assert_eq!(shape.padding, shape.per_rank * world - n, "{case}");
                            for (k, p) in padded.iter().enumerate() {
                                let repeated = whole[k % n];
                                assert_eq!(
                                    (p.dataset, p.index, p.stream),
                                    (repeated.dataset, repeated.index, repeated.stream),
                                    "{case}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_of_every_source_match_their_plans() {
        let sizes = [5, 6];
        let annotated = vec![vec![true, false], vec![true, true]];
        let sources = [
            SampleSource::Uniform { shuffle: false },
            SampleSource::Balanced,
            SampleSource::Subset {
                indices: vec![1, 3, 7, 9, 10],
                shuffle: true,
            },
            SampleSource::Given {
                indices: vec![0, 0, 4, 2, 10, 8, 1],
            },
        ];
        for source in sources {
            for iterations in [None, Some(2), Some(9)] {
                for world in [1, 3] {
                    let mut s = settings(source.clone());
                    (s.iterations, s.world_size, s.batch_size) = (iterations, world, 2);
                    let shape = s.shape(11).unwrap();
                    for rank in 0..world {
                        s.rank = rank;
                        let batches = epoch_batches(&sizes, &annotated, &s).unwrap();
                        assert_eq!(batches.len(), shape.batches, "{source:?} {iterations:?} rank {rank}/{world}");
                    }
                    if let (Some(n), SampleSource::Given { indices }) = (iterations, &source) {
                        assert_eq!(shape.planned, indices.len().min(n * 2 * world), "given indices are never repeated");
                    }
                }
            }
        }
    }

    #[test]
    fn a_worker_reads_its_share_of_the_ranks_batches() {
        let mut s = settings(SampleSource::Uniform { shuffle: false });
        (s.batch_size, s.workers) = (3, 2);
        let all: Vec<usize> = (0..2)
            .map(|w| {
                s.worker = w;
                let shape = s.shape(10).unwrap();
                let batches = epoch_batches(&[10], &[], &s).unwrap();
                assert_eq!(batches.len(), shape.worker_batches);
                assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), shape.worker_samples);
                shape.worker_samples
            })
            .collect();
        assert_eq!(all, vec![6, 4], "batches 0 and 2 (3 + 3), batches 1 and 3 (3 + 1)");
    }

    #[test]
    fn shards_are_disjoint_and_complete() {
        let plan = uniform_plan(&[7, 6], Some(13), true, 3, 2).unwrap();
        let a = shard(&plan, 0, 2).unwrap();
        let b = shard(&plan, 1, 2).unwrap();
        let mut union: Vec<_> = a.iter().chain(&b).copied().collect();
        union.sort_by_key(|p| p.stream);
        assert_eq!(union, plan);
    }
}
