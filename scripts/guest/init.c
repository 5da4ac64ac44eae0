// Bulkhead Linux guest /init. Freestanding x86-64 Linux program: raw system calls, no libc,
// so the static binary stays ~10 KB (under the PVM build hosts' emulated guest kernel every
// byte the kernel copies costs about a microsecond). Built by scripts/guest-image.sh:
//   gcc -static -Os -nostdlib -ffreestanding -fno-stack-protector
//       -fno-tree-loop-distribute-patterns -o init init.c
// Console lines start "bulkhead-init: ".
//
// Kernel command line tokens (from /proc/cmdline, any order, unknown tokens ignored):
//   bh.disk-test=<seed>:<sectors>  write the test pattern to sectors [0, sectors) of /dev/vda
//                                  (O_DIRECT), fsync, read back and compare. The pattern is
//                                  the test guest's (tests/guest/README.md "Pattern").
//   bh.net=<ip>/<prefix>           configure eth0 with that address and bring it (and lo) up.
//   bh.shell                       exec /bin/sh (busybox) on the console instead of finishing.
//   bh.wait                        before finishing, wait until Bulkhead's shutdown-request
//                                  port (0xf5, via /dev/port) reads 1 (`bulkhead shutdown`).
//   bh.poweroff                    end the VM when done (the default), see below.
//   bh.halt                        instead, reboot(RB_POWER_OFF) when done.
//
// Order: mounts, "started", disk test, net, then shell or "done" + end.
// This kernel has no ACPI, so reboot(LINUX_REBOOT_CMD_POWER_OFF) only halts the CPUs
// ("System halted.") and the VM keeps running. The VM is therefore ended with
// reboot(LINUX_REBOOT_CMD_RESTART): with `reboot=k` (or no reboot= at all: the default order
// falls through to the keyboard controller) the kernel writes 0xFE to the i8042 (port 0x64),
// which QEMU with -no-reboot and Bulkhead report as the guest shutting down.
//
// Output:
//   bulkhead-init: started
//   bulkhead-init: disk <size-bytes> bytes serial '<serial>'      (bh.disk-test)
//   bulkhead-init: disk-test ok | bulkhead-init: disk-test FAILED <why>
//   bulkhead-init: eth0 <ip> link up | bulkhead-init: net FAILED <why>   (bh.net)
//   bulkhead-init: shell                                           (bh.shell)
//   bulkhead-init: done

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned char u8;

// ---- system calls ----
#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_ioctl 16
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_pause 34
#define SYS_dup2 33
#define SYS_socket 41
#define SYS_execve 59
#define SYS_exit 60
#define SYS_fsync 74
#define SYS_mkdir 83
#define SYS_setsid 112
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_nanosleep 35

static i64 sc6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    i64 ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sc(n, a, b, c) sc6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)

#define O_RDONLY 0
#define O_RDWR 2
#define O_SYNC 04010000
#define O_DIRECT 040000
#define AF_INET 2
#define SOCK_DGRAM 2
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define TIOCSCTTY 0x540E
#define BLKGETSIZE64 0x80081272
#define IFF_UP 0x1
#define IFF_RUNNING 0x40
#define REBOOT_MAGIC1 0xfee1dead
#define REBOOT_MAGIC2 672274793
#define REBOOT_CMD_RESTART 0x01234567
#define REBOOT_CMD_POWER_OFF 0x4321FEDC
#define REBOOT_CMD_CAD_OFF 0

// gcc may emit calls to these even when freestanding.
void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}
int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}
static u64 slen(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    return n;
}

// ---- output: one line per call, written with a single write() ----
struct line { char b[512]; u64 n; };
static void put(struct line *l, const char *s) {
    while (*s && l->n < sizeof l->b - 1) l->b[l->n++] = *s++;
}
static void putu(struct line *l, u64 v) {
    char t[24];
    int i = 0;
    do { t[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i && l->n < sizeof l->b - 1) l->b[l->n++] = t[--i];
}
static void putd(struct line *l, i64 v) {
    if (v < 0) { put(l, "-"); v = -v; }
    putu(l, (u64)v);
}
static void start(struct line *l) { l->n = 0; put(l, "bulkhead-init: "); }
static void end(struct line *l) { l->b[l->n++] = '\n'; sc(SYS_write, 1, l->b, l->n); }
static void say(const char *s) { struct line l; start(&l); put(&l, s); end(&l); }
static void fail(const char *what, const char *why, i64 err) {
    struct line l;
    start(&l); put(&l, what); put(&l, " FAILED "); put(&l, why);
    if (err) { put(&l, ": errno "); putd(&l, -err); }
    end(&l);
}

// ---- command line ----
static char cmdline[4096];

// Value of `key=` (copied into out) or "" for a bare `key`; 0 if absent.
static const char *param(const char *key, char *out, u64 outlen) {
    u64 kl = slen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\n' || *p == '\t') p++;
        const char *s = p;
        while (*p && *p != ' ' && *p != '\n' && *p != '\t') p++;
        u64 tl = (u64)(p - s);
        if (tl >= kl && memcmp(s, key, kl) == 0 && (tl == kl || s[kl] == '=')) {
            u64 vl = tl > kl ? tl - kl - 1 : 0;
            if (vl >= outlen) vl = outlen - 1;
            memcpy(out, s + (tl > kl ? kl + 1 : kl), vl);
            out[vl] = 0;
            return out;
        }
    }
    return 0;
}

// Parses a decimal or 0x-hex number; returns the end pointer.
static const char *num(const char *s, u64 *v) {
    u64 x = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;; s++) {
            int d = *s >= '0' && *s <= '9' ? *s - '0' : *s >= 'a' && *s <= 'f' ? *s - 'a' + 10
                  : *s >= 'A' && *s <= 'F' ? *s - 'A' + 10 : -1;
            if (d < 0) break;
            x = x * 16 + (u64)d;
        }
    } else {
        while (*s >= '0' && *s <= '9') x = x * 10 + (u64)(*s++ - '0');
    }
    *v = x;
    return s;
}

// ---- disk test ----
static void pattern_sector(u64 seed, u64 n, u64 *w) {
    u64 x = seed ^ (n * 0x9e3779b97f4a7c15UL);
    if (x == 0) x = 0x9e3779b97f4a7c15UL;
    w[0] = n;  // x86 is little-endian: the words are the on-disk layout
    for (int i = 1; i < 64; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
}

#define CHUNK_SECTORS 256  // 128 KiB per request
static u64 iobuf[CHUNK_SECTORS * 64] __attribute__((aligned(4096)));

static int disk_test(const char *arg) {
    u64 seed, sectors;
    const char *e = num(arg, &seed);
    if (*e != ':' || *num(e + 1, &sectors) || sectors == 0) {
        fail("disk-test", "bad argument (want bh.disk-test=<seed>:<sectors>)", 0);
        return -1;
    }
    i64 fd = sc(SYS_open, "/dev/vda", O_RDWR | O_DIRECT | O_SYNC, 0);
    if (fd < 0) { fail("disk-test", "open /dev/vda", fd); return -1; }
    u64 size = 0;
    i64 r = sc(SYS_ioctl, fd, BLKGETSIZE64, &size);
    if (r < 0) { fail("disk-test", "BLKGETSIZE64", r); sc(SYS_close, fd, 0, 0); return -1; }

    char serial[128];
    serial[0] = 0;
    i64 sfd = sc(SYS_open, "/sys/block/vda/serial", O_RDONLY, 0);
    if (sfd >= 0) {
        r = sc(SYS_read, sfd, serial, sizeof serial - 1);
        serial[r > 0 ? r : 0] = 0;
        for (int i = 0; serial[i]; i++)
            if (serial[i] == '\n') serial[i] = 0;
        sc(SYS_close, sfd, 0, 0);
    }
    struct line l;
    start(&l); put(&l, "disk "); putu(&l, size); put(&l, " bytes serial '"); put(&l, serial); put(&l, "'"); end(&l);
    if (sectors > size / 512) { fail("disk-test", "sector count beyond the disk", 0); sc(SYS_close, fd, 0, 0); return -1; }

    int rc = 0;
    for (u64 s = 0; s < sectors && !rc; s += CHUNK_SECTORS) {
        u64 n = sectors - s < CHUNK_SECTORS ? sectors - s : CHUNK_SECTORS;
        for (u64 i = 0; i < n; i++) pattern_sector(seed, s + i, iobuf + i * 64);
        r = sc6(SYS_pwrite64, fd, (i64)iobuf, (i64)(n * 512), (i64)(s * 512), 0, 0);
        if (r != (i64)(n * 512)) { fail("disk-test", "write", r < 0 ? r : 0); rc = -1; }
    }
    if (!rc && (r = sc(SYS_fsync, fd, 0, 0)) < 0) { fail("disk-test", "fsync", r); rc = -1; }
    u64 want[64];
    for (u64 s = 0; s < sectors && !rc; s += CHUNK_SECTORS) {
        u64 n = sectors - s < CHUNK_SECTORS ? sectors - s : CHUNK_SECTORS;
        memset(iobuf, 0, n * 512);
        r = sc6(SYS_pread64, fd, (i64)iobuf, (i64)(n * 512), (i64)(s * 512), 0, 0);
        if (r != (i64)(n * 512)) { fail("disk-test", "read", r < 0 ? r : 0); rc = -1; break; }
        for (u64 i = 0; i < n; i++) {
            pattern_sector(seed, s + i, want);
            if (memcmp(iobuf + i * 64, want, 512)) {
                start(&l); put(&l, "disk-test FAILED mismatch at sector "); putu(&l, s + i); end(&l);
                rc = -1;
                break;
            }
        }
    }
    sc(SYS_close, fd, 0, 0);
    if (!rc) say("disk-test ok");
    return rc;
}

// ---- network ----
struct sockaddr_in_ { unsigned short family, port; u32 addr; u8 zero[8]; };
struct ifreq_ { char name[16]; union { struct sockaddr_in_ sin; short flags; u8 pad[24]; } u; };

static int parse_ip(const char *s, u32 *out, int *prefix) {
    u32 a = 0;
    for (int i = 0; i < 4; i++) {
        u64 v;
        const char *e = num(s, &v);
        if (e == s || v > 255) return -1;
        a = a << 8 | (u32)v;
        s = e;
        if (i < 3) { if (*s != '.') return -1; s++; }
    }
    *prefix = 24;
    if (*s == '/') {
        u64 p;
        const char *e = num(s + 1, &p);
        if (e == s + 1 || p > 32) return -1;
        *prefix = (int)p;
        s = e;
    }
    if (*s) return -1;
    *out = a;  // host order
    return 0;
}
static u32 be32(u32 x) { return __builtin_bswap32(x); }

static int net_up(const char *arg) {
    u32 ip;
    int prefix;
    if (parse_ip(arg, &ip, &prefix)) { fail("net", "bad address (want bh.net=<ip>/<prefix>)", 0); return -1; }
    i64 s = sc(SYS_socket, AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { fail("net", "socket", s); return -1; }
    struct ifreq_ ifr;
    i64 r;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.name, "eth0", 5);
    ifr.u.sin.family = AF_INET;
    ifr.u.sin.addr = be32(ip);
    if ((r = sc(SYS_ioctl, s, SIOCSIFADDR, &ifr)) < 0) { fail("net", "SIOCSIFADDR eth0", r); return -1; }
    ifr.u.sin.addr = be32(prefix ? 0xffffffffu << (32 - prefix) : 0);
    if ((r = sc(SYS_ioctl, s, SIOCSIFNETMASK, &ifr)) < 0) { fail("net", "SIOCSIFNETMASK eth0", r); return -1; }
    memset(&ifr.u, 0, sizeof ifr.u);
    if ((r = sc(SYS_ioctl, s, SIOCGIFFLAGS, &ifr)) < 0) { fail("net", "SIOCGIFFLAGS eth0", r); return -1; }
    ifr.u.flags |= IFF_UP | IFF_RUNNING;
    if ((r = sc(SYS_ioctl, s, SIOCSIFFLAGS, &ifr)) < 0) { fail("net", "SIOCSIFFLAGS eth0", r); return -1; }
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.name, "lo", 3);
    if (sc(SYS_ioctl, s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.u.flags |= IFF_UP;
        sc(SYS_ioctl, s, SIOCSIFFLAGS, &ifr);
    }
    sc(SYS_close, s, 0, 0);
    struct line l;
    start(&l); put(&l, "eth0 ");
    for (int i = 3; i >= 0; i--) { putu(&l, (ip >> (i * 8)) & 0xff); if (i) put(&l, "."); }
    put(&l, " link up");
    end(&l);
    return 0;
}

// ---- main ----
static void shell(void) {
    say("shell");
    sc(SYS_setsid, 0, 0, 0);
    sc(SYS_ioctl, 0, TIOCSCTTY, 1);
    char *argv[] = {"sh", "-l", 0};
    char *envp[] = {"PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/", "TERM=vt100", 0};
    i64 r = sc(SYS_execve, "/bin/sh", argv, envp);
    fail("shell", "exec /bin/sh", r);
}

// bh.wait: stay up (answering the network, if any) until Bulkhead's control domain asks the
// guest to shut down: its shutdown-request port 0xf5 reads 1 (read through /dev/port, so
// the kernel does the port access). Elsewhere the port reads 0xff: no request.
static void wait_for_shutdown(void) {
    i64 fd = sc(SYS_open, "/dev/port", O_RDONLY, 0);
    if (fd < 0) { fail("wait", "open /dev/port", fd); return; }
    say("waiting for a shutdown request");
    struct { i64 s, ns; } tick = {0, 100 * 1000 * 1000};
    for (;;) {
        u8 b = 0;
        i64 r = sc6(SYS_pread64, fd, (i64)&b, 1, 0xf5, 0, 0);
        if (r == 1 && b == 1) { say("shutdown requested"); break; }
        sc(SYS_nanosleep, (i64)&tick, 0, 0);
    }
    sc(SYS_close, fd, 0, 0);
}

static void finish(void) __attribute__((noreturn));
static void finish(void) {
    char v[8];
    int halt = param("bh.halt", v, sizeof v) != 0;
    say("done");
    sc(SYS_sync, 0, 0, 0);
    i64 r = sc6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, halt ? REBOOT_CMD_POWER_OFF : REBOOT_CMD_RESTART, 0, 0, 0);
    fail("reboot", "reboot()", r);
    for (;;) sc(SYS_pause, 0, 0, 0);
}

void main_(void) __attribute__((used, noreturn));
void main_(void) {
    sc(SYS_mkdir, "/proc", 0755, 0);
    sc(SYS_mkdir, "/sys", 0755, 0);
    sc(SYS_mkdir, "/dev", 0755, 0);
    sc6(SYS_mount, (i64)"proc", (i64)"/proc", (i64)"proc", 0, 0, 0);
    sc6(SYS_mount, (i64)"sysfs", (i64)"/sys", (i64)"sysfs", 0, 0, 0);
    sc6(SYS_mount, (i64)"devtmpfs", (i64)"/dev", (i64)"devtmpfs", 0, 0, 0);  // EBUSY if auto-mounted
    // The kernel gives /init fds 0-2 on /dev/console if the initramfs has it (ours does);
    // otherwise open it now from devtmpfs.
    if (sc(SYS_write, 1, "", 0) < 0) {
        i64 fd = sc(SYS_open, "/dev/console", O_RDWR, 0);
        if (fd >= 0) { sc(SYS_dup2, fd, 0, 0); sc(SYS_dup2, fd, 1, 0); sc(SYS_dup2, fd, 2, 0); }
    }
    say("started");
    // Ctrl-Alt-Del (what `bulkhead shutdown` presses on the i8042 keyboard) becomes SIGINT
    // for us, which pid 1 ignores, instead of an immediate reboot by the kernel: this /init
    // ends when the shutdown-request port says so (bh.wait), as before.
    sc6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_CAD_OFF, 0, 0, 0);

    i64 fd = sc(SYS_open, "/proc/cmdline", O_RDONLY, 0);
    if (fd >= 0) {
        i64 r = sc(SYS_read, fd, cmdline, sizeof cmdline - 1);
        cmdline[r > 0 ? r : 0] = 0;
        sc(SYS_close, fd, 0, 0);
    }
    char v[256];
    if (param("bh.disk-test", v, sizeof v)) disk_test(v);
    if (param("bh.net", v, sizeof v)) net_up(v);
    if (param("bh.shell", v, sizeof v)) shell();
    if (param("bh.wait", v, sizeof v)) wait_for_shutdown();
    finish();
}

// Entry: the kernel starts us with a valid stack; align it for the C ABI and never return.
__asm__(".text\n.global _start\n_start:\n xor %ebp, %ebp\n and $-16, %rsp\n call main_\n ud2\n");
