//! World-space geometry: boxes in nm, the output-voxel → source-voxel affine map, and tiling.

/// Axis names in the engine's fixed order.
pub const AXES: [&str; 3] = ["z", "y", "x"];

/// Largest coordinate, in voxels of some level or patch, that sampling arithmetic handles
/// exactly (far beyond any image, far inside i64): metadata or requests beyond it are refused.
pub const MAX_VOXEL_COORDINATE: f64 = (1u64 << 52) as f64;

/// An axis-aligned box in world coordinates (nm), `lo` inclusive, `hi` exclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorldBox {
    /// Lower corner (z, y, x).
    pub lo: [f64; 3],
    /// Upper corner (z, y, x).
    pub hi: [f64; 3],
}

impl WorldBox {
    /// Intersection of two boxes; `None` when they do not overlap.
    pub fn intersect(&self, other: &WorldBox) -> Option<WorldBox> {
        let lo = std::array::from_fn(|k| self.lo[k].max(other.lo[k]));
        let hi = std::array::from_fn(|k| self.hi[k].min(other.hi[k]));
        let b = WorldBox { lo, hi };
        (!b.is_empty()).then_some(b)
    }

    /// Whether any extent is non-positive.
    pub fn is_empty(&self) -> bool {
        (0..3).any(|k| self.hi[k] <= self.lo[k])
    }

    /// Centre point.
    pub fn centre(&self) -> [f64; 3] {
        std::array::from_fn(|k| (self.lo[k] + self.hi[k]) / 2.0)
    }

    /// Extent per axis.
    pub fn extent(&self) -> [f64; 3] {
        std::array::from_fn(|k| self.hi[k] - self.lo[k])
    }

    /// The box of centres from which a patch of world size `size` stays inside this box.
    /// Axes where the patch does not fit collapse to the box centre (`fits` is false there).
    pub fn centres_for_patch(&self, size: [f64; 3]) -> (WorldBox, [bool; 3]) {
        let mut lo = [0.0; 3];
        let mut hi = [0.0; 3];
        let mut fits = [true; 3];
        for k in 0..3 {
            let a = self.lo[k] + size[k] / 2.0;
            let b = self.hi[k] - size[k] / 2.0;
            if b >= a - 1e-9 {
                lo[k] = a;
                hi[k] = b.max(a);
            } else {
                let c = (self.lo[k] + self.hi[k]) / 2.0;
                lo[k] = c;
                hi[k] = c;
                fits[k] = false;
            }
        }
        (WorldBox { lo, hi }, fits)
    }
}

/// 3×3 matrix, row major.
pub type Mat3 = [[f64; 3]; 3];

/// The identity matrix.
pub const IDENTITY: Mat3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

/// Matrix product `a · b`.
pub fn matmul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// Matrix-vector product `a · v`.
pub fn matvec(a: &Mat3, v: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|i| (0..3).map(|k| a[i][k] * v[k]).sum())
}

/// Affine map from output voxel index `o` to continuous source voxel index `m · o + b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Linear part.
    pub m: Mat3,
    /// Offset.
    pub b: [f64; 3],
}

impl Affine {
    /// Applies the map to an output index.
    pub fn apply(&self, o: [f64; 3]) -> [f64; 3] {
        let v = matvec(&self.m, o);
        std::array::from_fn(|k| v[k] + self.b[k])
    }

    /// Composes `output voxel → world → source voxel` for a patch of `shape` voxels of
    /// `out_voxel` nm centred at `centre` (nm), turned by `orientation` (world offset =
    /// orientation · output-frame offset), read from a level with `src_voxel` nm voxels whose
    /// voxel 0 centre is at `src_origin` nm.
    pub fn compose(
        shape: [usize; 3],
        out_voxel: [f64; 3],
        centre: [f64; 3],
        orientation: &Mat3,
        src_voxel: [f64; 3],
        src_origin: [f64; 3],
    ) -> Affine {
        let scale_out: Mat3 = std::array::from_fn(|i| std::array::from_fn(|j| if i == j { out_voxel[i] } else { 0.0 }));
        let inv_src: Mat3 = std::array::from_fn(|i| std::array::from_fn(|j| if i == j { 1.0 / src_voxel[i] } else { 0.0 }));
        let m = matmul(&inv_src, &matmul(orientation, &scale_out));
        let half: [f64; 3] = std::array::from_fn(|k| (shape[k] as f64 - 1.0) / 2.0);
        let mh = matvec(&m, half);
        let b = std::array::from_fn(|k| (centre[k] - src_origin[k]) / src_voxel[k] - mh[k]);
        Affine { m, b }
    }

    /// Whether output z planes map to source z planes with no other axis mixed in (the linear
    /// part's z row and z column are zero off the diagonal): every output plane then samples the
    /// same in-plane positions, as a rotation about z with mirrors and in-plane transposes does.
    pub fn plane_separable(&self) -> bool {
        self.m[0][1] == 0.0 && self.m[0][2] == 0.0 && self.m[1][0] == 0.0 && self.m[2][0] == 0.0
    }

    /// When the linear part is a signed axis permutation with unit scale, returns for each
    /// output axis `k` the source axis it walks and the direction (±1).
    pub fn axis_aligned_unit(&self) -> Option<[(usize, i64); 3]> {
        const TOL: f64 = 1e-6;
        let mut result = [(0usize, 1i64); 3];
        let mut used = [false; 3];
        for (k, slot) in result.iter_mut().enumerate() {
            let mut found = None;
            for j in 0..3 {
                let v = self.m[j][k];
                if (v.abs() - 1.0).abs() < TOL {
                    if found.is_some() {
                        return None;
                    }
                    found = Some((j, if v > 0.0 { 1 } else { -1 }));
                } else if v.abs() > TOL {
                    return None;
                }
            }
            let (j, s) = found?;
            if used[j] {
                return None;
            }
            used[j] = true;
            *slot = (j, s);
        }
        Some(result)
    }

    /// Inverse of the linear part (`None` when singular).
    pub fn inverse_linear(&self) -> Option<Mat3> {
        let m = &self.m;
        let cofactor = |i: usize, j: usize| {
            let (r0, r1) = ((i + 1) % 3, (i + 2) % 3);
            let (c0, c1) = ((j + 1) % 3, (j + 2) % 3);
            m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]
        };
        let det = (0..3).map(|j| m[0][j] * cofactor(0, j)).sum::<f64>();
        if det.abs() < 1e-12 || !det.is_finite() {
            return None;
        }
        // The inverse is the transposed cofactor matrix over the determinant.
        Some(std::array::from_fn(|i| std::array::from_fn(|j| cofactor(j, i) / det)))
    }

    /// Bounding box (continuous source indices) of the images of all output voxel centres.
    pub fn source_bounds(&self, shape: [usize; 3]) -> ([f64; 3], [f64; 3]) {
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for corner in 0..8 {
            let o: [f64; 3] = std::array::from_fn(|k| if corner >> k & 1 == 1 { shape[k] as f64 - 1.0 } else { 0.0 });
            let s = self.apply(o);
            for k in 0..3 {
                lo[k] = lo[k].min(s[k]);
                hi[k] = hi[k].max(s[k]);
            }
        }
        (lo, hi)
    }
}

/// Tile start positions along one axis of `extent` voxels: tiles of `tile` voxels stepping by
/// `tile - overlap`, the last one shifted back so that it ends exactly at `extent` (never
/// dropped, it may overlap its neighbour more). An axis shorter than the tile gets one tile
/// centred on it (its start is negative; the tile is clipped to the array when written).
///
/// The one tiling rule of the project: the prediction writer's tile plan, the datasets'
/// validation tiles and the tests all use it.
pub fn tile_starts(extent: u64, tile: usize, overlap: usize) -> Vec<i64> {
    assert!(tile > 0 && overlap < tile, "tile must be positive and larger than the overlap");
    let (extent, tile_i) = (extent as i64, tile as i64);
    if extent <= tile_i {
        return vec![-((tile_i - extent) / 2)];
    }
    let step = (tile - overlap) as i64;
    let mut starts = Vec::new();
    let mut p = 0i64;
    loop {
        if p + tile_i >= extent {
            starts.push(extent - tile_i);
            break;
        }
        starts.push(p);
        p += step;
    }
    starts.dedup();
    starts
}

/// The chunks of `chunk_shape` meeting the voxel box `region` (`[lo, hi)` per axis), in C
/// order; none when the box is empty.
pub fn chunks_meeting(region: [(u64, u64); 3], chunk_shape: [usize; 3]) -> impl Iterator<Item = [u64; 3]> {
    let empty = region.iter().any(|(lo, hi)| hi <= lo);
    let [rz, ry, rx]: [std::ops::RangeInclusive<u64>; 3] =
        std::array::from_fn(|k| region[k].0 / chunk_shape[k] as u64..=region[k].1.saturating_sub(1) / chunk_shape[k] as u64);
    rz.filter(move |_| !empty).flat_map(move |z| {
        let rx = rx.clone();
        ry.clone().flat_map(move |y| rx.clone().map(move |x| [z, y, x]))
    })
}

/// Every cell of a grid of `grid` cells (chunks, say), in C order.
pub fn grid_cells(grid: [u64; 3]) -> impl Iterator<Item = [u64; 3]> {
    (0..grid[0]).flat_map(move |z| (0..grid[1]).flat_map(move |y| (0..grid[2]).map(move |x| [z, y, x])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_is_a_translation() {
        let a = Affine::compose([4, 4, 4], [8.0; 3], [100.0, 100.0, 100.0], &IDENTITY, [8.0; 3], [4.0; 3]);
        assert_eq!(a.axis_aligned_unit(), Some([(0, 1), (1, 1), (2, 1)]));
        // voxel 0 of the patch: centre - 1.5 voxels = 88 nm -> source index (88-4)/8 = 10.5
        assert!((a.apply([0.0; 3])[0] - 10.5).abs() < 1e-12);
    }

    #[test]
    fn rescale_is_not_unit() {
        let a = Affine::compose([4, 4, 4], [8.0; 3], [0.0; 3], &IDENTITY, [4.0; 3], [0.0; 3]);
        assert_eq!(a.axis_aligned_unit(), None);
        assert!((a.m[0][0] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn inverse_linear_undoes_the_map() {
        let r = crate::sample::augment::rotation_matrix([20.0, -35.0, 110.0]);
        let a = Affine::compose([8, 8, 8], [8.0, 6.0, 4.0], [0.0; 3], &r, [4.0, 4.0, 2.0], [0.0; 3]);
        let inv = a.inverse_linear().expect("rotation and scale are invertible");
        let product = matmul(&inv, &a.m);
        for (i, row) in product.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12, "{product:?}");
            }
        }
        let singular = Affine {
            m: [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 1.0]],
            b: [0.0; 3],
        };
        assert_eq!(singular.inverse_linear(), None);
    }

    #[test]
    fn tiles_cover_far_edge() {
        assert_eq!(tile_starts(10, 4, 0), vec![0, 4, 6]);
        assert_eq!(tile_starts(8, 4, 0), vec![0, 4]);
        assert_eq!(tile_starts(4, 4, 0), vec![0]);
        assert_eq!(tile_starts(3, 8, 0), vec![-2]);
        assert_eq!(tile_starts(100, 32, 8), vec![0, 24, 48, 68]);
        for (extent, tile, overlap) in [(1000u64, 128usize, 0usize), (257, 256, 0), (400, 128, 16), (31, 5, 4)] {
            let starts = tile_starts(extent, tile, overlap);
            assert_eq!(starts[0], 0);
            assert_eq!(*starts.last().unwrap() + tile as i64, extent as i64);
            for w in starts.windows(2) {
                // no gap, never more than the overlap-free step
                assert!(w[0] < w[1] && w[1] <= w[0] + (tile - overlap) as i64, "{starts:?}");
            }
        }
    }

    #[test]
    fn centres_for_patch_collapses_when_too_big() {
        let b = WorldBox {
            lo: [0.0; 3],
            hi: [100.0, 10.0, 100.0],
        };
        let (c, fits) = b.centres_for_patch([20.0, 20.0, 20.0]);
        assert_eq!(fits, [true, false, true]);
        assert_eq!(c.lo[1], 5.0);
        assert_eq!(c.lo[0], 10.0);
        assert_eq!(c.hi[0], 90.0);
    }
}
