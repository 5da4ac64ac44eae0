//! The raw disk image: positioned I/O (pread/pwrite, preadv/pwritev) between the image fd
//! and guest memory, flush, discard (hole punching) and write-zeroes; with
//! [`Cache::None`] the fd is switched to `O_DIRECT`.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// virtio-blk sectors are always 512 bytes, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;

/// Largest chunk written at once when zeroes have to be written by hand.
const ZERO_CHUNK: usize = 64 * 1024;

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The size of the image could not be determined.
    #[error("cannot determine the image size: {0}")]
    Size(#[source] io::Error),
    /// The image fd cannot be inspected.
    #[error("cannot inspect the image fd: {0}")]
    Fcntl(#[source] io::Error),
    /// The image is not open for writing but the disk is not read-only.
    #[error("the image is open read-only; pass --readonly")]
    NotWritable,
    /// The image is not a regular file or block device.
    #[error("the image is not a regular file or a block device")]
    NotAFileOrBlockDevice,
    /// `cache = none` asked for O_DIRECT and the file system refused it.
    #[error("cannot switch the image to O_DIRECT (cache = none): {0}")]
    Direct(#[source] io::Error),
}

/// How the image is cached on the host (QEMU's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cache {
    /// Through the host page cache; completed writes are durable after a FLUSH.
    #[default]
    Writeback,
    /// `O_DIRECT`: no host page cache; completed writes are durable after a FLUSH.
    None,
}

/// Alignment of memory, offsets and lengths for `O_DIRECT` I/O. virtio-blk offsets and
/// lengths are whole 512-byte sectors; guest buffers that are not 512-byte aligned go
/// through a bounce buffer.
pub const DIRECT_ALIGN: usize = 512;

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rw {
    /// Image to memory.
    Read,
    /// Memory to image.
    Write,
}

/// One open raw image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    readonly: bool,
    direct: bool,
}

impl Disk {
    /// Takes an opened image. Its size is fixed at this point (in whole sectors; a tail
    /// shorter than a sector is not reachable by the guest).
    pub fn new(file: File, readonly: bool) -> Result<Self, DiskError> {
        Self::with_cache(file, readonly, Cache::Writeback)
    }

    /// Like [`Disk::new`], with a cache mode: [`Cache::None`] sets `O_DIRECT` on the fd
    /// (the file description is shared with whoever handed it over; they all serve the
    /// same disk).
    pub fn with_cache(mut file: File, readonly: bool, cache: Cache) -> Result<Self, DiskError> {
        let meta = file.metadata().map_err(DiskError::Size)?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotAFileOrBlockDevice);
        }
        // SAFETY: F_GETFL on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(DiskError::Fcntl(io::Error::last_os_error()));
        }
        if !readonly && flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(DiskError::NotWritable);
        }
        let direct = cache == Cache::None;
        if direct && flags & libc::O_DIRECT == 0 {
            // SAFETY: F_SETFL on an fd we own with plain integer flags.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
                return Err(DiskError::Direct(io::Error::last_os_error()));
            }
        }
        // Works for block devices too, where metadata().len() is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(DiskError::Size)?;
        Ok(Disk {
            file,
            size,
            readonly,
            direct,
        })
    }

    /// Whether the fd is in `O_DIRECT` mode (`cache = none`).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Transfers every byte `iov` describes between memory and the image at `offset`,
    /// skipping the first `done` bytes (already transferred by an engine that returned a
    /// short count). Blocking; retries short transfers and EINTR.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped (and, for reads, writable) for
    /// the duration of the call.
    pub unsafe fn transfer(
        &self,
        rw: Rw,
        iov: &[libc::iovec],
        offset: u64,
        mut done: usize,
    ) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut rest: Vec<libc::iovec> = Vec::with_capacity(iov.len());
        while done < total {
            rest.clear();
            let mut skip = done;
            for v in iov {
                if skip >= v.iov_len {
                    skip -= v.iov_len;
                    continue;
                }
                rest.push(libc::iovec {
                    // SAFETY: skip < iov_len, so the pointer stays inside the described memory.
                    iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                    iov_len: v.iov_len - skip,
                });
                skip = 0;
            }
            let cnt = rest.len().min(1024) as libc::c_int;
            let off = offset
                .checked_add(done as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let fd = self.file.as_raw_fd();
            // SAFETY: the caller guarantees the iovecs describe live memory; `rest` only
            // narrows them.
            let n = unsafe {
                match rw {
                    Rw::Read => libc::preadv64(fd, rest.as_ptr(), cnt, off),
                    Rw::Write => libc::pwritev64(fd, rest.as_ptr(), cnt, off),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(match rw {
                    Rw::Read => io::ErrorKind::UnexpectedEof,
                    Rw::Write => io::ErrorKind::WriteZero,
                }));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Bytes the guest can reach: the capacity in sectors, in bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }

    /// Size of the image file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The image fd (for tests and diagnostics).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `slice.len()` bytes at `offset` of the image straight into guest memory.
    pub fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        slice: &VolatileSlice<B>,
    ) -> io::Result<()> {
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = guard.len();
        let mut done = 0usize;
        while done < len {
            let off = offset
                .checked_add(done as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: `base..base+len` is a live mapping of guest memory held by `guard`
            // (the slice was produced by vm-memory from a validated guest range); the
            // kernel writes at most `len - done` bytes from `base + done`.
            let n = unsafe {
                libc::pread64(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    len - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        slice.bitmap().mark_dirty(0, len);
        Ok(())
    }

    /// Writes the bytes of a guest memory slice at `offset` of the image.
    pub fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        slice: &VolatileSlice<B>,
    ) -> io::Result<()> {
        let guard = slice.ptr_guard();
        let base = guard.as_ptr();
        let len = guard.len();
        self.pwrite_all(base, len, offset)
    }

    fn pwrite_all(&self, base: *const u8, len: usize, offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let off = offset
                .checked_add(done as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: callers pass a pointer to `len` readable bytes that stay mapped for
            // the duration of the call (a guest memory guard or a local buffer).
            let n = unsafe {
                libc::pwrite64(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    len - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            // SAFETY: fallocate on our own fd with plain integer arguments.
            let r = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn is_unsupported(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
        )
    }

    /// Writes zeroes by hand, in chunks.
    fn write_zeroes_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        // Aligned for O_DIRECT (offsets and lengths are whole sectors).
        let zeroes = vec![0u8; ZERO_CHUNK + DIRECT_ALIGN];
        let at = zeroes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        let zeroes = &zeroes[at..at + ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.pwrite_all(zeroes.as_ptr(), n, offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Deallocates `[offset, offset+len)`: punches a hole, or writes zeroes where the file
    /// system cannot. Afterwards the range reads as zeroes either way.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if Self::is_unsupported(&e) => self.write_zeroes_slow(offset, len),
            Err(e) => Err(e),
        }
    }

    /// Zeroes `[offset, offset+len)`; with `unmap` the space may be deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap {
            return self.discard(offset, len);
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if Self::is_unsupported(&e) => self.write_zeroes_slow(offset, len),
            Err(e) => Err(e),
        }
    }
}
