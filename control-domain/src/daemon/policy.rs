//! Who may do what (by the caller's uid/gids from `SO_PEERCRED`) and what a VM may have.
//! Every refusal names the rule that refused it.

use std::path::{Path, PathBuf};

use core_vmm::config::{parse_memory_size, MAX_VCPUS};
use serde::Deserialize;

use super::vmconfig::ByteSize;
use bulkhead_ipc::devstats::Limits;
use thiserror::Error;

/// A policy file that cannot be used.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// Unreadable.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Invalid TOML or values.
    #[error("policy {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    admins: Option<AdminsFile>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    images: Option<ImagesFile>,
    #[serde(default)]
    runners: Option<RunnersFile>,
    #[serde(default)]
    networks: std::collections::BTreeMap<String, NetworkFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    bridge: Option<String>,
    address: Option<String>,
    #[serde(default)]
    vms: Vec<String>,
}

/// A network VMs may join: a host bridge, maybe with a host address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Bridge interface name.
    pub bridge: String,
    /// Host address on the bridge (CIDR).
    pub address: Option<String>,
    /// VM names allowed to join; `*` allows every VM.
    pub vms: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminsFile {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_vcpus: Option<u32>,
    max_memory: Option<String>,
    host_memory: Option<String>,
    max_disk_bandwidth: Option<ByteSize>,
    max_disk_iops: Option<u64>,
    max_nic_bandwidth: Option<ByteSize>,
    max_nic_pps: Option<u64>,
    default_disk_bandwidth: Option<ByteSize>,
    default_disk_iops: Option<u64>,
    default_nic_bandwidth: Option<ByteSize>,
    default_nic_pps: Option<u64>,
    hugepages: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesFile {
    allowed: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnersFile {
    uid_base: u32,
    uid_count: u32,
}

/// The policy `bulkheadd` enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPolicy {
    /// uids that may do everything.
    pub admin_uids: Vec<u32>,
    /// gids whose members may do everything.
    pub admin_gids: Vec<u32>,
    /// vCPUs per VM.
    pub max_vcpus: u8,
    /// RAM per VM, bytes.
    pub max_memory: u64,
    /// RAM of all live VMs together, bytes.
    pub host_memory: u64,
    /// Whether a VM may take its RAM from the host's hugetlb pool (`limits.hugepages`).
    pub hugepages: bool,
    /// Image files must lie under one of these directories.
    pub image_dirs: Vec<PathBuf>,
    /// First uid (and gid) given to runners.
    pub runner_uid_base: u32,
    /// How many runner uids there are.
    pub runner_uid_count: u32,
    /// Networks by name.
    pub networks: std::collections::BTreeMap<String, NetworkPolicy>,
    /// Most a disk may have (`limits.max_disk_*`; 0: no cap). Bursts are not capped.
    pub disk_max: Limits,
    /// What a disk that sets no limit gets (`limits.default_disk_*`; 0: none).
    pub disk_default: Limits,
    /// Most a NIC may have (`limits.max_nic_*`).
    pub nic_max: Limits,
    /// What a NIC that sets no limit gets (`limits.default_nic_*`).
    pub nic_default: Limits,
}

/// Something a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create a VM.
    Create,
    /// See a VM (list, info).
    View,
    /// Attach to its console.
    Console,
    /// Pause / unpause.
    Pause,
    /// Ask it to shut down.
    Shutdown,
    /// Destroy it.
    Destroy,
    /// Save it to a snapshot (`save`).
    Save,
    /// Restart a device's backend (`device-restart`): its owner or an administrator.
    DeviceRestart,
    /// Move a device to another backend binary (`device-upgrade`): administrators only,
    /// since it names a program that `bulkheadd` runs.
    DeviceUpgrade,
    /// Change a device's rate limits (`device-set-limit`): its owner or an administrator,
    /// within the policy's caps.
    DeviceSetLimit,
}

impl Action {
    /// The verb, as refusals name it.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::View => "view",
            Action::Console => "console",
            Action::Pause => "pause",
            Action::Shutdown => "shutdown",
            Action::Destroy => "destroy",
            Action::Save => "save",
            Action::DeviceRestart => "device-restart",
            Action::DeviceUpgrade => "device-upgrade",
            Action::DeviceSetLimit => "device-set-limit",
        }
    }
}

/// The caller, from `SO_PEERCRED` plus its supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// uid.
    pub uid: u32,
    /// Primary and supplementary gids.
    pub gids: Vec<u32>,
}

impl Caller {
    /// The caller with primary group `gid` and supplementary `groups` (from the socket:
    /// `SO_PEERCRED` and `SO_PEERGROUPS`).
    pub fn from_peer(uid: u32, gid: u32, groups: &[u32]) -> Self {
        let mut gids = vec![gid];
        gids.extend(groups.iter().copied().filter(|g| *g != gid));
        Self { uid, gids }
    }
}

fn mib(b: u64) -> u64 {
    b >> 20
}

impl DomainPolicy {
    /// The policy with no file: only root acts; limits are the host's.
    pub fn safe_default() -> Self {
        let host = core_vmm::config::host_memory().unwrap_or(1 << 30);
        Self {
            admin_uids: vec![0],
            admin_gids: vec![],
            max_vcpus: MAX_VCPUS,
            max_memory: host,
            host_memory: host,
            hugepages: true,
            image_dirs: vec![PathBuf::from("/")],
            runner_uid_base: 61000,
            runner_uid_count: 1000,
            networks: std::collections::BTreeMap::new(),
            disk_max: Limits::default(),
            disk_default: Limits::default(),
            nic_max: Limits::default(),
            nic_default: Limits::default(),
        }
    }

    /// Loads `path`; a missing file gives [`DomainPolicy::safe_default`].
    pub fn load(path: &Path) -> Result<(Self, bool), PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Self::parse(&text)
                    .map(|p| (p, true))
                    .map_err(|message| PolicyError::Invalid {
                        path: path.to_path_buf(),
                        message,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Self::safe_default(), false)),
            Err(source) => Err(PolicyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses policy TOML over the safe defaults.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: PolicyFile = toml::from_str(text).map_err(|e| {
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })?;
        let mut p = Self::safe_default();
        if let Some(a) = f.admins {
            p.admin_uids = a.uids;
            p.admin_gids = a.gids;
        }
        if let Some(v) = f.limits.max_vcpus {
            p.max_vcpus = u8::try_from(v)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| format!("limits.max_vcpus: {v} is out of range 1..={MAX_VCPUS}"))?;
        }
        if let Some(m) = &f.limits.max_memory {
            p.max_memory = parse_memory_size(m).map_err(|e| format!("limits.max_memory: {e}"))?;
        }
        if let Some(m) = &f.limits.host_memory {
            p.host_memory = parse_memory_size(m).map_err(|e| format!("limits.host_memory: {e}"))?;
        }
        if let Some(h) = f.limits.hugepages {
            p.hugepages = h;
        }
        let size = |v: &Option<ByteSize>, key: &str| {
            v.as_ref()
                .map_or(Ok(0), |b| b.bytes())
                .map_err(|m| format!("limits.{key}: {m}"))
        };
        let l = &f.limits;
        p.disk_max.bw_rate = size(&l.max_disk_bandwidth, "max_disk_bandwidth")?;
        p.disk_max.ops_rate = l.max_disk_iops.unwrap_or(0);
        p.nic_max.bw_rate = size(&l.max_nic_bandwidth, "max_nic_bandwidth")?;
        p.nic_max.ops_rate = l.max_nic_pps.unwrap_or(0);
        p.disk_default.bw_rate = size(&l.default_disk_bandwidth, "default_disk_bandwidth")?;
        p.disk_default.ops_rate = l.default_disk_iops.unwrap_or(0);
        p.nic_default.bw_rate = size(&l.default_nic_bandwidth, "default_nic_bandwidth")?;
        p.nic_default.ops_rate = l.default_nic_pps.unwrap_or(0);
        for (key, d, m) in [
            (
                "default_disk_bandwidth",
                p.disk_default.bw_rate,
                p.disk_max.bw_rate,
            ),
            (
                "default_disk_iops",
                p.disk_default.ops_rate,
                p.disk_max.ops_rate,
            ),
            (
                "default_nic_bandwidth",
                p.nic_default.bw_rate,
                p.nic_max.bw_rate,
            ),
            (
                "default_nic_pps",
                p.nic_default.ops_rate,
                p.nic_max.ops_rate,
            ),
        ] {
            if m > 0 && d > m {
                return Err(format!("limits.{key}: {d} is above its cap {m}"));
            }
        }
        if let Some(i) = f.images {
            if i.allowed.iter().any(|d| !d.is_absolute()) {
                return Err("images.allowed: directories must be absolute".into());
            }
            p.image_dirs = i.allowed;
        }
        for (name, n) in f.networks {
            let bridge = n.bridge.unwrap_or_else(|| format!("bh-{name}"));
            if bridge.is_empty()
                || bridge.len() > 15
                || !bridge
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("networks.{name}.bridge: '{bridge}' is not a valid interface name (1-15 of [A-Za-z0-9_-])"));
            }
            p.networks.insert(
                name,
                NetworkPolicy {
                    bridge,
                    address: n.address,
                    vms: n.vms,
                },
            );
        }
        if let Some(r) = f.runners {
            if r.uid_base == 0 || r.uid_count == 0 || r.uid_base.checked_add(r.uid_count).is_none()
            {
                return Err("runners: uid_base must be > 0 and uid_count > 0".into());
            }
            p.runner_uid_base = r.uid_base;
            p.runner_uid_count = r.uid_count;
        }
        Ok(p)
    }

    /// The limits `device` (a disk if `disk`, else a NIC) runs with when it asks for
    /// `asked`: a rate it leaves at 0 gets the policy's default, or else its cap; a rate
    /// above the cap is refused, naming the rule.
    pub fn device_limits(&self, device: &str, disk: bool, asked: Limits) -> Result<Limits, String> {
        let (max, default, kind, ops) = if disk {
            (&self.disk_max, &self.disk_default, "disk", "iops")
        } else {
            (&self.nic_max, &self.nic_default, "nic", "pps")
        };
        let pick = |asked: u64, default: u64, max: u64, what: &str, unit: &str| {
            let v = if asked > 0 {
                asked
            } else if default > 0 {
                default
            } else {
                max
            };
            if max > 0 && v > max {
                Err(format!(
                    "denied by rule 'limits.max_{kind}_{what}': {device} asks {v} {unit}, at most {max}"
                ))
            } else {
                Ok(v)
            }
        };
        Ok(Limits {
            bw_rate: pick(
                asked.bw_rate,
                default.bw_rate,
                max.bw_rate,
                "bandwidth",
                "bytes/s",
            )?,
            bw_burst: asked.bw_burst,
            ops_rate: pick(
                asked.ops_rate,
                default.ops_rate,
                max.ops_rate,
                ops,
                "per second",
            )?,
            ops_burst: asked.ops_burst,
        })
    }

    /// Whether the caller is an administrator.
    pub fn is_admin(&self, c: &Caller) -> bool {
        self.admin_uids.contains(&c.uid) || c.gids.iter().any(|g| self.admin_gids.contains(g))
    }

    /// May `caller` do `action` on a VM owned by `owner` (None for create)?
    pub fn authorize(
        &self,
        caller: &Caller,
        action: Action,
        vm: Option<(&str, u32)>,
    ) -> Result<(), String> {
        if self.is_admin(caller) {
            return Ok(());
        }
        match (action, vm) {
            (Action::Create, _) => Err(format!(
                "denied by rule 'admins': only administrators may create VMs, and uid {} is not one",
                caller.uid
            )),
            (Action::DeviceUpgrade, _) => Err(format!(
                "denied by rule 'device-upgrade': only administrators may move a device to another backend binary, and uid {} is not one",
                caller.uid
            )),
            (_, Some((_, owner))) if owner == caller.uid => Ok(()),
            (_, Some((name, _))) => Err(format!(
                "denied by rule 'owner': uid {} may not {} VM '{name}': it does not own it and is not an administrator",
                caller.uid,
                action.verb()
            )),
            (_, None) => Ok(()),
        }
    }

    /// Checks a new VM against the per-VM and host limits; `in_use` is the RAM of the live VMs.
    pub fn check_limits(&self, vcpus: u8, memory: u64, in_use: u64) -> Result<(), String> {
        if vcpus > self.max_vcpus {
            return Err(format!(
                "denied by rule 'limits.max_vcpus': {vcpus} vCPUs requested, at most {} per VM",
                self.max_vcpus
            ));
        }
        if memory > self.max_memory {
            return Err(format!(
                "denied by rule 'limits.max_memory': {} MiB requested, at most {} MiB per VM",
                mib(memory),
                mib(self.max_memory)
            ));
        }
        if in_use.saturating_add(memory) > self.host_memory {
            return Err(format!(
                "denied by rule 'limits.host_memory': {} MiB requested with {} MiB already given to running VMs; the host allows {} MiB in all",
                mib(memory),
                mib(in_use),
                mib(self.host_memory)
            ));
        }
        Ok(())
    }

    /// May a VM take its RAM from the host's hugetlb pool (`hugepages = true`)?
    pub fn check_hugepages(&self) -> Result<(), String> {
        if self.hugepages {
            Ok(())
        } else {
            Err("denied by rule 'limits.hugepages': this host gives no VM huge pages; remove hugepages = true from the VM config".into())
        }
    }

    /// May VM `vm` join network `net`?
    pub fn check_network(&self, vm: &str, net: &str) -> Result<&NetworkPolicy, String> {
        let n = self.networks.get(net).ok_or_else(|| {
            format!(
                "denied by rule 'networks': there is no network '{net}' (defined: {:?})",
                self.networks.keys().collect::<Vec<_>>()
            )
        })?;
        if n.vms.iter().any(|v| v == "*" || v == vm) {
            Ok(n)
        } else {
            Err(format!(
                "denied by rule 'networks.{net}.vms': VM '{vm}' may not join network '{net}'"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gids: vec![uid],
        }
    }

    #[test]
    fn device_limit_caps_and_defaults() {
        let p = DomainPolicy::parse(
            "[limits]\nmax_disk_iops = 500\nmax_disk_bandwidth = \"64M\"\ndefault_disk_bandwidth = \"16M\"\nmax_nic_pps = 100\n",
        )
        .expect("parse");
        let none = Limits::default();
        // Unset: the default, else the cap.
        let l = p.device_limits("disk0", true, none).expect("within");
        assert_eq!((l.bw_rate, l.ops_rate), (16 << 20, 500));
        let l = p.device_limits("nic0", false, none).expect("within");
        assert_eq!((l.bw_rate, l.ops_rate), (0, 100));
        let e = p
            .device_limits(
                "disk1",
                true,
                Limits {
                    ops_rate: 501,
                    ..none
                },
            )
            .unwrap_err();
        assert!(e.contains("denied by rule 'limits.max_disk_iops'"), "{e}");
        assert!(e.contains("disk1"), "{e}");
        let e = p
            .device_limits(
                "nic0",
                false,
                Limits {
                    ops_rate: 101,
                    ..none
                },
            )
            .unwrap_err();
        assert!(e.contains("limits.max_nic_pps"), "{e}");
        // A default above its cap is a policy error.
        let e = DomainPolicy::parse("[limits]\nmax_disk_iops = 5\ndefault_disk_iops = 6\n")
            .unwrap_err();
        assert!(e.contains("default_disk_iops"), "{e}");
    }

    #[test]
    fn default_only_root() {
        let p = DomainPolicy::safe_default();
        assert!(p.authorize(&caller(0), Action::Create, None).is_ok());
        let e = p
            .authorize(&caller(1000), Action::Create, None)
            .unwrap_err();
        assert!(e.contains("rule 'admins'"), "{e}");
    }

    #[test]
    fn owners_and_groups() {
        let p = DomainPolicy::parse("[admins]\nuids = [0]\ngids = [50]\n").expect("parse");
        assert!(p
            .authorize(
                &Caller {
                    uid: 7,
                    gids: vec![7, 50]
                },
                Action::Create,
                None
            )
            .is_ok());
        assert!(p
            .authorize(&caller(1000), Action::Console, Some(("a", 1000)))
            .is_ok());
        let e = p
            .authorize(&caller(1000), Action::Console, Some(("b", 1001)))
            .unwrap_err();
        assert!(e.contains("rule 'owner'") && e.contains("'b'"), "{e}");
    }

    #[test]
    fn device_verbs_have_rules_of_their_own() {
        let p = DomainPolicy::parse("[admins]\nuids = [0]\n").expect("parse");
        let mine = Some(("a", 1000));
        assert!(p
            .authorize(&caller(1000), Action::DeviceRestart, mine)
            .is_ok());
        let e = p
            .authorize(&caller(1001), Action::DeviceRestart, mine)
            .unwrap_err();
        assert!(
            e.contains("rule 'owner'") && e.contains("device-restart"),
            "{e}"
        );
        // An owner may not pick a program for bulkheadd to run.
        let e = p
            .authorize(&caller(1000), Action::DeviceUpgrade, mine)
            .unwrap_err();
        assert!(e.contains("rule 'device-upgrade'"), "{e}");
        assert!(p.authorize(&caller(0), Action::DeviceUpgrade, mine).is_ok());
    }

    #[test]
    fn limits_name_the_rule() {
        let p = DomainPolicy::parse(
            "[limits]\nmax_vcpus = 2\nmax_memory = \"512M\"\nhost_memory = \"1G\"\n",
        )
        .expect("parse");
        assert!(p.check_limits(2, 512 << 20, 0).is_ok());
        assert!(p
            .check_limits(3, 64 << 20, 0)
            .unwrap_err()
            .contains("limits.max_vcpus"));
        assert!(p
            .check_limits(1, 1 << 30, 0)
            .unwrap_err()
            .contains("limits.max_memory"));
        assert!(p
            .check_limits(1, 512 << 20, 600 << 20)
            .unwrap_err()
            .contains("limits.host_memory"));
        assert!(
            p.check_hugepages().is_ok(),
            "huge pages are allowed by default"
        );
        let no = DomainPolicy::parse("[limits]\nhugepages = false\n").expect("parse");
        assert!(no
            .check_hugepages()
            .unwrap_err()
            .contains("limits.hugepages"));
        assert!(DomainPolicy::parse("[limits]\nbogus = 1\n")
            .unwrap_err()
            .contains("bogus"));
    }
}
