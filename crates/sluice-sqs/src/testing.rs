//! Test support (feature `testing`): a local SQS-compatible server (moto, from the
//! tests' Python virtualenv) on a free port, and broker configurations against it.

// Everything here panics on failure: it runs only inside tests, where a panic is the report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::SqsConfig;

/// How long moto may take to answer after being spawned (it is Python: about half a
/// second on an idle machine, several times that on a busy one).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Spawning again on another port covers a port taken between choosing and binding it.
const START_ATTEMPTS: u32 = 3;

/// The virtualenv's Python with moto, made by `scripts/pyenv.sh` on first use (once per test
/// binary). It runs `scripts/moto_sqs.py`: moto's server with its receives made atomic.
pub fn moto_python() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = scripts().join("pyenv.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        let venv = String::from_utf8_lossy(&out.stdout);
        let venv = venv.lines().last().unwrap_or_default().trim();
        PathBuf::from(venv).join("bin").join("python")
    })
}

/// The repository's `scripts/` directory.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// A moto server on 127.0.0.1 holding its state in memory; killed when dropped.
pub struct MotoServer {
    child: Child,
    endpoint: String,
}

impl MotoServer {
    /// Spawns `moto_server` on a free port and waits until it answers HTTP.
    pub async fn start() -> MotoServer {
        let python = moto_python();
        let script = scripts().join("moto_sqs.py");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let child = Command::new(python)
                .arg(&script)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // moto logs every request; nobody reads it, and a full pipe would block it.
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", script.display()));
            let mut server = MotoServer {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            if server.wait_until_ready(port).await {
                return server;
            }
            assert!(
                attempt < START_ATTEMPTS,
                "moto did not answer on port {port} within {START_TIMEOUT:?}"
            );
        }
        unreachable!("the loop returns or panics")
    }

    /// True once an HTTP request gets an answer; false if the process exited (port taken).
    async fn wait_until_ready(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if answers_http(port).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Where the server listens, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A configuration against this server with a fresh random prefix, a short
    /// visibility timeout (3 s) and short long polls (1 s), so tests run quickly.
    pub fn config(&self) -> SqsConfig {
        SqsConfig {
            prefix: random_prefix(),
            endpoint_url: Some(self.endpoint.clone()),
            visibility_timeout_secs: 3,
            wait_time_secs: 1,
            ..SqsConfig::default()
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A queue prefix no other test uses: `test-` and a UUIDv7 without hyphens.
pub fn random_prefix() -> String {
    format!("test-{}", uuid::Uuid::now_v7().simple())
}

async fn answers_http(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut head = [0u8; 8];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}
