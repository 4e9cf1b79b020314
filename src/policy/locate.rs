//! Positions in YAML files, for file:line:col errors: where a serde_yaml error points (policy
//! and configuration files alike), and where a key of a parsed policy was written, so errors
//! found after parsing (an unknown detector in a condition, a bad regex) still point there too.
//!
//! serde does not keep positions, so this reads the text again with the indentation rules of
//! block-style YAML, and falls back to the enclosing key (or 1:1) when the layout is unusual.

/// A 1-based (line, column).
pub type Position = (usize, usize);

struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(|(i, l)| Line {
            number: i + 1,
            indent: l.len() - l.trim_start().len(),
            text: l,
        })
        .collect()
}

/// The position just after `key:` (and its spaces) in `line`, if the line holds that key.
fn key_in(line: &str, key: &str) -> Option<usize> {
    let mut search = 0;
    while let Some(found) = line.get(search..).and_then(|rest| rest.find(key)) {
        let start = search + found;
        let before_ok = start == 0
            || line
                .get(..start)
                .and_then(|b| b.chars().last())
                .is_some_and(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-' | '"' | '\''));
        let after = start + key.len();
        let rest = line.get(after..).unwrap_or("");
        let rest = rest.strip_prefix(['"', '\'']).unwrap_or(rest);
        if before_ok && rest.starts_with(':') {
            let value = line.len() - rest.len() + 1;
            let spaces = line
                .get(value..)
                .map_or(0, |v| v.len() - v.trim_start().len());
            return Some(value + spaces + 1);
        }
        search = after;
    }
    None
}

/// The block of lines under the top-level key `parent` (exclusive of the key line).
fn block<'a, 'b>(all: &'b [Line<'a>], parent: &str) -> Option<(&'b Line<'a>, &'b [Line<'a>])> {
    let start = all
        .iter()
        .position(|l| l.indent == 0 && key_in(l.text, parent).is_some())?;
    let head = &all[start];
    let rest = &all[start + 1..];
    let end = rest
        .iter()
        .position(|l| l.indent == 0)
        .unwrap_or(rest.len());
    Some((head, &rest[..end]))
}

/// `parent: { key: … }` → where `key` is.
pub fn map_key(text: &str, parent: &str, key: &str) -> Position {
    let all = lines(text);
    let Some((head, body)) = block(&all, parent) else {
        return (1, 1);
    };
    body.iter()
        .find_map(|l| key_in(l.text, key).map(|_| (l.number, l.indent + 1)))
        .unwrap_or((head.number, 1))
}

/// `list: [ {…}, {…} ]` → where `key` is in item `index`.
pub fn list_item_key(text: &str, list: &str, index: usize, key: &str) -> Position {
    let all = lines(text);
    let Some((head, body)) = block(&all, list) else {
        return (1, 1);
    };
    let Some(item_indent) = body
        .iter()
        .find(|l| l.text.trim_start().starts_with('-'))
        .map(|l| l.indent)
    else {
        return (head.number, 1);
    };
    let starts: Vec<usize> = body
        .iter()
        .enumerate()
        .filter(|(_, l)| l.indent == item_indent && l.text.trim_start().starts_with('-'))
        .map(|(i, _)| i)
        .collect();
    let Some(&first) = starts.get(index) else {
        return (head.number, 1);
    };
    let last = starts.get(index + 1).copied().unwrap_or(body.len());
    let item = &body[first..last];
    item.iter()
        .find_map(|l| key_in(l.text, key).map(|col| (l.number, col)))
        .unwrap_or((item[0].number, item_indent + 1))
}

/// `a: { b: { c: … } }` → where `c` is.
pub fn nested_key(text: &str, path: &[&str]) -> Position {
    let all = lines(text);
    let Some((first, rest)) = path.split_first() else {
        return (1, 1);
    };
    let Some((head, mut body)) = block(&all, first) else {
        return (1, 1);
    };
    let mut found = (head.number, 1);
    for key in rest {
        let Some(i) = body.iter().position(|l| key_in(l.text, key).is_some()) else {
            return found;
        };
        let line = &body[i];
        found = (
            line.number,
            key_in(line.text, key).unwrap_or(line.indent + 1),
        );
        let after = &body[i + 1..];
        let end = after
            .iter()
            .position(|l| l.indent <= line.indent)
            .unwrap_or(after.len());
        body = &after[..end];
    }
    found
}

/// Line, column and message of a YAML error. The message already starts with the field path
/// ("upstream: unknown field …"); its tail " at line L column C" is dropped because callers put
/// the position in front.
pub fn yaml_error_parts(err: &serde_yaml_ng::Error) -> (usize, usize, String) {
    let (line, column) = err
        .location()
        .map_or((0, 0), |loc| (loc.line(), loc.column()));
    let message = err.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    (line, column, message)
}

/// Like [`yaml_error_parts`], for an error in `text`. libyaml's reader reports some errors
/// (control characters, invalid UTF-8) as a byte offset, "… at position 450", with no line and
/// column (1:1); this turns the offset into the line and column it points at.
///
/// At the end of a text whose last line has no line break, libyaml counts one line more than
/// there is; such errors point at the end of the last line instead.
pub fn yaml_error_parts_in(err: &serde_yaml_ng::Error, text: &str) -> (usize, usize, String) {
    let (line, column, message) = yaml_error_parts(err);
    let Some((problem, rest)) = message.split_once(" at position ") else {
        let lines = text.split('\n').count();
        if line > lines && !text.ends_with('\n') {
            let last = text.rsplit('\n').next().unwrap_or_default();
            return (lines, last.chars().count() + 1, message);
        }
        return (line, column, message);
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Some(offset) = rest.get(..digits).and_then(|d| d.parse::<usize>().ok()) else {
        return (line, column, message);
    };
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let column = 1 + String::from_utf8_lossy(before.get(line_start..).unwrap_or_default())
        .chars()
        .count();
    let message = format!("{problem}{}", rest.get(digits..).unwrap_or_default());
    (line, column, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = concat!(
        "mode: monitor\n",
        "detectors:\n",
        "  trigger: { type: trigger_phrase }\n",
        "  gibberish:\n",
        "    type: gibberish\n",
        "rules:\n",
        "  # a comment\n",
        "  - name: one\n",
        "    when: trigger.prompt.matched\n",
        "    severity: high\n",
        "  - { name: two, when: gibberish.score > 0.5, severity: info }\n",
        "alerts:\n",
        "  webhook:\n",
        "    url: http://x\n",
    );

    #[test]
    fn finds_keys_in_block_and_flow_style() {
        assert_eq!(map_key(TEXT, "detectors", "gibberish"), (4, 3));
        assert_eq!(map_key(TEXT, "detectors", "trigger"), (3, 3));
        assert_eq!(list_item_key(TEXT, "rules", 0, "when"), (9, 11));
        assert_eq!(list_item_key(TEXT, "rules", 1, "when"), (11, 24));
        assert_eq!(nested_key(TEXT, &["alerts", "webhook", "url"]), (14, 10));
    }

    #[test]
    fn falls_back_to_the_enclosing_key() {
        assert_eq!(list_item_key(TEXT, "rules", 5, "when"), (6, 1));
        assert_eq!(map_key(TEXT, "nowhere", "x"), (1, 1));
    }
}
