//! Guest RAM: one memfd, sealed against resizing, mapped here and registered with KVM.
//!
//! The memfd is the unit of sharing: the control domain creates it (or the standalone runner
//! does), the runner maps it, and device backends map it through vhost-user. It is backed
//! by ordinary shared memory, or by 2 MiB pages from the host's hugetlb pool
//! ([`RamBacking::HugePages`]), all allocated when it is made so that a short pool is an
//! error at create, not a SIGBUS in the guest later. Huge pages matter for device I/O: a
//! backend's `O_DIRECT` transfer of a 1 MiB guest buffer is one physical segment instead
//! of 256, and the host block layer no longer splits it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Failure to create, map or register guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create/ftruncate/fcntl failed.
    #[error("cannot create the guest-RAM memfd: {0}")]
    Memfd(#[source] nix::Error),
    /// The handed-in memfd is unusable.
    #[error("guest-RAM memfd: {0}")]
    BadMemfd(String),
    /// mmap failed.
    #[error("cannot map guest RAM ({size} bytes): {source}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The host's hugetlb pool cannot hold the RAM.
    #[error("cannot allocate {needed} huge pages of 2 MiB for guest RAM ({available}); reserve them first, e.g. `sysctl vm.nr_hugepages=<N>` (see README, Huge pages): {source}")]
    HugePages {
        /// Pages asked for.
        needed: u64,
        /// What the pool had, in words (`N free`, or why it is unknown).
        available: String,
        /// What the kernel said.
        #[source]
        source: nix::Error,
    },
    /// Huge-page RAM whose size is not a whole number of pages.
    #[error("guest RAM of {0} bytes is not a multiple of 2 MiB, as huge pages need")]
    NotHugeAligned(u64),
    /// vm-memory refused the region layout.
    #[error("guest RAM layout: {0}")]
    Layout(String),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM refused guest RAM region {slot}: {source}")]
    Register {
        /// Memory slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One contiguous piece of guest RAM: where it sits in the guest and in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the 32-bit MMIO gap.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            guest_addr: MMIO_GAP_END,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

/// The size of the huge pages [`RamBacking::HugePages`] uses.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Where the host's pool of 2 MiB pages says how many are free and how many of those are
/// promised to mappings already.
const HUGE_POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// What guest RAM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamBacking {
    /// Shared memory in 4 KiB pages (transparent huge pages where the host's
    /// `shmem_enabled` allows them: the mapping asks with `MADV_HUGEPAGE`).
    #[default]
    Shmem,
    /// 2 MiB pages from the host's hugetlb pool (`vm.nr_hugepages`), all taken at creation.
    HugePages,
}

impl RamBacking {
    /// [`RamBacking::HugePages`] if `huge`, else [`RamBacking::Shmem`] (a config's flag).
    pub fn huge_if(huge: bool) -> Self {
        if huge {
            RamBacking::HugePages
        } else {
            RamBacking::Shmem
        }
    }
}

/// Free 2 MiB pages in the host's pool that no mapping has reserved yet.
pub fn free_huge_pages() -> std::io::Result<u64> {
    let read = |name: &str| -> std::io::Result<u64> {
        let text = std::fs::read_to_string(format!("{HUGE_POOL}/{name}"))?;
        text.trim().parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: {e}"))
        })
    };
    Ok(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Creates a guest-RAM memfd of `size` bytes backed as `backing` says, sealed against
/// resizing. Huge pages are all allocated here (`fallocate`).
pub fn create_memfd(size: u64, backing: RamBacking) -> Result<File, MemoryError> {
    let len = i64::try_from(size).map_err(|_| MemoryError::BadMemfd("size too large".into()))?;
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    if backing == RamBacking::HugePages {
        if !size.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::NotHugeAligned(size));
        }
        flags |= MemFdCreateFlag::MFD_HUGETLB | MemFdCreateFlag::MFD_HUGE_2MB;
    }
    let huge_error = |source| MemoryError::HugePages {
        needed: size / HUGE_PAGE_SIZE,
        available: match free_huge_pages() {
            Ok(n) => format!("{n} free"),
            Err(e) => format!("the pool's size is unknown: {HUGE_POOL}: {e}"),
        },
        source,
    };
    let fd: OwnedFd = memfd_create(c"bulkhead-guest-ram", flags).map_err(|e| match backing {
        RamBacking::HugePages => huge_error(e),
        RamBacking::Shmem => MemoryError::Memfd(e),
    })?;
    let file = File::from(fd);
    nix::unistd::ftruncate(&file, len).map_err(MemoryError::Memfd)?;
    if backing == RamBacking::HugePages {
        let allocated = nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            len,
        );
        if let Err(e) = allocated {
            // The pages it did get are the pool's again only once the file is gone; the
            // error then counts what is free for real.
            drop(file);
            return Err(huge_error(e));
        }
    }
    seal(&file).map_err(MemoryError::Memfd)?;
    Ok(file)
}

/// Whether `file` lives on hugetlbfs (huge-page RAM).
pub fn is_huge(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC)
}

/// A VM's RAM: the memfd and this process's mapping of it.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    size: u64,
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates a sealed memfd of `size` bytes backed as `backing` says, and maps it.
    pub fn create(size: u64, backing: RamBacking) -> Result<Self, MemoryError> {
        Self::from_memfd(create_memfd(size, backing)?)
    }

    /// Maps a memfd created by someone else (the control domain); its size is the RAM size.
    pub fn from_memfd(memfd: File) -> Result<Self, MemoryError> {
        let size = memfd
            .metadata()
            .map_err(|e| MemoryError::BadMemfd(e.to_string()))?
            .len();
        if size == 0 {
            return Err(MemoryError::BadMemfd("size is zero".into()));
        }
        let huge = is_huge(&memfd);
        if huge && !size.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::NotHugeAligned(size));
        }
        let mut regions = Vec::new();
        for r in ram_regions(size) {
            let clone = memfd
                .try_clone()
                .map_err(|e| MemoryError::BadMemfd(e.to_string()))?;
            let len = usize::try_from(r.size)
                .map_err(|_| MemoryError::Layout("region too large".into()))?;
            let mapping = MmapRegion::build(
                Some(FileOffset::new(clone, r.file_offset)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemoryError::Map {
                size: r.size,
                source,
            })?;
            if !huge {
                // Ask for transparent huge pages, as QEMU does for its RAM: granted only
                // where the host's shmem_enabled is `advise` or more, and harmless where
                // it is not (the advice is a hint; its failure changes nothing).
                // SAFETY: the range is exactly the mapping just made, owned by `mapping`.
                let _ = unsafe {
                    libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE)
                };
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| MemoryError::Layout("region wraps the address space".into()))?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self { memfd, size, mem })
    }

    /// The mapping, for loaders and devices.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd (to share with backends or the control domain).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// The guest-physical layout of this RAM.
    pub fn regions(&self) -> Vec<RamRegion> {
        ram_regions(self.size)
    }

    /// Registers every region with KVM, one memory slot each.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Layout(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `memory_size` bytes owned by
            // `self.mem`, which outlives the VM (the `Vm` holds this `GuestRam`).
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| MemoryError::Register { slot, source })?;
        }
        Ok(())
    }
}

/// Seals a memfd against growing, shrinking and further sealing.
pub fn seal(file: &File) -> nix::Result<()> {
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map(|_| ())
}

/// Takes ownership of an inherited descriptor number after checking it is open.
pub fn file_from_inherited_fd(fd: i32, what: &str) -> Result<File, String> {
    if fd < 0 {
        return Err(format!("{what}: fd {fd} is negative"));
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| format!("{what}: fd {fd} is not open ({e})"))?;
    // SAFETY: the fd is open (checked above) and was handed to this process for it to own;
    // nothing else in the runner uses that number.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_split_around_gap() {
        assert_eq!(ram_regions(256 << 20).len(), 1);
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_GAP_START);
        assert_eq!(r[1].guest_addr, MMIO_GAP_END);
        assert_eq!(r[1].file_offset, MMIO_GAP_START);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
    }

    #[test]
    fn memfd_is_sealed_and_shared() {
        let ram = GuestRam::create(16 << 20, RamBacking::Shmem).expect("create");
        ram.mem()
            .write_obj(0xabcdu32, GuestAddress(0x1000))
            .expect("write");
        // Growing is refused by the seal.
        assert!(nix::unistd::ftruncate(ram.memfd(), 32 << 20).is_err());
        // A second mapping of the same memfd sees the write.
        let again = GuestRam::from_memfd(ram.memfd().try_clone().expect("dup")).expect("map");
        assert_eq!(
            again
                .mem()
                .read_obj::<u32>(GuestAddress(0x1000))
                .expect("read"),
            0xabcd
        );
    }

    #[test]
    fn huge_pages_need_whole_pages() {
        let e = create_memfd(3 << 20, RamBacking::HugePages).expect_err("3 MiB");
        assert!(
            matches!(e, MemoryError::NotHugeAligned(n) if n == 3 << 20),
            "{e}"
        );
    }

    #[test]
    fn a_short_huge_page_pool_is_an_error_that_says_so() {
        // Far more pages than any pool here holds (free ones are allocated, then it fails).
        let Ok(free) = free_huge_pages() else {
            eprintln!("SKIP: no 2 MiB hugetlb pool on this host");
            return;
        };
        let pages = free + 100_000;
        let e = create_memfd(pages * HUGE_PAGE_SIZE, RamBacking::HugePages).expect_err("too many");
        let text = e.to_string();
        assert!(
            matches!(e, MemoryError::HugePages { needed, .. } if needed == pages),
            "{text}"
        );
        assert!(text.contains("vm.nr_hugepages"), "{text}");
        // Counted after the failed file gave its pages back, so the number is the pool's
        // (checked when nothing else changed the pool meanwhile).
        if free_huge_pages().is_ok_and(|now| now == free) {
            assert!(text.contains(&format!("({free} free)")), "{text}");
        }
    }
}
