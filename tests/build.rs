//! Builds the bare-metal test guest (`tests/guest`, its own Cargo project) with a nested
//! `cargo build --release` into `<workspace target dir>/guest`, and exports the ELF's
//! path as `BULKHEAD_TEST_GUEST`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_NAME: &str = "bulkhead-test-guest";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let guest_dir = manifest_dir.join("guest");

    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root.join(d)
            }
        }
        _ => workspace_root.join("target"),
    };
    let guest_target_dir = target_dir.join("guest");

    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&guest_target_dir);
    if let Some(jobs) = env::var_os("NUM_JOBS") {
        cmd.arg("-j").arg(jobs);
    }
    // Everything the outer build sets that would change how the inner one compiles or
    // links (the guest's flags come from tests/guest/.cargo/config.toml only).
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_ENCODED_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("__CARGO")
        {
            cmd.env_remove(key);
        }
    }
    for key in [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_INCREMENTAL",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ] {
        cmd.env_remove(key);
    }
    // Keep our stdout clean: cargo parses it for build-script directives.
    cmd.stdout(Stdio::from(std::io::stderr()));

    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo for the test guest: {e}"));
    if !status.success() {
        panic!(
            "building the test guest in {} failed: {status}",
            guest_dir.display()
        );
    }

    let elf = guest_target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_NAME);
    assert!(
        Path::new(&elf).is_file(),
        "test guest not found at {}",
        elf.display()
    );
    println!("cargo:rustc-env=BULKHEAD_TEST_GUEST={}", elf.display());
}
