//! The short fuzz pass that runs with `cargo test`: every target replays its corpus
//! (`fuzz/corpus/<target>/`, which holds the regression inputs of crashes found and fixed)
//! and then runs `BULKHEAD_FUZZ_CASES` generated inputs (default 2000) from the fixed seed
//! `BULKHEAD_FUZZ_SEED` (default 1). Long runs: `scripts/fuzz.sh`.

use std::path::PathBuf;

use bulkhead_fuzz::{run, targets, Budget, Options};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn short_pass(name: &str) {
    let target = targets::find(name).expect("target");
    let opts = Options {
        budget: Budget::Cases(env_u64("BULKHEAD_FUZZ_CASES", 2000)),
        seed: env_u64("BULKHEAD_FUZZ_SEED", 1),
        corpus: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")),
        crash_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes")),
    };
    let report = run(target, &opts);
    println!("{}", report.line());
    assert!(
        report.crashes.is_empty(),
        "{name}: {} crash(es); first: {} (input {:?}, saved to {:?})",
        report.crashes.len(),
        report.crashes[0].message,
        report.crashes[0].input,
        report.crashes[0].saved
    );
}

macro_rules! passes {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { short_pass($name); })*

        #[test]
        fn every_target_has_a_short_pass() {
            let ours = [$($name),*];
            for t in targets::ALL {
                assert!(ours.contains(&t.name), "no short pass for {}", t.name);
            }
        }
    };
}

passes! {
    blk => "blk",
    net_tx => "net-tx",
    net_rx => "net-rx",
    inflight => "inflight",
    ipc_frame => "ipc-frame",
    ipc_request => "ipc-request",
    ipc_reply => "ipc-reply",
    ipc_runner_command => "ipc-runner-command",
    ipc_runner_event => "ipc-runner-event",
    ipc_runner_request => "ipc-runner-request",
    ipc_runner_message => "ipc-runner-message",
    ipc_hello => "ipc-hello",
    snapshot => "snapshot",
}
