//! A local SQS-compatible server (feature `moto`): moto's `moto_server` on a free port of
//! 127.0.0.1, holding its state in memory and killed when dropped.
//!
//! Not test-only: `sluice bench throughput` starts one to measure SQS lanes without AWS.
//! Errors are returned, never panicked on; the `testing` module wraps this for tests.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long moto may take to answer after being spawned (it is Python: about half a
/// second on an idle machine, several times that on a busy one).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Spawning again on another port covers a port taken between choosing and binding it.
const START_ATTEMPTS: u32 = 3;

/// The virtualenv `pyenv` (the repository's `scripts/pyenv.sh`) creates or updates: the
/// script prints its path last.
pub fn venv(pyenv: &Path) -> io::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(pyenv)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", pyenv.display())))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} failed ({})",
            pyenv.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout.lines().last().unwrap_or_default().trim(),
    ))
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// A running `moto_server` on 127.0.0.1; killed when dropped.
pub struct MotoServer {
    child: Child,
    endpoint: String,
}

impl MotoServer {
    /// Spawns `bin` (a `moto_server` executable, or a Python with `leading` naming a script
    /// that takes moto_server's arguments) on a free port and waits until it answers HTTP,
    /// trying other ports if the process exits early (its port was taken).
    pub async fn start(bin: &Path, leading: &[&Path]) -> io::Result<MotoServer> {
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let child = Command::new(bin)
                .args(leading)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // moto logs every request; nobody reads it, and a full pipe would block it.
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot start {}: {e}", bin.display()))
                })?;
            let mut server = MotoServer {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            match server.wait_until_ready(port).await {
                Ready::Yes => return Ok(server),
                Ready::Exited => continue,
                Ready::TimedOut => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("moto did not answer on port {port} within {START_TIMEOUT:?}"),
                    ))
                }
            }
        }
        Err(io::Error::other(format!(
            "{} exited before answering, {START_ATTEMPTS} times",
            bin.display()
        )))
    }

    async fn wait_until_ready(&mut self, port: u16) -> Ready {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ready::Exited;
            }
            if answers_http(port).await {
                return Ready::Yes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ready::TimedOut
    }

    /// Where the server listens, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

enum Ready {
    Yes,
    /// The process exited: most likely its port was taken meanwhile.
    Exited,
    TimedOut,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
