//! Who may ask the agent's HTTP port what: the `Host` a request names (against DNS
//! rebinding: a web page whose name an attacker re-points at the Mac must not read the port
//! through a browser), and, in cluster mode, whether a scraper proved itself (a bearer token or
//! a client certificate from the metalkube CA). `/healthz` needs no proof. Pure decisions; the
//! middleware applying them is in `http_port`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::api_keys::ApiKeys;

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

/// How scrapers prove themselves on the agent's HTTP port (cluster mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrapeAuth {
    /// `--http-bearer-token-file`: tokens (by digest) a request may present as
    /// `Authorization: Bearer`. `Open` when no file was given.
    pub tokens: ApiKeys,
    /// `--http-client-certificates`: a client certificate the TLS handshake verified against
    /// `--client-ca` is enough.
    pub client_certificates: bool,
}

impl ScrapeAuth {
    /// Anyone who reaches the port may ask anything.
    pub fn is_open(&self) -> bool {
        self.tokens.is_open() && !self.client_certificates
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 421: the `Host` is not this agent's.
    Host(String),
    /// 401: no valid token or certificate.
    Unauthenticated,
}

/// Whether a request for `path`, naming `host`, presenting `token` over a connection with a
/// verified client certificate or not, is let in.
pub fn admit(
    path: &str,
    host: Option<&str>,
    token: Option<&[u8]>,
    client_certificate: bool,
    hosts: &AllowedHosts,
    auth: &ScrapeAuth,
) -> Result<(), Denied> {
    // No Host at all is no browser (every browser sends one), so no rebinding.
    if let Some(host) = host
        && !hosts.allows(host)
    {
        return Err(Denied::Host(host.to_owned()));
    }
    // Liveness tells nothing and must answer any probe.
    if path == "/healthz" || auth.is_open() {
        return Ok(());
    }
    let by_certificate = auth.client_certificates && client_certificate;
    let by_token = !auth.tokens.is_open() && auth.tokens.accepts(token);
    if by_certificate || by_token { Ok(()) } else { Err(Denied::Unauthenticated) }
}

/// What to tell a client `denied`, naming what would let it in.
pub fn denial_message(denied: &Denied, auth: &ScrapeAuth) -> String {
    match denied {
        Denied::Host(host) => format!(
            "Host {host:?} is not a name of this agent: use its IP address or localhost, or start the agent with {ALLOWED_HOST_FLAG} NAME (this check keeps web pages from reading the agent through DNS rebinding)"
        ),
        Denied::Unauthenticated => {
            let mut ways = Vec::new();
            if !auth.tokens.is_open() {
                ways.push("send `Authorization: Bearer <token>` with a token from --http-bearer-token-file");
            }
            if auth.client_certificates {
                ways.push("present a client certificate signed by --client-ca");
            }
            format!("this agent's HTTP port needs authentication: {} (/healthz needs none)", ways.join(", or "))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::model::api_keys::digests_of_key_lines;
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
    fn healthz_is_open_and_everything_else_needs_a_token_or_a_certificate() {
        let hosts = AllowedHosts::default();
        let auth =
            ScrapeAuth { tokens: ApiKeys::Digests(digests_of_key_lines(b"scrape-token\n")), client_certificates: true };
        let host = Some("10.0.0.21:9090");
        assert_eq!(admit("/healthz", host, None, false, &hosts, &auth), Ok(()));
        assert_eq!(admit("/metrics", host, None, false, &hosts, &auth), Err(Denied::Unauthenticated));
        assert_eq!(admit("/metrics", host, Some(b"wrong"), false, &hosts, &auth), Err(Denied::Unauthenticated));
        assert_eq!(admit("/metrics", host, Some(b"scrape-token"), false, &hosts, &auth), Ok(()));
        assert_eq!(admit("/readyz", host, None, true, &hosts, &auth), Ok(()));
        let token_only = ScrapeAuth { client_certificates: false, ..auth.clone() };
        assert_eq!(admit("/", host, None, true, &hosts, &token_only), Err(Denied::Unauthenticated));
        assert_eq!(admit("/", host, None, false, &hosts, &ScrapeAuth::default()), Ok(()), "open without flags");
        assert_eq!(
            admit("/healthz", Some("evil.example"), None, false, &hosts, &auth),
            Err(Denied::Host("evil.example".into())),
            "the Host check comes first, even for /healthz"
        );
        let message = denial_message(&Denied::Unauthenticated, &auth);
        assert!(message.contains("--http-bearer-token-file") && message.contains("--client-ca"), "{message}");
        assert!(denial_message(&Denied::Host("x".into()), &auth).contains(ALLOWED_HOST_FLAG));
        assert_eq!(admit("/metrics", None, None, false, &hosts, &auth), Err(Denied::Unauthenticated));
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
