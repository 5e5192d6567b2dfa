//! A PostgreSQL cluster and a RabbitMQ node of a test's own, on free ports in a temporary
//! directory, that the test may crash and restart without disturbing any other test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// A free TCP port on 127.0.0.1 (free when asked; taken by whoever binds first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

async fn run(what: &str, command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique(label));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A PostgreSQL cluster (`initdb` of the newest server under `/usr/lib/postgresql`, or the one
/// on `PATH`), trust authentication, `fsync` off (a test's data need not survive the machine).
/// As root the server runs as the `postgres` user, since PostgreSQL refuses root. Stopped and
/// removed on `Drop`.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let dir = scratch_dir("pg");
        let bin = postgres_bin();
        let pg = PrivatePostgres {
            dir,
            bin,
            port: free_port(),
        };
        if is_root() {
            run(
                "chown",
                Command::new("chown").args(["-R", "postgres"]).arg(&pg.dir),
            )
            .await;
        }
        let data = pg.data();
        run(
            "initdb",
            pg.as_owner(&pg.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "--no-sync"]),
        )
        .await;
        pg.up().await;
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stop at once, as a crash would (no checkpoint; recovery replays the WAL at the next
    /// start), then start again on the same port.
    pub async fn crash_and_restart(&self) {
        self.stop("immediate").await;
        self.up().await;
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_owner(&self, program: &Path) -> Command {
        Command::from(as_postgres_owner(program))
    }

    async fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        run(
            "pg_ctl start",
            self.as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(self.dir.join("log"))
                .arg("start"),
        )
        .await;
    }

    async fn stop(&self, mode: &str) {
        run(
            "pg_ctl stop",
            self.as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-m", mode, "-w", "stop"]),
        )
        .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let status = as_postgres_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = status {
            eprintln!("testkit: could not stop the private PostgreSQL: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `program` as the cluster's owner: `postgres` when we are root (PostgreSQL refuses root).
fn as_postgres_owner(program: &Path) -> std::process::Command {
    if is_root() {
        let mut command = std::process::Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        std::process::Command::new(program)
    }
}

fn postgres_bin() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(Result::ok)
                .map(|v| v.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .max_by_key(|bin| {
                    bin.parent()
                        .and_then(|v| v.file_name())
                        .and_then(|v| v.to_str())
                        .and_then(|v| v.parse::<u32>().ok())
                        .unwrap_or(0)
                })
        });
    newest.unwrap_or_default()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A RabbitMQ node (`rabbitmq-server` with a config, data and logs of its own, no plugins),
/// killed and removed on `Drop`.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
}

impl PrivateRabbit {
    pub async fn start() -> PrivateRabbit {
        let dir = scratch_dir("rabbit");
        let port = free_port();
        let rabbit = PrivateRabbit {
            node: format!("sluice_test_{port}@localhost"),
            dist_port: free_port(),
            dir,
            port,
        };
        let write = |name: &str, text: String| {
            std::fs::write(rabbit.dir.join(name), text)
                .unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
        };
        write(
            "rabbitmq.conf",
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        );
        write("enabled_plugins", "[].\n".into());
        rabbit.up().await;
        rabbit
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `kill -9` the node, then start it again on its data: what was confirmed survives.
    pub async fn crash_and_restart(&self) {
        self.kill().await;
        self.up().await;
    }

    /// Starts the node and waits until it takes AMQP connections, not only TCP ones: a node
    /// restarted right after a `kill -9` on a busy machine now and then opens its port and then
    /// dies while booting. Such a node is started again, up to three times, with its log's tail
    /// on stderr.
    async fn up(&self) {
        const STARTS: u32 = 3;
        for start in 1..=STARTS {
            let mut child = self.spawn();
            match self.ready(&mut child, Duration::from_secs(60)).await {
                Ok(()) => return,
                Err(why) => {
                    eprintln!(
                        "the private RabbitMQ on {} {why} (start {start} of {STARTS}); its output ends:\n{}",
                        self.port,
                        self.output_tail()
                    );
                    let _ = child.kill().await;
                    self.kill().await;
                }
            }
        }
        panic!(
            "the private RabbitMQ on {} did not come up in {STARTS} starts",
            self.port
        );
    }

    fn spawn(&self) -> tokio::process::Child {
        let program = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("rabbitmq-server"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.out"))
            .unwrap_or_else(|e| panic!("cannot open the RabbitMQ log: {e}"));
        Command::new(program)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs rabbitmq-server: {e}"))
    }

    /// Ready when an AMQP connection opens; an error when the node exits or time runs out.
    async fn ready(
        &self,
        child: &mut tokio::process::Child,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let config = sluice_broker::RabbitConfig {
            url: self.url(),
            prefix: "sluice-testkit-probe".into(),
            ..sluice_broker::RabbitConfig::default()
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited while starting ({status})"));
            }
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if listening
                && sluice_broker::RabbitBroker::connect(config.clone())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("took no AMQP connection within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines the node printed, across its starts.
    fn output_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    async fn kill(&self) {
        let Ok(pid) = std::fs::read_to_string(self.pid_file()) else {
            return;
        };
        let pid = pid.trim().to_owned();
        let _ = Command::new("kill").args(["-9", &pid]).status().await;
        // Gone when its port is closed and its pid is no more.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists()
            || tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "the private RabbitMQ did not die"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(self.pid_file());
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.pid_file()) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
