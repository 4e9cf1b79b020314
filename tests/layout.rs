//! The layout rule: no two top-level modules of the library import each other, directly or
//! through others. The folder tree is the data flow (proxy → capture → inspect → detect →
//! policy → store / alert, with app/ composing and cli/ at the edge), and a cycle is the first
//! sign that a room has started doing another room's job.
//!
//! The graph is read from the source text: every `crate::<module>` path in code, `use
//! crate::{…}` groups included, in every file under `src/<module>/` or `src/<module>.rs`.
//! Comments (doc links too) are not dependencies. Unit tests (`tests.rs` files and
//! `#[cfg(test)] mod tests { … }` blocks) are left out: they may take fixtures from `lab`
//! (the development data, the attack generators) the way a dev-dependency would, while `lab`
//! builds on the rooms it measures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → the top-level modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn top_level_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(
        graph.len() >= 10,
        "expected the library's top-level modules under {}, found {:?}",
        src.display(),
        graph.keys().collect::<Vec<_>>()
    );
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                format!(
                    "{} -> {}: {}",
                    pair[0],
                    pair[1],
                    where_named(&src, &pair[0], &pair[1])
                )
            })
            .collect();
        panic!(
            "the top-level modules import each other in a cycle: {}\n{}\n\
             Move the shared piece down into the lower module (or a new one below both), or pass \
             it in from app/ at construction.",
            cycle.join(" -> "),
            edges.join("\n")
        );
    }
}

#[test]
fn the_cycle_check_finds_a_deliberate_cycle() {
    let graph = graph_of(&[
        ("proxy", &["capture", "inspect"]),
        ("inspect", &["detect", "store"]),
        ("detect", &["capture"]),
        ("store", &["proxy"]),
        ("capture", &[]),
    ]);
    let cycle = find_cycle(&graph).expect("store -> proxy closes a cycle");
    assert_eq!(cycle.first(), cycle.last());
    for module in ["proxy", "inspect", "store"] {
        assert!(
            cycle.iter().any(|m| m == module),
            "{cycle:?} misses {module}"
        );
    }
    let acyclic = graph_of(&[
        ("proxy", &["capture", "inspect"]),
        ("inspect", &["detect", "store"]),
        ("detect", &["capture"]),
        ("store", &[]),
        ("capture", &[]),
    ]);
    assert_eq!(find_cycle(&acyclic), None);
}

#[test]
fn crate_paths_are_read_in_every_form() {
    let text = "use crate::capture::Exchange;\n\
                use crate::{detect::Finding, store,\n    policy::{Engine, Verdict}};\n\
                // crate::commented::Out is not a dependency\n\
                let x = crate::telemetry::Metrics::default(); // crate::trailing::Comment\n\
                /// See [`crate::alert`].\n\
                let s = \"crate::quoted\";\n\
                #[cfg(test)]\n\
                mod tests {\n\
                    use crate::lab::devset;\n\
                    fn f() { let g = crate::app::Server::start; }\n\
                }\n\
                use crate::alert::Alert;";
    let names = crate_names(&without_test_modules(text));
    let expected: BTreeSet<String> = ["alert", "capture", "detect", "policy", "store", "telemetry"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, expected);
}

fn graph_of(edges: &[(&str, &[&str])]) -> Graph {
    edges
        .iter()
        .map(|(from, to)| {
            (
                (*from).to_owned(),
                to.iter().map(|t| (*t).to_owned()).collect(),
            )
        })
        .collect()
}

/// Reads the graph of the library's top-level modules from `src`.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        if name == "lib" || name == "main" {
            continue;
        }
        let mut deps = BTreeSet::new();
        for file in rust_files(&path) {
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            deps.extend(crate_names(&without_test_modules(&text)));
        }
        deps.remove(&name);
        graph.entry(name).or_default().extend(deps);
    }
    graph
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return if path.extension().is_some_and(|e| e == "rs") {
            vec![path.to_owned()]
        } else {
            Vec::new()
        };
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        files.extend(rust_files(&entry.unwrap().path()));
    }
    files
}

/// The top-level module names a file's text reaches through `crate::`, outside plain
/// comments and string literals (doc comments count: their links are dependencies).
fn crate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let code = strip_comment_and_strings(line);
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let before = rest.get(..at).and_then(|b| b.chars().next_back());
            rest = rest.get(at + "crate::".len()..).unwrap_or_default();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                names.extend(group_names(group, text, line));
            } else {
                let ident: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !ident.is_empty() {
                    names.insert(ident);
                }
            }
        }
    }
    names
}

/// The first-level names of a `crate::{…}` group that may run over several lines: read from
/// the group's start in this line to its closing brace in the whole text.
fn group_names(_start: &str, text: &str, line: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some(line_at) = text.find(line) else {
        return names;
    };
    let Some(open) = text.get(line_at..).and_then(|t| t.find("crate::{")) else {
        return names;
    };
    let body = text
        .get(line_at + open + "crate::{".len()..)
        .unwrap_or_default();
    let mut depth = 0usize;
    let mut current = String::new();
    let mut expecting_name = true;
    for c in body.chars() {
        match c {
            '{' => {
                depth += 1;
                expecting_name = false;
            }
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                if expecting_name && !current.is_empty() {
                    names.insert(std::mem::take(&mut current));
                }
                expecting_name = true;
                current.clear();
            }
            c if depth == 0 && expecting_name && (c.is_alphanumeric() || c == '_') => {
                current.push(c);
            }
            c if depth == 0 && expecting_name && !current.is_empty() && !c.is_whitespace() => {
                names.insert(std::mem::take(&mut current));
                expecting_name = false;
            }
            _ => {}
        }
    }
    if expecting_name && !current.is_empty() {
        names.insert(current);
    }
    names
}

/// The text without its `#[cfg(test)] mod … { … }` blocks (braces counted per line, which
/// the formatter's layout makes exact for these blocks).
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let is_test_module = line.trim() == "#[cfg(test)]"
            && lines.peek().is_some_and(|next| {
                let next = next.trim_start();
                (next.starts_with("mod ") || next.starts_with("pub(crate) mod "))
                    && next.ends_with('{')
            });
        if !is_test_module {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut depth = 0i64;
        for inner in lines.by_ref() {
            depth += inner.matches('{').count() as i64 - inner.matches('}').count() as i64;
            if depth <= 0 {
                break;
            }
        }
    }
    out
}

/// The line without string literals and without comments.
fn strip_comment_and_strings(line: &str) -> String {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return String::new();
    }
    let mut out = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == '/' && out.ends_with('/') {
            out.pop();
            break;
        } else {
            out.push(c);
        }
    }
    out
}

/// A cycle in `graph`, as the modules along it with the first repeated at the end.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|m| m == node).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            // Names that are not modules of ours (a macro's `crate::`, say) lead nowhere.
            if graph.contains_key(next)
                && let Some(cycle) = visit(next, graph, marks, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// Where the files of `from` name `to`, as `file:line` (the first few), for the failure message.
fn where_named(src: &Path, from: &str, to: &str) -> String {
    let mut places = Vec::new();
    let root = if src.join(from).is_dir() {
        src.join(from)
    } else {
        src.join(format!("{from}.rs"))
    };
    for file in rust_files(&root) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            if crate_names(line).contains(to) {
                let shown = file
                    .strip_prefix(src.parent().unwrap_or(src))
                    .unwrap_or(&file);
                places.push(format!("{}:{}", shown.display(), n + 1));
            }
        }
    }
    let more = places.len().saturating_sub(4);
    places.truncate(4);
    if more > 0 {
        places.push(format!("and {more} more"));
    }
    places.join(", ")
}
