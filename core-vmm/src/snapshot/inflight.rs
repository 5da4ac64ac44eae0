//! Writing a saved in-flight region into the one a new backend handed out: through a
//! shared mapping, since the runner's sandbox has no `pwrite`.

use std::fs::File;
use std::num::NonZeroUsize;

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
