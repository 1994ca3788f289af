//! The import rules README §Architecture states as invariants, checked on the source: a
//! module that reaches upstream, or a core module that starts doing IO through the store or
//! the runtime, fails here before a reviewer has to notice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::support::repo_path;

/// A source file as the repository names it.
fn repo_relative(file: &Path) -> String {
    file.strip_prefix(repo_path(""))
        .unwrap()
        .display()
        .to_string()
}

/// Every `.rs` file under `dir` (or `dir` itself if it is a file).
fn sources(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (doc comments name other modules freely) and
/// without its unit tests: a test may compare with code further up (a profile test with
/// the features it yields); the rules are about what the module itself depends on.
fn code(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => &text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level crate modules a file names through `crate::…` paths, anywhere in its
/// code (`use` lines and inline paths alike).
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            // `crate::{a, b}`: every name in the braces.
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let item = item.trim().split("::").next().unwrap_or("").trim();
                    if !item.is_empty() {
                        found.insert(item.to_owned());
                    }
                }
            }
        } else {
            found.insert(name);
        }
    }
    found
}

/// Checks every file under `dir`: no `crate::` module outside `allowed`, and none of
/// `forbidden_words` (crates such as tokio) in the code.
fn check(dir: &str, allowed: &[&str], forbidden_words: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in sources(&repo_path(dir)) {
        let code = code(&file);
        let shown = repo_relative(&file);
        for module in crate_modules(&code) {
            if !allowed.contains(&module.as_str()) {
                problems.push(format!("{shown} imports crate::{module}"));
            }
        }
        for word in forbidden_words {
            if code.contains(word) {
                problems.push(format!("{shown} uses {word}"));
            }
        }
    }
    problems
}

#[test]
fn the_core_imports_nothing_upstream_and_does_no_runtime_io() {
    // The pure core: events, profiles, features, segments and trigger rules. It knows
    // nothing of the store, the engine, delivery, the API or the runtime.
    const CORE_IO: &[&str] = &["tokio", "fjall", "tonic", "reqwest"];
    let mut problems = Vec::new();
    problems.extend(check("src/time.rs", &[], CORE_IO));
    problems.extend(check("src/heap.rs", &[], CORE_IO));
    problems.extend(check("src/event.rs", &["time"], CORE_IO));
    problems.extend(check(
        "src/profile",
        &["event", "heap", "time", "profile"],
        CORE_IO,
    ));
    problems.extend(check(
        "src/features.rs",
        &["event", "profile", "time", "features"],
        CORE_IO,
    ));
    problems.extend(check(
        "src/trigger",
        &["event", "features", "heap", "profile", "time", "trigger"],
        CORE_IO,
    ));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn metrics_import_no_domain_module_and_cel_lives_in_one_file() {
    let mut problems = check("src/metrics.rs", &[], &[]);
    for file in sources(&repo_path("src")) {
        let shown = repo_relative(&file);
        if code(&file).contains("cel_interpreter") && shown != "src/trigger/expr.rs" {
            problems.push(format!("{shown} uses cel_interpreter"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn protocol_types_stay_in_the_api() {
    let mut problems = Vec::new();
    for file in sources(&repo_path("src")) {
        let shown = repo_relative(&file);
        // The API converts; the app registers the descriptor for reflection; lib.rs
        // defines the generated module.
        if shown.starts_with("src/api/") || shown == "src/app.rs" || shown == "src/lib.rs" {
            continue;
        }
        if crate_modules(&code(&file)).contains("pb") {
            problems.push(format!("{shown} names crate::pb"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_checker_sees_use_lines_groups_and_inline_paths() {
    let found = crate_modules(
        "use crate::store::Store;\nuse crate::{engine::Engine, api};\nlet x = crate::delivery::forget(&s);",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["api", "delivery", "engine", "store"]
    );
}
