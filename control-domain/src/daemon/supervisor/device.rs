//! The life of one device's backend as a state machine: which process serves the device,
//! what follows when it ends (restart, back-off, failed, stopped), its standby, and restarts
//! and upgrades on request. Pure: no I/O, no locks, no clock of its own. The supervisor
//! ([`super::Supervisor`]) feeds it [`Event`]s with the time, under the VM's device-table
//! lock, and carries out the [`Action`] each returns. Every transition is in [`Device::on`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::daemon::vmconfig::{RestartMode, RestartPolicy};

/// Crashes at start in a row after which the device is marked failed (unless its
/// `restart_limit` is 0: no limit). A backend "crashed at start" when it ended before it
/// served: before the runner finished its vhost-user setup with it (or it was refused).
/// Such a backend is restarted after a back-off; one that served is restarted at once.
pub const QUICK_BUDGET: u32 = 5;
/// The window `restart_limit` counts unplanned restarts in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// A standby that lived less than this when it died is not replaced until the next
/// restart (its binary probably crashes at start).
pub const STANDBY_MIN_LIFE: Duration = Duration::from_secs(1);

/// Why a serving process is expected to end, if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Not expected: its end is judged by the restart policy.
    Unplanned,
    /// Ended on request (restart or upgrade): restarted at once, never counted.
    Planned(String),
    /// Refused (never became ready, or the runner could not set it up) and killed: its end
    /// counts as a crash at start.
    Refused(String),
    /// Hung (it held requests and completed none for the device's timeout) and killed:
    /// judged by the restart policy like a crash.
    Hung(String),
}

/// Why a device has no backend and none is coming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stall {
    /// It kept crashing, or a backend could not be started.
    Failed(String),
    /// Its restart policy says not to restart it.
    Stopped(String),
}

/// The serving side of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// The first process is being started.
    Starting,
    /// A process serves the device (or is being set up to). Its pid is unreaped while the
    /// device is in this state, so it may be signalled without a pid-reuse race.
    Up {
        pid: i32,
        binary: PathBuf,
        /// The runner finished its vhost-user setup with it: it serves.
        served: bool,
        ending: Ending,
    },
    /// The process ended (or was found unusable): what follows is being decided, or the
    /// restart that was decided (its back-off, its spawn) is under way. `served`: the
    /// ended process had served.
    Restarting { ending: Ending, served: bool },
    /// No process and none coming: the device stalls until `device-restart`.
    Stalled(Stall),
}

/// The standby side of a device (disks keep a second backend ready to take over).
#[derive(Debug)]
pub enum Standby<C> {
    /// None, and none being started.
    None,
    /// One is being launched (no pid yet).
    Launching,
    /// One runs: sandboxed, handed the image and `conn`'s peer. `ready` once it signalled
    /// ready and its root is sealed; only then may it take over. Unreaped while here.
    Waiting {
        pid: i32,
        binary: PathBuf,
        conn: C,
        ready: bool,
        since: Instant,
    },
}

/// What happened to a device. `C` is the runner's end of a standby's connection.
#[derive(Debug)]
pub enum Event<C> {
    /// A serving process was started (first start or a restart).
    Spawned { pid: i32, binary: PathBuf },
    /// The runner finished its vhost-user setup with serving process `pid`.
    Served { pid: i32 },
    /// A restarted `bulkheadd` found process `pid` serving the device (`None`: it ended
    /// while nobody watched; the policy decides at once, as for any end).
    Adopted { pid: Option<i32>, binary: PathBuf },
    /// A process of this device ended; it is not reaped yet.
    Ended { pid: i32 },
    /// The serving process that ended was reaped: `clean` if it exited with status 0, `why`
    /// in words. Decides by the policy what follows.
    Decide { clean: bool, why: String },
    /// A restart could not start a process.
    SpawnFailed(String),
    /// Serving process `pid` will never serve (`running`: it has not exited yet).
    Refused {
        pid: i32,
        why: String,
        running: bool,
    },
    /// The runner saw the serving backend hold requests with no completion for
    /// `stalled_ms`.
    Hung { stalled_ms: u64 },
    /// The slow retry of a device marked failed is due.
    RetryFailed,
    /// An administrator's restart, or an upgrade to `binary`: revives a stalled device,
    /// and its crash counters start over.
    /// `by_admin`: an administrator's request also starts the crash counters over; a VM
    /// owner's does not (an owner cannot keep a crash-looping backend going).
    RestartRequested {
        upgrade: Option<PathBuf>,
        by_admin: bool,
    },
    /// The restart that was decided begins: the standby takes over if it can.
    Takeover,
    /// A standby is wanted (the guest runs, or the last one was used up).
    StandbyWanted,
    /// The standby process was started.
    StandbySpawned { pid: i32, binary: PathBuf, conn: C },
    /// Standby `pid` is ready.
    StandbyReady { pid: i32 },
    /// Standby `pid` will not become ready: it is ended.
    StandbyRefused { pid: i32 },
    /// The standby launch is over (whether it started one or not).
    StandbyLaunchOver,
}

/// What the supervisor does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<C> {
    /// Nothing.
    None,
    /// SIGKILL this pid (unreaped: the machine says so).
    Kill(i32),
    /// The serving process ended: reap it, then [`Event::Decide`].
    ServingEnded,
    /// The standby ended; start another if `replace`.
    StandbyEnded { replace: bool, lived: Duration },
    /// Start a new process after `backoff`. `reason` is the ended one's, for `info`.
    Restart { backoff: Duration, reason: String },
    /// No restart: the device stalls. `reason` is the ended one's; a failed device is
    /// tried again after `retry_in` ([`Event::RetryFailed`]), if set.
    Stalled {
        reason: String,
        stall: Stall,
        retry_in: Option<Duration>,
    },
    /// Start a process now (a stalled device was revived).
    SpawnNow,
    /// A restart is already coming: wait for it.
    Wait,
    /// Launch a standby.
    LaunchStandby,
    /// Hand the runner this standby's connection: it serves from now on.
    UseStandby { pid: i32, conn: C },
}

/// One device's backend supervision.
#[derive(Debug)]
pub struct Device<C> {
    /// The binary the next process runs (an upgrade changes it).
    pub binary: PathBuf,
    /// When its backend is restarted.
    pub policy: RestartPolicy,
    /// The serving side.
    pub serving: Serving,
    /// The standby side.
    pub standby: Standby<C>,
    /// Crashes at start in a row.
    pub quick_failures: u32,
    /// When the last minute's unplanned restarts happened.
    recent: VecDeque<Instant>,
    /// How many processes were refused, and why the last one was (an upgrade watches this
    /// to answer early).
    pub refusals: u32,
    pub last_refusal: String,
}

impl<C> Device<C> {
    /// A device whose first backend is about to be started.
    pub fn new(binary: PathBuf, policy: RestartPolicy) -> Self {
        Self {
            binary,
            policy,
            serving: Serving::Starting,
            standby: Standby::None,
            quick_failures: 0,
            recent: VecDeque::new(),
            refusals: 0,
            last_refusal: String::new(),
        }
    }

    /// The serving pid, while one is up (and so unreaped).
    pub fn serving_pid(&self) -> Option<i32> {
        match &self.serving {
            Serving::Up { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// The standby's pid once it is ready to take over.
    pub fn ready_standby(&self) -> Option<i32> {
        match &self.standby {
            Standby::Waiting {
                pid, ready: true, ..
            } => Some(*pid),
            _ => None,
        }
    }

    /// Every transition of the machine.
    pub fn on(&mut self, event: Event<C>, now: Instant) -> Action<C> {
        match event {
            Event::Spawned { pid, binary } => {
                self.serving = Serving::Up {
                    pid,
                    binary,
                    served: false,
                    ending: Ending::Unplanned,
                };
                Action::None
            }
            Event::Served { pid } => {
                if let Serving::Up { pid: p, served, .. } = &mut self.serving {
                    if *p == pid {
                        *served = true;
                    }
                }
                Action::None
            }
            Event::Adopted { pid, binary } => {
                // It has served: its end is not a crash at start.
                self.serving = match pid {
                    Some(pid) => Serving::Up {
                        pid,
                        binary,
                        served: true,
                        ending: Ending::Unplanned,
                    },
                    None => Serving::Restarting {
                        ending: Ending::Unplanned,
                        served: true,
                    },
                };
                match self.serving {
                    Serving::Restarting { .. } => Action::ServingEnded,
                    _ => Action::None,
                }
            }
            Event::Ended { pid } => {
                if let Serving::Up {
                    pid: p,
                    served,
                    ending,
                    ..
                } = &self.serving
                {
                    if *p == pid {
                        self.serving = Serving::Restarting {
                            ending: ending.clone(),
                            served: *served,
                        };
                        return Action::ServingEnded;
                    }
                }
                if let Standby::Waiting { pid: p, since, .. } = &self.standby {
                    if *p == pid {
                        let lived = now.saturating_duration_since(*since);
                        self.standby = Standby::None;
                        return Action::StandbyEnded {
                            replace: lived >= STANDBY_MIN_LIFE,
                            lived,
                        };
                    }
                }
                // One already set aside (a killed standby, a replaced process).
                Action::None
            }
            Event::Decide { clean, why } => {
                let Serving::Restarting { ending, served } = &self.serving else {
                    return Action::None;
                };
                let (ending, served) = (ending.clone(), *served);
                self.decide(ending, served, clean, why, now)
            }
            Event::SpawnFailed(e) => {
                if !matches!(self.serving, Serving::Restarting { .. } | Serving::Starting) {
                    return Action::None;
                }
                let stall = Stall::Failed(format!("cannot start a backend: {e}"));
                self.serving = Serving::Stalled(stall.clone());
                let retry_in = self.retry_in(&stall);
                Action::Stalled {
                    reason: e,
                    stall,
                    retry_in,
                }
            }
            Event::Refused { pid, why, running } => match &mut self.serving {
                Serving::Up { pid: p, ending, .. }
                    if *p == pid && *ending == Ending::Unplanned && running =>
                {
                    *ending = Ending::Refused(why.clone());
                    self.refusals += 1;
                    self.last_refusal = why;
                    Action::Kill(pid)
                }
                _ => Action::None,
            },
            Event::Hung { stalled_ms } => match &mut self.serving {
                Serving::Up { pid, ending, .. } if *ending == Ending::Unplanned => {
                    *ending = Ending::Hung(format!("hung: no progress for {stalled_ms} ms"));
                    Action::Kill(*pid)
                }
                _ => Action::None,
            },
            Event::RetryFailed => {
                if !matches!(self.serving, Serving::Stalled(Stall::Failed(_))) {
                    return Action::None;
                }
                // A new try from a clean slate: one more series of attempts.
                self.quick_failures = 0;
                self.recent.clear();
                self.serving = Serving::Restarting {
                    ending: Ending::Unplanned,
                    served: false,
                };
                Action::SpawnNow
            }
            Event::RestartRequested { upgrade, by_admin } => {
                let planned = match upgrade {
                    Some(b) => {
                        let msg = format!("upgraded to {}", b.display());
                        // A standby runs the old binary: it is ended when it would take
                        // over, and one of the new binary follows the upgrade.
                        self.binary = b;
                        msg
                    }
                    None => "restarted on request".to_string(),
                };
                if by_admin {
                    self.quick_failures = 0;
                    self.recent.clear();
                }
                match &mut self.serving {
                    Serving::Up { pid, ending, .. } => {
                        *ending = Ending::Planned(planned);
                        Action::Kill(*pid)
                    }
                    Serving::Restarting { ending, .. } => {
                        *ending = Ending::Planned(planned);
                        Action::Wait
                    }
                    Serving::Starting => Action::Wait,
                    Serving::Stalled(_) => {
                        self.serving = Serving::Restarting {
                            ending: Ending::Planned(planned),
                            served: false,
                        };
                        Action::SpawnNow
                    }
                }
            }
            Event::Takeover => {
                if !matches!(self.serving, Serving::Restarting { .. }) {
                    return Action::None;
                }
                match std::mem::replace(&mut self.standby, Standby::None) {
                    Standby::Waiting {
                        pid,
                        binary,
                        conn,
                        ready,
                        ..
                    } => {
                        if !ready || binary != self.binary {
                            return Action::Kill(pid);
                        }
                        self.serving = Serving::Up {
                            pid,
                            binary,
                            served: false,
                            ending: Ending::Unplanned,
                        };
                        Action::UseStandby { pid, conn }
                    }
                    other => {
                        self.standby = other;
                        Action::None
                    }
                }
            }
            Event::StandbyWanted => {
                if matches!(self.standby, Standby::None)
                    && self.policy.mode != RestartMode::Never
                    && !matches!(self.serving, Serving::Stalled(_))
                {
                    self.standby = Standby::Launching;
                    Action::LaunchStandby
                } else {
                    Action::None
                }
            }
            Event::StandbySpawned { pid, binary, conn } => {
                self.standby = Standby::Waiting {
                    pid,
                    binary,
                    conn,
                    ready: false,
                    since: now,
                };
                Action::None
            }
            Event::StandbyReady { pid } => {
                if let Standby::Waiting { pid: p, ready, .. } = &mut self.standby {
                    if *p == pid {
                        *ready = true;
                    }
                }
                Action::None
            }
            Event::StandbyRefused { pid } => match &self.standby {
                Standby::Waiting { pid: p, .. } if *p == pid => {
                    self.standby = Standby::None;
                    Action::Kill(pid)
                }
                _ => Action::None,
            },
            Event::StandbyLaunchOver => {
                if matches!(self.standby, Standby::Launching) {
                    self.standby = Standby::None;
                }
                Action::None
            }
        }
    }
}

/// The restart policy's decisions.
impl<C> Device<C> {
    /// When a device stalled by `stall` is tried again on its own: a failed one after the
    /// policy's `retry_failed_secs` (unless 0); a stopped one (its policy said so) never.
    fn retry_in(&self, stall: &Stall) -> Option<Duration> {
        match stall {
            Stall::Failed(_) if self.policy.retry_failed_secs > 0 => {
                Some(Duration::from_secs(self.policy.retry_failed_secs.into()))
            }
            _ => None,
        }
    }

    /// What follows the end of the serving process, by the restart policy.
    fn decide(
        &mut self,
        ending: Ending,
        served: bool,
        clean: bool,
        why: String,
        now: Instant,
    ) -> Action<C> {
        let reason = match &ending {
            Ending::Planned(p) | Ending::Hung(p) => format!("{p} ({why})"),
            Ending::Refused(r) => format!("{why}: refused, {r}"),
            Ending::Unplanned => why,
        };
        let stall = |me: &mut Self, stall: Stall| {
            me.serving = Serving::Stalled(stall.clone());
            let retry_in = me.retry_in(&stall);
            Action::Stalled {
                reason: reason.clone(),
                stall,
                retry_in,
            }
        };
        if let Ending::Planned(_) = ending {
            self.quick_failures = 0;
            return Action::Restart {
                backoff: Duration::ZERO,
                reason,
            };
        }
        if self.policy.mode == RestartMode::Never {
            return stall(self, Stall::Stopped("restart policy is 'never'".into()));
        }
        if self.policy.mode == RestartMode::OnFailure && clean {
            return stall(
                self,
                Stall::Stopped("it exited cleanly and the restart policy is 'on-failure'".into()),
            );
        }
        if !served || matches!(ending, Ending::Refused(_)) {
            self.quick_failures += 1;
        } else {
            self.quick_failures = 0;
        }
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > WINDOW)
        {
            self.recent.pop_front();
        }
        let quick = self.quick_failures;
        let limit = self.policy.per_minute;
        if limit > 0 && quick >= QUICK_BUDGET {
            stall(
                self,
                Stall::Failed(format!(
                    "crashed {quick} times in a row before it served; last: {reason}"
                )),
            )
        } else if limit > 0 && self.recent.len() > limit as usize {
            let n = self.recent.len();
            stall(
                self,
                Stall::Failed(format!(
                    "ended {n} times within a minute, more than its restart_limit of {limit}; last: {reason}"
                )),
            )
        } else {
            let backoff = if quick > 0 {
                Duration::from_millis(100u64 << (quick - 1).min(4))
            } else {
                Duration::ZERO
            };
            Action::Restart { backoff, reason }
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
