//! The little XML the S3 API needs, as pure functions over text: find elements by name (keeping
//! the raw text of ones we do not model, so PUT can send them back unchanged), escape, unescape.
//!
//! Not a general XML parser: S3 answers are flat, namespace-default documents without CDATA.

/// The inner text of every `<name>…</name>` element (also `<name attr="…">`), in order, without
/// nesting of the same name.
pub fn elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let close = format!("</{name}>");
    let mut rest = xml;
    while let Some(start) = find_open_tag(rest, name) {
        let after_open = &rest[start..];
        let Some(open_end) = after_open.find('>') else {
            break;
        };
        if after_open[..open_end].ends_with('/') {
            found.push("");
            rest = &after_open[open_end + 1..];
            continue;
        }
        let body = &after_open[open_end + 1..];
        let Some(end) = body.find(&close) else { break };
        found.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    found
}

/// The raw `<name>…</name>` text of every element, tags included.
pub fn raw_elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let close = format!("</{name}>");
    let mut rest = xml;
    while let Some(start) = find_open_tag(rest, name) {
        let from_open = &rest[start..];
        let Some(end) = from_open.find(&close) else {
            break;
        };
        found.push(&from_open[..end + close.len()]);
        rest = &from_open[end + close.len()..];
    }
    found
}

fn find_open_tag(xml: &str, name: &str) -> Option<usize> {
    let open = format!("<{name}");
    let mut offset = 0;
    while let Some(position) = xml[offset..].find(&open) {
        let at = offset + position;
        let next = xml[at + open.len()..].chars().next();
        if matches!(
            next,
            Some('>') | Some(' ') | Some('/') | Some('\t') | Some('\n') | Some('\r')
        ) {
            return Some(at);
        }
        offset = at + open.len();
    }
    None
}

/// The unescaped text of the first `<name>` element.
pub fn first_text(xml: &str, name: &str) -> Option<String> {
    elements(xml, name)
        .first()
        .map(|text| unescape(text.trim()))
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            other => out.push(other),
        }
    }
    out
}

pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let entity = &tail[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ if entity.starts_with("#x") => u32::from_str_radix(&entity[2..], 16)
                .ok()
                .and_then(char::from_u32),
            _ if entity.starts_with('#') => entity[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_elements_and_keeps_raw_text() {
        let xml = r#"<?xml version="1.0"?><LifecycleConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Rule><ID>a</ID><Filter><Prefix>tmp/</Prefix></Filter></Rule><Rule><ID>b&amp;c</ID><Filter/><Transition><Days>3</Days></Transition></Rule></LifecycleConfiguration>"#;
        let rules = raw_elements(xml, "Rule");
        assert_eq!(rules.len(), 2);
        assert!(rules[1].starts_with("<Rule><ID>b&amp;c</ID>"));
        assert_eq!(first_text(rules[1], "ID").as_deref(), Some("b&c"));
        assert_eq!(first_text(rules[0], "Prefix").as_deref(), Some("tmp/"));
        assert_eq!(elements(rules[1], "Filter"), vec![""]);
        assert!(
            elements(xml, "Rul").is_empty(),
            "a prefix of a tag name is not the tag"
        );
    }

    #[test]
    fn escape_round_trips() {
        let text = "a<b>&\"c'";
        assert_eq!(unescape(&escape(text)), text);
        assert_eq!(unescape("&#65;&#x42;&bogus;"), "AB&bogus;");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(<[A-Za-z/]{0,6}>|[^<]{0,8}|&[#x0-9a-z]{0,6};?){0,24}") {
            let _ = elements(&text, "Rule");
            let _ = raw_elements(&text, "Rule");
            let _ = first_text(&text, "ID");
            let _ = unescape(&text);
        }

        #[test]
        fn escape_round_trips_any_text(text in ".{0,64}") {
            proptest::prop_assert_eq!(unescape(&escape(&text)), text);
        }
    }
}
