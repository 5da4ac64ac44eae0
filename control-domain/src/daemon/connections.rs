//! Connection admission on the control socket: how many connections each uid, and all
//! non-root users together, may hold open, so that no local user can use up `bulkheadd`'s
//! threads, memory or file descriptors. Root is never refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connections one non-root uid may hold open at once.
pub const PER_UID: usize = 64;
/// Connections all non-root uids together may hold open at once.
pub const TOTAL: usize = 512;
/// How often refusals are summed up in the log (the first is logged at once).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The counts of open connections, by uid.
pub struct ConnectionLimits {
    per_uid: usize,
    total: usize,
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_uid: HashMap<u32, usize>,
    total: usize,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    uid: u32,
}

/// Why a connection was refused, as the log says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The uid holds its share already.
    PerUid { uid: u32, limit: usize },
    /// Non-root users hold all connections there are.
    Total { limit: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::PerUid { uid, limit } => {
                write!(
                    f,
                    "uid {uid} already holds {limit} connections (the limit per uid)"
                )
            }
            Refused::Total { limit } => write!(
                f,
                "non-root users already hold {limit} connections (the limit for all of them)"
            ),
        }
    }
}

impl ConnectionLimits {
    /// Limits of `per_uid` connections for each non-root uid and `total` for all of them.
    pub fn new(per_uid: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_uid,
            total,
            inner: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `uid`, or says why not. Root is always admitted.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Admitted, Refused> {
        if uid != 0 {
            let mut c = self.counts();
            let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
            let refusal = if mine >= self.per_uid {
                Some(Refused::PerUid {
                    uid,
                    limit: self.per_uid,
                })
            } else if c.total >= self.total {
                Some(Refused::Total { limit: self.total })
            } else {
                None
            };
            if let Some(r) = refusal {
                c.refused_since_log += 1;
                let due = !matches!(c.last_log, Some(t) if t.elapsed() < REFUSAL_LOG_EVERY);
                if due {
                    super::log(&format!(
                        "refused {} connection(s): {r}",
                        c.refused_since_log
                    ));
                    c.refused_since_log = 0;
                    c.last_log = Some(Instant::now());
                }
                return Err(r);
            }
            *c.by_uid.entry(uid).or_insert(0) += 1;
            c.total += 1;
        }
        Ok(Admitted {
            limits: self.clone(),
            uid,
        })
    }

    /// Open connections of non-root users: (by `uid`, in total).
    pub fn open(&self, uid: u32) -> (usize, usize) {
        let c = self.counts();
        (c.by_uid.get(&uid).copied().unwrap_or(0), c.total)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.uid == 0 {
            return;
        }
        let mut c = self.limits.counts();
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
        c.total = c.total.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_its_share_and_no_more_and_root_is_never_refused() {
        let l = ConnectionLimits::new(2, 3);
        let a1 = l.admit(1000).expect("first");
        let _a2 = l.admit(1000).expect("second");
        assert_eq!(
            l.admit(1000).err(),
            Some(Refused::PerUid {
                uid: 1000,
                limit: 2
            })
        );
        let _b1 = l.admit(1001).expect("another uid");
        assert_eq!(l.admit(1002).err(), Some(Refused::Total { limit: 3 }));
        let roots: Vec<_> = (0..10).map(|_| l.admit(0).expect("root")).collect();
        assert_eq!(l.open(0), (0, 3));
        drop(a1);
        assert_eq!(l.open(1000), (1, 2));
        let _a3 = l.admit(1000).expect("a freed place is taken again");
        drop(roots);
        assert_eq!(l.open(1000), (2, 3));
    }
}
