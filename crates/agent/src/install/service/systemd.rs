//! The agent's systemd unit: a system unit with `--system`, else a user unit.

use super::{Scope, ServiceCommand};

/// Seconds systemd waits before starting the agent again after it exited.
pub const RESTART_SECONDS: u32 = 5;
/// Seconds between SIGTERM and SIGKILL: the agent drains in-flight requests (--drain-grace,
/// 30 s) and then stops its engines (--stop-grace, 10 s).
pub const STOP_TIMEOUT_SECONDS: u32 = 60;

/// Renders the unit. `KillMode=mixed`: SIGTERM goes to the agent alone, which drains and stops
/// its engines' process groups itself; only what is left after the timeout is killed.
pub fn render_unit(command: &ServiceCommand, scope: Scope) -> String {
    let exec = std::iter::once(command.program.display().to_string())
        .chain(command.args.iter().cloned())
        .map(|arg| quote(&arg))
        .collect::<Vec<_>>()
        .join(" ");
    // network-online.target is a system target; a user manager cannot order against it.
    let (after, wanted_by) = match scope {
        Scope::System => ("After=network-online.target\nWants=network-online.target\n", "multi-user.target"),
        Scope::User => ("", "default.target"),
    };
    format!(
        "[Unit]\n\
         Description=metalkube agent (supervises llama-server for the metalkube controller)\n\
         {after}\n\
         [Service]\n\
         Type=exec\n\
         ExecStart={exec}\n\
         Restart=always\n\
         RestartSec={RESTART_SECONDS}\n\
         KillMode=mixed\n\
         TimeoutStopSec={STOP_TIMEOUT_SECONDS}\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy={wanted_by}\n"
    )
}

/// One ExecStart word: double-quoted, with what systemd would otherwise expand (`%` specifiers,
/// `$` variables) or end the word on escaped.
fn quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn words_are_quoted_and_specifiers_escaped() {
        assert_eq!(quote("/opt/metal kube/bin"), "\"/opt/metal kube/bin\"");
        assert_eq!(quote("100%"), "\"100%%\"");
        assert_eq!(quote("$HOME"), "\"$$HOME\"");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
