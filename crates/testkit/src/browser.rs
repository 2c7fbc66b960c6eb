//! Headless Chromium (Debian `chromium`, installed by `cargo xtask setup`) for tests that look
//! at a page as a person would: the DOM once the page has loaded (or after its timers ran), and
//! a screenshot. A missing browser fails the test (never skips it) with the command that
//! installs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the browser binary; else `chromium` on `PATH`.
pub const CHROMIUM_ENV: &str = "METALKUBE_CHROMIUM";

/// A guard for one browser run: it loads a page from loopback in about a second.
const RUN_GUARD: Duration = Duration::from_secs(90);

/// The browser binary.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os(CHROMIUM_ENV).map(PathBuf::from) {
        assert!(p.is_file(), "{CHROMIUM_ENV}={} does not exist", p.display());
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "chromium is not installed (nor named by {CHROMIUM_ENV}): `apt-get install chromium`, \
             or `cargo xtask setup`, which installs it"
        )
    })
}

/// A page as the browser left it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The DOM, serialised as HTML.
    pub dom: String,
    /// What the page wrote to the browser's console, Content-Security-Policy refusals and
    /// script errors included: a page that fetches nothing and runs cleanly leaves none.
    pub console: Vec<String>,
}

/// `url` once the page has loaded. Headless Chromium cannot do this with scripts disabled
/// (`--blink-settings=scriptEnabled=false` makes `--dump-dom` and `--screenshot` give
/// nothing), so what a page shows without JavaScript is checked on the HTML the server sends.
pub async fn load(url: &str) -> Loaded {
    load_after(url, None).await
}

/// As `load`, after letting the page's timers run for `virtual_time_ms` of the browser's
/// virtual time (which waits for fetches in flight): how a test sees a live page update itself.
pub async fn load_after(url: &str, virtual_time_ms: Option<u64>) -> Loaded {
    let budget = virtual_time_ms.map(|ms| format!("--virtual-time-budget={ms}"));
    let mut args = vec!["--dump-dom", "--enable-logging=stderr", "--v=0"];
    args.extend(budget.as_deref());
    let out = run(url, &args).await;
    let console =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect();
    Loaded { dom: String::from_utf8_lossy(&out.stdout).into_owned(), console }
}

/// A PNG screenshot of `url` in a `width` x `height` window, written to `path`.
pub async fn screenshot(url: &str, (width, height): (u32, u32), path: &Path) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }
    let _ = std::fs::remove_file(path);
    let shot = format!("--screenshot={}", path.display());
    let size = format!("--window-size={width},{height}");
    run(url, &[&shot, &size, "--hide-scrollbars"]).await;
    assert!(path.is_file(), "chromium wrote no screenshot at {}", path.display());
}

/// Width and height from a PNG's header, to check a screenshot is the picture asked for.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || &png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| b.try_into().ok().map(u32::from_be_bytes);
    Some((be(&png[16..20])?, be(&png[20..24])?))
}

async fn run(url: &str, extra: &[&str]) -> std::process::Output {
    // A profile of its own per run: tests run in parallel, and Chromium locks its profile.
    let profile = tempfile::tempdir().unwrap_or_else(|e| panic!("a profile directory: {e}"));
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        // Nothing but the page under test leaves the browser: no update checks, no sync, no
        // safe-browsing lists, no DNS prefetch.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-pings",
        "--dns-prefetch-disable",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .kill_on_drop(true);
    cmd.arg(url);
    let out = match tokio::time::timeout(RUN_GUARD, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("starting chromium: {e}"),
        Err(_) => panic!("chromium did not finish with {url} within {RUN_GUARD:?}"),
    };
    assert!(
        out.status.success(),
        "chromium failed on {url} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
