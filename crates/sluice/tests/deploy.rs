//! The deployment files (Dockerfile, docker-compose.yml, terraform/, Prometheus alerts) checked
//! by `scripts/check-deploy.sh`, one check per test so nextest runs them in parallel. The script
//! installs its tools on first use (checkov and friends into the project venv, promtool from
//! Debian's `prometheus` package).

use std::path::PathBuf;
use std::process::Command;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Runs `scripts/check-deploy.sh <check>` and fails with its whole output unless it succeeds.
fn check(which: &str) {
    let root = workspace_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/check-deploy.sh"))
        .arg(which)
        .current_dir(&root)
        .output()
        .expect("run scripts/check-deploy.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/check-deploy.sh {which} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    println!("{stdout}");
}

#[test]
fn compose_file_matches_the_compose_spec_and_its_references_resolve() {
    check("compose");
}

#[test]
fn terraform_parses_and_checkov_finds_no_failed_check() {
    check("terraform");
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    check("alerts");
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    check("dockerfile");
}
