//! `bulkheadd`: the control domain. Owns `/dev/kvm`, the policy and the state dir; creates
//! guest RAM and spawns each VM's runner into its sandbox; supervises the device backends;
//! serves the CLI; re-adopts running VMs after a restart.
//!
//! Its rooms, each a module that says what it owns and what it may call (the threads and
//! locks are drawn in `control-domain/README.md`):
//! - [`server`]: the control socket and its connections, admitted by [`connections`];
//! - [`api`]: one function per request, authorized by the [`policy`];
//! - [`lifecycle`]: the VM registry and create, start, pause, shutdown, reboot, destroy,
//!   adopt;
//! - [`supervisor`]: every device backend, its state machine, restarts, standbys, upgrades;
//! - [`vm`]: one VM's record and runner link; [`console`]: its console ring and clients;
//! - [`describe`]: how `list` and `info` word things;
//! - [`spawn`], [`network`], [`state`], [`vmconfig`]: sandboxes, taps, the state dir, configs;
//! - [`images`]: opening disk images, kernels and initrds beneath the allowed directories.

pub mod api;
pub mod connections;
pub mod console;
pub mod describe;
pub mod images;
pub mod lifecycle;
pub mod network;
pub mod policy;
pub mod server;
pub mod spawn;
pub mod state;
pub mod stats;
pub mod supervisor;
pub mod vm;
pub mod vmconfig;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bulkhead_ipc::control::ErrorCode;

use lifecycle::Registry;
use policy::DomainPolicy;
use state::StateDir;
use supervisor::Supervisor;

/// How `bulkheadd` was started.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Client socket.
    pub socket: PathBuf,
    /// State dir.
    pub state_dir: PathBuf,
    /// Policy file (may be absent).
    pub policy: PathBuf,
    /// The runner binary.
    pub runner: PathBuf,
    /// The disk backend binary (bulkhead-blk).
    pub blk: PathBuf,
    /// The network backend binary (bulkhead-net).
    pub net: PathBuf,
    /// Have runners run their sandbox self-test (tests only).
    pub runner_selftest: bool,
}

/// A request that failed: the code and one line for the user.
pub type Failure = (ErrorCode, String);

/// A [`Failure`] with `code` and `msg`.
pub fn fail(code: ErrorCode, msg: impl Into<String>) -> Failure {
    (code, msg.into())
}

/// The control domain.
pub struct Daemon {
    /// Itself, for what outlives a request (a VM's restart after its guest rebooted).
    me: std::sync::Weak<Daemon>,
    cfg: DaemonConfig,
    policy: DomainPolicy,
    state: StateDir,
    vms: Registry,
    supervisor: Arc<Supervisor>,
    next_client: AtomicU64,
    connections: Arc<connections::ConnectionLimits>,
}

/// One line in `bulkheadd`'s log.
pub(crate) fn log(msg: &str) {
    eprintln!("bulkheadd: {msg}");
}

impl Daemon {
    /// Loads policy and state; re-adopts VMs whose runners still run.
    pub fn new(cfg: DaemonConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let (policy, from_file) = DomainPolicy::load(&cfg.policy)?;
        if from_file {
            log(&format!("policy loaded from {}", cfg.policy.display()));
        } else {
            log(&format!(
                "no policy at {}: safe default (only root may act)",
                cfg.policy.display()
            ));
        }
        let state = StateDir::open(&cfg.state_dir)
            .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
        let daemon = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cfg,
            policy,
            supervisor: Supervisor::new(state.clone()),
            state,
            vms: Registry::default(),
            next_client: AtomicU64::new(1),
            connections: connections::ConnectionLimits::new(
                connections::PER_UID,
                connections::TOTAL,
            ),
        });
        daemon.adopt_all();
        Ok(daemon)
    }
}
