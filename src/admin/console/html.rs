//! Building the console's HTML. Prompts and outputs are attacker-controlled text, so markup
//! and text take different doors: [`Html::raw`] takes only `&'static str` (markup written in
//! this source), and everything else, numbers and attribute values included, goes through
//! [`Html::text`], which escapes it. A value from the store cannot reach the page unescaped
//! without a change to this type.

use std::fmt::Display;

/// A page or fragment being built.
#[derive(Debug, Default)]
pub struct Html(String);

impl Html {
    /// An empty fragment.
    pub fn new() -> Html {
        Html(String::with_capacity(16 * 1024))
    }

    /// Appends markup written in the source.
    pub fn raw(&mut self, markup: &'static str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// Appends `text` escaped: safe in element content and in double-quoted attributes.
    pub fn text(&mut self, text: &str) -> &mut Html {
        escape_into(text, &mut self.0);
        self
    }

    /// Appends a value's `Display`, escaped.
    pub fn show(&mut self, value: impl Display) -> &mut Html {
        self.text(&value.to_string())
    }

    /// Appends a fragment built separately (already escaped).
    pub fn append(&mut self, fragment: Html) -> &mut Html {
        self.0.push_str(&fragment.0);
        self
    }

    /// The HTML.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'`.
fn escape_into(text: &str, out: &mut String) {
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
}

/// Percent-encodes a query parameter value (everything but unreserved characters).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A query string (`?a=1&b=2`) of the pairs with a value; empty when none have one.
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty())
                .map(|v| format!("{k}={}", url_encode(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_markup_is_not() {
        let mut html = Html::new();
        html.raw("<p title=\"")
            .text("\" onmouseover='x'")
            .raw("\">")
            .text("<script>alert(1)</script> & <img src=x onerror=y>")
            .raw("</p>");
        assert_eq!(
            html.into_string(),
            "<p title=\"&quot; onmouseover=&#39;x&#39;\">&lt;script&gt;alert(1)&lt;/script&gt; \
             &amp; &lt;img src=x onerror=y&gt;</p>"
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query(&[
                ("rule", Some("a b&c=<d>")),
                ("model", None),
                ("route", Some(""))
            ]),
            "?rule=a%20b%26c%3D%3Cd%3E"
        );
        assert_eq!(query(&[("x", None)]), "");
        assert_eq!(url_encode("é"), "%C3%A9");
    }
}
