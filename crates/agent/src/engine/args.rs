//! The llama-server command line for a spec. The agent owns where the engine listens, which
//! file it serves and what the model is called (the MetalModel's name, so `/v1/models` and every
//! answer say `tiny`, not a path on the Mac); everything else comes from the spec.

use std::ffi::OsString;
use std::path::Path;

use metalkube_api::EngineSpec;
use metalkube_vitals::slots::CacheLayout;

pub fn engine_args(engine: &EngineSpec, model: &Path, name: &str, port: u16) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--model".into(),
        model.as_os_str().to_owned(),
        "--alias".into(),
        name.into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string().into(),
        "--ctx-size".into(),
        engine.context_size.to_string().into(),
        "--parallel".into(),
        engine.parallel.to_string().into(),
        "--n-gpu-layers".into(),
        // llama-server reads any count above the layer total as "all".
        if engine.gpu_layers < 0 { "999".to_owned() } else { engine.gpu_layers.to_string() }.into(),
        "--metrics".into(),
        "--slots".into(),
        "--no-webui".into(),
    ];
    if let Some(idle) = engine.sleep_after_idle {
        // Whole seconds, at least one (validation refuses less).
        args.extend(["--sleep-idle-seconds".into(), idle.get().as_secs().max(1).to_string().into()]);
    }
    args.extend(engine.extra_args.iter().map(OsString::from));
    args
}

/// How the engine started for `engine` lays its KV cache over its slots, which its `/slots`
/// answer does not say: shared when `extraArgs` turn `--kv-unified` on (the last of the flags
/// wins, as in llama-server's own parsing), else split, which is what the pinned llama-server does
/// with the explicit `--parallel` the agent always passes (measured: `-c 512 -np 2` gave two slots
/// of 256).
pub fn cache_layout(engine: &EngineSpec) -> CacheLayout {
    let shared = engine.extra_args.iter().fold(false, |shared, arg| match arg.as_str() {
        "--kv-unified" | "-kvu" => true,
        "--no-kv-unified" | "-no-kvu" => false,
        _ => shared,
    });
    if shared { CacheLayout::Shared } else { CacheLayout::Split }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_split_unless_extra_args_unify_it() {
        let mut engine = EngineSpec::default();
        assert_eq!(cache_layout(&engine), CacheLayout::Split);
        engine.extra_args = vec!["--kv-unified".into()];
        assert_eq!(cache_layout(&engine), CacheLayout::Shared);
        engine.extra_args = vec!["-kvu".into(), "--no-kv-unified".into()];
        assert_eq!(cache_layout(&engine), CacheLayout::Split, "the last flag wins");
    }

    #[test]
    fn owned_flags_come_first_and_extra_args_follow_unchanged() {
        let engine =
            EngineSpec { gpu_layers: -1, extra_args: vec!["--flash-attn".into(), "on".into()], ..Default::default() };
        let args: Vec<String> = engine_args(&engine, Path::new("/m.gguf"), "tiny", 18001)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("--model /m.gguf --alias tiny --host 127.0.0.1 --port 18001"), "{joined}");
        assert!(joined.contains("--n-gpu-layers 999") && joined.contains("--metrics"), "{joined}");
        assert!(joined.ends_with("--flash-attn on"), "{joined}");
    }
}
