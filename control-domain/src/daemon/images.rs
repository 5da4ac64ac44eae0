//! Opening what a VM config names on the host — disk images, kernels, initrds — the one
//! safe way: beneath an allowed directory held open as `O_PATH`, with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so no symlink or `..` swapped in after a
//! check can lead the open outside; only regular files and block devices; never a FIFO
//! that would block or a device that is not a disk. The opened file is then passed on as
//! a descriptor and never looked up by its path again.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, openat2, FcntlArg, OFlag, OpenHow, ResolveFlag};

/// One opened image and the path it was found at (for records and messages).
#[derive(Debug)]
pub struct OpenedImage {
    /// Where it was found: the canonical path below its allowed directory.
    pub path: PathBuf,
    /// The open file (read-only or read-write as asked).
    pub file: File,
}

/// Opens `path` (`what` names it in errors: "disk0 image", "kernel") below one of `dirs`,
/// read-write if `write`. Errors are one line for the user; a path outside every allowed
/// directory is "denied by rule 'images.allowed'".
pub fn open_beneath(
    dirs: &[PathBuf],
    what: &str,
    path: &Path,
    write: bool,
) -> Result<OpenedImage, String> {
    // Resolving first only finds the allowed directory and the path below it; the open
    // below does not trust it (the tree may change in between).
    let real =
        std::fs::canonicalize(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let denied = || {
        format!(
            "denied by rule 'images.allowed': {what} {} is not under any of {:?}",
            real.display(),
            dirs
        )
    };
    let (dir, below) = dirs
        .iter()
        .filter_map(|d| {
            let d = std::fs::canonicalize(d).ok()?;
            let below = real.strip_prefix(&d).ok()?.to_path_buf();
            Some((d, below))
        })
        .next()
        .ok_or_else(denied)?;
    if below.as_os_str().is_empty() {
        return Err(format!("{what} {}: is a directory", real.display()));
    }
    let dirfd = nix::fcntl::open(
        &dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("allowed directory {}: {e}", dir.display()))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    let access = if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    let how = OpenHow::new()
        .flags(access | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(std::os::fd::AsRawFd::as_raw_fd(&dirfd), &below, how).map_err(|e| {
        match e {
            Errno::ELOOP => format!(
                "{what} {}: a symbolic link is on its path below {} (images are opened without following links)",
                real.display(),
                dir.display()
            ),
            Errno::EXDEV => denied(),
            Errno::ENOSYS => format!(
                "{what} {}: this kernel lacks openat2 (Linux 5.6 or later is needed)",
                real.display()
            ),
            e => format!("{what} {}: {e}", real.display()),
        }
    })?;
    // SAFETY: `openat2` just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let kind = file
        .metadata()
        .map_err(|e| format!("{what} {}: {e}", real.display()))?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        let is = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "{what} {} is {is}: only regular files and block devices can be used",
            real.display()
        ));
    }
    fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        FcntlArg::F_SETFL(OFlag::empty()),
    )
    .map_err(|e| format!("{what} {}: {e}", real.display()))?;
    Ok(OpenedImage { path: real, file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bh-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("allowed")).expect("scratch dir");
        d
    }

    #[test]
    fn a_file_below_an_allowed_dir_opens_and_other_kinds_are_refused() {
        let d = scratch("kinds");
        let allowed = vec![d.join("allowed")];
        std::fs::write(d.join("allowed/disk.img"), b"image").expect("write");
        let img = open_beneath(&allowed, "disk0 image", &d.join("allowed/disk.img"), true)
            .expect("a plain image opens");
        assert!(img.path.ends_with("allowed/disk.img"));
        nix::unistd::mkfifo(
            &d.join("allowed/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let e = open_beneath(&allowed, "disk0 image", &d.join("allowed/fifo"), false)
            .expect_err("a FIFO is refused");
        assert!(e.contains("is a FIFO"), "{e}");
        std::fs::write(d.join("outside.img"), b"x").expect("write");
        let e = open_beneath(&allowed, "disk0 image", &d.join("outside.img"), false)
            .expect_err("outside is denied");
        assert!(e.contains("denied by rule 'images.allowed'"), "{e}");
        let e = open_beneath(&allowed, "kernel", &d.join("allowed"), false)
            .expect_err("a directory is refused");
        assert!(e.contains("directory"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    /// A writer in the allowed dir swaps `disk.img` between its own file and a symlink to
    /// a secret outside, as fast as it can, while the image is opened 1,000 times: no
    /// open ever reads the secret.
    #[test]
    fn a_symlink_swapped_in_never_leads_outside() {
        let d = scratch("race");
        let allowed = vec![d.join("allowed")];
        let secret = d.join("secret");
        std::fs::write(&secret, b"SECRET").expect("secret");
        let img = d.join("allowed/disk.img");
        std::fs::write(&img, b"mine").expect("image");
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let swapper = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            let (dir, secret) = (d.join("allowed"), secret.clone());
            std::thread::spawn(move || {
                let (file, link) = (dir.join("file.tmp"), dir.join("link.tmp"));
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::write(&file, b"mine");
                    let _ = std::fs::rename(&file, dir.join("disk.img"));
                    let _ = std::os::unix::fs::symlink(&secret, &link);
                    let _ = std::fs::rename(&link, dir.join("disk.img"));
                    swaps.fetch_add(2, Ordering::Relaxed);
                }
            })
        };
        let (mut opened, mut refused) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // 1,000 opens at least, and on until the swapper has swapped 1,000 times.
        while (opened + refused < 1000 || swaps.load(Ordering::Relaxed) < 1000)
            && std::time::Instant::now() < deadline
        {
            match open_beneath(&allowed, "disk0 image", &img, false) {
                Ok(mut o) => {
                    let mut text = String::new();
                    let _ = o.file.read_to_string(&mut text);
                    assert_ne!(text, "SECRET", "an open followed the symlink outside");
                    opened += 1;
                }
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().expect("swapper");
        let swaps = swaps.load(Ordering::Relaxed);
        assert!(swaps >= 1000, "the swapper barely ran ({swaps} swaps)");
        assert!(refused > 0, "no open met the symlink: the race was not run");
        eprintln!(
            "{} opens during {swaps} swaps: {opened} opened the user's file, {refused} refused",
            opened + refused
        );
        let _ = std::fs::remove_dir_all(d);
    }
}
