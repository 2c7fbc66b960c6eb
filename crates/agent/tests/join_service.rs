//! `metalkube-agent join` and `service`: the key material lands privately in the state
//! directory, and the service definitions (launchd and systemd, both checked here on Linux)
//! run `serve` with exactly those files and the bundle's settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use metalkube_agent::install::enrollment::EnrollmentFiles;
use metalkube_agent::install::service::{self, Host, Scope, ServiceCommand, Target};
use metalkube_api::bundle::{AgentBundle, AgentSettings, AgentTls, render_bundle};
use metalkube_testkit::pki::TestCa;

fn command() -> ServiceCommand {
    ServiceCommand {
        program: "/Users/ana/bin/metalkube-agent".into(),
        args: vec!["serve".into(), "--state-dir".into(), "/Users/ana/Library/Application Support/metal&kube".into()],
    }
}

fn host(target: Target, scope: Scope) -> Host {
    Host { target, scope, home: Some("/Users/ana".into()), xdg_config_home: None }
}

fn plist(text: &str) -> plist::Dictionary {
    plist::Value::from_reader_xml(text.as_bytes()).expect("a property list launchd can read").into_dictionary().unwrap()
}

#[test]
fn the_launchd_job_is_a_property_list_that_keeps_the_agent_running() {
    for (scope, log) in [
        (Scope::User, "/Users/ana/Library/Logs/metalkube/agent.log"),
        (Scope::System, "/Library/Logs/metalkube/agent.log"),
    ] {
        let definition = service::definition(&host(Target::Macos, scope), &command()).unwrap();
        let job = plist(&definition.contents);
        assert_eq!(job["Label"].as_string(), Some("dev.metalkube.agent"));
        let args: Vec<&str> =
            job["ProgramArguments"].as_array().unwrap().iter().map(|v| v.as_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "/Users/ana/bin/metalkube-agent",
                "serve",
                "--state-dir",
                "/Users/ana/Library/Application Support/metal&kube"
            ],
            "escaped in XML, read back whole"
        );
        assert_eq!(job["RunAtLoad"].as_boolean(), Some(true));
        assert_eq!(job["KeepAlive"].as_boolean(), Some(true));
        assert_eq!(job["ThrottleInterval"].as_signed_integer(), Some(10));
        assert_eq!(job["ExitTimeOut"].as_signed_integer(), Some(60));
        let files = |key: &str| job[key].as_dictionary().unwrap()["NumberOfFiles"].as_signed_integer();
        assert_eq!((files("SoftResourceLimits"), files("HardResourceLimits")), (Some(65536), Some(65536)));
        assert_eq!(job["StandardOutPath"].as_string(), Some(log));
        assert_eq!(job["StandardErrorPath"].as_string(), Some(log));
        assert_eq!(definition.log_path.as_deref(), Some(Path::new(log)));
    }
}

#[test]
fn the_systemd_unit_restarts_the_agent_and_lets_it_stop_its_engines() {
    let system = service::definition(&host(Target::Linux, Scope::System), &command()).unwrap();
    assert_eq!(system.path, Path::new("/etc/systemd/system/metalkube-agent.service"));
    assert_eq!(system.log_path, None, "the journal keeps the output");
    let unit = &system.contents;
    for line in [
        "[Service]",
        "ExecStart=\"/Users/ana/bin/metalkube-agent\" \"serve\" \"--state-dir\" \"/Users/ana/Library/Application Support/metal&kube\"",
        "Restart=always",
        "RestartSec=5",
        "KillMode=mixed",
        "TimeoutStopSec=60",
        "LimitNOFILE=65536",
        "After=network-online.target",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line:?} missing from\n{unit}");
    }
    let user = service::definition(&host(Target::Linux, Scope::User), &command()).unwrap();
    assert!(user.contents.lines().any(|l| l == "WantedBy=default.target"), "{}", user.contents);
    assert!(!user.contents.contains("network-online"), "a user manager has no such target");
    // Every line is a section, a key=value or blank: nothing the unit parser would reject.
    for line in unit.lines().chain(user.contents.lines()) {
        assert!(line.is_empty() || line.starts_with('[') || line.contains('='), "{line:?}");
    }
}

fn bundle(ca: &TestCa) -> AgentBundle {
    let pem = ca.server(&["10.0.0.21"]);
    AgentBundle {
        agent: AgentSettings {
            node_name: "mac-01".into(),
            grpc_listen: "0.0.0.0:9443".parse().unwrap(),
            serving_host: "0.0.0.0".parse().unwrap(),
            serving_address: "10.0.0.21".into(),
            memory_budget_bytes: Some(48 << 30),
        },
        tls: AgentTls { certificate: pem.cert, private_key: pem.key, client_ca: ca.cert_pem.clone() },
    }
}

/// Runs the agent binary with `home` as its HOME (where a user service is written).
fn agent(home: &Path, args: &[&str]) -> Output {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_metalkube-agent"))
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .env("PATH", "/nonexistent")
        .args(args)
        .output()
        .unwrap();
    eprintln!("metalkube-agent {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    output
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn join_installs_the_bundle_privately_and_writes_the_service_that_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let state = dir.path().join("state");
    let ca = TestCa::new("metalkube");
    let bundle = bundle(&ca);
    let bundle_path = dir.path().join("mac-01.bundle");
    std::fs::write(&bundle_path, render_bundle(&bundle)).unwrap();

    let output = agent(
        &home,
        &[
            "join",
            bundle_path.to_str().unwrap(),
            "--no-start",
            "--state-dir",
            state.to_str().unwrap(),
            "--engine",
            "/opt/llama-server",
        ],
    );
    assert!(output.status.success());
    let files = EnrollmentFiles::new(state.clone());
    assert_eq!(std::fs::read_to_string(files.certificate()).unwrap(), bundle.tls.certificate);
    assert_eq!(std::fs::read_to_string(files.private_key()).unwrap(), bundle.tls.private_key);
    assert_eq!(std::fs::read_to_string(files.client_ca()).unwrap(), bundle.tls.client_ca);
    assert_eq!(files.load_settings().unwrap(), bundle.agent);
    for file in [files.certificate(), files.private_key(), files.client_ca(), files.settings()] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!((mode(&state), mode(&files.tls_dir())), (0o700, 0o700));

    // On Linux, a user unit under HOME, running this very binary with the joined files.
    let unit_path = home.join(".config/systemd/user/metalkube-agent.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_metalkube-agent")).unwrap();
    let state = state.display();
    let expected = format!(
        "ExecStart=\"{}\" \"serve\" \"--grpc-listen\" \"0.0.0.0:9443\" \"--tls-cert\" \"{state}/tls/agent.crt\" \
         \"--tls-key\" \"{state}/tls/agent.key\" \"--client-ca\" \"{state}/tls/client-ca.crt\" \
         \"--serving-host\" \"0.0.0.0\" \"--state-dir\" \"{state}\" \"--memory-budget-bytes\" \"51539607552\" \
         \"--engine\" \"/opt/llama-server\"",
        exe.display()
    );
    assert!(unit.lines().any(|l| l == expected), "{expected}\nnot in\n{unit}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("not started (--no-start)"));

    // `service print` writes the same definition from what join kept, for either OS.
    let printed =
        agent(&home, &["service", "print", "--state-dir", &state.to_string(), "--engine", "/opt/llama-server"]);
    assert!(printed.status.success());
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), unit);
    let mac = agent(&home, &["service", "print", "--target", "macos", "--state-dir", &state.to_string()]);
    let job = plist(&String::from_utf8(mac.stdout).unwrap());
    let args: Vec<&str> = job["ProgramArguments"].as_array().unwrap().iter().map(|v| v.as_string().unwrap()).collect();
    assert_eq!(args[1..4], ["serve", "--grpc-listen", "0.0.0.0:9443"]);
    assert!(!args.contains(&"--engine"), "no llama-server on PATH, none given: none pinned");

    // A second join (a renewal) replaces the files in place, still private.
    let mut second = bundle.clone();
    second.tls = ca_leaf(&ca);
    std::fs::write(&bundle_path, render_bundle(&second)).unwrap();
    let again = agent(&home, &["join", bundle_path.to_str().unwrap(), "--no-start", "--state-dir", &state.to_string()]);
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(files.private_key()).unwrap(), second.tls.private_key);
    assert_eq!(mode(&files.private_key()), 0o600);
    // The same service again: nothing to restart; a running agent reloads the files itself.
    let same = agent(&home, &["join", bundle_path.to_str().unwrap(), "--no-start", "--state-dir", &state.to_string()]);
    assert!(same.status.success());
    assert!(String::from_utf8_lossy(&same.stdout).contains("service definition unchanged"), "{same:?}");

    // A bundle whose key is not its certificate's is refused, and the working files stay.
    let mut mismatched = bundle.clone();
    mismatched.tls.private_key = ca_leaf(&ca).private_key;
    std::fs::write(&bundle_path, render_bundle(&mismatched)).unwrap();
    let refused =
        agent(&home, &["join", bundle_path.to_str().unwrap(), "--no-start", "--state-dir", &state.to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("TLS"), "{refused:?}");
    assert_eq!(std::fs::read_to_string(files.private_key()).unwrap(), second.tls.private_key, "untouched");
}

fn ca_leaf(ca: &TestCa) -> AgentTls {
    let pem = ca.server(&["10.0.0.21"]);
    AgentTls { certificate: pem.cert, private_key: pem.key, client_ca: ca.cert_pem.clone() }
}

#[test]
fn join_refuses_a_broken_bundle_and_service_needs_a_join_first() {
    let dir = tempfile::tempdir().unwrap();
    let bundle_path: PathBuf = dir.path().join("mac-01.bundle");
    let text = render_bundle(&bundle(&TestCa::new("metalkube")));
    std::fs::write(&bundle_path, text.replace("  nodeName: mac-01\n", "")).unwrap();
    let state = dir.path().join("state");
    let output = agent(
        dir.path(),
        &["join", bundle_path.to_str().unwrap(), "--no-start", "--state-dir", state.to_str().unwrap()],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("mac-01.bundle: agent.nodeName: missing"), "{stderr}");
    assert!(!state.exists(), "nothing written from a broken bundle");

    let output = agent(dir.path(), &["service", "print", "--state-dir", state.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("run `metalkube-agent join BUNDLE` first"), "{stderr}");
}
