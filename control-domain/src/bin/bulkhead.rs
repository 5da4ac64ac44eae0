//! `bulkhead`: the command-line client of `bulkheadd` (see `control_domain::cli`).

use std::process::ExitCode;

fn main() -> ExitCode {
    control_domain::cli::main_with_args(std::env::args_os())
}
