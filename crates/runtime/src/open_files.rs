//! The process's file-descriptor limit (RLIMIT_NOFILE), raised at start as far as the OS
//! allows. Every connection, engine log, pipe and model file takes a descriptor; the soft limit
//! a shell or launchd hands out (256 in a macOS terminal) runs out long before the machine
//! does, while the hard limit is usually far higher and a process may raise its soft limit up
//! to it without privileges.

/// Below this many descriptors an agent with a few models and their clients can run out
/// (each engine restart, serving-port connection and pulse takes some).
pub const OPEN_FILES_ENOUGH: u64 = 4096;

/// What the limit was, what it is now, and why it could not be raised when it could not.
#[derive(Debug)]
pub struct OpenFilesLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit in force now.
    pub soft: u64,
    /// The hard limit (the ceiling for the soft one).
    pub hard: u64,
    /// Why raising failed, if it did (the limit is then what it was).
    pub error: Option<std::io::Error>,
}

impl OpenFilesLimit {
    /// Fewer descriptors than an agent with a few busy models needs.
    pub fn is_low(&self) -> bool {
        self.soft < OPEN_FILES_ENOUGH
    }

    /// One line for the log: what it is, and what to do when it is too low.
    pub fn describe(&self) -> String {
        let hard = if self.hard == rlimit::INFINITY { "unlimited".to_owned() } else { self.hard.to_string() };
        let mut text = format!("open-files limit {} (was {}, hard limit {hard})", self.soft, self.before);
        if let Some(e) = &self.error {
            text.push_str(&format!("; raising it failed: {e}"));
        }
        if self.is_low() {
            text.push_str(&format!(
                "; below {OPEN_FILES_ENOUGH}, connections and engine restarts may fail with \"Too many open files\": \
                 raise the hard limit (macOS: `launchctl limit maxfiles`, a LaunchDaemon's HardResourceLimits; \
                 systemd: LimitNOFILE=; a shell: ulimit -Hn)"
            ));
        }
        text
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (on macOS to the most `setrlimit` accepts
/// there: the hard limit, but no more than kern.maxfilesperproc, since an unlimited soft
/// limit is refused). Never fails: what could not be done is in the answer.
pub fn raise_open_files_limit() -> OpenFilesLimit {
    let (before, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(error) => return OpenFilesLimit { before: 0, soft: 0, hard: 0, error: Some(error) },
    };
    // The crate caps the wish at the hard limit, and on macOS at kern.maxfilesperproc.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => OpenFilesLimit { before, soft, hard, error: None },
        Err(error) => OpenFilesLimit { before, soft: before, hard, error: Some(error) },
    }
}

/// The soft limit in force now, if the OS says.
pub fn open_files_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_limit_says_what_to_raise() {
        let low = OpenFilesLimit { before: 256, soft: 256, hard: 256, error: None };
        let text = low.describe();
        assert!(low.is_low() && text.contains("open-files limit 256") && text.contains("LimitNOFILE"), "{text}");
        let fine = OpenFilesLimit { before: 256, soft: 1 << 20, hard: rlimit::INFINITY, error: None };
        assert_eq!(fine.describe(), "open-files limit 1048576 (was 256, hard limit unlimited)");
        let failed =
            OpenFilesLimit { before: 512, soft: 512, hard: 8192, error: Some(std::io::Error::from_raw_os_error(1)) };
        assert!(failed.describe().contains("raising it failed"), "{}", failed.describe());
    }

    /// In a child process of its own (the limit is process-wide): a lowered soft limit comes
    /// back up to the hard one.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        if std::env::var_os("METALKUBE_OPEN_FILES_CHILD").is_some() {
            let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
            let lowered = hard.min(64);
            assert!(rlimit::Resource::NOFILE.set(lowered, hard).is_ok());
            let raised = raise_open_files_limit();
            assert!(raised.error.is_none(), "{raised:?}");
            assert_eq!((raised.before, raised.soft, open_files_limit()), (lowered, hard, Some(hard)));
            return;
        }
        let me = std::env::current_exe().unwrap_or_default();
        let status = std::process::Command::new(me)
            .args(["--exact", "open_files::tests::the_soft_limit_is_raised_to_the_hard_limit", "--nocapture"])
            .env("METALKUBE_OPEN_FILES_CHILD", "1")
            .status();
        assert!(status.is_ok_and(|s| s.success()), "the child test failed");
    }
}
