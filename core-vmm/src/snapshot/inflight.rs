//! A device's in-flight region in a snapshot: kept sparse (a drained region is mostly
//! zeros, and the state travels in one control frame), and written into the region a new
//! backend handed out through a shared mapping, since the runner's sandbox has no `pwrite`.

use std::fs::File;
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

/// Bytes kept as their length and the chunks that are not zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseBytes {
    /// Total length.
    pub len: u32,
    /// (offset, bytes) of each non-zero chunk, in order, not overlapping.
    pub chunks: Vec<(u32, Vec<u8>)>,
}

/// Chunk granularity.
const CHUNK: usize = 64;
/// No region is larger (QEMU's layout for 16 queues of 1024 is about 1.1 MiB).
const MAX_LEN: u32 = 16 << 20;

impl SparseBytes {
    /// `data`, without its zero chunks.
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut chunks: Vec<(u32, Vec<u8>)> = Vec::new();
        for (i, c) in data.chunks(CHUNK).enumerate() {
            if c.iter().all(|&b| b == 0) {
                continue;
            }
            let off = (i * CHUNK) as u32;
            match chunks.last_mut() {
                Some((o, v)) if *o as usize + v.len() == off as usize => v.extend_from_slice(c),
                _ => chunks.push((off, c.to_vec())),
            }
        }
        Self {
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            chunks,
        }
    }

    /// The bytes again; refuses chunks outside the length or out of order.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        if self.len > MAX_LEN {
            return Err(format!("{} bytes is too large", self.len));
        }
        let mut out = vec![0u8; self.len as usize];
        let mut next = 0usize;
        for (off, data) in &self.chunks {
            let start = *off as usize;
            let end = start.checked_add(data.len()).ok_or("chunk overflows")?;
            if start < next || end > out.len() {
                return Err(format!(
                    "chunk at {start} (+{}) is out of place",
                    data.len()
                ));
            }
            out[start..end].copy_from_slice(data);
            next = end;
        }
        Ok(out)
    }
}

/// Copies `bytes` to `file` at `offset` through a shared mapping.
pub fn write_region(file: &File, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    let Some(len) = NonZeroUsize::new(bytes.len()) else {
        return Ok(());
    };
    let off = i64::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: a fresh shared mapping of `len` bytes of `file` (the backend's memfd, at least
    // `offset + len` long: it announced that size); nothing else in this process maps it.
    let ptr = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            file,
            off,
        )
    }
    .map_err(std::io::Error::from)?;
    // SAFETY: `ptr` is valid for `len` writable bytes (mapped above) and does not overlap
    // `bytes`, which is ours.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr().cast::<u8>(), len.get()) };
    // SAFETY: `ptr`/`len` are exactly the mapping made above, unmapped once.
    unsafe { munmap(ptr, len.get()) }.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip_and_bad_chunks() {
        let mut data = vec![0u8; 10_000];
        data[5] = 1;
        data[64] = 2;
        data[9_999] = 3;
        let s = SparseBytes::from_bytes(&data);
        assert_eq!(s.chunks.len(), 2, "adjacent chunks merge");
        assert_eq!(s.to_bytes().expect("valid"), data);
        let bad = SparseBytes {
            len: 10,
            chunks: vec![(8, vec![1, 2, 3])],
        };
        assert!(bad.to_bytes().is_err());
        let overlap = SparseBytes {
            len: 100,
            chunks: vec![(10, vec![1; 10]), (15, vec![1])],
        };
        assert!(overlap.to_bytes().is_err());
    }
}
