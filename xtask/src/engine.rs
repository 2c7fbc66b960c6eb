//! llama-server, built from the llama.cpp sources vendored in the PyPI sdist of
//! llama-cpp-python (pinned, sha256-checked), once per version, cached under
//! ~/.cache/metalkube/engine/<version>/.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::run;

pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// Part of the cache key: changing the build flags must not reuse an old binary.
const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
];

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("metalkube")
}

fn flags_key() -> String {
    let digest = Sha256::digest(CMAKE_FLAGS.join(" ").as_bytes());
    format!("{:x}", digest)[..8].to_owned()
}

/// Returns the cached llama-server, building it first when it is missing.
pub fn ensure_llama_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("METALKUBE_LLAMA_SERVER").map(PathBuf::from)
        && path.is_file()
    {
        return Ok(path);
    }
    let dir = cache_dir().join("engine").join(format!("{LLAMA_CPP_PYTHON_VERSION}-{}", flags_key()));
    let binary = dir.join("llama-server");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (about 10 minutes on 2 cores; cached afterwards)"
    );
    let work = cache_dir().join("build").join(LLAMA_CPP_PYTHON_VERSION);
    let sdist = download_sdist(&work)?;
    let src = work.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar").arg("xzf").arg(&sdist).arg("-C").arg(&src).args(["--strip-components", "1"]))?;
    let llama_cpp = src.join("vendor/llama.cpp");
    if !llama_cpp.join("CMakeLists.txt").is_file() {
        bail!("{} has no vendor/llama.cpp: the sdist layout changed", sdist.display());
    }
    let build = work.join("build");
    run(Command::new("cmake").arg("-S").arg(&llama_cpp).arg("-B").arg(&build).args(CMAKE_FLAGS))?;
    let jobs = std::env::var("CARGO_BUILD_JOBS").unwrap_or_else(|_| "2".into());
    run(Command::new("cmake").arg("--build").arg(&build).args(["--target", "llama-server", "-j", &jobs]))?;
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("llama-server.tmp");
    std::fs::copy(build.join("bin/llama-server"), &tmp).context("copying the built llama-server")?;
    std::fs::rename(&tmp, &binary)?;
    // The sources and objects are large; only the binary is worth keeping.
    let _ = std::fs::remove_dir_all(&work);
    Ok(binary)
}

fn download_sdist(work: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dl = work.join("sdist");
    std::fs::create_dir_all(&dl)?;
    let file = dl.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"));
    if !file.is_file() {
        let python = if Command::new("python3").arg("--version").output().is_ok() { "python3" } else { "python" };
        run(Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-d"])
            .arg(&dl)
            .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")))?;
    }
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let got = format!("{:x}", Sha256::digest(&bytes));
    if got != SDIST_SHA256 {
        let _ = std::fs::remove_file(&file);
        bail!("{} has sha256 {got}, expected {SDIST_SHA256}: refusing to build from it", file.display());
    }
    Ok(file)
}
