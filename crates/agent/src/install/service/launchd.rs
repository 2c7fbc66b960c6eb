//! The agent's launchd job (a property list): a LaunchDaemon with `--system`, else the user's
//! LaunchAgent.

use std::fmt::Write as _;
use std::path::Path;

use super::ServiceCommand;

/// Seconds launchd waits before starting a job that exited again: it keeps a crash-looping agent
/// from spinning, and the agent's engines from being restarted in a tight loop with it.
pub const THROTTLE_SECONDS: u32 = 10;
/// Seconds between SIGTERM and SIGKILL when the job is stopped: the agent drains in-flight
/// requests (--drain-grace, 30 s) and then stops its engines (--stop-grace, 10 s).
pub const EXIT_TIMEOUT_SECONDS: u32 = 60;
/// Open files the agent may hold: each serving port takes up to 1024 connections
/// (--max-connections), and launchd's default soft limit is 256.
pub const OPEN_FILES: u32 = 65536;

/// Renders the job's plist: started at load (boot or login), kept alive, its output appended to
/// `log`.
pub fn render_plist(label: &str, command: &ServiceCommand, log: &Path) -> String {
    let mut program = String::new();
    for arg in std::iter::once(command.program.display().to_string()).chain(command.args.iter().cloned()) {
        // Writing into a String cannot fail.
        let _ = writeln!(program, "\t\t<string>{}</string>", escape(&arg));
    }
    let log = escape(&log.display().to_string());
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>{label}</string>
	<key>ProgramArguments</key>
	<array>
{program}	</array>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<true/>
	<key>ThrottleInterval</key>
	<integer>{THROTTLE_SECONDS}</integer>
	<key>ExitTimeOut</key>
	<integer>{EXIT_TIMEOUT_SECONDS}</integer>
	<key>SoftResourceLimits</key>
	<dict>
		<key>NumberOfFiles</key>
		<integer>{OPEN_FILES}</integer>
	</dict>
	<key>HardResourceLimits</key>
	<dict>
		<key>NumberOfFiles</key>
		<integer>{OPEN_FILES}</integer>
	</dict>
	<key>StandardOutPath</key>
	<string>{log}</string>
	<key>StandardErrorPath</key>
	<string>{log}</string>
</dict>
</plist>
"#,
        label = escape(label),
    )
}

/// XML text escaping: a path or argument with `&` or `<` must not break the plist.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
