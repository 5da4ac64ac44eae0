//! Walks every transition of the device state machine, without a VM.

use super::*;

type Dev = Device<&'static str>;

fn policy(mode: RestartMode, per_minute: u32) -> RestartPolicy {
    RestartPolicy { mode, per_minute }
}

fn up(d: &mut Dev, pid: i32, t: Instant) {
    let binary = d.binary.clone();
    assert_eq!(d.on(Event::Spawned { pid, binary }, t), Action::None);
    assert_eq!(d.serving_pid(), Some(pid));
}

/// Ends the serving `pid` after `life` and decides; returns the decision.
fn crash(d: &mut Dev, pid: i32, t: &mut Instant, life: Duration) -> Action<&'static str> {
    *t += life;
    assert_eq!(d.on(Event::Ended { pid }, *t), Action::ServingEnded);
    assert_eq!(
        d.serving_pid(),
        None,
        "not Up once ended: never signalled again"
    );
    d.on(
        Event::Decide {
            clean: false,
            why: "killed by SIGKILL".into(),
        },
        *t,
    )
}

#[test]
fn start_serve_crash_restart() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    assert_eq!(d.serving, Serving::Starting);
    up(&mut d, 10, t);
    // A crash after serving a while: restarted at once.
    let a = crash(&mut d, 10, &mut t, Duration::from_secs(5));
    assert_eq!(
        a,
        Action::Restart {
            backoff: Duration::ZERO,
            reason: "killed by SIGKILL".into()
        }
    );
    assert!(matches!(d.serving, Serving::Restarting { .. }));
    assert_eq!(d.on(Event::Takeover, t), Action::None, "no standby");
    up(&mut d, 11, t);
    assert_eq!(d.quick_failures, 0);
}

#[test]
fn crash_at_start_backs_off_then_fails() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 0));
    let mut pid = 20;
    up(&mut d, pid, t);
    for n in 1..QUICK_BUDGET {
        match crash(&mut d, pid, &mut t, Duration::from_millis(10)) {
            Action::Restart { backoff, .. } => {
                assert_eq!(backoff, Duration::from_millis(100 << (n - 1)))
            }
            other => panic!("crash {n}: {other:?}"),
        }
        pid += 1;
        up(&mut d, pid, t);
    }
    match crash(&mut d, pid, &mut t, Duration::from_millis(10)) {
        Action::Stalled {
            stall: Stall::Failed(why),
            ..
        } => assert!(why.contains("crashed 5 times"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(d.serving, Serving::Stalled(Stall::Failed(_))));
    // No standby is started for a failed device.
    assert_eq!(d.on(Event::StandbyWanted, t), Action::None);
    // An administrator revives it: counters start over, a process is started now.
    assert_eq!(
        d.on(Event::RestartRequested { upgrade: None }, t),
        Action::SpawnNow
    );
    assert_eq!(d.quick_failures, 0);
    up(&mut d, 99, t);
}

#[test]
fn restart_limit_per_minute() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 2));
    up(&mut d, 1, t);
    assert!(matches!(
        crash(&mut d, 1, &mut t, Duration::from_secs(1)),
        Action::Restart { .. }
    ));
    up(&mut d, 2, t);
    assert!(matches!(
        crash(&mut d, 2, &mut t, Duration::from_secs(1)),
        Action::Restart { .. }
    ));
    up(&mut d, 3, t);
    match crash(&mut d, 3, &mut t, Duration::from_secs(1)) {
        Action::Stalled {
            stall: Stall::Failed(why),
            ..
        } => assert!(why.contains("restart_limit of 2"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A minute later the window is empty again.
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 1));
    up(&mut d, 1, t);
    assert!(matches!(
        crash(&mut d, 1, &mut t, Duration::from_secs(1)),
        Action::Restart { .. }
    ));
    up(&mut d, 2, t);
    assert!(matches!(
        crash(&mut d, 2, &mut t, WINDOW + Duration::from_secs(1)),
        Action::Restart { .. }
    ));
}

#[test]
fn stopped_by_policy() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Never, 120));
    up(&mut d, 1, t);
    match crash(&mut d, 1, &mut t, Duration::from_secs(1)) {
        Action::Stalled {
            stall: Stall::Stopped(why),
            ..
        } => assert!(why.contains("never")),
        other => panic!("{other:?}"),
    }
    let mut d = Dev::new("blk".into(), policy(RestartMode::OnFailure, 120));
    up(&mut d, 1, t);
    t += Duration::from_secs(1);
    d.on(Event::Ended { pid: 1 }, t);
    match d.on(
        Event::Decide {
            clean: true,
            why: "exited with status 0".into(),
        },
        t,
    ) {
        Action::Stalled {
            stall: Stall::Stopped(why),
            ..
        } => assert!(why.contains("on-failure")),
        other => panic!("{other:?}"),
    }
    // A non-clean exit under on-failure is restarted.
    up(&mut d, 2, t);
    assert!(matches!(
        crash(&mut d, 2, &mut t, Duration::from_secs(1)),
        Action::Restart { .. }
    ));
}

#[test]
fn refused_counts_as_crash_at_start() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    up(&mut d, 5, t);
    t += Duration::from_secs(6);
    // A refusal of another pid, or of one that already exited, does nothing.
    let other = Event::Refused {
        pid: 4,
        why: "x".into(),
        running: true,
    };
    assert_eq!(d.on(other, t), Action::None);
    let exited = Event::Refused {
        pid: 5,
        why: "x".into(),
        running: false,
    };
    assert_eq!(d.on(exited, t), Action::None);
    let refused = Event::Refused {
        pid: 5,
        why: "setup timed out".into(),
        running: true,
    };
    assert_eq!(d.on(refused, t), Action::Kill(5));
    assert_eq!(d.refusals, 1);
    d.on(Event::Ended { pid: 5 }, t);
    match d.on(
        Event::Decide {
            clean: false,
            why: "killed by SIGKILL".into(),
        },
        t,
    ) {
        Action::Restart { backoff, reason } => {
            assert_eq!(
                backoff,
                Duration::from_millis(100),
                "backed off: a crash at start"
            );
            assert!(reason.contains("refused, setup timed out"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn upgrade_is_planned_and_skips_an_old_standby() {
    let mut t = Instant::now();
    let mut d = Dev::new("old".into(), policy(RestartMode::Always, 120));
    up(&mut d, 1, t);
    assert_eq!(d.on(Event::StandbyWanted, t), Action::LaunchStandby);
    assert_eq!(d.on(Event::StandbyWanted, t), Action::None, "one at a time");
    d.on(
        Event::StandbySpawned {
            pid: 2,
            binary: "old".into(),
            conn: "conn2",
        },
        t,
    );
    d.on(Event::StandbyReady { pid: 2 }, t);
    d.on(Event::StandbyLaunchOver, t);
    assert_eq!(d.ready_standby(), Some(2));
    // Upgrade: the serving process is killed, its end is planned.
    let upgrade = Event::RestartRequested {
        upgrade: Some("new".into()),
    };
    assert_eq!(d.on(upgrade, t), Action::Kill(1));
    t += Duration::from_millis(1);
    d.on(Event::Ended { pid: 1 }, t);
    match d.on(
        Event::Decide {
            clean: false,
            why: "killed by SIGKILL".into(),
        },
        t,
    ) {
        Action::Restart { backoff, reason } => {
            assert_eq!(backoff, Duration::ZERO);
            assert!(reason.starts_with("upgraded to new"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.quick_failures, 0, "a planned end is no crash");
    // The standby runs the old binary: ended, not used.
    assert_eq!(d.on(Event::Takeover, t), Action::Kill(2));
    assert!(matches!(d.standby, Standby::None));
    assert_eq!(d.on(Event::Ended { pid: 2 }, t), Action::None, "set aside");
    up(&mut d, 3, t);
    match &d.serving {
        Serving::Up { binary, .. } => assert_eq!(binary, &PathBuf::from("new")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn standby_takeover_and_standby_death() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    up(&mut d, 1, t);
    d.on(Event::StandbyWanted, t);
    d.on(
        Event::StandbySpawned {
            pid: 2,
            binary: "blk".into(),
            conn: "conn2",
        },
        t,
    );
    // Not ready yet: a takeover ends it instead.
    let mut not_ready = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    up(&mut not_ready, 1, t);
    not_ready.on(Event::StandbyWanted, t);
    not_ready.on(
        Event::StandbySpawned {
            pid: 2,
            binary: "blk".into(),
            conn: "c",
        },
        t,
    );
    let mut t2 = t;
    crash(&mut not_ready, 1, &mut t2, Duration::from_secs(1));
    assert_eq!(not_ready.on(Event::Takeover, t2), Action::Kill(2));

    d.on(Event::StandbyReady { pid: 2 }, t);
    d.on(Event::StandbyLaunchOver, t);
    assert!(matches!(
        crash(&mut d, 1, &mut t, Duration::from_secs(2)),
        Action::Restart { .. }
    ));
    assert_eq!(
        d.on(Event::Takeover, t),
        Action::UseStandby {
            pid: 2,
            conn: "conn2"
        }
    );
    assert_eq!(d.serving_pid(), Some(2));
    // The next standby dies young: not replaced. One that lived is.
    d.on(Event::StandbyWanted, t);
    d.on(
        Event::StandbySpawned {
            pid: 3,
            binary: "blk".into(),
            conn: "conn3",
        },
        t,
    );
    t += Duration::from_millis(10);
    assert!(matches!(
        d.on(Event::Ended { pid: 3 }, t),
        Action::StandbyEnded { replace: false, .. }
    ));
    d.on(Event::StandbyLaunchOver, t);
    d.on(Event::StandbyWanted, t);
    d.on(
        Event::StandbySpawned {
            pid: 4,
            binary: "blk".into(),
            conn: "conn4",
        },
        t,
    );
    t += Duration::from_secs(2);
    assert!(matches!(
        d.on(Event::Ended { pid: 4 }, t),
        Action::StandbyEnded { replace: true, .. }
    ));
    // A standby that never becomes ready is ended.
    d.on(Event::StandbyWanted, t);
    d.on(
        Event::StandbySpawned {
            pid: 5,
            binary: "blk".into(),
            conn: "conn5",
        },
        t,
    );
    assert_eq!(d.on(Event::StandbyRefused { pid: 5 }, t), Action::Kill(5));
    assert_eq!(d.on(Event::StandbyRefused { pid: 5 }, t), Action::None);
}

#[test]
fn restart_requests_while_restarting_wait() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    assert_eq!(
        d.on(Event::RestartRequested { upgrade: None }, t),
        Action::Wait,
        "the first process is coming"
    );
    up(&mut d, 1, t);
    t += Duration::from_secs(1);
    d.on(Event::Ended { pid: 1 }, t);
    // Ended but not yet decided: the request makes the end planned, and waits.
    assert_eq!(
        d.on(Event::RestartRequested { upgrade: None }, t),
        Action::Wait
    );
    match d.on(
        Event::Decide {
            clean: true,
            why: "exited with status 0".into(),
        },
        t,
    ) {
        Action::Restart { backoff, reason } => {
            assert_eq!(backoff, Duration::ZERO);
            assert!(reason.starts_with("restarted on request"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A restart whose spawn fails stalls the device as failed.
    match d.on(Event::SpawnFailed("no such file".into()), t) {
        Action::Stalled {
            stall: Stall::Failed(why),
            ..
        } => assert!(why.contains("cannot start a backend: no such file")),
        other => panic!("{other:?}"),
    }
    // Events that do not apply in a state change nothing.
    assert_eq!(d.on(Event::Takeover, t), Action::None);
    assert_eq!(
        d.on(
            Event::Decide {
                clean: false,
                why: "x".into()
            },
            t
        ),
        Action::None
    );
    assert_eq!(d.on(Event::Ended { pid: 1 }, t), Action::None);
}
