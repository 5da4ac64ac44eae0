#!/usr/bin/python3
"""A connection flood for Bulkhead's hardening test: as UID (dropped from root), open COUNT
connections to bulkheadd's control SOCKET, never send a hello, and hold them until the
daemon has closed every one (or DEADLINE seconds pass).

Prints `connected N` once all connects returned, then `closed N of COUNT after S s` and
exits 0 when all were closed, 1 when the deadline passed first.

usage: flood_connect.py SOCKET UID COUNT DEADLINE_SECONDS   (as root)
"""
import os
import resource
import select
import socket
import sys
import time


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    path, uid, count, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    start = time.monotonic()
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        socks.append(s)
    print(f"connected {len(socks)}", flush=True)
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.POLLIN | select.POLLHUP)
        by_fd[s.fileno()] = s
    closed = 0
    end = start + deadline
    while by_fd and time.monotonic() < end:
        for fd, _ev in poller.poll(200):
            s = by_fd.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue  # a message before the close; the close follows
            poller.unregister(fd)
            del by_fd[fd]
            s.close()
            closed += 1
    print(f"closed {closed} of {count} after {time.monotonic() - start:.1f} s", flush=True)
    sys.exit(0 if not by_fd else 1)


if __name__ == "__main__":
    main()
