//! `bulkhead-fuzz`: runs the fuzz targets for a number of inputs or a time, replays inputs,
//! and writes the built-in seeds to the corpus. See `scripts/fuzz.sh`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_fuzz::{run, run_one, targets, Budget, Options};

const USAGE: &str = "\
usage: bulkhead-fuzz [--cases N | --seconds S] [--seed X] [--corpus DIR] [--crashes DIR] [TARGET...]
       bulkhead-fuzz --list
       bulkhead-fuzz --replay TARGET FILE...
       bulkhead-fuzz --write-seeds [--corpus DIR] [TARGET...]

Runs each TARGET (default: all) for N generated inputs (default 10000) or S seconds, after
replaying its corpus (DIR/TARGET/*, default fuzz/corpus). Crashing inputs are written to
--crashes DIR (default target/fuzz-crashes). Exit status 1 if anything crashed.";

fn parse<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    v.ok_or_else(|| format!("{flag} needs a value"))?
        .parse()
        .map_err(|_| format!("{flag}: not a valid value"))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("bulkhead-fuzz: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut opts = Options {
        budget: Budget::Cases(10_000),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        corpus: Some(manifest.join("corpus")),
        crash_dir: Some(manifest.join("../target/fuzz-crashes")),
    };
    let mut names = Vec::new();
    let mut replay = false;
    let mut write_seeds = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cases" => opts.budget = Budget::Cases(parse("--cases", args.next())?),
            "--seconds" => {
                let s: f64 = parse("--seconds", args.next())?;
                opts.budget = Budget::Time(Duration::from_secs_f64(s.max(0.0)));
            }
            "--seed" => opts.seed = parse("--seed", args.next())?,
            "--corpus" => opts.corpus = Some(parse("--corpus", args.next())?),
            "--crashes" => opts.crash_dir = Some(parse("--crashes", args.next())?),
            "--list" => {
                for t in targets::ALL {
                    println!("{:<20} {}", t.name, t.about);
                }
                return Ok(ExitCode::SUCCESS);
            }
            "--replay" => replay = true,
            "--write-seeds" => write_seeds = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => names.push(a),
        }
    }

    if replay {
        let (name, files) = names.split_first().ok_or("--replay needs a target")?;
        let t = targets::find(name).ok_or_else(|| format!("no target {name}"))?;
        let mut bad = false;
        for f in files {
            let input = std::fs::read(f).map_err(|e| format!("{f}: {e}"))?;
            match run_one(t, &input) {
                Ok(sig) => println!("{f}: ok (signature {sig:016x})"),
                Err(msg) => {
                    println!("{f}: CRASH {msg}");
                    bad = true;
                }
            }
        }
        return Ok(if bad {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }

    let selected: Vec<_> = if names.is_empty() {
        targets::ALL.iter().collect()
    } else {
        names
            .iter()
            .map(|n| targets::find(n).ok_or_else(|| format!("no target {n} (see --list)")))
            .collect::<Result<_, _>>()?
    };

    if write_seeds {
        let root = opts.corpus.clone().ok_or("--write-seeds needs --corpus")?;
        for t in &selected {
            let dir = root.join(t.name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for (i, s) in (t.seeds)().iter().enumerate() {
                let p = dir.join(format!("seed-{i:02}"));
                std::fs::write(&p, s).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            println!(
                "{}: {} seeds in {}",
                t.name,
                (t.seeds)().len(),
                dir.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    println!("bulkhead-fuzz: seed {} ({:?})", opts.seed, opts.budget);
    let mut crashed = false;
    for t in selected {
        let r = run(t, &opts);
        println!("{}", r.line());
        for c in &r.crashes {
            crashed = true;
            println!(
                "  crash x{}: {}{}",
                c.hits,
                c.message,
                c.saved
                    .as_ref()
                    .map(|p| format!(" [{}]", p.display()))
                    .unwrap_or_default()
            );
        }
    }
    Ok(if crashed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
