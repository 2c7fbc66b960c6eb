//! Who may ask the agent's HTTP port: the `Host` a request names, against DNS rebinding (a
//! web page whose name an attacker re-points at the Mac must not read the port through a
//! browser). Pure decisions; the middleware applying them is in `observe::http`.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// The flag that adds names to the allowed set, for messages.
pub const ALLOWED_HOST_FLAG: &str = "--http-allowed-host";

/// The names a request's `Host` may carry besides IP literals and `localhost`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// Lower case, without a trailing dot.
    names: BTreeSet<String>,
}

impl AllowedHosts {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self { names: names.into_iter().map(|n| normalize(&n)).filter(|n| !n.is_empty()).collect() }
    }

    /// The names configured, for logs.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Whether a request naming `host` (a `Host` header value or a URI authority, with or
    /// without a port) is for this agent. An IP literal always is: a browser tricked by
    /// rebinding sends the attacker's name, never an address.
    pub fn allows(&self, host: &str) -> bool {
        let Some(name) = host_without_port(host) else { return false };
        if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = normalize(name);
        name == "localhost" || self.names.contains(&name)
    }
}

fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// `host` without its `:port`; None when what follows the last colon of a name that is not a
/// bracketed IPv6 literal is not a port.
fn host_without_port(host: &str) -> Option<&str> {
    let host = host.trim();
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        return (rest.is_empty() || is_port(rest.strip_prefix(':')?)).then_some(&host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) && !name.contains(':') => Some(name),
        Some(_) => None,
        None => Some(host),
    }
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 421: the `Host` is not this agent's.
    Host(String),
}

/// Whether a request naming `host` (None: no Host at all) is let in.
pub fn admit(host: Option<&str>, hosts: &AllowedHosts) -> Result<(), Denied> {
    // No Host at all is no browser (every browser sends one), so no rebinding.
    match host {
        Some(host) if !hosts.allows(host) => Err(Denied::Host(host.to_owned())),
        _ => Ok(()),
    }
}

/// What to tell a client `denied`, naming what would let it in.
pub fn denial_message(denied: &Denied) -> String {
    match denied {
        Denied::Host(host) => format!(
            "Host {host:?} is not a name of this agent: use its IP address or localhost, or start the agent with {ALLOWED_HOST_FLAG} NAME (this check keeps web pages from reading the agent through DNS rebinding)"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn hosts() -> AllowedHosts {
        AllowedHosts::new(["Mac-01.lan.".to_owned(), String::new()])
    }

    #[test]
    fn addresses_localhost_and_configured_names_pass() {
        let h = hosts();
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "10.0.0.21:9090",
            "[::1]:9090",
            "[fe80::1]",
            "localhost",
            "LOCALHOST:9090",
            "localhost.",
            "mac-01.lan",
            "MAC-01.LAN.:9090",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9090",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "mac-01.lan.evil",
            "mac-01.lan:notaport",
            "[::1",
            "[::1]x",
            "",
            "::1",
        ] {
            assert!(!h.allows(refused), "{refused}");
        }
        assert_eq!(h.names().collect::<Vec<_>>(), ["mac-01.lan"]);
    }

    #[test]
    fn requests_without_a_known_host_are_denied_naming_the_flag() {
        let hosts = AllowedHosts::default();
        assert_eq!(admit(Some("10.0.0.21:9090"), &hosts), Ok(()));
        assert_eq!(admit(None, &hosts), Ok(()), "no Host: no browser");
        let denied = admit(Some("evil.example"), &hosts).unwrap_err();
        assert_eq!(denied, Denied::Host("evil.example".into()));
        assert!(denial_message(&denied).contains(ALLOWED_HOST_FLAG));
    }

    proptest! {
        /// A name is allowed only if it is an IP literal, localhost or configured, whatever
        /// port and case it comes with.
        #[test]
        fn only_known_names_pass(name in "[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,10}){0,3}", port in proptest::option::of(1u16..)) {
            let host = match port { Some(p) => format!("{name}:{p}"), None => name.clone() };
            let known = name == "localhost" || name.parse::<IpAddr>().is_ok();
            prop_assert_eq!(AllowedHosts::default().allows(&host), known);
            prop_assert!(AllowedHosts::new([name.to_uppercase()]).allows(&host));
        }
    }
}
