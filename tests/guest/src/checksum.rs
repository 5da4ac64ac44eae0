//! Deterministic checksum: FNV-1a 64 over the read-only image and over a RAM region
//! filled with an xorshift64 pattern and read back.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const XORSHIFT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Streaming FNV-1a 64.
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Fnv1a {
        Fnv1a(FNV_OFFSET)
    }

    #[inline(always)]
    pub fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ b as u64).wrapping_mul(FNV_PRIME);
    }

    pub fn u64(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.byte(b);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Hashes physical memory [start, end).
fn hash_phys(h: &mut Fnv1a, start: u64, end: u64) {
    let mut p = start;
    while p < end {
        // SAFETY: the range is part of the loaded image (identity mapped).
        h.byte(unsafe { (p as *const u8).read_volatile() });
        p += 1;
    }
}

/// Fills [start, start+len) (8-byte granular) with the xorshift64 pattern, reads it back
/// into the hash. Returns the number of words that read back wrong.
fn fill_and_hash(h: &mut Fnv1a, start: u64, len: u64) -> u64 {
    let words = len / 8;
    let base = start as *mut u64;
    let mut x = XORSHIFT_SEED;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: the region is usable RAM above the image (checked by the caller).
        unsafe { base.add(i as usize).write_volatile(x) };
    }
    let mut x = XORSHIFT_SEED;
    let mut bad = 0;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: as above.
        let v = unsafe { base.add(i as usize).read_volatile() };
        if v != x {
            bad += 1;
        }
        h.u64(v);
    }
    bad
}

/// The result of [`compute`].
#[allow(dead_code)]
pub struct Checksum {
    pub value: u64,
    pub fill_start: u64,
    pub fill_len: u64,
    pub bad_words: u64,
}

/// Checksums [image_start, rodata_end) and the fill region: `fill_mib` MiB starting at
/// the image end rounded up to 2 MiB, clamped to the usable RAM region there.
pub fn compute(si: &crate::start_info::StartInfo, fill_mib: u64) -> Checksum {
    let mut h = Fnv1a::new();
    hash_phys(
        &mut h,
        crate::boot::image_start(),
        crate::boot::rodata_end(),
    );
    let fill_start = (crate::boot::image_end() + 0x1f_ffff) & !0x1f_ffff;
    let want_end = fill_start.saturating_add(fill_mib.saturating_mul(1 << 20));
    let fill_end = match si.usable_end_containing(fill_start) {
        Some(end) => want_end.min(end),
        None => fill_start,
    };
    let fill_len = fill_end - fill_start;
    let bad_words = fill_and_hash(&mut h, fill_start, fill_len);
    Checksum {
        value: h.value(),
        fill_start,
        fill_len,
        bad_words,
    }
}
