//! `metalkube-agent calibrate`'s command line, and the settings a run takes from it.

use std::path::PathBuf;
use std::time::Duration;

use metalkube_api::ModelKey;

use super::shape::Shape;
use super::target::Target;
use crate::CalibrateError;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Point it at a model with --agent and --model (on the Mac running the agent: engines listen on \
127.0.0.1 only), or with --engine-url (llama-server's own port; the agent's /api/v1/models calls it internalPort) and \
optionally --serving-url (the model's serving port, so the load meets the admission queue as clients do) and \
--engine-pid (for uptime and memory). report.json and report.html land in --out.

Example: metalkube-agent calibrate --agent http://127.0.0.1:9090 --model default/tiny --duration 10m --healthy-for 10m"
)]
pub struct CalibrateArgs {
    /// A running agent's HTTP address, asked every interval for the model's serving port, engine
    /// port and pid (so an engine it restarts is followed). Needs --model.
    #[arg(long, requires = "model", conflicts_with_all = ["engine_url", "serving_url", "engine_pid"])]
    pub agent: Option<String>,
    /// The model to calibrate, as NAMESPACE/NAME (standalone models are in `default`).
    #[arg(long, value_parser = parse_model_key, requires = "agent")]
    pub model: Option<ModelKey>,
    /// llama-server's own address (pulse, /slots, /metrics, /props), e.g. http://127.0.0.1:18000.
    #[arg(long, required_unless_present = "agent")]
    pub engine_url: Option<String>,
    /// The model's serving port the load goes through, e.g. http://127.0.0.1:8080. Default:
    /// --engine-url (straight to the engine, no admission in front).
    #[arg(long)]
    pub serving_url: Option<String>,
    /// The engine's process id, for its uptime and resident memory.
    #[arg(long)]
    pub engine_pid: Option<u32>,
    /// Load shape: mixed (chat, short completions, long prompts), chat, long, or burst.
    #[arg(long, value_enum, default_value = "mixed")]
    pub shape: Shape,
    /// How long to drive the load.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How often to pulse and read the engine's indicators (one line of the report each).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Clients sending requests at once, one request at a time each.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Seed of the request plans: the same seed and concurrency send the same requests.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The first part of the run known to be healthy: its pulses set the suggested thresholds.
    /// Default: the whole run.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub healthy_for: Option<Duration>,
    /// How far back the uptime and task-counter checks compare. Default: one interval.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub check_window: Option<Duration>,
    /// A pulse with no answer by then is a failure; longer than the slowest pulse you want to
    /// see measured.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub pulse_timeout: Duration,
    /// A request with no full answer by then is a failure.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// API key for a serving port whose model has spec.auth (sent as a Bearer token).
    #[arg(long, env = "METALKUBE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Directory for report.json and report.html. Default: ./calibrate-<UTC time>.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_model_key(s: &str) -> Result<ModelKey, CalibrateError> {
    ModelKey::parse(s).ok_or_else(|| CalibrateError::ModelKey { given: s.to_owned() })
}

/// What one run does; `CalibrateArgs::settings` checks and fills it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub shape: Shape,
    pub duration: Duration,
    pub interval: Duration,
    pub concurrency: u32,
    pub seed: u64,
    pub healthy_for: Option<Duration>,
    pub check_window: Duration,
    pub pulse_timeout: Duration,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    pub out: PathBuf,
}

/// Shortest interval: each one reads the engine and starts a pulse.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

impl CalibrateArgs {
    pub fn settings(self) -> Result<Settings, CalibrateError> {
        let target = match (self.agent, self.model, self.engine_url) {
            (Some(agent), Some(model), _) => Target::agent(&agent, model),
            (None, _, Some(engine)) => Target::direct(self.serving_url.as_deref(), &engine, self.engine_pid),
            _ => return Err(CalibrateError::NoTarget),
        };
        if self.interval < MIN_INTERVAL {
            return Err(CalibrateError::IntervalTooShort { min: MIN_INTERVAL });
        }
        if self.duration < self.interval {
            return Err(CalibrateError::DurationUnderInterval);
        }
        let out = self.out.unwrap_or_else(|| {
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            PathBuf::from(format!("calibrate-{}", stamp.replace(['-', ':'], "")))
        });
        Ok(Settings {
            target,
            shape: self.shape,
            duration: self.duration,
            interval: self.interval,
            concurrency: self.concurrency,
            seed: self.seed,
            healthy_for: self.healthy_for,
            check_window: self.check_window.unwrap_or(self.interval).max(self.interval),
            pulse_timeout: self.pulse_timeout,
            request_timeout: self.request_timeout,
            api_key: self.api_key,
            out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CalibrateArgs,
    }

    fn parse(args: &[&str]) -> Result<Settings, Box<dyn std::error::Error>> {
        let cli = Cli::try_parse_from(std::iter::once("calibrate").chain(args.iter().copied()))?;
        Ok(cli.args.settings()?)
    }

    #[test]
    fn the_agent_or_the_engine_names_the_target() {
        let s =
            parse(&["--agent", "http://127.0.0.1:9090", "--model", "default/tiny"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.target, Target::Agent { .. }));
        assert_eq!((s.check_window, s.duration), (Duration::from_secs(5), Duration::from_secs(300)));
        assert!(s.out.to_string_lossy().starts_with("calibrate-2"), "{:?}", s.out);
        let s = parse(&["--engine-url", "http://127.0.0.1:18000", "--engine-pid", "42", "--check-window", "1m"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.target, Target::direct(None, "http://127.0.0.1:18000", Some(42)));
        assert_eq!(s.check_window, Duration::from_secs(60));
    }

    #[test]
    fn contradictions_and_nonsense_are_refused() {
        assert!(parse(&[]).is_err(), "no target");
        assert!(parse(&["--agent", "http://a:1"]).is_err(), "--agent needs --model");
        assert!(parse(&["--agent", "http://a:1", "--model", "tiny"]).is_err(), "NAMESPACE/NAME");
        assert!(parse(&["--agent", "http://a:1", "--model", "d/t", "--engine-url", "http://b:2"]).is_err());
        assert!(parse(&["--engine-url", "http://b:2", "--interval", "10ms"]).is_err());
        assert!(parse(&["--engine-url", "http://b:2", "--duration", "1s", "--interval", "2s"]).is_err());
        assert!(parse(&["--engine-url", "http://b:2", "--concurrency", "0"]).is_err());
    }
}
