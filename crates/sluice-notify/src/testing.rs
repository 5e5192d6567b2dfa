//! Test support (feature `testing`): a real SMTP server (aiosmtpd, `scripts/smtp_sink.py`) on a
//! free port that stores what it receives, and the received emails decoded, for any crate's tests.

// Everything here panics on failure: it runs only inside tests, where a panic is the report.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The virtualenv's Python with aiosmtpd, made by `scripts/pyenv.sh` on first use (once per
/// test binary).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = scripts().join("pyenv.sh");
        let out = std::process::Command::new("bash")
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

/// A TCP port nothing listens on right now, below Linux's ephemeral range (32768 and up): a
/// sink stopped and started again on it must find it still free, and the kernel hands ports of
/// that range to every outgoing connection (and to the next test's port-0 listener).
pub fn free_port() -> u16 {
    for _ in 0..1_000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free local port between 20000 and 32000")
}

/// A directory the sink writes into, removed when dropped.
pub struct Maildir(pub PathBuf);

impl Maildir {
    pub fn new() -> Maildir {
        let dir = std::env::temp_dir().join(format!("sluice-mail-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("create the mail directory");
        Maildir(dir)
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Email> {
        let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.0)
            .expect("read the mail directory")
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".eml")?
                    .parse()
                    .ok()?;
                Some((n, path))
            })
            .collect();
        numbered.sort();
        numbered
            .into_iter()
            .map(|(_, path)| Email::parse(&std::fs::read(path).expect("read a received message")))
            .collect()
    }

    /// Wait until `n` messages arrived, then a little longer to catch any duplicate.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Email> {
        let start = Instant::now();
        while self.messages().len() < n {
            assert!(
                start.elapsed() < within,
                "{n} email(s) expected within {within:?}, got {}",
                self.messages().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        self.messages()
    }
}

impl Default for Maildir {
    fn default() -> Self {
        Maildir::new()
    }
}

impl Drop for Maildir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The aiosmtpd sink on 127.0.0.1; killed when dropped or stopped.
pub struct Sink {
    child: tokio::process::Child,
}

impl Sink {
    /// Start a sink on `port` writing into `dir`, and wait until it accepts connections.
    pub async fn start(port: u16, dir: &Maildir) -> Sink {
        let mut child = tokio::process::Command::new(python())
            .arg(scripts().join("smtp_sink.py"))
            .arg("127.0.0.1")
            .arg(port.to_string())
            .arg(&dir.0)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the SMTP sink");
        let stdout = child.stdout.take().expect("the sink's stdout");
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("the SMTP sink did not start within 30 s")
        .expect("read the SMTP sink's output");
        assert_eq!(line.trim(), "ready", "the SMTP sink said {line:?}");
        Sink { child }
    }

    /// Kill the sink and wait until it is gone, so its port is free again.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A received message, decoded.
#[derive(Debug, Clone)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub content_type: String,
    pub plain: String,
    pub html: String,
}

impl Email {
    pub fn parse(raw: &[u8]) -> Email {
        use mailparse::MailHeaderMap;
        let mail = mailparse::parse_mail(raw).expect("a received message parses");
        let header = |name: &str| mail.headers.get_first_value(name).unwrap_or_default();
        let part = |mime: &str| {
            mail.subparts
                .iter()
                .find(|p| p.ctype.mimetype == mime)
                .map(|p| {
                    p.get_body()
                        .expect("a decodable part")
                        .replace("\r\n", "\n")
                })
                .unwrap_or_default()
        };
        Email {
            to: header("To"),
            subject: header("Subject"),
            message_id: header("Message-ID"),
            content_type: mail.ctype.mimetype.clone(),
            plain: part("text/plain"),
            html: part("text/html"),
        }
    }
}
