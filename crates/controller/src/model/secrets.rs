//! What a model's Secrets hold for its agents: the digests of its API keys (`spec.auth`) and
//! its hub token (`spec.model.tokenSecretRef`). The keys and the token go no further than
//! these functions and the mTLS call that carries them.

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::ResourceExt;
use kube::api::Api;
use metalkube_api::MetalModel;
use metalkube_api::keys::{KeyDigest, digests_of_key_lines};

use crate::ControllerError;

/// The hub token `spec.model.tokenSecretRef` names, read from the Secret in the model's
/// namespace. A missing Secret or key sends no token: the agent then says the hub refused it,
/// which names the fix. The token is never logged.
pub(crate) async fn hub_token(m: &MetalModel, client: &Client) -> Result<Option<String>, ControllerError> {
    let Some(r) = &m.spec.model.token_secret_ref else { return Ok(None) };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &m.namespace().unwrap_or_default());
    let value = secrets.get_opt(&r.name).await?.and_then(|s| s.data?.remove(&r.key));
    let token = value.map(|b| String::from_utf8_lossy(&b.0).trim().to_owned()).filter(|t| !t.is_empty());
    if token.is_none() {
        tracing::warn!(secret = %r.name, key = %r.key, "spec.model.tokenSecretRef names a Secret key that does not exist or is empty; downloading without a token");
    }
    Ok(token)
}

/// The digests of the API keys `spec.auth` names, read from the Secret in the model's namespace
/// (None: the model asks for no keys). A missing Secret or key gives no digests: the agents then
/// let nobody in, rather than everybody. The keys themselves go no further than this function.
pub(crate) async fn api_key_digests(
    m: &MetalModel,
    client: &Client,
) -> Result<Option<Vec<KeyDigest>>, ControllerError> {
    let Some(auth) = &m.spec.auth else { return Ok(None) };
    let r = &auth.api_key_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &m.namespace().unwrap_or_default());
    let value = secrets.get_opt(&r.name).await?.and_then(|s| s.data?.remove(&r.key));
    match value {
        Some(bytes) => Ok(Some(digests_of_key_lines(&bytes.0))),
        None => {
            tracing::warn!(
                secret = %r.name,
                key = %r.key,
                "spec.auth names a Secret key that does not exist; the model lets nobody in"
            );
            Ok(Some(Vec::new()))
        }
    }
}
