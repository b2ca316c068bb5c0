//! Chunks being assembled in memory: tiles spread over the output chunks they touch, summed
//! with blend weights or copied, and the element conversion to the stored type.

pub(super) trait Sample: Copy + Send + Sync + zarrs::array::Element + zarrs::array::ElementOwned + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn from_f64(v: f64) -> Self;
    fn same(self, other: Self) -> bool;
}

macro_rules! int_sample {
    ($($t:ty),*) => {$(
        impl Sample for $t {
            #[inline(always)]
            fn from_f32(v: f32) -> Self { v.round() as $t }
            #[inline(always)]
            fn to_f32(self) -> f32 { self as f32 }
            fn from_f64(v: f64) -> Self { v.round() as $t }
            #[inline(always)]
            fn same(self, other: Self) -> bool { self == other }
        }
    )*};
}
int_sample!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Sample for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        self.to_bits() == other.to_bits() || (self.is_nan() && other.is_nan()) || self == other
    }
}

impl Sample for f64 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        (self.is_nan() && other.is_nan()) || self == other
    }
}

pub(super) struct Acc {
    /// Plain: the values; blended: the sum of value × weight.
    pub values: Vec<f32>,
    /// Blended: the summed weights.
    pub weights: Option<Vec<f32>>,
    /// Without a plan: which voxels were written.
    pub covered: Option<Vec<bool>>,
    /// Tiles (plan) or voxels (no plan) still missing.
    pub remaining: u64,
}

pub(super) enum ChunkState {
    Pending(Acc),
    /// Every tile arrived; waiting to be encoded and written with the next group of complete
    /// chunks (see `ImageWriter::store_complete`).
    Complete(Acc),
    Written,
}

/// A tile (or free write) about to be applied to one chunk.
pub(super) struct Piece<'a> {
    pub start: [i64; 3],
    pub shape: [usize; 3],
    pub data: &'a [f32],
    /// Voxels written (array coordinates), already clipped to the array.
    pub region: [(u64, u64); 3],
    /// Whether it counts toward plan completion (first arrival of a planned tile).
    pub counts: bool,
}

pub(super) fn empty_acc() -> Acc {
    Acc {
        values: Vec::new(),
        weights: None,
        covered: None,
        remaining: 0,
    }
}

/// Blended sums divided by their weights, in place (fill where no weight).
pub(super) fn normalise_in_place(values: &mut [f32], weights: &[f32], fill: f32) {
    for (v, &w) in values.iter_mut().zip(weights) {
        *v = if w > 0.0 { *v / w } else { fill };
    }
}

pub(super) fn normalised(acc: &Acc, fill: f32) -> Vec<f32> {
    match &acc.weights {
        None => acc.values.clone(),
        Some(w) => acc
            .values
            .iter()
            .zip(w)
            .map(|(&v, &w)| if w > 0.0 { v / w } else { fill })
            .collect(),
    }
}

/// Copies the part of `piece` inside the chunk `[lo, hi)` into `acc`; returns how many voxels
/// became covered for the first time (0 when coverage is not tracked).
pub(super) fn copy_piece(
    acc: &mut Acc,
    lo: [u64; 3],
    hi: [u64; 3],
    chunk_shape: [usize; 3],
    piece: &Piece<'_>,
    weights: Option<&[Vec<f32>; 3]>,
) -> u64 {
    let r = piece.region;
    let a: [u64; 3] = std::array::from_fn(|k| r[k].0.max(lo[k]));
    let b: [u64; 3] = std::array::from_fn(|k| r[k].1.min(hi[k]));
    if (0..3).any(|k| b[k] <= a[k]) {
        return 0;
    }
    let mut newly = 0u64;
    let run = (b[2] - a[2]) as usize;
    let t = piece.shape;
    for z in a[0]..b[0] {
        let tz = (z as i64 - piece.start[0]) as usize;
        for y in a[1]..b[1] {
            let ty = (y as i64 - piece.start[1]) as usize;
            let tx0 = (a[2] as i64 - piece.start[2]) as usize;
            let src0 = (tz * t[1] + ty) * t[2] + tx0;
            let dst0 = (((z - lo[0]) as usize * chunk_shape[1]) + (y - lo[1]) as usize) * chunk_shape[2] + (a[2] - lo[2]) as usize;
            let src = &piece.data[src0..src0 + run];
            match (weights, acc.weights.as_mut()) {
                (Some(w), Some(acc_w)) => {
                    let wzy = w[0][tz] * w[1][ty];
                    let wx = &w[2][tx0..tx0 + run];
                    let dv = &mut acc.values[dst0..dst0 + run];
                    let dw = &mut acc_w[dst0..dst0 + run];
                    for i in 0..run {
                        let wi = wzy * wx[i];
                        dv[i] += src[i] * wi;
                        dw[i] += wi;
                    }
                }
                _ => match acc.weights.as_mut() {
                    // A free write into a blended chunk: weight 1.
                    Some(acc_w) => {
                        acc.values[dst0..dst0 + run].iter_mut().zip(src).for_each(|(d, s)| *d += *s);
                        acc_w[dst0..dst0 + run].iter_mut().for_each(|w| *w += 1.0);
                    }
                    None => acc.values[dst0..dst0 + run].copy_from_slice(src),
                },
            }
            if let Some(cov) = acc.covered.as_mut() {
                for c in &mut cov[dst0..dst0 + run] {
                    if !*c {
                        *c = true;
                        newly += 1;
                    }
                }
            }
        }
    }
    newly
}
