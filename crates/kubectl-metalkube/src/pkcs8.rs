//! A CA's private key as PKCS#8, the one encoding ring signs with. The CAs metalkube meets write
//! older ones: helm's `genCA` (the chart's own CA) an RSA key as PKCS#1, cert-manager an ECDSA
//! key as SEC1 unless told otherwise. Both wrap into PKCS#8 without touching the key itself.

use anyhow::{Context, bail};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
/// `[0]`, where SEC1 keeps the curve.
const CONTEXT_0: u8 = 0xa0;
/// AlgorithmIdentifier of rsaEncryption (1.2.840.113549.1.1.1) with its NULL parameters.
const RSA_ALGORITHM: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
/// OID of id-ecPublicKey (1.2.840.10045.2.1).
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// The PKCS#8 DER of the PEM private key in `pem` (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn pkcs8_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .context("no PEM private key (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")?;
    Ok(match key {
        PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(key) => wrap(RSA_ALGORITHM, key.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(key) => {
            let curve = sec1_curve(key.secret_sec1_der()).context(
                "the EC PRIVATE KEY does not name its curve; write it as PKCS#8 (e.g. cert-manager's privateKey.encoding: PKCS8)",
            )?;
            wrap(&[EC_PUBLIC_KEY, curve].concat(), key.secret_sec1_der())
        }
        _ => bail!("unsupported private key encoding"),
    })
}

/// PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }.
fn wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let body = [tlv(INTEGER, &[0]), tlv(SEQUENCE, algorithm), tlv(OCTET_STRING, key)].concat();
    tlv(SEQUENCE, &body)
}

/// The curve OID (whole, tag and length included) of an ECPrivateKey
/// { version, privateKey, [0] parameters, [1] publicKey }.
fn sec1_curve(der: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = read_tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, rest) = read_tlv(body)?; // version
    let (_, _, rest) = read_tlv(rest)?; // privateKey
    let (tag, parameters, _) = read_tlv(rest)?;
    (tag == CONTEXT_0).then_some(parameters)
}

fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// One DER element: its tag, its value, and what follows it.
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<usize>() || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// What helm's genCA writes (the chart's CA): RSA, PKCS#1.
    const HELM_KEY: &str = include_str!("../tests/fixtures/helm-genca.key");
    /// What cert-manager and `openssl ecparam -genkey` write: P-256, SEC1 with its curve.
    const SEC1_KEY: &str = include_str!("../tests/fixtures/sec1-ec-ca.key");

    #[test]
    fn legacy_encodings_become_keys_ring_signs_with() {
        for pem in [HELM_KEY, SEC1_KEY] {
            let der = pkcs8_der(pem).unwrap();
            let key = rcgen::KeyPair::try_from(der.as_slice()).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap().self_signed(&key);
            assert!(cert.is_ok(), "{pem}");
        }
    }

    #[test]
    fn pkcs8_passes_through() {
        let key = rcgen::KeyPair::generate().unwrap();
        assert_eq!(pkcs8_der(&key.serialize_pem()).unwrap(), key.serialize_der());
    }

    #[test]
    fn lengths_encode_in_short_and_long_form() {
        assert_eq!(tlv(OCTET_STRING, &[7; 3]), [4, 3, 7, 7, 7]);
        let long = tlv(OCTET_STRING, &[0; 300]);
        assert_eq!(long[..4], [4, 0x82, 0x01, 0x2c]);
        let (tag, value, rest) = read_tlv(&long).unwrap();
        assert_eq!((tag, value.len(), rest.len()), (OCTET_STRING, 300, 0));
        assert!(read_tlv(&long[..100]).is_none(), "a truncated element is refused");
    }

    #[test]
    fn what_is_not_a_key_is_refused() {
        let err = pkcs8_der("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(err.to_string().starts_with("no PEM private key"), "{err}");
    }
}
