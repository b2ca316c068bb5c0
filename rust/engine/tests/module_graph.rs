//! The engine's layering, checked from its source: every `crate::…` path outside test code is a
//! dependency of the module that names it. The module graph must have no cycle, and each folder
//! may depend only on the layers below it (as `docs/architecture.md` draws them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of its own layer (without a cycle) and of
/// the layers listed before it; `writer` sits beside `sample` and `pipeline`, on `source`.
const LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["error", "geometry", "runtime"]),
    ("io", &["io"]),
    ("format", &["format"]),
    ("source", &["source"]),
    ("sample", &["sample"]),
    ("pipeline", &["pipeline"]),
];
const BESIDE: &[(&str, &str)] = &[("writer", "source")];

/// Module path (`pipeline::batch`) of each non-test source file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            let name = match parts.last().map(String::as_str) {
                Some("lib") => continue,
                Some("mod") => parts[..parts.len() - 1].join("::"),
                _ => parts.join("::"),
            };
            // Test-only modules (fixtures, the writer's test file) are not part of the layering.
            if name == "test_fixtures" || name.ends_with("::tests") {
                continue;
            }
            found.insert(name, path);
        }
    }
    found
}

/// The file's text up to its unit-test module.
fn non_test_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod tests")) {
            break;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The modules a file's code names through `crate::a::b…` (the longest known module prefix).
fn dependencies(code: &str, known: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    for (start, _) in code.match_indices("crate::") {
        // `$crate::` in exported macros is the same crate.
        let rest = &code[start + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        for n in (1..=segments.len()).rev() {
            let candidate = segments[..n].join("::");
            if known.contains_key(&candidate) {
                deps.insert(candidate);
                break;
            }
        }
    }
    deps
}

fn layer_of(module: &str) -> (usize, &'static str) {
    let top = module.split("::").next().unwrap();
    for (rank, (name, members)) in LAYERS.iter().enumerate() {
        if members.contains(&top) {
            return (rank, name);
        }
    }
    for (name, on) in BESIDE {
        if *name == top {
            let below = LAYERS.iter().position(|(layer, _)| layer == on).unwrap();
            return (below + 1, name);
        }
    }
    panic!("module `{module}` is in no layer: add its folder to LAYERS in tests/module_graph.rs and to docs/architecture.md");
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    known
        .iter()
        .map(|(name, path)| {
            let mut deps = dependencies(&non_test_code(path), &known);
            deps.remove(name);
            // A folder's `mod.rs` declares its children; that is not a dependency on them.
            deps.retain(|d| !d.starts_with(&format!("{name}::")));
            (name.clone(), deps)
        })
        .collect()
}

/// A cycle through `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[from..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|n| visit(n, graph, &mut state, &mut Vec::new()))
}

#[test]
fn module_graph_has_no_cycle() {
    let graph = graph();
    assert!(graph.len() > 20, "the scan found the engine's modules: {:?}", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in the engine: {}", cycle.join(" -> "));
    }
}

#[test]
fn each_layer_uses_only_the_layers_below() {
    let mut wrong = Vec::new();
    for (module, deps) in graph() {
        let (rank, layer) = layer_of(&module);
        for dep in deps {
            let (dep_rank, dep_layer) = layer_of(&dep);
            let same_layer = dep_layer == layer;
            if dep_rank > rank || (dep_rank == rank && !same_layer) {
                wrong.push(format!("{module} ({layer}) uses {dep} ({dep_layer})"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_finds_a_cycle_and_a_layer_breach() {
    // The checks themselves, on a small graph: they must be able to fail.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("sample::a".into(), ["sample::b".to_string()].into());
    graph.insert("sample::b".into(), ["sample::a".to_string()].into());
    let cycle = find_cycle(&graph).expect("a two-module cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert!(layer_of("io::remote").0 < layer_of("format::ngff").0);
    assert!(layer_of("writer::store").0 > layer_of("source::volume").0);
    assert_eq!(
        layer_of("writer::store").0,
        layer_of("sample::augment").0,
        "writer beside sample, not above it"
    );
}
