//! Which agents the router follows, read from `--agent NODE=URL`: the node's name, its agent's
//! gRPC endpoint, and the host its serving ports are reached at (the endpoint's host).

use crate::agent_watch::AgentTarget;
use crate::error::RouterError;

/// Reads one `--agent NODE=URL`.
pub fn parse_agent_flag(given: &str) -> Result<AgentTarget, RouterError> {
    let bad = |problem| RouterError::AgentFlag { given: given.to_owned(), problem };
    let (node, url) = given.split_once('=').ok_or_else(|| bad("no '='"))?;
    if node.is_empty() {
        return Err(bad("the node name is empty"));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("the URL must start with https:// or http://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split_once(']').map(|(h, _)| h).ok_or_else(|| bad("an IPv6 host lacks its ']'"))?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(bad("the URL has no host"));
    }
    Ok(AgentTarget { node: node.to_owned(), endpoint: url.to_owned(), serving_host: host.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_flag_names_the_node_its_endpoint_and_the_serving_host() {
        let t = parse_agent_flag("mac-1=https://10.0.0.21:7443").ok();
        assert_eq!(
            t.map(|t| (t.node, t.endpoint, t.serving_host)),
            Some(("mac-1".into(), "https://10.0.0.21:7443".into(), "10.0.0.21".into()))
        );
        let t = parse_agent_flag("mac-2=http://[::1]:7443").ok();
        assert_eq!(t.map(|t| t.serving_host), Some("::1".into()));
        for bad in ["mac-1", "=https://a:1", "mac-1=ftp://a:1", "mac-1=https://:7443"] {
            assert!(parse_agent_flag(bad).is_err(), "{bad}");
        }
    }
}
