//! The names Kubernetes allows for objects and Secret keys, checked as the API server checks
//! them. A standalone agent reads its MetalModels from files no API server has seen, and the
//! agent derives file names from these names (engine log, pidfile, desired-state record, API
//! key file): a name with a path separator or `..` would reach outside its directory. Pure.

/// What an RFC 1123 label (a namespace) may be.
pub const DNS_LABEL_ALLOWED: &str =
    "1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit (an RFC 1123 label)";
/// What an RFC 1123 subdomain (an object's name) may be.
pub const DNS_SUBDOMAIN_ALLOWED: &str = "1 to 253 lowercase letters, digits, '-' or '.', each '.'-separated part starting \
     and ending with a letter or digit (an RFC 1123 subdomain)";
/// What a Secret's data key may be.
pub const SECRET_KEY_ALLOWED: &str = "1 to 253 letters, digits, '-', '_' or '.', other than '.' and '..'";

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;
const SECRET_KEY_MAX: usize = 253;

/// What is wrong with `value` as an RFC 1123 label (a namespace), if anything.
pub fn dns_label_problem(value: &str) -> Option<String> {
    length_problem(value, LABEL_MAX)
        .or_else(|| first_char_not(value, |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        .or_else(|| part_ends_problem(value, value))
}

/// What is wrong with `value` as an RFC 1123 subdomain (an object's name), if anything.
pub fn dns_subdomain_problem(value: &str) -> Option<String> {
    length_problem(value, SUBDOMAIN_MAX)
        .or_else(|| first_char_not(value, |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
        .or_else(|| value.split('.').find_map(|part| part_ends_problem(value, part)))
}

/// What is wrong with `value` as a Secret data key, if anything.
pub fn secret_key_problem(value: &str) -> Option<String> {
    length_problem(value, SECRET_KEY_MAX)
        .or_else(|| first_char_not(value, |c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .or_else(|| (value == "." || value == "..").then(|| format!("{} is a directory name", shown(value))))
}

fn length_problem(value: &str, max: usize) -> Option<String> {
    if value.is_empty() {
        return Some("it is empty".to_owned());
    }
    let chars = value.chars().count();
    (chars > max).then(|| format!("{} is {chars} characters long", shown(value)))
}

/// The first character `allowed` refuses; a path separator is named before any other.
fn first_char_not(value: &str, allowed: impl Fn(char) -> bool) -> Option<String> {
    let separator = value.chars().find(|&c| c == '/' || c == '\\');
    let c = separator.or_else(|| value.chars().find(|&c| !allowed(c)))?;
    let what = match c {
        '/' | '\\' => " (a path separator)",
        c if c.is_ascii_uppercase() => " (uppercase)",
        _ => "",
    };
    Some(format!("{} holds {c:?}{what}", shown(value)))
}

/// A label, or one '.'-separated part of a subdomain, starts and ends with a letter or digit.
fn part_ends_problem(value: &str, part: &str) -> Option<String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if part.is_empty() {
        return Some(format!("{} has an empty part between dots (or a dot at an end)", shown(value)));
    }
    if !part.starts_with(alnum) || !part.ends_with(alnum) {
        return Some(format!("{} has a part starting or ending with '-'", shown(value)));
    }
    None
}

/// The value as an error shows it: quoted, escaped, and cut short.
fn shown(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        format!("{:?}…", value.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_and_subdomains_as_kubernetes_has_them() {
        for good in ["default", "a", "team-1", &"a".repeat(63)] {
            assert_eq!(dns_label_problem(good), None, "{good}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("../../x", "'/' (a path separator)"),
            ("a/b", "path separator"),
            ("Default", "uppercase"),
            ("-a", "'-'"),
            ("a-", "'-'"),
            ("a.b", "'.'"),
            (&"a".repeat(64), "64 characters"),
        ] {
            let problem = dns_label_problem(bad).unwrap_or_default();
            assert!(problem.contains(says), "{bad:?}: {problem}");
        }
        for good in ["tiny", "qwen2.5-0.5b", "a.b.c", &"a".repeat(253)] {
            assert_eq!(dns_subdomain_problem(good), None, "{good}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("..", "empty part"),
            ("/etc", "path separator"),
            ("a..b", "empty part"),
            (".a", "empty part"),
            ("a.-b", "'-'"),
            ("a_b", "'_'"),
            (&"a".repeat(254), "254 characters"),
        ] {
            let problem = dns_subdomain_problem(bad).unwrap_or_default();
            assert!(problem.contains(says), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn secret_keys_as_kubernetes_has_them() {
        for good in ["keys", "api.keys", "K_1-x", "..keys", "a..b"] {
            assert_eq!(secret_key_problem(good), None, "{good}");
        }
        for (bad, says) in
            [("", "empty"), (".", "directory"), ("..", "directory"), ("a/b", "path separator"), ("k y", "' '")]
        {
            let problem = secret_key_problem(bad).unwrap_or_default();
            assert!(problem.contains(says), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn a_long_value_is_shown_cut() {
        let problem = dns_label_problem(&"x".repeat(10_000)).unwrap_or_default();
        assert!(problem.len() < 200 && problem.contains("10000 characters"), "{problem}");
    }

    proptest! {
        /// Whatever passes is one plain path component: no separator, never '.' or '..', and
        /// within the length limits.
        #[test]
        fn what_passes_is_a_plain_file_name(value in prop_oneof![".{0,8}", "[-a-z0-9./\\\\_A-Z]{0,12}"]) {
            for (ok, max) in [
                (dns_label_problem(&value).is_none(), LABEL_MAX),
                (dns_subdomain_problem(&value).is_none(), SUBDOMAIN_MAX),
                (secret_key_problem(&value).is_none(), SECRET_KEY_MAX),
            ] {
                if ok {
                    prop_assert!(!value.is_empty() && value.len() <= max);
                    prop_assert!(!value.contains(['/', '\\', '\0']) && value != "." && value != "..");
                }
            }
        }

        /// Names built the way Kubernetes defines them pass.
        #[test]
        fn rfc1123_names_pass(parts in prop::collection::vec("[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", 1..4)) {
            prop_assert_eq!(dns_label_problem(&parts[0]), None);
            prop_assert_eq!(dns_subdomain_problem(&parts.join(".")), None);
            prop_assert_eq!(secret_key_problem(&parts.join(".")), None);
        }
    }
}
