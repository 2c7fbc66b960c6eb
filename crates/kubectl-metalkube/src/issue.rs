//! The agent's serving certificate, signed by the metalkube CA: it names the address the
//! controller dials (an IP SAN, or a DNS SAN for a host name), so the controller's check of the
//! agent's identity is the ordinary one.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType};

use crate::pkcs8::pkcs8_der;

/// Longest certificate lifetime enroll issues.
const MAX_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Clocks on a Mac and in the cluster disagree a little; a certificate valid from a few minutes
/// ago works on both.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The CA that signs agents' certificates, as the CA Secret holds it.
pub struct CaPem<'a> {
    pub cert: &'a str,
    pub key: &'a str,
}

/// An issued certificate and its new private key, PEM-encoded.
#[derive(Debug)]
pub struct Issued {
    pub cert: String,
    pub key: String,
    pub not_after: SystemTime,
}

/// Issues the serving certificate of the agent `node` reached at `address`, valid from now
/// (less `BACKDATE`) for `valid_for`.
pub fn issue_agent_certificate(
    ca: &CaPem<'_>,
    node: &str,
    address: &str,
    valid_for: Duration,
    now: SystemTime,
) -> anyhow::Result<Issued> {
    let ca_key = KeyPair::try_from(pkcs8_der(ca.key).context("the CA's key")?.as_slice())
        .context("the CA's key is not one this tool can sign with (RSA, ECDSA P-256/P-384 or Ed25519)")?;
    let issuer = Issuer::from_ca_cert_pem(ca.cert, ca_key).context("the CA's certificate is not readable")?;
    let san = match address.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            address
                .try_into()
                .with_context(|| format!("--address {address:?} is neither an IP address nor a DNS name"))?,
        ),
    };
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![san];
    params.distinguished_name.push(DnType::CommonName, node);
    params.distinguished_name.push(DnType::OrganizationName, "metalkube agents");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    if valid_for.is_zero() || valid_for > MAX_VALIDITY {
        bail!("--valid-for {}: allowed from 1s to 10 years", humantime::format_duration(valid_for));
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).context("the clock is before 1970")?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE);
    params.not_after = epoch + since_epoch + valid_for;
    let key = KeyPair::generate().context("generating the agent's key")?;
    let cert = params.signed_by(&key, &issuer).context("signing the agent's certificate")?;
    let issued = Issued { cert: cert.pem(), key: key.serialize_pem(), not_after: now + valid_for };
    verify_as_the_controller_would(ca.cert, &issued.cert, address, now)?;
    Ok(issued)
}

/// Checks the new certificate the way the controller will when it dials the agent: it must
/// chain to the CA certificate and name the address. A Secret whose key is not the CA
/// certificate's, a certificate that is no CA, or an expired CA is caught here, with the reason,
/// instead of as a handshake failure on the Mac.
fn verify_as_the_controller_would(ca_pem: &str, cert_pem: &str, address: &str, now: SystemTime) -> anyhow::Result<()> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("the CA Secret's tls.crt is not PEM")?).context("the CA Secret's tls.crt")?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .context("the CA Secret's tls.crt cannot anchor a verification")?;
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("the issued certificate")?;
    let name = ServerName::try_from(address.to_owned()).context("the address as a TLS name")?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    verifier.verify_server_cert(&leaf, &[], &name, &[], at).map_err(|e| {
        anyhow::anyhow!(
            "the certificate issued under the CA Secret does not verify against its tls.crt ({e}): \
             the Secret's tls.key must be the key of its tls.crt, which must be a CA certificate that has not expired"
        )
    })?;
    Ok(())
}
