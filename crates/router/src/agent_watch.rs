//! One Watch stream per agent, asking for load (`include_load`): the agent sends each model's
//! queue, requests in flight, limit and decode speed as they move (looked at every 100 ms) and at
//! least every 300 ms, which is how the router tells fresh figures from stale ones. The stream
//! runs over mTLS with the router's own client certificate (issued from the metalkube CA, as the
//! controller's is). When it breaks, what the agent said no longer stands: its replicas leave
//! the picker at once, and the stream is opened again with backoff.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use metalkube_api::AgentEvent;
use metalkube_proto as pb;
use pb::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::RouterError;
use crate::fleet::Fleet;

/// The router's side of mTLS to the agents.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// One agent the router follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTarget {
    /// The MetalNode (Mac) name.
    pub node: String,
    /// The agent's gRPC endpoint, `https://host:port` (or `http://` with `--insecure`).
    pub endpoint: String,
    /// Where the Mac's serving ports are reached: its IP address or DNS name.
    pub serving_host: String,
}

/// A channel to `target`'s agent: keep-alive so a dead Mac is noticed without traffic.
pub fn channel(target: &AgentTarget, tls: Option<&ClientTls>) -> Result<Channel, RouterError> {
    let bad = |problem: String| RouterError::AgentEndpoint { node: target.node.clone(), problem };
    let mut endpoint = Endpoint::from_shared(target.endpoint.clone())
        .map_err(|e| bad(format!("{:?} is not a URL: {e}", target.endpoint)))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    match (tls, target.endpoint.starts_with("https://")) {
        (Some(tls), true) => {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            endpoint = endpoint
                .tls_config(config)
                .map_err(|source| RouterError::AgentTls { node: target.node.clone(), source })?;
        }
        (Some(_), false) => return Err(bad("must be https:// (mTLS is on; plaintext needs --insecure)".into())),
        (None, true) => return Err(bad("is https:// but the router runs with --insecure".into())),
        (None, false) => {}
    }
    Ok(endpoint.connect_lazy())
}

/// Follows `target`'s agent for as long as the router runs.
pub async fn follow(fleet: Arc<Fleet>, target: AgentTarget, channel: Channel) {
    fleet.set_host(&target.node, &target.serving_host);
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    loop {
        let mut client = AgentClient::new(channel.clone());
        match client.watch(pb::WatchRequest { include_load: true }).await {
            Ok(stream) => {
                let open = StreamOpen::new(&fleet);
                let mut stream = stream.into_inner();
                let mut heard = false;
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            if !heard {
                                heard = true;
                                delays = backoff.build();
                            }
                            if let Some(said) = read_event(&target.node, message) {
                                fleet.agent_said(&target.node, said);
                            }
                        }
                        Ok(None) => break "the agent closed its Watch stream".to_owned(),
                        Err(status) => break format!("the Watch stream broke: {}", status.message()),
                    }
                };
                drop(open);
                fleet.agent_gone(&target.node);
                tracing::warn!(node = %target.node, "{ended}; its replicas are out of the picker until it is back");
            }
            Err(status) => {
                tracing::warn!(node = %target.node, code = ?status.code(), "cannot open the agent's Watch stream: {}", status.message());
            }
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::time::sleep(delay).await;
    }
}

/// One open Watch stream in `metalkube_router_agent_streams`, counted out however the stream
/// ends (its task may be aborted when its MetalNode goes).
struct StreamOpen(Arc<Fleet>);

impl StreamOpen {
    fn new(fleet: &Arc<Fleet>) -> Self {
        fleet.metrics().agent_streams.inc();
        Self(fleet.clone())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.metrics().agent_streams.dec();
    }
}

/// A Watch event in the api crate's terms; None when nothing in it can be read (logged: one bad
/// report must not cost the Mac its stream).
fn read_event(node: &str, message: pb::WatchEvent) -> Option<AgentEvent> {
    let read = pb::ReadEvent::from(message);
    for e in &read.unreadable {
        tracing::warn!(%node, "the agent sent a report that cannot be read: {e}");
    }
    read.event
}
