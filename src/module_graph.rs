//! A check, run by `cargo test`: no dependency cycle between the crate's top-level modules.
//! It reads the sources (`crate::x` paths outside comments) and fails on any edge that closes
//! a cycle, naming where it first appears. The last cycles (through `config`) were broken in
//! issue 16: each subsystem's section is gathered by `config`, and the modules that read the
//! whole config (`admin`, `server`) have theirs in `config` itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `lib.rs` declares.
fn modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    lib.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or(line.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.to_owned())
        })
        .collect()
}

/// The `crate::x` paths in a line of code, comments left out.
fn crate_paths(line: &str) -> impl Iterator<Item = &str> {
    let code = line.split("//").next().unwrap_or_default();
    code.match_indices("crate::").filter_map(move |(at, _)| {
        let rest = code.get(at + "crate::".len()..)?;
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        rest.get(..end)
    })
}

fn edges(src: &Path, modules: &BTreeSet<String>) -> BTreeMap<(String, String), String> {
    let mut edges = BTreeMap::new();
    for module in modules {
        let mut files = Vec::new();
        let single = src.join(format!("{module}.rs"));
        if single.exists() {
            files.push(single);
        }
        rust_files(&src.join(module), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                for to in crate_paths(line) {
                    if to != module && modules.contains(to) {
                        edges
                            .entry((module.clone(), to.to_owned()))
                            .or_insert_with(|| format!("{}:{}", file.display(), n + 1));
                    }
                }
            }
        }
    }
    edges
}

fn reaches(edges: &BTreeMap<(String, String), String>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(at) = stack.pop() {
        if at == to {
            return true;
        }
        if seen.insert(at.clone()) {
            stack.extend(
                edges
                    .keys()
                    .filter(|(a, _)| *a == at)
                    .map(|(_, b)| b.clone()),
            );
        }
    }
    false
}

#[test]
fn no_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(modules.contains("pool") && modules.contains("session"));
    let edges = edges(&src, &modules);
    let cyclic: Vec<String> = edges
        .iter()
        .filter(|((a, b), _)| reaches(&edges, b, a))
        .map(|((a, b), at)| format!("{a} -> {b} (first at {at})"))
        .collect();
    assert!(
        cyclic.is_empty(),
        "a dependency cycle between top-level modules: {cyclic:#?}"
    );
}

#[test]
fn the_check_sees_a_path_in_code_and_not_in_comments() {
    assert_eq!(
        crate_paths("use crate::pool::{A, B}; // crate::session").collect::<Vec<_>>(),
        ["pool"]
    );
}
