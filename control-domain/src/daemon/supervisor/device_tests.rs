//! Walks every transition of the device state machine, without a VM.

use super::*;

type Dev = Device<&'static str>;

fn policy(mode: RestartMode, per_minute: u32) -> RestartPolicy {
    RestartPolicy {
        mode,
        per_minute,
        hang_timeout_ms: 2000,
        retry_failed_secs: 30,
    }
}

/// Starts `pid` and has the runner set it up: it serves.
fn up(d: &mut Dev, pid: i32, t: Instant) {
    spawned(d, pid, t);
    assert_eq!(d.on(Event::Served { pid }, t), Action::None);
}

/// Starts `pid`; the runner has not set it up yet.
fn spawned(d: &mut Dev, pid: i32, t: Instant) {
    let binary = d.binary.clone();
    assert_eq!(d.on(Event::Spawned { pid, binary }, t), Action::None);
    assert_eq!(d.serving_pid(), Some(pid));
}

/// Wants a standby and spawns it as `pid` running `binary` (not ready yet).
fn spawn_standby(d: &mut Dev, pid: i32, binary: &str, conn: &'static str, t: Instant) {
    assert_eq!(d.on(Event::StandbyWanted, t), Action::LaunchStandby);
    let binary = binary.into();
    d.on(Event::StandbySpawned { pid, binary, conn }, t);
}

/// Why a decision stalled the device.
fn stall(a: Action<&'static str>) -> Stall {
    match a {
        Action::Stalled { stall, .. } => stall,
        other => panic!("expected a stall: {other:?}"),
    }
}

/// The reason of a `Stalled(Stopped)` decision.
fn stopped(a: Action<&'static str>) -> String {
    let Stall::Stopped(why) = stall(a) else {
        panic!("expected stopped")
    };
    why
}

/// The reason of a `Stalled(Failed)` decision.
fn failed(a: Action<&'static str>) -> String {
    let Stall::Failed(why) = stall(a) else {
        panic!("expected failed")
    };
    why
}

/// The back-off and reason of a `Restart` decision.
fn restarted(a: Action<&'static str>) -> (Duration, String) {
    match a {
        Action::Restart { backoff, reason } => (backoff, reason),
        other => panic!("expected a restart: {other:?}"),
    }
}

/// Decides after the serving process ended `clean` (or not) because of `why`.
fn decide(d: &mut Dev, clean: bool, why: &str, t: Instant) -> Action<&'static str> {
    let why = why.to_string();
    d.on(Event::Decide { clean, why }, t)
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
    decide(d, false, "killed by SIGKILL", *t)
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
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    let mut pid = 20;
    // Each process dies before the runner set it up: a crash at start, however long it
    // lived.
    spawned(&mut d, pid, t);
    for n in 1..QUICK_BUDGET {
        let (backoff, _) = restarted(crash(&mut d, pid, &mut t, Duration::from_secs(3)));
        assert_eq!(backoff, Duration::from_millis(100 << (n - 1)), "crash {n}");
        pid += 1;
        spawned(&mut d, pid, t);
    }
    let why = failed(crash(&mut d, pid, &mut t, Duration::from_millis(10)));
    assert!(why.contains("crashed 5 times"), "{why}");
    assert!(matches!(d.serving, Serving::Stalled(Stall::Failed(_))));
    // No standby is started for a failed device.
    assert_eq!(d.on(Event::StandbyWanted, t), Action::None);
    // An administrator revives it: counters start over, a process is started now.
    assert_eq!(
        d.on(
            Event::RestartRequested {
                upgrade: None,
                by_admin: true,
            },
            t
        ),
        Action::SpawnNow
    );
    assert_eq!(d.quick_failures, 0);
    up(&mut d, 99, t);
}

#[test]
fn no_restart_limit_means_no_limit_for_crashes_at_start_either() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 0));
    let mut pid = 1;
    spawned(&mut d, pid, t);
    for n in 1..=50u32 {
        let (backoff, _) = restarted(crash(&mut d, pid, &mut t, Duration::from_millis(1)));
        assert_eq!(
            backoff,
            Duration::from_millis(100 << (n - 1).min(4)),
            "crash {n}: backed off, never failed"
        );
        pid += 1;
        spawned(&mut d, pid, t);
    }
}

#[test]
fn kills_of_backends_that_served_are_never_crashes_at_start() {
    // Ten kills 50 ms apart, each of a backend (a standby that just took over) that the
    // runner had set up: restarted at once every time, never failed.
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 0));
    up(&mut d, 1, t);
    for pid in 1..=10 {
        let (backoff, _) = restarted(crash(&mut d, pid, &mut t, Duration::from_millis(50)));
        assert_eq!(backoff, Duration::ZERO, "kill {pid}");
        up(&mut d, pid + 1, t);
    }
    assert_eq!(d.quick_failures, 0);
}

#[test]
fn restart_limit_per_minute() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 2));
    up(&mut d, 1, t);
    restarted(crash(&mut d, 1, &mut t, Duration::from_secs(1)));
    up(&mut d, 2, t);
    restarted(crash(&mut d, 2, &mut t, Duration::from_secs(1)));
    up(&mut d, 3, t);
    let why = failed(crash(&mut d, 3, &mut t, Duration::from_secs(1)));
    assert!(why.contains("restart_limit of 2"), "{why}");
    // A minute later the window is empty again.
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 1));
    up(&mut d, 1, t);
    restarted(crash(&mut d, 1, &mut t, Duration::from_secs(1)));
    up(&mut d, 2, t);
    restarted(crash(&mut d, 2, &mut t, WINDOW + Duration::from_secs(1)));
}

#[test]
fn stopped_by_policy() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Never, 120));
    up(&mut d, 1, t);
    let why = stopped(crash(&mut d, 1, &mut t, Duration::from_secs(1)));
    assert!(why.contains("never"));
    let mut d = Dev::new("blk".into(), policy(RestartMode::OnFailure, 120));
    up(&mut d, 1, t);
    t += Duration::from_secs(1);
    d.on(Event::Ended { pid: 1 }, t);
    let why = stopped(decide(&mut d, true, "exited with status 0", t));
    assert!(why.contains("on-failure"));
    // A non-clean exit under on-failure is restarted.
    up(&mut d, 2, t);
    restarted(crash(&mut d, 2, &mut t, Duration::from_secs(1)));
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
    let (backoff, reason) = restarted(decide(&mut d, false, "killed by SIGKILL", t));
    assert_eq!(
        backoff,
        Duration::from_millis(100),
        "backed off: a crash at start"
    );
    assert!(reason.contains("refused, setup timed out"), "{reason}");
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
        by_admin: true,
        upgrade: Some("new".into()),
    };
    assert_eq!(d.on(upgrade, t), Action::Kill(1));
    t += Duration::from_millis(1);
    d.on(Event::Ended { pid: 1 }, t);
    let (backoff, reason) = restarted(decide(&mut d, false, "killed by SIGKILL", t));
    assert_eq!(backoff, Duration::ZERO);
    assert!(reason.starts_with("upgraded to new"), "{reason}");
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
    spawn_standby(&mut d, 2, "blk", "conn2", t);
    // Not ready yet: a takeover ends it instead.
    let mut not_ready = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    up(&mut not_ready, 1, t);
    spawn_standby(&mut not_ready, 2, "blk", "c", t);
    let mut t2 = t;
    crash(&mut not_ready, 1, &mut t2, Duration::from_secs(1));
    assert_eq!(not_ready.on(Event::Takeover, t2), Action::Kill(2));

    d.on(Event::StandbyReady { pid: 2 }, t);
    d.on(Event::StandbyLaunchOver, t);
    restarted(crash(&mut d, 1, &mut t, Duration::from_secs(2)));
    assert_eq!(
        d.on(Event::Takeover, t),
        Action::UseStandby {
            pid: 2,
            conn: "conn2"
        }
    );
    assert_eq!(d.serving_pid(), Some(2));
    // The next standby dies young: not replaced. One that lived is.
    spawn_standby(&mut d, 3, "blk", "conn3", t);
    t += Duration::from_millis(10);
    assert!(matches!(
        d.on(Event::Ended { pid: 3 }, t),
        Action::StandbyEnded { replace: false, .. }
    ));
    d.on(Event::StandbyLaunchOver, t);
    spawn_standby(&mut d, 4, "blk", "conn4", t);
    t += Duration::from_secs(2);
    assert!(matches!(
        d.on(Event::Ended { pid: 4 }, t),
        Action::StandbyEnded { replace: true, .. }
    ));
    // A standby that never becomes ready is ended.
    spawn_standby(&mut d, 5, "blk", "conn5", t);
    assert_eq!(d.on(Event::StandbyRefused { pid: 5 }, t), Action::Kill(5));
    assert_eq!(d.on(Event::StandbyRefused { pid: 5 }, t), Action::None);
}

#[test]
fn restart_requests_while_restarting_wait() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    assert_eq!(
        d.on(
            Event::RestartRequested {
                upgrade: None,
                by_admin: true,
            },
            t
        ),
        Action::Wait,
        "the first process is coming"
    );
    up(&mut d, 1, t);
    t += Duration::from_secs(1);
    d.on(Event::Ended { pid: 1 }, t);
    // Ended but not yet decided: the request makes the end planned, and waits.
    assert_eq!(
        d.on(
            Event::RestartRequested {
                upgrade: None,
                by_admin: true,
            },
            t
        ),
        Action::Wait
    );
    let (backoff, reason) = restarted(decide(&mut d, true, "exited with status 0", t));
    assert_eq!(backoff, Duration::ZERO);
    assert!(reason.starts_with("restarted on request"), "{reason}");
    // A restart whose spawn fails stalls the device as failed.
    let why = failed(d.on(Event::SpawnFailed("no such file".into()), t));
    assert!(why.contains("cannot start a backend: no such file"));
    // Events that do not apply in a state change nothing.
    assert_eq!(d.on(Event::Takeover, t), Action::None);
    assert_eq!(decide(&mut d, false, "x", t), Action::None);
    assert_eq!(d.on(Event::Ended { pid: 1 }, t), Action::None);
}

#[test]
fn adopted_after_a_daemon_restart() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    let adopted = Event::Adopted {
        pid: Some(7),
        binary: "blk".into(),
    };
    assert_eq!(d.on(adopted, t), Action::None);
    assert_eq!(d.serving_pid(), Some(7));
    // Its end right after the adoption is no crash at start.
    let (backoff, _) = restarted(crash(&mut d, 7, &mut t, Duration::from_millis(1)));
    assert_eq!(backoff, Duration::ZERO);
    assert_eq!(d.quick_failures, 0);
    // One that ended while bulkheadd was down is decided at once.
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    let gone = Event::Adopted {
        pid: None,
        binary: "blk".into(),
    };
    assert_eq!(d.on(gone, t), Action::ServingEnded);
    let (backoff, reason) = restarted(decide(&mut d, false, "ended while bulkheadd was down", t));
    assert_eq!(backoff, Duration::ZERO);
    assert!(reason.contains("while bulkheadd was down"));
}

#[test]
fn an_owners_restart_does_not_start_the_crash_counters_over() {
    let mut t = Instant::now();
    let mut d = Dev::new("blk".into(), policy(RestartMode::Always, 120));
    spawned(&mut d, 1, t);
    for pid in 1..QUICK_BUDGET as i32 {
        restarted(crash(&mut d, pid, &mut t, Duration::from_millis(1)));
        spawned(&mut d, pid + 1, t);
    }
    failed(crash(
        &mut d,
        QUICK_BUDGET as i32,
        &mut t,
        Duration::from_millis(1),
    ));
    let by_owner = Event::RestartRequested {
        upgrade: None,
        by_admin: false,
    };
    assert_eq!(
        d.on(by_owner, t),
        Action::SpawnNow,
        "an owner may revive it"
    );
    assert_eq!(d.quick_failures, QUICK_BUDGET, "but its crash count stays");
    spawned(&mut d, 50, t);
    failed(crash(&mut d, 50, &mut t, Duration::from_millis(1)));
    let by_admin = Event::RestartRequested {
        upgrade: None,
        by_admin: true,
    };
    assert_eq!(d.on(by_admin, t), Action::SpawnNow);
    assert_eq!(
        d.quick_failures, 0,
        "an administrator's restart starts it over"
    );
}
