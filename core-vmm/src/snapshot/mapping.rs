//! A whole file (the guest-RAM memfd) mapped shared, so a snapshot is written from guest
//! RAM and read into it with no copy in between.

use std::fs::File;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// A shared mapping of a whole file, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self` /
// `&mut self` borrows like any buffer's.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps all of `file` (read-only unless `writable`).
    pub fn map(file: &File, writable: bool) -> std::io::Result<Self> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        let Some(nz) = NonZeroUsize::new(len) else {
            return Err(std::io::Error::other("the file is empty"));
        };
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of `len` bytes of `file`, owned by the returned
        // value and unmapped only by its drop.
        let ptr = unsafe { mmap(None, nz, prot, MapFlags::MAP_SHARED, file, 0) }
            .map_err(std::io::Error::from)?;
        Ok(Self { ptr, len, writable })
    }

    /// The bytes. For guest RAM: only while nothing else writes it (the vCPUs paused, the
    /// devices drained), or the copy is not consistent.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes, to fill (a writable mapping of a file nobody else uses yet).
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        if !self.writable {
            return None;
        }
        // SAFETY: `ptr` is valid for `len` writable bytes (mapped PROT_WRITE) for as long
        // as `self` lives, and `&mut self` makes this the only borrow.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}
