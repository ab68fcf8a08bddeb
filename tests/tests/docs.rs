//! The docs a newcomer is sent to exist: every `docs/...` path README.md names is a file.

use std::path::Path;

#[test]
fn every_docs_path_named_in_the_readme_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut named = Vec::new();
    for (i, _) in readme.match_indices("docs/") {
        // Only whole paths: `docs/` at the start of a word.
        if i > 0 && readme.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let rest = &readme[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches('.');
        named.push(path.to_string());
    }
    for want in [
        "docs/quickstart.md",
        "docs/schema.md",
        "docs/wire.md",
        "docs/baking.md",
        "docs/api.md",
    ] {
        assert!(
            named.iter().any(|n| n == want),
            "README does not link {want}"
        );
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|p| p.as_str() != "docs/" && !root.join(p).is_file() && !root.join(p).is_dir())
        .collect();
    assert!(
        missing.is_empty(),
        "README names docs that do not exist: {missing:?}"
    );
    // The docs' own relative links too.
    for doc in [
        "quickstart.md",
        "schema.md",
        "wire.md",
        "baking.md",
        "api.md",
    ] {
        let text = std::fs::read_to_string(root.join("docs").join(doc)).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap();
            if target.contains("://") || target.starts_with('#') {
                continue;
            }
            assert!(
                root.join("docs").join(target).exists(),
                "docs/{doc} links {target}, which does not exist"
            );
        }
    }
}
