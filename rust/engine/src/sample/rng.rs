//! Every random draw of the engine comes from a stream keyed by what it is for (a sample, a
//! value op of one array, an elastic control point), never from a shared sequential generator,
//! so draws do not depend on thread scheduling, batch order or other samples.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// The splitmix64 finaliser: a bijective 64-bit mix, used to fold key parts together.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `first` with each of `parts` folded in, in order.
fn fold_key(first: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(first, |key, &part| splitmix(key ^ part))
}

/// The random stream of one sample, keyed by (seed, epoch, rank, sample index) so that a
/// sample's draws never depend on thread scheduling or on other samples.
pub struct SampleRng(pub(crate) Xoshiro256PlusPlus);

impl SampleRng {
    /// The stream for one sample.
    pub fn new(seed: u64, epoch: u64, rank: u64, index: u64) -> Self {
        SampleRng(Xoshiro256PlusPlus::seed_from_u64(fold_key(splitmix(seed), &[epoch, rank, index])))
    }

    /// A uniform float in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }

    /// A 63-bit seed for value transforms (fits torch's int64 generator seeds).
    pub fn next_seed(&mut self) -> u64 {
        self.0.random::<u64>() >> 1
    }
}

/// What a random value op draws from: the sample's value seed, the array (or class) and the
/// op's position, so that changing one array's transforms never changes another's draws.
pub fn op_rng(value_seed: u64, stream: u64, position: usize) -> Xoshiro256PlusPlus {
    let first = value_seed ^ 0x005E_ED0F_7A1E_u64.rotate_left(17);
    Xoshiro256PlusPlus::seed_from_u64(fold_key(first, &[stream, position as u64]))
}

/// The stream of one elastic control point: the sample's elastic seed and the point's grid
/// index, so a point's displacement is the same whichever patch or thread evaluates it.
pub fn control_point_rng(seed: u64, index: [i64; 3]) -> Xoshiro256PlusPlus {
    let parts = index.map(|i| i as u64);
    Xoshiro256PlusPlus::seed_from_u64(fold_key(splitmix(seed), &parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_nested_splitmix_of_their_parts() {
        // The published key schedule (batches are reproducible across releases only if it holds).
        let nested = |a: u64, b: u64, c: u64, d: u64| splitmix(splitmix(splitmix(splitmix(a) ^ b) ^ c) ^ d);
        let mut expected = Xoshiro256PlusPlus::seed_from_u64(nested(7, 1, 2, 3));
        let mut sample = SampleRng::new(7, 1, 2, 3);
        assert_eq!(sample.next_seed(), expected.random::<u64>() >> 1);
        let mut point = control_point_rng(7, [1, 2, 3]);
        let mut expected = Xoshiro256PlusPlus::seed_from_u64(nested(7, 1, 2, 3));
        assert_eq!(point.random::<u64>(), expected.random::<u64>());
        let first = 9 ^ 0x005E_ED0F_7A1E_u64.rotate_left(17);
        let mut op = op_rng(9, 4, 5);
        let mut expected = Xoshiro256PlusPlus::seed_from_u64(splitmix(splitmix(first ^ 4) ^ 5));
        assert_eq!(op.random::<u64>(), expected.random::<u64>());
    }

    #[test]
    fn splitmix_matches_the_reference_values() {
        // splitmix64 seeded with 0: the first outputs of the published generator.
        assert_eq!(splitmix(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }
}
