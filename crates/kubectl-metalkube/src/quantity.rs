//! Memory sizes as Kubernetes writes them (`48Gi`, `512Mi`, `64G`, `1000000`), in bytes.

use anyhow::{Context, bail};

const SUFFIXES: [(&str, u64); 10] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
];

pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, unit) =
        SUFFIXES.iter().find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit))).unwrap_or((text, 1));
    let allowed = "a whole number of bytes with an optional Ki, Mi, Gi, Ti, Pi, k, M, G, T or P suffix, e.g. 48Gi";
    let value: u64 = number.parse().with_context(|| format!("{text:?} is not a size ({allowed})"))?;
    let bytes = value.checked_mul(unit).with_context(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        bail!("{text:?}: the size must be above 0");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("48Gi").unwrap(), 48 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("64G").unwrap(), 64_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
    }

    #[test]
    fn nonsense_is_refused_with_what_is_allowed() {
        let err = parse_bytes("48GB").unwrap_err().to_string();
        assert!(err.contains("\"48GB\" is not a size (a whole number of bytes"), "{err}");
        assert!(parse_bytes("1.5Gi").is_err());
        assert!(parse_bytes("0").unwrap_err().to_string().contains("above 0"));
        assert!(parse_bytes("99999999999Pi").unwrap_err().to_string().contains("too large"));
    }
}
