//! The relay's modules depend on each other one way.
//!
//! Reads every file of `src/`, collects the crate paths it names (`crate::…`, `super::…`,
//! `self::…`, a child module by its name, `outbox_relay::…` from the binary), and builds the graph
//! of modules: one node per top-level module, and one per submodule of `source` and `sink`
//! (`source::logical`, `sink::kafka`, …); a submodule deeper down or an inline module (`mod
//! tests`) belongs to its file's node. Paths in doc comments do not count; paths in string
//! attributes (`#[serde(with = "…")]`) do. The check fails, naming the files and lines, when the
//! graph has a cycle or when a module other than the entry points imports the pipeline
//! (`relay`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules that may import the pipeline: the crate root (it re-exports `Relay`) and the
/// binary.
const MAY_IMPORT_THE_PIPELINE: &[&str] = &["lib", "main"];

/// The pipeline's node.
const PIPELINE: &str = "relay";

/// Modules whose submodules are nodes of their own.
const SPLIT_MODULES: &[&str] = &["source", "sink"];

/// One crate path found in a file: which node names which, and where.
#[derive(Debug, Clone)]
struct Import {
    from: String,
    to: String,
    at: String,
}

/// A source file: its path relative to `src/` and its text.
struct SourceFile {
    path: PathBuf,
    text: String,
}

fn read_tree(dir: &Path, root: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let path = path.strip_prefix(root).expect("under src").to_path_buf();
            out.push(SourceFile { path, text });
        }
    }
}

/// The module path of a file: `source/logical/slot.rs` → `source::logical::slot`; the crate
/// roots (`lib.rs`, `main.rs`) have the empty path.
fn module_path(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !(parts.is_empty() && (stem == "lib" || stem == "main")) && stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The node a module path belongs to (`root` for the crate root itself).
fn node(path: &[String], root: &str) -> String {
    match path {
        [] => root.to_owned(),
        [first, second, ..] if SPLIT_MODULES.contains(&first.as_str()) => {
            format!("{first}::{second}")
        }
        [first, ..] => first.clone(),
    }
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads an identifier at `i`; returns it and the index past it.
fn ident_at(text: &[u8], i: usize) -> Option<(String, usize)> {
    let mut j = i;
    while j < text.len() && is_ident_char(text[j]) {
        j += 1;
    }
    (j > i && !text[i].is_ascii_digit())
        .then(|| (String::from_utf8_lossy(&text[i..j]).into_owned(), j))
}

fn skip_space(text: &[u8], mut i: usize) -> usize {
    while i < text.len() && text[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Reads a path's segments after its first one (`::a::b`), and a `::{…}` group if one follows.
/// Returns every full path it denotes (one per group item) and the index past it.
fn path_tail(text: &[u8], mut i: usize, prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix;
    loop {
        let j = skip_space(text, i);
        if !text[j..].starts_with(b"::") {
            return (vec![path], i);
        }
        let k = skip_space(text, j + 2);
        if text.get(k) == Some(&b'{') {
            return group(text, k + 1, path);
        }
        if text.get(k) == Some(&b'*') {
            return (vec![path], k + 1);
        }
        match ident_at(text, k) {
            Some((segment, next)) => {
                path.push(segment);
                i = next;
            }
            None => return (vec![path], i),
        }
    }
}

/// Reads the items of a `{…}` group starting at `i` (just past `{`), each relative to `prefix`.
fn group(text: &[u8], mut i: usize, prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut paths = Vec::new();
    loop {
        i = skip_space(text, i);
        match text.get(i) {
            None => return (paths, i),
            Some(b'}') => return (paths, i + 1),
            Some(b',') => i += 1,
            Some(b'*') => {
                paths.push(prefix.clone());
                i += 1;
            }
            Some(_) => match ident_at(text, i) {
                Some((first, next)) if first == "self" => {
                    paths.push(prefix.clone());
                    i = next;
                }
                Some((first, next)) => {
                    let mut item = prefix.clone();
                    item.push(first);
                    let (found, next) = path_tail(text, next, item);
                    paths.extend(found);
                    i = next;
                }
                // `as`-renames and anything else that is not a path: skip a character.
                None => i += 1,
            },
        }
    }
}

/// The index past a `::super` at `i`, if one is there.
fn next_super(text: &[u8], i: usize) -> Option<usize> {
    let k = skip_space(text, i);
    if !text[k..].starts_with(b"::") {
        return None;
    }
    let (segment, after) = ident_at(text, skip_space(text, k + 2))?;
    (segment == "super").then_some(after)
}

/// The inline module a line opens (`mod tests {`), with its indentation.
fn inline_module(line: &str) -> Option<(usize, String)> {
    let indent = line.len() - line.trim_start().len();
    let rest = line.trim_start();
    let rest = rest
        .strip_prefix("pub(crate) ")
        .or_else(|| rest.strip_prefix("pub "))
        .unwrap_or(rest);
    let name = rest.strip_prefix("mod ")?.strip_suffix(" {")?;
    name.bytes()
        .all(is_ident_char)
        .then(|| (indent, name.to_owned()))
}

/// Every crate path named in `file`, as absolute module paths with their line numbers.
/// `children` are the file modules directly below this file's module.
fn paths_in(file: &SourceFile, children: &BTreeSet<String>) -> Vec<(Vec<String>, usize)> {
    let own = module_path(&file.path);
    let is_binary = file.path == Path::new("main.rs");
    // The text without comment lines, each kept line with its number and inline-module path.
    let mut text = String::new();
    let mut line_of = Vec::new();
    let mut scope_of = Vec::new();
    let mut inline: Vec<(usize, String)> = Vec::new();
    for (n, line) in file.text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if trimmed == "}" && inline.last().is_some_and(|(i, _)| *i == indent) {
            inline.pop();
        }
        let mut scope = own.clone();
        scope.extend(inline.iter().map(|(_, name)| name.clone()));
        for _ in 0..=line.len() {
            line_of.push(n + 1);
            scope_of.push(scope.clone());
        }
        text.push_str(line);
        text.push('\n');
        if let Some(opened) = inline_module(line) {
            inline.push(opened);
        }
    }
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_path = is_ident_char(bytes[i])
            && (i == 0 || !(is_ident_char(bytes[i - 1]) || bytes[i - 1] == b':'))
            && !(i > 0 && bytes[i - 1] == b'$');
        let Some((first, next)) = starts_path.then(|| ident_at(bytes, i)).flatten() else {
            i += 1;
            continue;
        };
        let followed_by_path = bytes[skip_space(bytes, next)..].starts_with(b"::");
        let scope = &scope_of[i];
        let base: Option<Vec<String>> = match first.as_str() {
            _ if !followed_by_path => None,
            "crate" if !is_binary => Some(Vec::new()),
            "outbox_relay" if is_binary => Some(Vec::new()),
            "self" => Some(scope.clone()),
            "super" => Some(scope[..scope.len().saturating_sub(1)].to_vec()),
            name if children.contains(name) && scope == &own => {
                let mut p = own.clone();
                p.push(name.to_owned());
                Some(p)
            }
            _ => None,
        };
        let Some(mut base) = base else {
            i = next;
            continue;
        };
        // `super::super::…`
        let mut j = next;
        while let Some(after) = (first == "super").then(|| next_super(bytes, j)).flatten() {
            base.pop();
            j = after;
        }
        let (paths, end) = path_tail(bytes, j, base);
        let line = line_of[i];
        found.extend(paths.into_iter().map(|p| (p, line)));
        i = end.max(i + 1);
    }
    found
}

/// The module graph's edges of the files in `files`.
fn imports(files: &[SourceFile]) -> Vec<Import> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&f.path)).collect();
    let mut out = Vec::new();
    for file in files {
        let own = module_path(&file.path);
        let root = if file.path == Path::new("main.rs") {
            "main"
        } else {
            "lib"
        };
        let children: BTreeSet<String> = modules
            .iter()
            .filter(|m| m.len() == own.len() + 1 && m.starts_with(&own))
            .map(|m| m.last().expect("non-empty").clone())
            .collect();
        let from = node(&own, root);
        for (path, line) in paths_in(file, &children) {
            // The module that defines the named item: the longest prefix that is a file module
            // (an item of the crate root, `crate::RelayConfig`, is a use of the root).
            let defining = (0..=path.len())
                .rev()
                .map(|n| &path[..n])
                .find(|p| p.is_empty() || modules.contains(*p))
                .expect("the empty prefix");
            let to = node(defining, "lib");
            if to != from {
                out.push(Import {
                    from: from.clone(),
                    to,
                    at: format!("src/{}:{line}", file.path.display()),
                });
            }
        }
    }
    out
}

/// Every cycle's strongly connected component (more than one node), each as its nodes in a
/// cycle order starting from its smallest node.
fn cycles(imports: &[Import]) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in imports {
        graph.entry(&i.from).or_default().insert(&i.to);
        graph.entry(&i.to).or_default();
    }
    let reaches = |from: &str, to: &str| -> Option<Vec<String>> {
        // Breadth-first, remembering the way, so the cycle shown is a shortest one.
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(n) = queue.pop_front() {
            for &m in &graph[n] {
                if m == to {
                    let mut way = vec![m.to_owned()];
                    let mut at = n;
                    while at != from {
                        way.push(at.to_owned());
                        at = previous[at];
                    }
                    way.push(from.to_owned());
                    way.reverse();
                    return Some(way);
                }
                if m != from && !previous.contains_key(m) {
                    previous.insert(m, n);
                    queue.push_back(m);
                }
            }
        }
        None
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut found = Vec::new();
    for &n in graph.keys() {
        if seen.contains(n) {
            continue;
        }
        if let Some(cycle) = reaches(n, n) {
            seen.extend(cycle.iter().cloned());
            found.push(cycle);
        }
    }
    found
}

/// What is wrong with `imports`, one line per finding with the import sites behind it.
fn violations(imports: &[Import]) -> Vec<String> {
    let sites = |from: &str, to: &str| -> String {
        imports
            .iter()
            .filter(|i| i.from == from && i.to == to)
            .map(|i| i.at.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    for cycle in cycles(imports) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} ({})", w[0], w[1], sites(&w[0], &w[1])))
            .collect();
        out.push(format!(
            "cycle {}: {}",
            cycle.join(" -> "),
            steps.join("; ")
        ));
    }
    let importers: BTreeSet<&str> = imports
        .iter()
        .filter(|i| i.to == PIPELINE && !MAY_IMPORT_THE_PIPELINE.contains(&i.from.as_str()))
        .map(|i| i.from.as_str())
        .collect();
    for from in importers {
        out.push(format!(
            "{from} imports the pipeline `{PIPELINE}` ({}); only {MAY_IMPORT_THE_PIPELINE:?} may",
            sites(from, PIPELINE)
        ));
    }
    out
}

fn the_crate() -> Vec<SourceFile> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    files
}

#[test]
fn modules_depend_on_each_other_one_way() {
    let files = the_crate();
    let imports = imports(&files);
    let edge = |from: &str, to: &str| imports.iter().any(|i| i.from == from && i.to == to);
    // The scan sees the imports it must see, so an empty finding means something.
    for (from, to) in [
        ("relay", "source"),
        ("relay", "sink"),
        ("source::polling", "source::row_marks"),
        ("sink::kafka", "config"),
        ("main", "lib"),
        ("lib", "relay"),
    ] {
        assert!(edge(from, to), "the scan missed {from} -> {to}");
    }
    let found = violations(&imports);
    assert!(
        found.is_empty(),
        "module dependencies must point one way:\n{}",
        found.join("\n")
    );
}

fn made_up(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(path, text)| SourceFile {
            path: PathBuf::from(path),
            text: (*text).to_owned(),
        })
        .collect()
}

#[test]
fn the_check_names_a_cycle_and_an_import_of_the_pipeline() {
    let files = made_up(&[
        (
            "lib.rs",
            "pub mod a;\npub mod relay;\npub mod source;\npub use relay::Relay;\n",
        ),
        (
            "relay.rs",
            "use crate::a::Thing;\nuse crate::source::{polling::P, Source};\n",
        ),
        (
            "a.rs",
            "/// See [`crate::source`].\nuse crate::relay::Stats;\n",
        ),
        ("source.rs", "pub mod polling;\npub mod row_marks;\n"),
        (
            "source/polling.rs",
            "use super::row_marks::Keys;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        ),
        (
            "source/row_marks.rs",
            "fn f() {\n    crate::source::polling::ack();\n}\n",
        ),
    ]);
    let found = violations(&imports(&files));
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].starts_with("cycle a -> relay -> a: "),
        "{}",
        found[0]
    );
    assert!(found[0].contains("src/a.rs:2"), "{}", found[0]);
    assert!(
        found[1].starts_with("cycle source::polling -> source::row_marks -> source::polling"),
        "{}",
        found[1]
    );
    assert!(
        found[2].starts_with("a imports the pipeline"),
        "{}",
        found[2]
    );
}

#[test]
fn doc_comments_inline_tests_and_groups_are_read_as_rust_reads_them() {
    let files = made_up(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod relay;\n"),
        (
            "a.rs",
            "//! Uses [`crate::relay`] in prose only.\nuse crate::{b::{self, X}, Y};\n\
             #[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::b::Z;\n}\n",
        ),
        (
            "b.rs",
            "#[serde(with = \"crate::a::duration\")]\nstruct S;\n",
        ),
        ("relay.rs", ""),
    ]);
    let imports = imports(&files);
    let edges: BTreeSet<(String, String)> = imports
        .iter()
        .map(|i| (i.from.clone(), i.to.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = [("a", "b"), ("a", "lib"), ("b", "a")]
        .iter()
        .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
        .collect();
    assert_eq!(edges, expected, "{imports:#?}");
}
