//! Downsampled levels: each level the 2×2×2 (or 1×2×2 ...) block mean (raw-like outputs) or
//! mode (labels) of the one before, computed at close from the written chunks. A chunk of a
//! level depends only on the 2×2×2 chunks under it, so ranks can build their own parts.

use rayon::prelude::*;
use zarrs::array::ArraySubset;

use super::accumulate::Sample;
use super::config::{downsample_factors, Downsample};
use super::ImageWriter;
use crate::error::{Error, Result};
use crate::with_dtype;

impl ImageWriter {
    /// The chunks of level `level`, C order.
    pub(super) fn level_chunks(&self, level: usize) -> Vec<[u64; 3]> {
        let cs = self.config.chunk_shape;
        let shape = self.levels[level].shape;
        let grid: [u64; 3] = std::array::from_fn(|k| shape[k].div_ceil(cs[k] as u64));
        crate::geometry::grid_cells(grid).collect()
    }

    /// The chunks of level `level - 1` under chunk `chunk` of level `level`.
    pub(super) fn source_chunks(&self, level: usize, chunk: [u64; 3]) -> impl Iterator<Item = [u64; 3]> {
        let f = downsample_factors(self.levels[level - 1].shape);
        let src_shape = self.levels[level - 1].shape;
        let cs = self.config.chunk_shape;
        let range = move |k: usize| {
            let grid = src_shape[k].div_ceil(cs[k] as u64);
            chunk[k] * f[k]..((chunk[k] + 1) * f[k]).min(grid)
        };
        range(0).flat_map(move |z| range(1).flat_map(move |y| range(2).map(move |x| [z, y, x])))
    }

    /// Level `level` from level `level - 1`, whole: each 2×2×2 (or 1×2×2 ...) block
    /// summarised by the configured [`Downsample`].
    pub(super) fn downsample(&self, level: usize) -> Result<()> {
        self.downsample_chunks(level, &self.level_chunks(level), |_| Ok(()))
    }

    /// Chunks `chunks` of level `level` from level `level - 1`, in parallel; `built` is called
    /// after each is written.
    pub(super) fn downsample_chunks(&self, level: usize, chunks: &[[u64; 3]], built: impl Fn([u64; 3]) -> Result<()> + Sync) -> Result<()> {
        let src = &self.levels[level - 1];
        let f = downsample_factors(src.shape);
        let cs = self.config.chunk_shape;
        let src_array = &src.array;
        let where_ = || src.name.clone();
        chunks.par_iter().try_for_each(|&chunk| {
            let (lo, hi) = self.chunk_box(level, chunk);
            let slo: [u64; 3] = std::array::from_fn(|k| lo[k] * f[k]);
            let shi: [u64; 3] = std::array::from_fn(|k| (hi[k] * f[k]).min(src.shape[k]));
            let sshape: [usize; 3] = std::array::from_fn(|k| (shi[k] - slo[k]) as usize);
            let subset = ArraySubset::new_with_ranges(&[slo[0]..shi[0], slo[1]..shi[1], slo[2]..shi[2]]);
            let source: Vec<f32> = with_dtype!(self.config.dtype, T => {
                src_array
                    .retrieve_array_subset::<Vec<T>>(&subset)
                    .map_err(|e| Error::decode(self.config.path.join(&where_()), e))?
                    .into_iter()
                    .map(Sample::to_f32)
                    .collect()
            });
            let n: usize = cs.iter().product();
            let mut values = vec![self.config.fill_value as f32; n];
            let mut block = Vec::with_capacity(8);
            for z in lo[0]..hi[0] {
                for y in lo[1]..hi[1] {
                    for x in lo[2]..hi[2] {
                        block.clear();
                        for dz in 0..f[0] {
                            for dy in 0..f[1] {
                                for dx in 0..f[2] {
                                    let (sz, sy, sx) = (z * f[0] + dz, y * f[1] + dy, x * f[2] + dx);
                                    if sz < shi[0] && sy < shi[1] && sx < shi[2] {
                                        let i = (((sz - slo[0]) as usize * sshape[1]) + (sy - slo[1]) as usize) * sshape[2]
                                            + (sx - slo[2]) as usize;
                                        block.push(source[i]);
                                    }
                                }
                            }
                        }
                        let o = (((z - lo[0]) as usize * cs[1]) + (y - lo[1]) as usize) * cs[2] + (x - lo[2]) as usize;
                        values[o] = match self.config.downsample {
                            Downsample::Mean => (block.iter().map(|&v| v as f64).sum::<f64>() / block.len().max(1) as f64) as f32,
                            Downsample::Mode => mode(&mut block),
                        };
                    }
                }
            }
            self.store_chunk(level, chunk, &values)?;
            built(chunk)
        })
    }
}

/// The most frequent value of `values` (the smallest on a tie; NaN counts as one value).
fn mode(values: &mut [f32]) -> f32 {
    values.sort_unstable_by(|a, b| a.total_cmp(b));
    let (mut best, mut best_count) = (f32::NAN, 0usize);
    let mut i = 0;
    while i < values.len() {
        let run = values[i..].iter().take_while(|v| v.total_cmp(&values[i]).is_eq()).count();
        if run > best_count {
            (best, best_count) = (values[i], run);
        }
        i += run;
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn mode_takes_the_most_frequent_and_the_smallest_on_a_tie() {
        assert_eq!(super::mode(&mut [3.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(super::mode(&mut [2.0, 1.0, 1.0, 2.0, 5.0]), 1.0);
        assert_eq!(super::mode(&mut [7.0]), 7.0);
    }
}
