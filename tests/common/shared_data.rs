//! Finding test inputs in `../shared` (real models, tokenizers, corpora that the repository
//! does not carry). CI always has `../shared`, so there a missing file is a failure; elsewhere
//! the test skips with a note. Included by path from the library's unit tests and from the
//! integration tests, so there is one definition.

use std::path::PathBuf;

/// `../shared/<rel>` (beside the repository) if it exists. If it does not: panics when the
/// environment variable `CI` is set (to anything but empty, `0` or `false`), else prints a
/// note and returns `None` for the caller to skip.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    locate(rel, ci)
}

fn locate(rel: &str, ci: bool) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel);
    if path.exists() {
        return Some(path);
    }
    assert!(!ci, "{} is missing, and CI (which always has ../shared) is set", path.display());
    eprintln!("skipping: {} is not present (with CI set this fails)", path.display());
    None
}

#[test]
#[should_panic(expected = "is missing, and CI")]
fn a_missing_shared_file_fails_under_ci() {
    locate("no-such-file-anywhere", true);
}

#[test]
fn a_missing_shared_file_skips_outside_ci() {
    assert_eq!(locate("no-such-file-anywhere", false), None);
}
