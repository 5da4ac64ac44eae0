//! A stable-toolchain fuzzer for every parser that reads guest or peer input: the
//! descriptor-chain validation of `bulkhead-blk` and `bulkhead-net`, the in-flight region a
//! restarted backend takes over, and every `ipc` decoder.
//!
//! libFuzzer (cargo-fuzz) needs a nightly toolchain, so this is a small engine of its own:
//! each [target](targets) is a function from bytes to an *outcome signature* that runs the
//! real product code and asserts its invariants (an invariant broken is a panic). The
//! engine replays the seed corpus (`fuzz/corpus/<target>/`), then feeds the target random
//! inputs and mutations of the pool; an input whose signature was not seen before joins the
//! pool (a cheap stand-in for coverage feedback). Panics are caught, deduplicated by
//! location and saved; a crash that kills the process (a stray access into the guard pages
//! around guest memory, say) ends the run with a signal, which `scripts/fuzz.sh` reports.
//!
//! Entry points: the `bulkhead-fuzz` binary (long runs, `scripts/fuzz.sh`) and
//! `tests/short_pass.rs` (a few thousand cases per target in `cargo test`).

pub mod guest;
pub mod input;
pub mod targets;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use input::Input;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name (also its corpus directory).
    pub name: &'static str,
    /// What it exercises.
    pub about: &'static str,
    /// Runs one input; returns a signature of what happened (distinct outcomes, distinct
    /// signatures). Panics when an invariant does not hold.
    pub run: fn(&[u8]) -> u64,
    /// Seed inputs built in code (written to the corpus by `bulkhead-fuzz seeds`).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Longest input the engine generates.
    pub max_len: usize,
}

/// How long to run.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many generated inputs (after the corpus).
    Cases(u64),
    /// Generated inputs for this long.
    Time(Duration),
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long.
    pub budget: Budget,
    /// PRNG seed.
    pub seed: u64,
    /// The corpus root (`<root>/<target>/*` are replayed first and seed the pool).
    pub corpus: Option<PathBuf>,
    /// Where crashing inputs are written (`<dir>/<target>-<n>.bin`).
    pub crash_dir: Option<PathBuf>,
}

/// One distinct crash.
#[derive(Debug, Clone)]
pub struct Crash {
    /// The panic message and location.
    pub message: String,
    /// The first input that hit it.
    pub input: Vec<u8>,
    /// How many inputs hit it.
    pub hits: u64,
    /// Where the input was saved.
    pub saved: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// Corpus inputs replayed.
    pub replayed: u64,
    /// Inputs run in total (corpus included).
    pub cases: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Distinct outcome signatures seen.
    pub signatures: usize,
    /// Distinct crashes.
    pub crashes: Vec<Crash>,
}

impl Report {
    /// One line for people.
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "{:<20} {:>10} inputs ({} corpus) in {:>8.1} s = {:>8.0}/s, {:>5} distinct outcomes, {} crash(es)",
            self.target,
            self.cases,
            self.replayed,
            secs,
            self.cases as f64 / secs.max(1e-9),
            self.signatures,
            self.crashes.len()
        )
    }
}

/// A small, fast PRNG (splitmix64): reproducible from the seed, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Values that tend to sit on boundaries.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    8,
    12,
    15,
    16,
    17,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x200,
    0xffff,
    0xffff_ffff,
    u64::MAX,
];

/// Applies one to eight random byte-level mutations to `data`, keeping it at most `max_len`.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>], max_len: usize) {
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        let len = data.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            3 if len > 0 => {
                // A little-endian integer of 2, 4 or 8 bytes, interesting or nudged.
                let width = [2usize, 4, 8][rng.below(3)];
                if len >= width {
                    let i = rng.below(len - width + 1);
                    let mut cur = [0u8; 8];
                    cur[..width].copy_from_slice(&data[i..i + width]);
                    let v = if rng.one_in(2) {
                        INTERESTING[rng.below(INTERESTING.len())]
                    } else {
                        u64::from_le_bytes(cur)
                            .wrapping_add(rng.below(33) as u64)
                            .wrapping_sub(16)
                    };
                    data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
            }
            4 if len < max_len => {
                let i = rng.below(len + 1);
                let n = (1 + rng.below(16)).min(max_len - len);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            6 if len > 0 && len < max_len => {
                // Duplicate a piece somewhere else.
                let i = rng.below(len);
                let n = (1 + rng.below((len - i).min(32))).min(max_len - len);
                let piece = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            7 if !pool.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
                data.truncate(max_len);
            }
            8 if len > 0 => data.truncate(rng.below(len)),
            9 if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => {
                if len < max_len {
                    data.push(rng.next_u64() as u8);
                }
            }
        }
    }
}

/// A fresh random input: mostly short, sometimes up to `max_len`.
pub fn random_input(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let cap = [16usize, 64, 256, 1024, max_len][rng.below(5)].min(max_len);
    let n = rng.below(cap + 1);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// The corpus files of `target` under `root`, sorted by name.
pub fn corpus_files(root: &Path, target: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(target))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

thread_local! {
    /// While true, the panic hook records instead of printing.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The last panic caught on this thread: message and location.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                let loc = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                    (*s).to_string()
                } else if let Some(s) = info.payload().downcast_ref::<String>() {
                    s.clone()
                } else {
                    "panic".to_string()
                };
                *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("{loc}: {msg}"));
            } else {
                prev(info);
            }
        }));
    });
}

/// Runs `target` once on `input`: its signature, or the panic message and location.
pub fn run_one(target: &Target, input: &[u8]) -> Result<u64, String> {
    install_hook();
    QUIET.with(|q| q.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    QUIET.with(|q| q.set(false));
    r.map_err(|_| {
        LAST_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "panic".to_string())
    })
}

/// Where a panic happened, without the part of the message that varies with the input.
fn crash_key(message: &str) -> String {
    message.split(": ").next().unwrap_or(message).to_string()
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Most inputs kept in the pool.
const POOL_MAX: usize = 4096;

/// Runs `target` under `opts`: the corpus, then generated inputs until the budget is spent.
pub fn run(target: &Target, opts: &Options) -> Report {
    let start = Instant::now();
    let mut rng = Rng::new(opts.seed ^ hash_bytes(target.name.as_bytes()));
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut crashes: Vec<Crash> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut cases = 0u64;

    let mut record = |input: &[u8],
                      result: Result<u64, String>,
                      pool: &mut Vec<Vec<u8>>,
                      crashes: &mut Vec<Crash>,
                      always_keep: bool| {
        match result {
            Ok(sig) => {
                if (seen.insert(sig) || always_keep) && pool.len() < POOL_MAX {
                    pool.push(input.to_vec());
                }
            }
            Err(message) => {
                let key = crash_key(&message);
                if let Some(&i) = by_key.get(&key) {
                    crashes[i].hits += 1;
                } else {
                    let saved = opts.crash_dir.as_ref().and_then(|dir| {
                        std::fs::create_dir_all(dir).ok()?;
                        let p = dir.join(format!("{}-{}.bin", target.name, crashes.len()));
                        std::fs::write(&p, input).ok()?;
                        Some(p)
                    });
                    eprintln!(
                        "bulkhead-fuzz: {}: CRASH {message}{}",
                        target.name,
                        saved
                            .as_ref()
                            .map(|p| format!(" (input saved to {})", p.display()))
                            .unwrap_or_default()
                    );
                    by_key.insert(key, crashes.len());
                    crashes.push(Crash {
                        message,
                        input: input.to_vec(),
                        hits: 1,
                        saved,
                    });
                }
            }
        }
    };

    // The corpus first, every file as it is; the built-in seeds (which
    // `bulkhead-fuzz --write-seeds` puts in the corpus) only if it has none.
    let mut replayed = 0u64;
    let files = opts
        .corpus
        .as_ref()
        .map(|root| corpus_files(root, target.name))
        .unwrap_or_default();
    let mut initial: Vec<Vec<u8>> = files.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    if initial.is_empty() {
        initial.extend((target.seeds)());
    }
    for input in &initial {
        let r = run_one(target, input);
        record(input, r, &mut pool, &mut crashes, true);
        replayed += 1;
        cases += 1;
    }

    let deadline = match opts.budget {
        Budget::Time(d) => Some(start + d),
        Budget::Cases(_) => None,
    };
    let mut generated = 0u64;
    loop {
        match opts.budget {
            Budget::Cases(n) if generated >= n => break,
            // Checking the clock every 256 inputs keeps it off the profile.
            Budget::Time(_)
                if generated.is_multiple_of(256)
                    && deadline.is_some_and(|d| Instant::now() >= d) =>
            {
                break
            }
            _ => {}
        }
        let input = if pool.is_empty() || rng.one_in(8) {
            random_input(&mut rng, target.max_len)
        } else {
            let mut v = pool[rng.below(pool.len())].clone();
            mutate(&mut rng, &mut v, &pool, target.max_len);
            v
        };
        let r = run_one(target, &input);
        record(&input, r, &mut pool, &mut crashes, false);
        generated += 1;
        cases += 1;
    }
    Report {
        target: target.name,
        replayed,
        cases,
        elapsed: start.elapsed(),
        signatures: seen.len(),
        crashes,
    }
}

/// Mixes `v` into the signature `h` (order-sensitive).
pub fn mix(h: u64, v: u64) -> u64 {
    (h ^ v)
        .wrapping_mul(0x0100_0000_01b3)
        .rotate_left(29)
        .wrapping_add(0x9e37_79b9)
}
