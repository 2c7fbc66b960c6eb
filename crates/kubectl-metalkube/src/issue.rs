//! The agent's serving certificate, signed by the metalkube CA: it names the address the
//! controller dials (an IP SAN, or a DNS SAN for a host name), so the controller's check of the
//! agent's identity is the ordinary one.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType};

use crate::pkcs8::pkcs8_der;

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
    let since_epoch = now.duration_since(UNIX_EPOCH).context("the clock is before 1970")?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE);
    params.not_after = epoch + since_epoch + valid_for;
    if valid_for.is_zero() {
        bail!("--valid-for must be longer than 0");
    }
    let key = KeyPair::generate().context("generating the agent's key")?;
    let cert = params.signed_by(&key, &issuer).context("signing the agent's certificate")?;
    Ok(Issued { cert: cert.pem(), key: key.serialize_pem(), not_after: now + valid_for })
}
