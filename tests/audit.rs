//! The dependency audit's advisories gate (`make audit`, docs/security.md) fails on a known
//! vulnerability and passes otherwise. The real RustSec database cannot be reached from the
//! machines this project is built on, so each test writes its own one-advisory database in the
//! RustSec format, against the exact version of tokio in Cargo.lock, and runs the pinned
//! cargo-deny on this repository's Cargo.lock with deny.toml's own settings and `--offline`,
//! as the Makefile does with an offline copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate the fixture advisories name: a direct dependency, so it is in the graph on every
/// platform and with every feature set.
const CRATE: &str = "tokio";
/// A made-up identifier (`RUSTSEC-0000-0000` is the placeholder cargo-deny skips).
const ID: &str = "RUSTSEC-0000-0001";
/// The directory cargo-deny reads the database from under deny.toml's `db-path`: the last
/// segment of the URL in `db-urls` and a hash of it (cargo-deny's `url_to_db_path`);
/// scripts/audit_advisories.sh links offline copies to the same name.
const DB_DIR: &str = "advisory-db-3157b0e258782691";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cargo-deny the Makefile installs (`CARGO_DENY`, set by `make unit`), else the same path
/// in this clone. Missing is a failure, never a skip.
fn cargo_deny() -> PathBuf {
    let path = std::env::var_os("CARGO_DENY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/bin/cargo-deny"));
    assert!(
        path.is_file(),
        "cargo-deny not found at {}: `make audit` (and `make test`) installs cargo-deny 0.20.2 \
         into .tools/; CARGO_DENY=<path> names another",
        path.display()
    );
    path
}

/// The one version of `name` in Cargo.lock.
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let versions: Vec<&str> = lock
        .split("[[package]]")
        .filter(|block| block.lines().any(|l| l == format!("name = \"{name}\"")))
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
        })
        .collect();
    assert_eq!(versions.len(), 1, "{name} in Cargo.lock: {versions:?}");
    versions[0].to_owned()
}

/// The patch release after `version` (a plain `major.minor.patch`).
fn next_patch(version: &str) -> String {
    let parts: Vec<u64> = version
        .split('.')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("not a plain release: {version}"))
        })
        .collect();
    assert_eq!(parts.len(), 3, "not a plain release: {version}");
    format!("{}.{}.{}", parts[0], parts[1], parts[2] + 1)
}

fn git(dir: &Path, args: &[&str]) {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=tripwire tests",
            "-c",
            "user.email=tests@tripwire.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git {args:?}: {e} (the audit test needs the git CLI)"));
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A database under `dbs` (deny.toml's `db-path`) holding one advisory against `CRATE` that
/// is fixed in `patched` and later: a git repository with one commit, because cargo-deny
/// reads the last commit's date to refuse a stale database.
fn write_database(dbs: &Path, patched: &str) {
    let db = dbs.join(DB_DIR);
    let dir = db.join("crates").join(CRATE);
    std::fs::create_dir_all(&dir).unwrap();
    let advisory = format!(
        r#"```toml
[advisory]
id = "{ID}"
package = "{CRATE}"
date = "2026-01-01"
categories = ["memory-corruption"]
keywords = ["fixture"]

[versions]
patched = [">= {patched}"]
```

# Fixture advisory written by tests/audit.rs

Not a real vulnerability: tripwire's audit test writes this advisory to check that the gate
fails when a version in Cargo.lock is affected.
"#
    );
    std::fs::write(dir.join(format!("{ID}.md")), advisory).unwrap();
    git(&db, &["init", "--quiet"]);
    git(&db, &["add", "--all"]);
    git(&db, &["commit", "--quiet", "--message", "fixture advisory"]);
}

/// deny.toml with only `db-path` changed to `dbs`, so the run uses the gate's own settings.
fn write_config(dir: &Path, dbs: &Path) -> PathBuf {
    let deny = std::fs::read_to_string(root().join("deny.toml")).unwrap();
    let mut swapped = 0;
    let config: String = deny
        .lines()
        .map(|line| {
            if line.starts_with("db-path = ") {
                swapped += 1;
                format!("db-path = {:?}\n", dbs.to_str().unwrap())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert_eq!(swapped, 1, "deny.toml must set `db-path` once");
    let path = dir.join("deny.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// `cargo-deny check advisories` on this repository's Cargo.lock against a database whose one
/// advisory is fixed in `patched`.
fn check_advisories(patched: &str) -> (Output, String) {
    let deny = cargo_deny();
    let dir = tempfile::tempdir().unwrap();
    let dbs = dir.path().join("advisory-dbs");
    write_database(&dbs, patched);
    let config = write_config(dir.path(), &dbs);
    let output = Command::new(deny)
        .current_dir(dir.path())
        .arg("--offline")
        .arg("--locked")
        .args(["--color", "never"])
        .arg("--manifest-path")
        .arg(root().join("Cargo.toml"))
        .arg("--config")
        .arg(&config)
        .args(["check", "--hide-inclusion-graph", "advisories"])
        .output()
        .unwrap();
    // Diagnostics go to stderr, the one-line summary ("advisories ok") to stdout.
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    (output, log)
}

#[test]
fn a_known_vulnerability_in_cargo_lock_fails_the_audit() {
    let ours = locked_version(CRATE);
    // Affected: every version before the next patch release, ours included.
    let (output, log) = check_advisories(&next_patch(&ours));
    assert!(
        !output.status.success(),
        "cargo-deny passed a Cargo.lock with a vulnerable {CRATE} {ours}:\n{log}"
    );
    for expected in [
        "error[vulnerability]",
        ID,
        &format!("{CRATE} {ours} registry+"),
        "advisories FAILED",
    ] {
        assert!(log.contains(expected), "`{expected}` missing from:\n{log}");
    }
}

#[test]
fn an_advisory_our_version_is_patched_for_passes_the_audit() {
    let ours = locked_version(CRATE);
    // Fixed in our version: only older ones are affected. A database cargo-deny cannot find
    // or load is an error, so passing also shows it read this one.
    let (output, log) = check_advisories(&ours);
    assert!(
        output.status.success(),
        "cargo-deny failed on a Cargo.lock whose {CRATE} {ours} is patched:\n{log}"
    );
    assert!(log.contains("advisories ok"), "{log}");
    assert!(!log.contains(ID), "{log}");
}
