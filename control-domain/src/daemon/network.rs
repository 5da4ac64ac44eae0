//! Host-side networking for VMs: the bridge of each policy network (created on demand, with
//! its host address) and one tap per NIC, opened here with `IFF_VNET_HDR` and attached to
//! the bridge, so `bulkhead-net` needs no `CAP_NET_ADMIN`. A tap disappears when its last
//! fd closes, i.e. when the VM's backend ends.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Runs `ip` with `args`; returns its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes sure `bridge` exists, is up and (if given) has `address` (CIDR).
pub fn ensure_bridge(bridge: &str, address: Option<&str>) -> Result<(), String> {
    if ip(&["link", "show", "dev", bridge]).is_err() {
        ip(&["link", "add", "name", bridge, "type", "bridge"])?;
    }
    if let Some(addr) = address {
        // Already present is fine.
        if let Err(e) = ip(&["addr", "add", addr, "dev", bridge]) {
            if !e.contains("File exists") && !e.contains("already assigned") {
                return Err(e);
            }
        }
    }
    ip(&["link", "set", "dev", bridge, "up"])
}

/// Creates tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), attaches it to `bridge` and
/// brings it up. The returned fd is the tap; it vanishes when every copy is closed.
pub fn open_tap(name: &str, bridge: &str) -> Result<File, String> {
    if name.len() > 15 {
        return Err(format!("tap name '{name}' is longer than 15 bytes"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `IfReq` is,
    // on an open /dev/net/tun fd.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    ip(&["link", "set", "dev", name, "master", bridge])?;
    ip(&["link", "set", "dev", name, "up"])?;
    Ok(tun)
}

/// Sets `tap`'s vnet header size (12 bytes, virtio 1.x) and finds out whether it takes
/// UFO; leaves its offloads off. Done once, here, so that a backend (or its standby) never
/// has to touch the tap before a guest's features are known.
pub fn probe_tap(tap: &File) -> Result<bool, String> {
    let fd = tap.as_raw_fd();
    let hdr: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass, on a tap fd.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr as *const libc::c_int) } < 0 {
        return Err(format!(
            "TUNSETVNETHDRSZ: {}",
            std::io::Error::last_os_error()
        ));
    }
    let all = libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | libc::TUN_F_TSO_ECN
        | libc::TUN_F_UFO;
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let ufo = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(all)) } == 0;
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(format!(
            "TUNSETOFFLOAD: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(ufo)
}

/// A stable MAC for NIC `index` of VM `id` (locally administered, QEMU's 52:54:00 prefix).
pub fn default_mac(id: u32, index: usize) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (id >> 8) & 0xff,
        id & 0xff,
        index & 0xff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_names() {
        assert_eq!(default_mac(0x102, 3), "52:54:00:01:02:03");
        assert!(open_tap("this-name-is-way-too-long", "br").is_err());
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
