#!/usr/bin/python3
"""A slow disk for Bulkhead's watchdog tests: a FUSE filesystem with one file,
`disk.img`, backed by a real file, where every read and write first sleeps DELAY seconds.
A backend serving this image is slow, never stuck: each request completes, late.

usage: slowfs.py BACKING_FILE MOUNTPOINT DELAY_SECONDS   (as root; runs until unmounted)
Needs Debian's python3-fusepy (scripts/install-deps.sh installs it).
"""
import errno
import os
import stat
import sys
import time

import fusepy as fuse


class SlowFS(fuse.Operations):
    def __init__(self, backing, delay):
        self.backing = backing
        self.delay = delay

    def _check(self, path):
        if path != "/disk.img":
            raise fuse.FuseOSError(errno.ENOENT)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        self._check(path)
        st = os.stat(self.backing)
        return {
            "st_mode": stat.S_IFREG | 0o644,
            "st_nlink": 1,
            "st_size": st.st_size,
            "st_mtime": st.st_mtime,
            "st_atime": st.st_atime,
            "st_ctime": st.st_ctime,
        }

    def readdir(self, path, fh):
        return [".", "..", "disk.img"]

    def open(self, path, flags):
        self._check(path)
        return os.open(self.backing, flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR))

    def read(self, path, size, offset, fh):
        time.sleep(self.delay)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        time.sleep(self.delay)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._check(path)
        os.truncate(self.backing, length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    backing, mountpoint, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fuse.FUSE(
        SlowFS(backing, delay),
        mountpoint,
        foreground=True,
        allow_other=True,
        direct_io=True,
        big_writes=True,
        max_write=1 << 20,
        max_read=1 << 20,
    )


if __name__ == "__main__":
    main()
