//! The state dir: one file per VM, written atomically, so a restarted `bulkheadd` knows what
//! runs. Layout: `vms/NAME.toml` (records), `run/NAME.sock` (runner control sockets),
//! `logs/NAME.log` (runner stderr), `root/` (mount point for runners' empty roots).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use bulkhead_ipc::control::VmState;
use serde::{Deserialize, Serialize};

use super::vmconfig::VmSpec;

/// What `bulkheadd` remembers about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Numeric id.
    pub id: u32,
    /// Lifecycle state.
    pub state: VmState,
    /// Runner pid (host pid namespace).
    pub runner_pid: Option<i32>,
    /// Runner uid (= gid).
    pub runner_uid: Option<u32>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The validated config.
    pub spec: VmSpec,
    /// Device backend processes (one per disk), in device order.
    #[serde(default)]
    pub backends: Vec<BackendRecord>,
}

/// A device backend process of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    /// Device name (`disk0`).
    pub device: String,
    /// Its pid.
    pub pid: i32,
    /// Its uid (= gid).
    pub uid: u32,
    /// The binary it runs.
    pub binary: String,
    /// How many times it was restarted (crash, restart or upgrade).
    #[serde(default)]
    pub restarts: u32,
    /// Why the previous process ended.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Set when it kept crashing and is no longer restarted; the device is stalled.
    #[serde(default)]
    pub failed: Option<String>,
    /// Set when it ended and its restart policy says not to restart it; the device is
    /// stalled until `device-restart`.
    #[serde(default)]
    pub stopped: Option<String>,
    /// Its restart policy, as `info` shows it.
    #[serde(default)]
    pub restart_policy: String,
    /// The standby backend waiting to take over, if one is ready.
    #[serde(default)]
    pub standby_pid: Option<i32>,
    /// When a failed device is tried again (seconds since the epoch).
    #[serde(default)]
    pub next_attempt_unix: Option<u64>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the layout under `root`: records, sockets and logs readable by root only
    /// (dirs 0700, files 0600, also for a state dir an older bulkheadd left readable), the
    /// root itself 0711 and the sandboxes' empty root 0555.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        for sub in ["vms", "run", "logs", "root"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o555))?;
        for sub in ["vms", "run", "logs"] {
            let dir = root.join(sub);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            for entry in std::fs::read_dir(&dir)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
                }
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The state dir itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A VM's record file.
    pub fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(format!("{name}.toml"))
    }

    /// A VM's runner control socket.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("{name}.sock"))
    }

    /// A VM's runner log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    /// The empty directory runners' roots are mounted on.
    pub fn sandbox_root(&self) -> PathBuf {
        self.root.join("root")
    }

    /// Writes a record atomically (temp file, fsync, rename, fsync dir).
    pub fn save(&self, name: &str, rec: &VmRecord) -> std::io::Result<()> {
        let text = toml::to_string(rec).map_err(std::io::Error::other)?;
        let path = self.record_path(name);
        let tmp = path.with_extension("toml.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        File::open(self.root.join("vms"))?.sync_all()
    }

    /// Removes a VM's files.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.record_path(name));
        let _ = std::fs::remove_file(self.socket_path(name));
    }

    /// Every record that parses; broken files are reported and skipped.
    pub fn load_all(&self) -> Vec<(String, VmRecord)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.root.join("vms")) else {
            return out;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let Some(name) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| toml::from_str::<VmRecord>(&t).map_err(|e| e.to_string()))
            {
                Ok(rec) => out.push((name, rec)),
                Err(e) => eprintln!(
                    "bulkheadd: skipping unreadable state file {}: {e}",
                    path.display()
                ),
            }
        }
        out.sort_by_key(|(_, r)| r.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_ipc::control::StopReason;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("bulkhead-state-{}", std::process::id()));
        let st = StateDir::open(&dir).expect("open");
        let rec = VmRecord {
            id: 3,
            state: VmState::Stopped(StopReason::GuestExit(4)),
            runner_pid: Some(42),
            runner_uid: Some(61000),
            created_unix: 1,
            spec: super::super::vmconfig::parse(
                "name = \"a\"\nkernel = \"/k\"\n",
                Path::new("/"),
                0,
            )
            .expect("spec"),
            backends: vec![],
        };
        st.save("a", &rec).expect("save");
        let all = st.load_all();
        assert_eq!(all, vec![("a".to_string(), rec)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
