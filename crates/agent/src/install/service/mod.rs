//! The agent as an OS service: a launchd job on macOS, a systemd unit on Linux, so that it starts
//! at boot (or login), restarts when it dies, and writes its logs somewhere known.
//!
//! Rendering is pure (`definition`), so either target's definition can be written and checked
//! on any OS; `install` and `uninstall` hand it to the host's service manager.

pub mod launchd;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;

use metalkube_api::bundle::AgentSettings;

use crate::install::InstallError;
use crate::install::enrollment::EnrollmentFiles;

/// launchd label of the agent's job (also its plist's file name).
pub const LAUNCHD_LABEL: &str = "dev.metalkube.agent";
/// File name of the agent's systemd unit.
pub const SYSTEMD_UNIT: &str = "metalkube-agent.service";

/// Which service manager the definition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// launchd (a plist).
    Macos,
    /// systemd (a unit file).
    Linux,
}

impl Target {
    /// The service manager of the OS this binary runs on, if it is one the agent knows.
    pub fn host() -> Option<Self> {
        match std::env::consts::OS {
            "macos" => Some(Self::Macos),
            "linux" => Some(Self::Linux),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Macos => "macos",
            Self::Linux => "linux",
        }
    }
}

impl std::str::FromStr for Target {
    type Err = InstallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "macos" => Ok(Self::Macos),
            "linux" => Ok(Self::Linux),
            other => {
                Err(InstallError::Service(format!("--target {other:?}: write macos (launchd) or linux (systemd)")))
            }
        }
    }
}

/// A machine-wide service started at boot (root), or the user's own, started at login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    System,
    User,
}

/// Where the definition and logs go: the home and XDG directories of the user who installs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub target: Target,
    pub scope: Scope,
    pub home: Option<PathBuf>,
    pub xdg_config_home: Option<PathBuf>,
}

impl Host {
    /// This machine, for `scope`.
    pub fn current(target: Target, scope: Scope) -> Self {
        Self {
            target,
            scope,
            home: std::env::var_os("HOME").map(PathBuf::from),
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
        }
    }

    fn home(&self) -> Result<&Path, InstallError> {
        self.home.as_deref().ok_or_else(|| {
            InstallError::Service("HOME is not set: a user service lives under it (or pass --system)".to_owned())
        })
    }

    /// Where the definition is written.
    pub fn definition_path(&self) -> Result<PathBuf, InstallError> {
        Ok(match (self.target, self.scope) {
            (Target::Macos, Scope::System) => {
                PathBuf::from("/Library/LaunchDaemons").join(format!("{LAUNCHD_LABEL}.plist"))
            }
            (Target::Macos, Scope::User) => {
                self.home()?.join("Library/LaunchAgents").join(format!("{LAUNCHD_LABEL}.plist"))
            }
            (Target::Linux, Scope::System) => PathBuf::from("/etc/systemd/system").join(SYSTEMD_UNIT),
            (Target::Linux, Scope::User) => match &self.xdg_config_home {
                Some(config) => config.join("systemd/user").join(SYSTEMD_UNIT),
                None => self.home()?.join(".config/systemd/user").join(SYSTEMD_UNIT),
            },
        })
    }

    /// The agent's log file under launchd (systemd keeps the output in the journal).
    pub fn log_path(&self) -> Result<Option<PathBuf>, InstallError> {
        Ok(match (self.target, self.scope) {
            (Target::Macos, Scope::System) => Some(PathBuf::from("/Library/Logs/metalkube/agent.log")),
            (Target::Macos, Scope::User) => Some(self.home()?.join("Library/Logs/metalkube/agent.log")),
            (Target::Linux, _) => None,
        })
    }

    /// The state directory `join` uses when none is given. A system service must not depend on
    /// a user's home, and launchd gives daemons none.
    pub fn default_state_dir(&self) -> Result<PathBuf, InstallError> {
        Ok(match (self.target, self.scope) {
            (Target::Macos, Scope::System) => PathBuf::from("/Library/Application Support/metalkube"),
            (Target::Linux, Scope::System) => PathBuf::from("/var/lib/metalkube"),
            (_, Scope::User) => crate::install::enrollment::default_state_dir(),
        })
    }
}

/// What the service manager runs: the program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// The `metalkube-agent serve` command line for an enrolled agent: its key material from the
/// state directory, and the bundle's settings. `engine` pins llama-server's path: a service
/// does not get the login shell's PATH (launchd's is /usr/bin:/bin:/usr/sbin:/sbin), so
/// Homebrew's llama-server would not be found there.
pub fn serve_command(
    program: &Path,
    settings: &AgentSettings,
    files: &EnrollmentFiles,
    engine: Option<&Path>,
) -> ServiceCommand {
    let path = |p: &Path| p.display().to_string();
    let mut args = vec![
        "serve".to_owned(),
        "--grpc-listen".to_owned(),
        settings.grpc_listen.to_string(),
        "--tls-cert".to_owned(),
        path(&files.certificate()),
        "--tls-key".to_owned(),
        path(&files.private_key()),
        "--client-ca".to_owned(),
        path(&files.client_ca()),
        "--serving-host".to_owned(),
        settings.serving_host.to_string(),
        "--state-dir".to_owned(),
        path(files.state_dir()),
    ];
    if let Some(budget) = settings.memory_budget_bytes {
        args.extend(["--memory-budget-bytes".to_owned(), budget.to_string()]);
    }
    if let Some(engine) = engine {
        args.extend(["--engine".to_owned(), path(engine)]);
    }
    ServiceCommand { program: program.to_owned(), args }
}

/// A rendered service definition and where it belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    pub path: PathBuf,
    pub contents: String,
    /// The log file launchd writes to, whose directory must exist before the job starts.
    pub log_path: Option<PathBuf>,
}

/// Renders the definition of `command` for `host` (pure).
pub fn definition(host: &Host, command: &ServiceCommand) -> Result<Definition, InstallError> {
    let log_path = host.log_path()?;
    let contents = match host.target {
        Target::Macos => {
            let log = log_path.as_deref().unwrap_or_else(|| Path::new("/dev/null"));
            launchd::render_plist(LAUNCHD_LABEL, command, log)
        }
        Target::Linux => systemd::render_unit(command, host.scope),
    };
    Ok(Definition { path: host.definition_path()?, contents, log_path })
}

/// Writes the definition and has the service manager (re)start the agent with it.
pub fn install(host: &Host, definition: &Definition) -> Result<(), InstallError> {
    write_definition(definition)?;
    start(host, &definition.path)
}

/// Writes the definition file (and the log directory) without starting anything.
pub fn write_definition(definition: &Definition) -> Result<(), InstallError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| InstallError::File { what, path, source }
    };
    if let Some(dir) = definition.path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the service directory", dir))?;
    }
    if let Some(dir) = definition.log_path.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(dir).map_err(io("creating the log directory", dir))?;
    }
    std::fs::write(&definition.path, &definition.contents)
        .map_err(io("writing the service definition", &definition.path))
}

/// Stops the agent's service and removes its definition.
pub fn uninstall(host: &Host) -> Result<PathBuf, InstallError> {
    let path = host.definition_path()?;
    stop(host, &path)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path),
        Err(source) => Err(InstallError::File { what: "removing the service definition", path, source }),
    }
}

fn check_host(host: &Host) -> Result<(), InstallError> {
    if Target::host() == Some(host.target) {
        Ok(())
    } else {
        Err(InstallError::Service(format!(
            "cannot manage a {} service on {}: use `service print --target {}` to see its definition",
            host.target.as_str(),
            std::env::consts::OS,
            host.target.as_str()
        )))
    }
}

fn start(host: &Host, path: &Path) -> Result<(), InstallError> {
    check_host(host)?;
    match host.target {
        Target::Macos => {
            let domain = launchd_domain(host.scope);
            // A job already loaded (a second join, a renewal) is replaced: bootstrap refuses a
            // label that is loaded, so take the old one out first; that it was not there is fine.
            let _ = run(Command::new("launchctl").args(["bootout", &format!("{domain}/{LAUNCHD_LABEL}")]), false);
            run(Command::new("launchctl").args(["bootstrap", &domain]).arg(path), true)
        }
        Target::Linux => {
            run(systemctl(host.scope).arg("daemon-reload"), true)?;
            run(systemctl(host.scope).args(["enable", SYSTEMD_UNIT]), true)?;
            // restart, not start: a running agent takes the new definition too.
            run(systemctl(host.scope).args(["restart", SYSTEMD_UNIT]), true)
        }
    }
}

fn stop(host: &Host, path: &Path) -> Result<(), InstallError> {
    check_host(host)?;
    if !path.exists() {
        return Ok(());
    }
    match host.target {
        Target::Macos => {
            // A job that was never loaded (`join --no-start`) has nothing to stop.
            let domain = launchd_domain(host.scope);
            let loaded = Command::new("launchctl")
                .args(["print", &format!("{domain}/{LAUNCHD_LABEL}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !loaded {
                return Ok(());
            }
            run(Command::new("launchctl").args(["bootout", &format!("{domain}/{LAUNCHD_LABEL}")]), true)
        }
        Target::Linux => {
            run(systemctl(host.scope).args(["disable", "--now", SYSTEMD_UNIT]), true)?;
            run(systemctl(host.scope).arg("daemon-reload"), true)
        }
    }
}

/// launchd's domain: `system` for daemons, the user's GUI session for agents.
fn launchd_domain(scope: Scope) -> String {
    match scope {
        Scope::System => "system".to_owned(),
        Scope::User => format!("gui/{}", nix::unistd::getuid()),
    }
}

fn systemctl(scope: Scope) -> Command {
    let mut command = Command::new("systemctl");
    if scope == Scope::User {
        command.arg("--user");
    }
    command
}

/// Runs a service manager command; with `required`, a failure is an error that says what ran
/// and what it answered.
fn run(command: &mut Command, required: bool) -> Result<(), InstallError> {
    let shown = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let output = command.output().map_err(|source| InstallError::ServiceCommand {
        command: shown.clone(),
        detail: String::new(),
        source: Some(source),
    })?;
    if output.status.success() || !required {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(InstallError::ServiceCommand { command: shown, detail: format!("{}: {stderr}", output.status), source: None })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn host(target: Target, scope: Scope) -> Host {
        Host { target, scope, home: Some("/Users/ana".into()), xdg_config_home: None }
    }

    #[test]
    fn definitions_go_where_each_service_manager_looks() {
        let path = |t, s| host(t, s).definition_path().unwrap();
        assert_eq!(path(Target::Macos, Scope::System), Path::new("/Library/LaunchDaemons/dev.metalkube.agent.plist"));
        assert_eq!(
            path(Target::Macos, Scope::User),
            Path::new("/Users/ana/Library/LaunchAgents/dev.metalkube.agent.plist")
        );
        assert_eq!(path(Target::Linux, Scope::System), Path::new("/etc/systemd/system/metalkube-agent.service"));
        assert_eq!(
            path(Target::Linux, Scope::User),
            Path::new("/Users/ana/.config/systemd/user/metalkube-agent.service")
        );
        let xdg = Host { xdg_config_home: Some("/cfg".into()), ..host(Target::Linux, Scope::User) };
        assert_eq!(xdg.definition_path().unwrap(), Path::new("/cfg/systemd/user/metalkube-agent.service"));
        let homeless = Host { home: None, ..host(Target::Macos, Scope::User) };
        assert!(homeless.definition_path().unwrap_err().to_string().contains("HOME is not set"));
        assert!(Host { home: None, ..host(Target::Macos, Scope::System) }.definition_path().is_ok());
    }

    #[test]
    fn the_serve_command_names_the_enrolled_files_and_settings() {
        let files = EnrollmentFiles::new("/var/lib/metalkube".into());
        let settings = AgentSettings {
            node_name: "mac-01".into(),
            grpc_listen: "0.0.0.0:9443".parse().unwrap(),
            serving_host: "0.0.0.0".parse().unwrap(),
            serving_address: "10.0.0.21".into(),
            memory_budget_bytes: Some(1 << 30),
        };
        let command = serve_command(Path::new("/usr/local/bin/metalkube-agent"), &settings, &files, None);
        assert_eq!(
            command.args.join(" "),
            "serve --grpc-listen 0.0.0.0:9443 --tls-cert /var/lib/metalkube/tls/agent.crt \
             --tls-key /var/lib/metalkube/tls/agent.key --client-ca /var/lib/metalkube/tls/client-ca.crt \
             --serving-host 0.0.0.0 --state-dir /var/lib/metalkube --memory-budget-bytes 1073741824"
        );
        let pinned = serve_command(
            Path::new("/a"),
            &AgentSettings { memory_budget_bytes: None, ..settings },
            &files,
            Some(Path::new("/opt/homebrew/bin/llama-server")),
        );
        assert!(!pinned.args.contains(&"--memory-budget-bytes".to_owned()));
        assert_eq!(pinned.args[pinned.args.len() - 2..], ["--engine", "/opt/homebrew/bin/llama-server"]);
    }

    #[test]
    fn targets_parse_and_refuse_others() {
        assert_eq!("macos".parse::<Target>().unwrap(), Target::Macos);
        assert_eq!("linux".parse::<Target>().unwrap(), Target::Linux);
        let err = "windows".parse::<Target>().unwrap_err().to_string();
        assert!(err.contains("--target \"windows\": write macos (launchd) or linux (systemd)"), "{err}");
    }

    #[test]
    fn managing_another_os_service_is_refused_with_the_way_to_print_it() {
        let other = if Target::host() == Some(Target::Macos) { Target::Linux } else { Target::Macos };
        let err = uninstall(&host(other, Scope::User)).unwrap_err().to_string();
        assert!(err.contains(&format!("use `service print --target {}`", other.as_str())), "{err}");
    }
}
