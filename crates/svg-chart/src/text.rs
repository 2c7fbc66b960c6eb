//! Text into markup: outside text (model names, engine error messages, URLs) escaped for HTML or
//! SVG, and numbers short enough for an axis label.

/// The text with the five characters that can end an element's text or a quoted attribute
/// replaced by their entities.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for an axis label: few digits, no trailing zeros.
pub fn short(v: f64) -> String {
    let text = if v.abs() >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") };
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_end_a_text_or_an_attribute() {
        assert_eq!(escape(r#"<b a="x">'&'</b>"#), "&lt;b a=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;");
        assert_eq!(escape("plain ü ≥"), "plain ü ≥");
    }

    #[test]
    fn labels_are_short() {
        assert_eq!([short(0.25), short(2.0), short(150.4), short(0.5)], ["0.25", "2", "150", "0.5"]);
    }
}
