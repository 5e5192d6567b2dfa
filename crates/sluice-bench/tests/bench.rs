//! `sluice-bench throughput` across lane backends: every backend named runs to completion and
//! lands in the summary table. No timing is asserted, only that each backend finished its jobs.
#![allow(clippy::unwrap_used)]

use sluice_testkit::{database_url, rabbitmq_url};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-bench");

#[tokio::test]
async fn bench_throughput_runs_each_backend_and_prints_one_table() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let config = std::env::temp_dir().join(format!("sluice-e2e-bench-{id}.toml"));
    std::fs::write(&config, "").unwrap();
    let output = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .args(["throughput", "--jobs", "200", "--clients", "8"])
        .args(["--workers", "1", "--concurrency", "32"])
        .args(["--backends", "rabbitmq,sql-sqlite"])
        // The config file stays empty; the test's servers come in as the usual overrides.
        .env("SLUICE_DATABASE__URL", database_url())
        .env("SLUICE_RABBITMQ__URL", rabbitmq_url())
        .env("SLUICE_LOG", "warn")
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.starts_with("backend "))
        .collect();
    assert!(!table.is_empty(), "no table in:\n{stdout}");
    for backend in ["rabbitmq", "sql-sqlite"] {
        let row = table
            .iter()
            .find(|line| line.split_whitespace().next() == Some(backend))
            .unwrap_or_else(|| panic!("no {backend} row in:\n{stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[1], "200",
            "{backend} did not complete every job: {row}"
        );
        let jobs_per_sec: f64 = cells[3]
            .parse()
            .unwrap_or_else(|_| panic!("no jobs/s in {row:?}"));
        assert!(jobs_per_sec > 0.0, "{row}");
    }
}
