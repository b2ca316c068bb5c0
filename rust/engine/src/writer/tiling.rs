//! The tiles a dataset writer hands out (a regular grid over the output array, per
//! [`crate::geometry::tile_starts`]) and how overlapping tiles are weighted when blended.

use crate::error::{Error, Result};
use crate::geometry::tile_starts;

/// How overlapping tiles are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blend {
    /// Tent weights: a linear ramp over the `overlap` voxels at each tile edge, 1 inside.
    Linear,
    /// Gaussian weights centred on the tile, sigma = tile / 8 per axis.
    Gaussian,
}

impl Blend {
    /// Parses `linear` (also `tent`) or `gaussian`.
    pub fn parse(name: &str) -> Result<Blend> {
        match name {
            "linear" => Ok(Blend::Linear),
            "gaussian" => Ok(Blend::Gaussian),
            other => Err(Error::invalid(format!("blend must be 'linear' or 'gaussian', not '{other}'"))),
        }
    }

    /// Weights along one tile axis of `n` voxels overlapping its neighbours by `overlap`.
    /// All weights are positive; an axis without overlap has weight 1 everywhere.
    pub fn axis_weights(self, n: usize, overlap: usize) -> Vec<f32> {
        if overlap == 0 || n <= 1 {
            return vec![1.0; n];
        }
        match self {
            Blend::Linear => {
                let ramp = (overlap + 1) as f64;
                (0..n)
                    .map(|i| {
                        let w = ((i + 1) as f64 / ramp).min((n - i) as f64 / ramp).min(1.0);
                        w as f32
                    })
                    .collect()
            }
            Blend::Gaussian => {
                let sigma = (n as f64 / 8.0).max(0.5);
                let c = (n as f64 - 1.0) / 2.0;
                (0..n)
                    .map(|i| {
                        let d = i as f64 - c;
                        ((-d * d / (2.0 * sigma * sigma)).exp()).max(1e-6) as f32
                    })
                    .collect()
            }
        }
    }
}

/// The tiles a dataset writer hands out: a regular grid of per-axis starts over the array.
#[derive(Debug, Clone)]
pub struct TilePlan {
    /// Tile shape (voxels, z y x).
    pub tile: [usize; 3],
    /// Overlap between neighbouring tiles (voxels, z y x).
    pub overlap: [usize; 3],
    /// Tile starts per axis (array voxels; may be negative for an axis shorter than the tile).
    pub starts: [Vec<i64>; 3],
    /// Per axis, per start: the voxels `[lo, hi)` that tile writes.
    pub(super) regions: [Vec<(u64, u64)>; 3],
    /// Separable blend weights of a tile (only when some overlap is positive).
    pub(super) weights: Option<[Vec<f32>; 3]>,
}

impl TilePlan {
    /// Plans tiles of `tile` voxels over an array of `shape` voxels. The tile and overlap were
    /// checked with the writer's configuration ([`super::WriterConfig::check_values`]).
    pub(super) fn new(shape: [u64; 3], tile: [usize; 3], overlap: [usize; 3], blend: Blend) -> TilePlan {
        let starts: [Vec<i64>; 3] = std::array::from_fn(|k| tile_starts(shape[k], tile[k], overlap[k]));
        let blended = overlap.iter().any(|&o| o > 0);
        let regions = std::array::from_fn(|k| {
            let t = tile[k] as i64;
            let extent = shape[k] as i64;
            starts[k]
                .iter()
                .enumerate()
                .map(|(j, &s)| {
                    let mut lo = s.max(0);
                    if !blended && j > 0 {
                        // Plain tiling: a voxel belongs to the first tile covering it.
                        lo = lo.max(starts[k][j - 1] + t);
                    }
                    let hi = (s + t).min(extent);
                    (lo as u64, hi.max(lo) as u64)
                })
                .collect()
        });
        let weights = blended.then(|| std::array::from_fn(|k| blend.axis_weights(tile[k], overlap[k])));
        TilePlan {
            tile,
            overlap,
            starts,
            regions,
            weights,
        }
    }

    /// Tiles per axis.
    pub fn grid(&self) -> [usize; 3] {
        std::array::from_fn(|k| self.starts[k].len())
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.grid().iter().product()
    }

    /// Whether the plan has no tile (never true: every axis has at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether tiles are blended (some overlap is positive).
    pub fn is_blended(&self) -> bool {
        self.weights.is_some()
    }

    fn index3(&self, index: usize) -> [usize; 3] {
        let g = self.grid();
        [index / (g[1] * g[2]), (index / g[2]) % g[1], index % g[2]]
    }

    /// Start (array voxels) of tile `index` (row-major over the per-axis starts).
    pub fn tile_start(&self, index: usize) -> [i64; 3] {
        let i = self.index3(index);
        std::array::from_fn(|k| self.starts[k][i[k]])
    }

    pub(super) fn region(&self, index: usize) -> [(u64, u64); 3] {
        let i = self.index3(index);
        std::array::from_fn(|k| self.regions[k][i[k]])
    }

    /// Number of tiles whose written region meets the voxel box `[lo, hi)`.
    pub(super) fn tiles_meeting(&self, lo: [u64; 3], hi: [u64; 3]) -> u64 {
        (0..3)
            .map(|k| self.regions[k].iter().filter(|&&(a, b)| a < b && a < hi[k] && b > lo[k]).count() as u64)
            .product()
    }
}
