//! Running the external tools the deployment tests drive, with failures that show the exact
//! command and everything it printed.

// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The repository root (this crate is `crates/deploy-tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// A finished command and what it printed.
pub struct Ran {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// The command line, exit status and full output, for assertion messages.
    pub fn report(&self) -> String {
        let mut text = format!("command: {}\nexit: {}\n", self.command, self.status);
        for (name, output) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if output.is_empty() {
                let _ = writeln!(text, "--- {name}: (empty)");
            } else {
                let _ = write!(text, "--- {name}:\n{output}");
                if !output.ends_with('\n') {
                    text.push('\n');
                }
            }
        }
        text
    }

    /// stdout and stderr together, for searching either.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c)) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `cmd` as a shell-pasteable line, prefixed by its working directory when it has one.
pub fn command_line(cmd: &Command) -> String {
    let mut words = vec![quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {})", quote(&dir.to_string_lossy()), words.join(" ")),
        None => words.join(" "),
    }
}

/// Runs `cmd` to completion, whatever its exit status.
pub fn run(cmd: &mut Command) -> Ran {
    let command = command_line(cmd);
    let out = cmd.output().unwrap_or_else(|e| panic!("could not start `{command}`: {e}"));
    Ran {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `cmd` and fails the test, showing everything, unless it exits 0.
pub fn succeed(cmd: &mut Command) -> Ran {
    let ran = run(cmd);
    assert!(ran.status.success(), "command failed\n{}", ran.report());
    ran
}
