//! VM configuration files (TOML): parsing, validation, and resolving paths.

use std::path::{Path, PathBuf};

use bulkhead_ipc::devstats::Limits;
use core_vmm::config::{parse_memory_size, MAX_VCPUS};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A VM config that cannot be used, with the key or value at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VmConfigError {
    /// TOML syntax, unknown key, wrong type.
    #[error("VM config: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("VM config: {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// `memory = "256M"` or `memory = 512` (MiB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemorySetting {
    /// A size with a suffix.
    Text(String),
    /// MiB.
    Mib(u64),
}

/// What `bulkheadd` does when a device's backend process ends without being asked to
/// (`restart = "always"`, the default; `"on-failure"`; `"never"`). A restart asked for with
/// `bulkhead device-restart` or `device-upgrade` happens whatever the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Start a new backend whenever one ends.
    #[default]
    Always,
    /// Start a new backend unless the old one exited with status 0.
    OnFailure,
    /// Leave the device stopped (stalled) until an administrator restarts it.
    Never,
}

impl std::fmt::Display for RestartMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestartMode::Always => "always",
            RestartMode::OnFailure => "on-failure",
            RestartMode::Never => "never",
        })
    }
}

/// Default `hang_timeout_ms`: how long a backend may hold requests with no completion
/// before it is declared hung and replaced.
pub const DEFAULT_HANG_TIMEOUT_MS: u32 = 2000;
/// Default `retry_failed_secs`: how long a device marked failed waits for its next try.
pub const DEFAULT_RETRY_FAILED_SECS: u32 = 30;

/// What happens when the guest reboots (`on_reboot`, xl.cfg's key): the guest reset itself
/// (Linux `reboot`, the i8042 reset line) or `bulkhead reboot` asked it to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReboot {
    /// Start the VM again in place: a new runner with the same record, devices, images,
    /// taps and MACs, and new backend processes for them.
    Restart,
    /// The VM ends ("shut down"), as a guest reset always did before this key; the default,
    /// so that guests that end by resetting (the test guest, the initramfs `/init`) stop.
    #[default]
    Destroy,
}

impl std::fmt::Display for OnReboot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnReboot::Restart => "restart",
            OnReboot::Destroy => "destroy",
        })
    }
}

/// Default `restart_limit`: unplanned restarts per minute before a device is marked failed.
pub const DEFAULT_RESTART_LIMIT: u32 = 120;

/// A device's restart policy, as the supervisor applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub mode: RestartMode,
    /// Most unplanned restarts within any minute (0: no limit); one more marks the device
    /// failed. Backends that crash at start are also backed off and failed after a few tries.
    pub per_minute: u32,
    /// A backend that holds requests with no completion this long is hung (0: not watched).
    pub hang_timeout_ms: u32,
    /// A device marked failed is tried again after this long (0: only on request).
    pub retry_failed_secs: u32,
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.mode, self.per_minute) {
            (RestartMode::Never, _) => write!(f, "never"),
            (m, 0) => write!(f, "{m}, no rate limit"),
            (m, n) => write!(f, "{m}, at most {n}/min"),
        }
    }
}

/// One disk of a VM (served by `bulkhead-blk` once the disk issue lands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image path.
    pub path: PathBuf,
    /// Read-only to the guest.
    #[serde(default)]
    pub readonly: bool,
    /// Serial number reported to the guest (VIRTIO_BLK_F_GET_ID, 20 bytes at most).
    #[serde(default)]
    pub serial: Option<String>,
    /// Request queues (1 to 8; default: one per vCPU, at most 8).
    #[serde(default)]
    pub queues: Option<u16>,
    /// When the backend is restarted after it ends on its own.
    #[serde(default)]
    pub restart: RestartMode,
    /// Most unplanned restarts per minute (default 120; 0: no limit).
    #[serde(default)]
    pub restart_limit: Option<u32>,
    /// How long the backend may hold requests with no completion before it is declared
    /// hung, killed and replaced (default 2000; 0: not watched).
    #[serde(default)]
    pub hang_timeout_ms: Option<u32>,
    /// Seconds until a device marked failed is tried again (default 30; 0: only on request).
    #[serde(default)]
    pub retry_failed_secs: Option<u32>,
    /// Host caching of the image (QEMU's words): `writeback` (the default, through the
    /// host page cache) or `none` (O_DIRECT). FLUSH makes completed writes durable in both.
    #[serde(default)]
    pub cache: DiskCache,
    /// `[disks.limits]`: rate limits (`bandwidth`, `iops`, each with a `_burst`).
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    /// The most microseconds the backend's queue workers keep polling the ring (and the
    /// I/O engine) after serving requests before they sleep (0 to 10000; 0: never; unset:
    /// the backend's default, 200). Each worker adapts its window within this and does not
    /// poll while the host has more runnable threads than CPUs (`bulkhead-blk --poll-us`).
    #[serde(default)]
    pub poll_us: Option<u32>,
}

/// A byte count: an integer (bytes) or a string with a binary suffix (`"8M"`, `"512K"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    /// Bytes.
    Bytes(u64),
    /// With a suffix (K, M, G, T; B or none: bytes).
    Text(String),
}

impl ByteSize {
    /// The number of bytes, or why the text is not one.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) if t.trim().bytes().all(|b| b.is_ascii_digit()) => t
                .trim()
                .parse()
                .map_err(|_| format!("'{t}' is not a byte count")),
            ByteSize::Text(t) => parse_memory_size(t)
                .map_err(|_| format!("'{t}' is not a byte count like 1048576 or \"8M\"")),
        }
    }
}

/// `[disks.limits]` / `[nics.limits]`: token-bucket rate limits of one device, enforced by
/// its backend. A rate of 0 or none is unlimited (unless the policy imposes one); a
/// `_burst` is a one-time credit on top of the rate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Bytes per second.
    #[serde(default)]
    pub bandwidth: Option<ByteSize>,
    /// One-time extra bytes.
    #[serde(default)]
    pub bandwidth_burst: Option<ByteSize>,
    /// Disk requests per second (disks only).
    #[serde(default)]
    pub iops: Option<u64>,
    /// One-time extra requests (disks only).
    #[serde(default)]
    pub iops_burst: Option<u64>,
    /// Packets per second, each way (NICs only).
    #[serde(default)]
    pub pps: Option<u64>,
    /// One-time extra packets (NICs only).
    #[serde(default)]
    pub pps_burst: Option<u64>,
}

impl LimitsConfig {
    /// The limits as the shared page holds them (`disk`: iops, else pps), or the key at
    /// fault.
    pub fn resolve(&self, disk: bool) -> Result<Limits, VmConfigError> {
        let (kind, ops, ops_burst, wrong) = if disk {
            (
                "disks",
                self.iops,
                self.iops_burst,
                self.pps.or(self.pps_burst),
            )
        } else {
            (
                "nics",
                self.pps,
                self.pps_burst,
                self.iops.or(self.iops_burst),
            )
        };
        if wrong.is_some() {
            return Err(invalid(
                if disk {
                    "disks.limits.pps"
                } else {
                    "nics.limits.iops"
                },
                if disk {
                    "a disk is limited in iops, not pps"
                } else {
                    "a NIC is limited in pps, not iops"
                },
            ));
        }
        let size = |v: &Option<ByteSize>, key: &'static str| {
            v.as_ref()
                .map_or(Ok(0), |b| b.bytes())
                .map_err(|m| invalid(key, format!("{kind}: {m}")))
        };
        Ok(Limits {
            bw_rate: size(&self.bandwidth, "limits.bandwidth")?,
            bw_burst: size(&self.bandwidth_burst, "limits.bandwidth_burst")?,
            ops_rate: ops.unwrap_or(0),
            ops_burst: ops_burst.unwrap_or(0),
        })
    }

    /// The config form of `l` (`disk`: iops, else pps); unlimited rates are left out.
    pub fn from_limits(l: Limits, disk: bool) -> Self {
        let some = |v: u64| (v > 0).then_some(v);
        let (ops, ops_burst) = (some(l.ops_rate), some(l.ops_burst));
        LimitsConfig {
            bandwidth: some(l.bw_rate).map(ByteSize::Bytes),
            bandwidth_burst: some(l.bw_burst).map(ByteSize::Bytes),
            iops: if disk { ops } else { None },
            iops_burst: if disk { ops_burst } else { None },
            pps: if disk { None } else { ops },
            pps_burst: if disk { None } else { ops_burst },
        }
    }
}

/// A disk's `cache` mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCache {
    /// Through the host page cache.
    #[default]
    Writeback,
    /// O_DIRECT: around the host page cache.
    None,
}

impl DiskCache {
    /// The word `bulkhead-blk --cache` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::None => "none",
        }
    }
}

impl DiskConfig {
    /// Its restart policy.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            mode: self.restart,
            per_minute: self.restart_limit.unwrap_or(DEFAULT_RESTART_LIMIT),
            hang_timeout_ms: self.hang_timeout_ms.unwrap_or(DEFAULT_HANG_TIMEOUT_MS),
            retry_failed_secs: self.retry_failed_secs.unwrap_or(DEFAULT_RETRY_FAILED_SECS),
        }
    }
}

/// One NIC of a VM (served by `bulkhead-net` once the network issue lands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// MAC address, `52:54:00:12:34:56`.
    #[serde(default)]
    pub mac: Option<String>,
    /// Network name from the policy's networks.
    pub network: String,
    /// When the backend is restarted after it ends on its own.
    #[serde(default)]
    pub restart: RestartMode,
    /// Most unplanned restarts per minute (default 120; 0: no limit).
    #[serde(default)]
    pub restart_limit: Option<u32>,
    /// How long the backend may hold requests with no completion before it is declared
    /// hung, killed and replaced (default 2000; 0: not watched).
    #[serde(default)]
    pub hang_timeout_ms: Option<u32>,
    /// Seconds until a device marked failed is tried again (default 30; 0: only on request).
    #[serde(default)]
    pub retry_failed_secs: Option<u32>,
    /// `[nics.limits]`: rate limits (`bandwidth`, `pps`, each with a `_burst`).
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
}

impl NicConfig {
    /// Its restart policy.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            mode: self.restart,
            per_minute: self.restart_limit.unwrap_or(DEFAULT_RESTART_LIMIT),
            hang_timeout_ms: self.hang_timeout_ms.unwrap_or(DEFAULT_HANG_TIMEOUT_MS),
            retry_failed_secs: self.retry_failed_secs.unwrap_or(DEFAULT_RETRY_FAILED_SECS),
        }
    }
}

/// A VM config file, as written by an administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    /// VM name: letters, digits, `-`, `_`, `.`; 1–64 characters.
    pub name: String,
    /// vCPUs (default 1).
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest RAM (default 256M).
    #[serde(default = "default_memory")]
    pub memory: MemorySetting,
    /// Guest RAM in 2 MiB pages from the host's hugetlb pool, all taken at create (default
    /// false; `memory` must then be a multiple of 2 MiB).
    #[serde(default)]
    pub hugepages: bool,
    /// Kernel image (ELF with PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Owner: a uid, or a user name from /etc/passwd (default: the creator).
    #[serde(default)]
    pub owner: Option<Owner>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// CPU template: `auto` (default: `minimal` where KVM emulates guest ring 0, else
    /// `host`), `host` or `minimal`.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// What a guest reboot does: `restart` or `destroy` (default).
    #[serde(default)]
    pub on_reboot: OnReboot,
}

/// `owner = 1000` or `owner = "alice"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Owner {
    /// A uid.
    Uid(u32),
    /// A user name.
    Name(String),
}

fn one() -> u32 {
    1
}

fn default_memory() -> MemorySetting {
    MemorySetting::Text("256M".into())
}

/// A validated VM config: sizes in bytes, paths absolute, owner resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// RAM bytes.
    pub memory: u64,
    /// Whether RAM is in huge pages (absent from records and snapshots made before it).
    #[serde(default)]
    pub hugepages: bool,
    /// Kernel, absolute.
    pub kernel: PathBuf,
    /// Initrd, absolute.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// Owner uid.
    pub owner: u32,
    /// Disks, paths absolute.
    pub disks: Vec<DiskConfig>,
    /// NICs.
    pub nics: Vec<NicConfig>,
    /// CPU template as configured (`auto`, `host`, `minimal`).
    #[serde(default = "auto")]
    pub cpu_template: String,
    /// What a guest reboot does.
    #[serde(default)]
    pub on_reboot: OnReboot,
}

fn auto() -> String {
    "auto".into()
}

fn invalid(key: &'static str, message: impl Into<String>) -> VmConfigError {
    VmConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Whether `name` is usable as a VM name (also a file name in the state dir).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Looks a user name up in /etc/passwd (no NSS: the daemon does not load modules).
pub fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Parses and validates a config; relative paths are taken from `config_dir`; `creator` owns
/// the VM when the config names no owner.
pub fn parse(text: &str, config_dir: &Path, creator: u32) -> Result<VmSpec, VmConfigError> {
    let file: VmConfigFile =
        toml::from_str(text).map_err(|e| VmConfigError::Parse(one_line(&e.to_string())))?;
    if !valid_name(&file.name) {
        return Err(invalid(
            "name",
            format!(
                "'{}' is not a valid name: use 1-64 letters, digits, '-', '_' or '.'",
                file.name
            ),
        ));
    }
    let vcpus = u8::try_from(file.vcpus)
        .ok()
        .filter(|v| (1..=MAX_VCPUS).contains(v))
        .ok_or_else(|| {
            invalid(
                "vcpus",
                format!("{} is out of range 1..={MAX_VCPUS}", file.vcpus),
            )
        })?;
    let memory = match &file.memory {
        MemorySetting::Text(t) => {
            parse_memory_size(t).map_err(|e| invalid("memory", e.to_string()))?
        }
        MemorySetting::Mib(m) => m
            .checked_mul(1 << 20)
            .ok_or_else(|| invalid("memory", format!("{m} MiB is too large")))?,
    };
    if memory < core_vmm::config::MIN_MEMORY {
        return Err(invalid(
            "memory",
            format!(
                "{} KiB is too small: at least {} MiB",
                memory >> 10,
                core_vmm::config::MIN_MEMORY >> 20
            ),
        ));
    }
    if file.hugepages && !memory.is_multiple_of(core_vmm::memory::HUGE_PAGE_SIZE) {
        return Err(invalid(
            "memory",
            format!(
                "{} KiB is not a multiple of 2 MiB, as hugepages = true needs",
                memory >> 10
            ),
        ));
    }
    core_vmm::config::validate_machine(memory, vcpus, &file.cmdline)
        .map_err(|e| invalid("memory/cmdline", e.to_string()))?;
    let owner = match &file.owner {
        None => creator,
        Some(Owner::Uid(u)) => *u,
        Some(Owner::Name(n)) => uid_of(n)
            .ok_or_else(|| invalid("owner", format!("no user named '{n}' in /etc/passwd")))?,
    };
    for d in &file.disks {
        if d.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return Err(invalid("disks.serial", "at most 20 bytes"));
        }
        if d.queues.is_some_and(|q| !(1..=8).contains(&q)) {
            return Err(invalid("disks.queues", "must be between 1 and 8"));
        }
        if d.poll_us.is_some_and(|us| us > 10_000) {
            return Err(invalid("disks.poll_us", "at most 10000 (10 ms)"));
        }
        if let Some(l) = &d.limits {
            l.resolve(true)?;
        }
    }
    for n in &file.nics {
        if let Some(l) = &n.limits {
            l.resolve(false)?;
        }
    }
    let cpu_template = file.cpu_template.clone().unwrap_or_else(auto);
    if cpu_template != "auto" && core_vmm::cpu_template::by_name(&cpu_template).is_none() {
        return Err(invalid(
            "cpu_template",
            format!("'{cpu_template}' is not a template: use auto, host or minimal"),
        ));
    }
    for n in &file.nics {
        if let Some(mac) = &n.mac {
            if !valid_mac(mac) {
                return Err(invalid(
                    "nics.mac",
                    format!("'{mac}' is not a MAC address like 52:54:00:12:34:56"),
                ));
            }
        }
    }
    Ok(VmSpec {
        name: file.name,
        vcpus,
        memory,
        hugepages: file.hugepages,
        kernel: absolute(config_dir, &file.kernel),
        initrd: file.initrd.as_deref().map(|p| absolute(config_dir, p)),
        cmdline: file.cmdline,
        owner,
        disks: file
            .disks
            .into_iter()
            .map(|d| DiskConfig {
                path: absolute(config_dir, &d.path),
                queues: Some(d.queues.unwrap_or_else(|| u16::from(vcpus).min(8))),
                ..d
            })
            .collect(),
        nics: file.nics,
        cpu_template,
        on_reboot: file.on_reboot,
    })
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"web1\"\nkernel = \"guest.elf\"\n";

    #[test]
    fn minimal_and_defaults() {
        let s = parse(BASE, Path::new("/etc/vms"), 1000).expect("parse");
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.memory, 256 << 20);
        assert_eq!(s.kernel, PathBuf::from("/etc/vms/guest.elf"));
        assert_eq!(s.owner, 1000);
    }

    #[test]
    fn hugepages_need_whole_2_mib_pages() {
        let s = parse(BASE, Path::new("/"), 0).expect("default");
        assert!(!s.hugepages);
        let s = parse(
            &format!("{BASE}hugepages = true\nmemory = \"130M\"\n"),
            Path::new("/"),
            0,
        )
        .expect("130M in huge pages");
        assert!(s.hugepages);
        let e = parse(
            &format!("{BASE}hugepages = true\nmemory = \"129M\"\n"),
            Path::new("/"),
            0,
        )
        .expect_err("129M");
        assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
        // Without huge pages any whole number of MiB will do.
        parse(&format!("{BASE}memory = \"129M\"\n"), Path::new("/"), 0).expect("129M");
    }

    #[test]
    fn memory_forms() {
        let m =
            |v: &str| parse(&format!("{BASE}memory = {v}\n"), Path::new("/"), 0).map(|s| s.memory);
        assert_eq!(m("\"1G\""), Ok(1 << 30));
        assert_eq!(m("512"), Ok(512 << 20));
        assert!(m("\"1K\"").is_err());
        assert!(m("\"lots\"").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("{BASE}colour = \"blue\"\n"), Path::new("/"), 0).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse(
            &format!("{BASE}[[disks]]\npath = \"a.img\"\nspeed = 3\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("speed"), "{e}");
    }

    #[test]
    fn restart_policies() {
        let s = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\n[[disks]]\npath = \"e.img\"\nrestart = \"on-failure\"\nrestart_limit = 0\n[[nics]]\nnetwork = \"lan\"\nrestart = \"never\"\n"),
            Path::new("/"),
            0,
        )
        .expect("parse");
        let p = s.disks[0].restart_policy();
        assert_eq!(
            (p.mode, p.per_minute),
            (RestartMode::Always, DEFAULT_RESTART_LIMIT)
        );
        assert_eq!(p.to_string(), "always, at most 120/min");
        let p = s.disks[1].restart_policy();
        assert_eq!((p.mode, p.per_minute), (RestartMode::OnFailure, 0));
        assert_eq!(p.to_string(), "on-failure, no rate limit");
        assert_eq!(s.nics[0].restart_policy().to_string(), "never");
        let e = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\nrestart = \"sometimes\"\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
    }

    #[test]
    fn on_reboot() {
        let s = parse(BASE, Path::new("/"), 0).expect("parse");
        assert_eq!(s.on_reboot, OnReboot::Destroy);
        let s = parse(
            &format!("{BASE}on_reboot = \"restart\"\n"),
            Path::new("/"),
            0,
        )
        .expect("parse");
        assert_eq!(s.on_reboot, OnReboot::Restart);
        let e = parse(
            &format!("{BASE}on_reboot = \"preserve\"\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("preserve"), "{e}");
    }

    #[test]
    fn limits_parse_and_name_bad_keys() {
        let s = parse(
            &format!(
                "{BASE}[[disks]]\npath = \"d.img\"\n[disks.limits]\nbandwidth = \"8M\"\niops = 1000\niops_burst = 10\n\
                 [[nics]]\nnetwork = \"lan\"\n[nics.limits]\nbandwidth = 1250000\npps = 5000\n"
            ),
            Path::new("/"),
            0,
        )
        .expect("parse");
        let d = s.disks[0].limits.as_ref().expect("disk limits");
        assert_eq!(
            d.resolve(true),
            Ok(Limits {
                bw_rate: 8 << 20,
                bw_burst: 0,
                ops_rate: 1000,
                ops_burst: 10
            })
        );
        let n = s.nics[0].limits.as_ref().expect("nic limits");
        assert_eq!(
            n.resolve(false).map(|l| (l.bw_rate, l.ops_rate)),
            Ok((1_250_000, 5000))
        );
        // Round trip through the form the record keeps.
        let back = LimitsConfig::from_limits(d.resolve(true).expect("resolve"), true);
        assert_eq!(back.resolve(true), d.resolve(true));
        for (bad, key) in [
            ("[disks.limits]\npps = 5\n", "disks.limits.pps"),
            ("[disks.limits]\nbandwidth = \"fast\"\n", "limits.bandwidth"),
            ("[disks.limits]\nspeed = 5\n", "speed"),
        ] {
            let e = parse(
                &format!("{BASE}[[disks]]\npath = \"d.img\"\n{bad}"),
                Path::new("/"),
                0,
            )
            .unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
        let e = parse(
            &format!("{BASE}[[nics]]\nnetwork = \"lan\"\n[nics.limits]\niops = 5\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("nics.limits.iops"), "{e}");
    }

    #[test]
    fn devices_and_owner() {
        let text = format!(
            "{BASE}owner = 0\n[[disks]]\npath = \"d.img\"\nreadonly = true\nserial = \"S1\"\n[[nics]]\nmac = \"52:54:00:00:00:01\"\nnetwork = \"lan\"\n"
        );
        let s = parse(&text, Path::new("/srv"), 1000).expect("parse");
        assert_eq!(s.owner, 0);
        assert_eq!(s.disks[0].path, PathBuf::from("/srv/d.img"));
        assert!(s.disks[0].readonly);
        assert_eq!(s.disks[0].cache, DiskCache::Writeback);
        assert_eq!(s.nics[0].network, "lan");
        let c = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\ncache = \"none\"\n"),
            Path::new("/"),
            0,
        )
        .expect("cache = none");
        assert_eq!(c.disks[0].cache, DiskCache::None);
        assert_eq!(c.disks[0].poll_us, None);
        let c = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\npoll_us = 50\n"),
            Path::new("/"),
            0,
        )
        .expect("poll_us = 50");
        assert_eq!(c.disks[0].poll_us, Some(50));
        let e = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\npoll_us = 20000\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("disks.poll_us"), "{e}");
        let e = parse(
            &format!("{BASE}[[disks]]\npath = \"d.img\"\ncache = \"unsafe\"\n"),
            Path::new("/"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unsafe"), "{e}");
        assert!(parse(
            &format!("{BASE}[[nics]]\nmac = \"zz\"\nnetwork = \"x\"\n"),
            Path::new("/"),
            0
        )
        .is_err());
        assert!(parse(&format!("{BASE}vcpus = 0\n"), Path::new("/"), 0).is_err());
        assert!(parse("name = \"../x\"\nkernel = \"k\"\n", Path::new("/"), 0).is_err());
        assert_eq!(uid_of("root"), Some(0));
    }
}
