//! Test support (feature `testing`): a local SQS-compatible server (moto, from the
//! tests' Python virtualenv) on a free port, and broker configurations against it.
//!
//! The server itself is [`crate::moto::MotoServer`] (feature `moto`, which `testing` turns
//! on); this adds finding moto in the repository's virtualenv and panicking on failure.

// Everything here panics on failure: it runs only inside tests, where a panic is the report.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::SqsConfig;

/// The virtualenv's Python with moto, made by `scripts/pyenv.sh` on first use (once per test
/// binary). It runs `scripts/moto_sqs.py`: moto's server with its receives and deletes made
/// atomic.
pub fn moto_python() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = crate::moto::venv(&scripts().join("pyenv.sh"))
            .unwrap_or_else(|e| panic!("no Python virtualenv for moto: {e}"));
        venv.join("bin").join("python")
    })
}

/// The repository's `scripts/` directory.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    crate::moto::free_port().expect("a free local port")
}

/// A moto server on 127.0.0.1 holding its state in memory; killed when dropped.
pub struct MotoServer {
    server: crate::moto::MotoServer,
}

impl MotoServer {
    /// Spawns moto (through `scripts/moto_sqs.py`) on a free port and waits until it answers.
    pub async fn start() -> MotoServer {
        let script = scripts().join("moto_sqs.py");
        let server = crate::moto::MotoServer::start(moto_python(), &[script.as_path()])
            .await
            .unwrap_or_else(|e| panic!("could not start moto: {e}"));
        MotoServer { server }
    }

    /// Where the server listens, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        self.server.endpoint()
    }

    /// A configuration against this server with a fresh random prefix, a short
    /// visibility timeout (3 s) and short long polls (1 s), so tests run quickly.
    pub fn config(&self) -> SqsConfig {
        SqsConfig {
            prefix: random_prefix(),
            endpoint_url: Some(self.endpoint().to_owned()),
            visibility_timeout_secs: 3,
            wait_time_secs: 1,
            ..SqsConfig::default()
        }
    }
}

/// A queue prefix no other test uses: `test-` and a UUIDv7 without hyphens.
pub fn random_prefix() -> String {
    format!("test-{}", uuid::Uuid::now_v7().simple())
}
