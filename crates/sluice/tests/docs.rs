//! The documentation describes the code as it is: every crate under `crates/` has its row in
//! the crate table of docs/ARCHITECTURE.md and in the README's, and no row names a crate that
//! is gone.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The crates of the workspace: the folders of `crates/` with a Cargo.toml.
fn crates() -> BTreeSet<String> {
    std::fs::read_dir(repo().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The crate names in the first column of a Markdown table whose header starts `| crate |`.
fn crate_table(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .skip_while(|l| !l.starts_with("| crate |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .map(|cell| cell.trim().trim_matches('`').to_owned())
        .collect()
}

#[test]
fn the_architecture_and_readme_crate_tables_list_every_crate() {
    let crates = crates();
    assert!(
        crates.len() >= 10 && crates.contains("sluice-core"),
        "{crates:?}"
    );
    for doc in ["docs/ARCHITECTURE.md", "README.md"] {
        let text = std::fs::read_to_string(repo().join(doc)).unwrap();
        let listed = crate_table(&text);
        let missing: Vec<_> = crates.difference(&listed).collect();
        let gone: Vec<_> = listed.difference(&crates).collect();
        assert!(missing.is_empty(), "{doc} has no row for {missing:?}");
        assert!(
            gone.is_empty(),
            "{doc} lists crates that do not exist: {gone:?}"
        );
    }
}
