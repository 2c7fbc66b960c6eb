//! Who may change what an agent serves. Every client certificate the agent accepts chains to the
//! metalkube CA, and both the controller and the router hold one; the router only needs to read
//! (Watch, Info, ListModels). A caller whose certificate names the router is refused the calls
//! that change models, so a router's key, if stolen, cannot start or stop engines. Without TLS
//! (`--insecure`, development only) there is no identity to judge.

use metalkube_api::ROUTER_IDENTITY;

/// The common name of a client certificate (DER); None when it cannot be read.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(name)
}

/// Whether a caller with these certificates' common names may change models: not the router.
pub fn may_change_models(common_names: &[Option<String>]) -> bool {
    !common_names.iter().any(|cn| cn.as_deref() == Some(ROUTER_IDENTITY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_reads_and_only_the_router_is_refused_changes() {
        assert!(!may_change_models(&[Some(ROUTER_IDENTITY.to_owned())]));
        assert!(may_change_models(&[Some("metalkube-controller".to_owned())]));
        assert!(may_change_models(&[None]), "a name that cannot be read is judged by the CA alone, as before");
        assert!(may_change_models(&[]), "no TLS: development mode");
    }

    #[test]
    fn the_common_name_is_read_from_a_real_certificate() {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).and_then(|mut p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, ROUTER_IDENTITY);
            let key = rcgen::KeyPair::generate()?;
            p.self_signed(&key)
        });
        let Ok(cert) = ca else { panic!("a self-signed certificate") };
        assert_eq!(common_name(cert.der()).as_deref(), Some(ROUTER_IDENTITY));
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
