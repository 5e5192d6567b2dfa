//! `sluice-bench throughput` across lane backends: every backend named runs to completion and
//! lands in the summary table. No timing is asserted, only that each backend finished its jobs.
#![allow(clippy::unwrap_used)]

use sluice_testkit::{database_url, rabbitmq_url};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-bench");

/// `sluice-bench throughput` with 8 clients and one worker, plus `args`, against the test's
/// servers (an empty config file; the servers come in as the usual overrides).
async fn throughput(args: &[&str]) -> std::process::Output {
    throughput_with_workers("1", args).await
}

/// [`throughput`] with `workers` workers.
async fn throughput_with_workers(workers: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "throughput",
        "--clients",
        "8",
        "--workers",
        workers,
        "--concurrency",
        "32",
    ];
    all.extend_from_slice(args);
    bench(&all).await
}

/// `sluice-bench` with `args` against the test's servers (an empty config file; the servers
/// come in as the usual overrides).
async fn bench(args: &[&str]) -> std::process::Output {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let config = std::env::temp_dir().join(format!("sluice-e2e-bench-{id}.toml"));
    std::fs::write(&config, "").unwrap();
    let output = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .args(args)
        .env("SLUICE_DATABASE__URL", database_url())
        .env("SLUICE_RABBITMQ__URL", rabbitmq_url())
        .env("SLUICE_LOG", "warn")
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&config);
    output
}

/// The run's standard output; panics with both outputs if it failed.
fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout.into_owned()
}

#[tokio::test]
async fn bench_throughput_runs_each_backend_and_prints_one_table() {
    let output = throughput(&["--jobs", "200", "--backends", "rabbitmq,sql-sqlite"]).await;
    let stdout = succeeded(&output);

    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.starts_with("backend "))
        .collect();
    assert!(!table.is_empty(), "no table in:\n{stdout}");
    // Columns: backend, admission, jobs, jobs/s, ..., vs rabbitmq, vs floor.
    let floor = table
        .iter()
        .find(|line| line.split_whitespace().next() == Some("floor"))
        .unwrap_or_else(|| panic!("no floor row in:\n{stdout}"));
    let floor_per_sec: f64 = floor.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(floor_per_sec > 0.0, "{floor}");
    for backend in ["rabbitmq", "sql-sqlite"] {
        for admission in ["on", "off"] {
            let row = table
                .iter()
                .find(|line| {
                    let mut cells = line.split_whitespace();
                    cells.next() == Some(backend) && cells.next() == Some(admission)
                })
                .unwrap_or_else(|| panic!("no {backend} {admission} row in:\n{stdout}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(
                cells[2], "200",
                "{backend} did not complete every job: {row}"
            );
            let jobs_per_sec: f64 = cells[3]
                .parse()
                .unwrap_or_else(|_| panic!("no jobs/s in {row:?}"));
            assert!(jobs_per_sec > 0.0, "{row}");
            let vs_floor = cells.last().unwrap().trim_end_matches('x');
            let vs_floor: f64 = vs_floor
                .parse()
                .unwrap_or_else(|_| panic!("no ratio to the floor in {row:?}"));
            assert!(
                (vs_floor - jobs_per_sec / floor_per_sec).abs() < 0.01,
                "{row} against {floor}"
            );
        }
    }
}

/// The guard CI runs fails a run below its share of the floor, and says so. No run of Sluice is
/// a thousand times as fast as the floor, so that threshold must fail.
#[tokio::test]
async fn bench_throughput_fails_below_the_floor_ratio_it_is_given() {
    let output = throughput(&[
        "--jobs",
        "100",
        "--backends",
        "rabbitmq",
        "--admission",
        "on",
        "--min-floor-ratio",
        "1000",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a 1000x guard passed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr
            .contains("below the guard's 1000.000x of the durable floor: rabbitmq (admission on)"),
        "{stderr}"
    );
    // Every job still ran: the run failed the guard, not the jobs.
    assert!(
        stdout.lines().any(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            cells.first() == Some(&"rabbitmq") && cells.get(2) == Some(&"100")
        }),
        "{stdout}"
    );
}

/// `--workers 0` measures ingest alone: every submission is accepted and counted, the jobs
/// stay queued, and the table shows the submit rate with no end-to-end figures.
#[tokio::test]
async fn bench_throughput_with_no_workers_measures_ingest_alone() {
    let output = throughput_with_workers(
        "0",
        &["--jobs", "300", "--backends", "sql-sqlite", "--no-floor"],
    )
    .await;
    let stdout = succeeded(&output);
    assert!(stdout.contains("ingest only (no workers)"), "{stdout}");
    // Read from /proc/vmstat, so a number on Linux, not "unknown".
    assert!(
        figure(&stdout, "disk writes, whole machine") >= 0.0,
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with("sql-sqlite"))
        .unwrap_or_else(|| panic!("no sql-sqlite row in:\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // backend, admission, jobs, jobs/s, 202 p50, 202 p99, e2e p50, e2e p95, ...
    assert_eq!(cells[2], "300", "{row}");
    assert!(cells[3].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!((cells[6], cells[7]), ("-", "-"), "{row}");

    // A floor ratio compares whole runs, which need workers.
    let refused = throughput_with_workers(
        "0",
        &[
            "--jobs",
            "10",
            "--backends",
            "sql-sqlite",
            "--min-floor-ratio",
            "0.1",
        ],
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs at least one worker"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `--rounds` runs every setting once per round, in order, and its medians are those of the
/// rows above them: each setting's jobs/s, and each round's on/off ratio.
#[tokio::test]
async fn bench_throughput_rounds_alternate_the_settings_and_print_their_medians() {
    let output = throughput(&[
        "--jobs",
        "100",
        "--backends",
        "sql-sqlite",
        "--no-floor",
        "--rounds",
        "3",
    ])
    .await;
    let stdout = succeeded(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let order: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("bench: sql-sqlite ("))
        .map(|line| line.rsplit_once("admission ").unwrap().1)
        .collect();
    assert_eq!(
        order,
        [
            "on, round 1 of 3",
            "off, round 1 of 3",
            "on, round 2 of 3",
            "off, round 2 of 3",
            "on, round 3 of 3",
            "off, round 3 of 3"
        ],
        "{stderr}"
    );

    let (table, medians) = stdout
        .split_once("median of 3 rounds")
        .unwrap_or_else(|| panic!("no medians in:\n{stdout}"));
    let per_sec = |admission: &str| -> Vec<f64> {
        table
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .take(2)
                    .eq(["sql-sqlite", admission])
            })
            .map(|line| {
                let cells: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(cells[2], "100", "not every job completed: {line}");
                cells[3].parse().unwrap()
            })
            .collect()
    };
    let (on, off) = (per_sec("on"), per_sec("off"));
    assert_eq!((on.len(), off.len()), (3, 3), "{table}");
    let middle = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[1]
    };
    let ratios: Vec<f64> = on.iter().zip(&off).map(|(on, off)| on / off).collect();
    let row: Vec<&str> = medians
        .lines()
        .find(|line| line.starts_with("sql-sqlite"))
        .unwrap_or_else(|| panic!("no sql-sqlite medians in:\n{medians}"))
        .split_whitespace()
        .collect();
    // The table prints whole jobs/s, so the medians agree to within rounding.
    assert!(
        (row[1].parse::<f64>().unwrap() - middle(on.clone())).abs() <= 1.0,
        "{row:?}"
    );
    assert!(
        (row[2].parse::<f64>().unwrap() - middle(off.clone())).abs() <= 1.0,
        "{row:?}"
    );
    assert!(
        (row[3].parse::<f64>().unwrap() - middle(ratios.clone())).abs() <= 0.01,
        "{row:?} {ratios:?}"
    );
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(0.0, f64::max);
    let (low, high) = row[4].split_once('-').unwrap();
    assert!(
        (low.parse::<f64>().unwrap() - lowest).abs() <= 0.01,
        "{row:?} {ratios:?}"
    );
    assert!(
        (high.parse::<f64>().unwrap() - highest).abs() <= 0.01,
        "{row:?} {ratios:?}"
    );

    // Bad input changes nothing: refused before any run.
    for (args, says) in [(&["--rounds", "0"][..], "--rounds must be at least 1")] {
        let mut all = vec!["--jobs", "10", "--backends", "sql-sqlite", "--no-floor"];
        all.extend_from_slice(args);
        let refused = throughput(&all).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("bench: sql-sqlite"),
            "{args:?} ran: {stderr}"
        );
    }
}

/// `sluice-bench cost` with `args`; it runs the `sluice` binary built beside this one as its
/// `serve` and `worker` processes.
async fn cost(args: &[&str]) -> std::process::Output {
    let mut all = vec!["cost"];
    all.extend_from_slice(args);
    bench(&all).await
}

/// The number after `label` on its line of `stdout`.
fn figure(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {line:?}"))
}

#[tokio::test]
async fn bench_cost_at_an_offered_rate_prints_the_202_and_the_cpu_per_job() {
    let output = cost(&["--jobs", "300", "--clients", "8", "--rate", "300"]).await;
    let stdout = succeeded(&output);
    assert!(
        stdout.contains("300 jobs, 8 clients at 300 submits/s"),
        "{stdout}"
    );
    // 300 jobs offered at 300 a second take about a second to submit; the run cannot be
    // faster than the rate it was offered.
    let seconds = figure(&stdout, "end to end");
    assert!(seconds >= 0.95, "{stdout}");
    let p50 = figure(&stdout, "202 p50 / p99");
    assert!(p50 > 0.0, "{stdout}");
    // `serve` and `worker` commit to PostgreSQL, each commit flushing its WAL to disk.
    assert!(
        figure(&stdout, "disk writes, whole machine") > 0.0,
        "{stdout}"
    );
    for process in ["sluice serve", "sluice worker"] {
        assert!(figure(&stdout, process) > 0.0, "{stdout}");
    }
    // Each job is inserted, claimed and completed once, by statements of one job or more.
    for statement in ["insert", "claim", "complete"] {
        let per_job = figure(&stdout, statement);
        assert!(per_job > 0.0 && per_job <= 1.0, "{statement}: {stdout}");
    }

    let refused = cost(&["--jobs", "10", "--rate", "0"]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--rate must be a positive number"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
