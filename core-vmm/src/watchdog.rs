//! The progress watchdog: notices a device backend that has work it is not doing. A ring
//! whose avail index is ahead of its used index holds requests; if its used index does not
//! move for the device's timeout, the backend is reported hung — once per stall (the next
//! report waits for a new backend, or for this one to make progress and stall again: the
//! control domain may decide a stall is no hang, e.g. a backend holding requests back for
//! its rate limit). A merely slow backend completes something within the timeout and is
//! never reported: the rule is about no progress at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vm::RunningVm;

/// How often the rings are looked at.
const PERIOD: Duration = Duration::from_millis(50);

/// One ring's progress as last seen.
struct RingSeen {
    used: u16,
    /// Since when it has held requests with no completion.
    since: Instant,
}

/// Watches the rings of every device in `timeouts` (device name → timeout; a zero timeout
/// is not watched) and calls `report(device, stalled)` for a hung backend. Runs until the
/// VM ends.
pub fn watch_rings(
    vm: Arc<RunningVm>,
    timeouts: HashMap<String, Duration>,
    report: impl Fn(&str, Duration) + Send + 'static,
) -> std::io::Result<()> {
    let timeouts: HashMap<String, Duration> =
        timeouts.into_iter().filter(|(_, t)| !t.is_zero()).collect();
    if timeouts.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut seen: HashMap<(String, usize), RingSeen> = HashMap::new();
            // Device → the reconnect count of the backend already reported.
            let mut reported: HashMap<String, u32> = HashMap::new();
            while vm.outcome().is_none() {
                std::thread::sleep(PERIOD);
                for (name, timeout) in &timeouts {
                    let Some(dev) = vm.devices().vhost_device(name) else {
                        continue;
                    };
                    let progress = dev.lock().unwrap_or_else(|e| e.into_inner()).progress();
                    let now = Instant::now();
                    let Some((backend, rings)) = progress else {
                        seen.retain(|(d, _), _| d != name);
                        continue;
                    };
                    let mut stalled = Duration::ZERO;
                    for (q, avail, used) in rings {
                        let s = seen
                            .entry((name.clone(), q))
                            .or_insert(RingSeen { used, since: now });
                        if avail == used || used != s.used {
                            *s = RingSeen { used, since: now };
                        } else {
                            stalled = stalled.max(now - s.since);
                        }
                    }
                    if stalled.is_zero() {
                        reported.remove(name);
                    } else if stalled >= *timeout && reported.get(name) != Some(&backend) {
                        reported.insert(name.clone(), backend);
                        report(name, stalled);
                    }
                }
            }
        })
        .map(|_| ())
}
