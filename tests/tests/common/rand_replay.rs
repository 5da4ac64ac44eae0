//! The host's replay of the test guest's random I/O tokens (`blk-rand=`,
//! `blk-rand-write=`; tests/guest/README.md, *Random I/O*): from the seed alone, which
//! blocks each request touched, what a random write put there, and the checksum a random
//! read prints. Kept independent of the guest's code on purpose: a guest and a backend
//! that agree on a wrong layout fail against it.

/// One random token: `seed`, `count` requests of `bs` bytes over `area` (first sector,
/// sectors; the guest's `blk-rand-area=`).
#[derive(Debug, Clone, Copy)]
pub struct RandToken {
    pub seed: u64,
    pub count: u64,
    pub bs: u64,
    pub area: (u64, u64),
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX: u64 = 0x0000_0100_0000_01b3;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RandToken {
    /// (sequence number, first sector) of every request, in submission order.
    pub fn requests(&self) -> Vec<(u64, u64)> {
        let spb = self.bs / 512;
        let nblk = self.area.1 / spb;
        let mut rng = self.seed;
        (0..self.count)
            .map(|i| (i + 1, self.area.0 + (splitmix(&mut rng) % nblk) * spb))
            .collect()
    }

    /// Applies the token's writes to `image` (the whole image), one after the other.
    pub fn apply_writes(&self, image: &mut [u8]) {
        let spb = self.bs / 512;
        for (seq, lba) in self.requests() {
            for k in 0..spb {
                let at = ((lba + k) * 512) as usize;
                image[at..at + 512].copy_from_slice(&rand_sector(self.seed, lba + k, seq));
            }
        }
    }

    /// The `blk-rand-checksum:` a read token prints over `image`.
    pub fn read_checksum(&self, image: &[u8]) -> u64 {
        let mut sum = 0u64;
        for (seq, lba) in self.requests() {
            let at = (lba * 512) as usize;
            let mut h = seq.wrapping_mul(MIX) ^ lba;
            for w in image[at..at + self.bs as usize].chunks_exact(8) {
                let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                h = (h ^ w).wrapping_mul(MIX);
            }
            sum = sum.wrapping_add(h);
        }
        sum
    }
}

/// Sector `lba` as written by the random write with sequence number `seq`.
pub fn rand_sector(seed: u64, lba: u64, seq: u64) -> [u8; 512] {
    let mut words = [0u64; 64];
    words[0] = lba;
    words[1] = seq;
    words[2] = seed;
    let mut x = seed ^ lba.wrapping_mul(GOLDEN) ^ seq.rotate_left(32);
    if x == 0 {
        x = GOLDEN;
    }
    for w in words.iter_mut().skip(3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let mut out = [0u8; 512];
    for (i, w) in words.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The first sector where `image` differs from `want`, with what each holds there (word 1
/// of a random write is its sequence number).
pub fn first_difference(image: &[u8], want: &[u8]) -> Option<String> {
    let n = image.len().min(want.len()) / 512;
    (0..n).find_map(|s| {
        let (a, b) = (
            &image[s * 512..s * 512 + 512],
            &want[s * 512..s * 512 + 512],
        );
        (a != b).then(|| {
            let w =
                |x: &[u8], i: usize| u64::from_le_bytes(x[i * 8..i * 8 + 8].try_into().expect("8"));
            format!(
                "sector {s}: image has lba {} seq {}, replay expects lba {} seq {}",
                w(a, 0),
                w(a, 1),
                w(b, 0),
                w(b, 1)
            )
        })
    })
}
