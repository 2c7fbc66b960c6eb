use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ApiError;

/// A span of time written the way people write it in YAML: `500ms`, `2s`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}

/// What the CRD schema accepts. Every string it matches must read (see `parse_schema_form`):
/// a MetalModel the API server stores but the controller cannot deserialize would fail the
/// controller's whole list.
const DURATION_PATTERN: &str = "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h) ?)+$";

impl FromStr for Duration {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // The schema's forms first, exactly; then humantime's wider ones (`2 days`, `5min`)
        // for files that never pass the API server.
        match parse_schema_form(s) {
            Some(d) => Ok(Duration(d)),
            None => humantime::parse_duration(s)
                .map(Duration)
                .map_err(|e| ApiError::Duration { value: s.to_owned(), message: e.to_string() }),
        }
    }
}

/// Parses the language of `DURATION_PATTERN` in exact integer nanoseconds, so that everything
/// the pattern lets through reads. humantime refuses a decimal finer than a nanosecond (`1.0ns`,
/// `1.0000000001s`) and overflows on long digit runs; here such a fraction is truncated and a
/// span beyond `std::time::Duration::MAX` (some 584 billion years) is taken as that.
fn parse_schema_form(s: &str) -> Option<std::time::Duration> {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    // Saturating: 39 digits and more exceed u128, and the total is capped below anyway.
    let number = |d: &str| d.parse::<u128>().unwrap_or(u128::MAX);
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (whole, r) = rest.split_at(digits(rest));
        let (fraction, r) = match r.strip_prefix('.') {
            Some(r) if digits(r) > 0 => r.split_at(digits(r)),
            Some(_) => return None, // `1.s`
            None => ("", r),
        };
        let (unit, r) = r.split_at(r.bytes().take_while(u8::is_ascii_lowercase).count());
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3600 * NANOS_PER_SEC,
            _ => return None,
        };
        if whole.is_empty() {
            return None; // `s`, `.5s`
        }
        total = total.saturating_add(number(whole).saturating_mul(per_unit));
        if !fraction.is_empty() {
            // 24 digits are exact to far below a nanosecond for every unit, and fit in u128.
            let fraction = &fraction[..fraction.len().min(24)];
            total = total.saturating_add(number(fraction) * per_unit / 10u128.pow(fraction.len() as u32));
        }
        rest = r.strip_prefix(' ').unwrap_or(r);
    }
    if s.is_empty() {
        return None;
    }
    Some(match u64::try_from(total / NANOS_PER_SEC) {
        Ok(secs) => std::time::Duration::new(secs, (total % NANOS_PER_SEC) as u32),
        Err(_) => std::time::Duration::MAX,
    })
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Duration {
    /// `1h2m3s`, `500ms`, `36h`: only the units the CRD's pattern accepts (humantime would
    /// write days, months and years for long spans, which the API server refuses), no spaces.
    pub fn compact(self) -> String {
        let d = self.0;
        if d.is_zero() {
            return "0s".into();
        }
        let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
        let parts = [
            (secs / 3600, "h"),
            (secs / 60 % 60, "m"),
            (secs % 60, "s"),
            (u64::from(nanos / 1_000_000), "ms"),
            (u64::from(nanos / 1_000 % 1_000), "us"),
            (u64::from(nanos % 1_000), "ns"),
        ];
        parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect()
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.compact())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 500ms, 2s or 1m30s."
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_compact_forms() {
        let d: Duration = "1m30s".parse().unwrap();
        assert_eq!(d.get(), std::time::Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
        let d: Duration = serde_json::from_str("\"250ms\"").unwrap();
        assert_eq!(d.get(), std::time::Duration::from_millis(250));
    }

    #[test]
    fn reads_every_form_the_schema_pattern_accepts() {
        // humantime refuses the first three and overflows on the last; the API server stores
        // them all, and a MetalModel the controller cannot read would fail its whole list.
        let read = |s: &str| s.parse::<Duration>().map(Duration::get);
        assert_eq!(read("0.0ns").unwrap(), std::time::Duration::ZERO);
        assert_eq!(read("1.5ns").unwrap(), std::time::Duration::from_nanos(1));
        assert_eq!(read("1.0000000001s").unwrap(), std::time::Duration::from_secs(1));
        assert_eq!(read("99999999999999999999h").unwrap(), std::time::Duration::MAX);
        // Long spans are written in hours: `1day` is not in the pattern.
        assert_eq!(Duration::from_secs(2 * 86_400 + 1).compact(), "48h1s");
        assert_eq!(read("1.5s 2m").unwrap(), std::time::Duration::from_millis(121_500));
        assert_eq!(read("2 days").unwrap(), std::time::Duration::from_secs(172_800));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        let err = "soon".parse::<Duration>().unwrap_err().to_string();
        assert!(err.contains("\"soon\"") && err.contains("500ms"), "{err}");
    }
}
