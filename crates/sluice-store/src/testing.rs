//! Test support for this and other crates' tests: a migrated store of its own, either on a
//! scratch schema of the real PostgreSQL or in a scratch SQLite file, removed when done.

use crate::{Backend, Store, StoreConfig};
use std::path::PathBuf;

/// A migrated store in a schema (PostgreSQL) or a file (SQLite) of its own.
pub struct TestDb {
    pub store: Store,
    scratch: Scratch,
}

enum Scratch {
    Schema(String),
    /// The database file; its `-wal` and `-shm` companions go with it.
    File(PathBuf),
}

impl TestDb {
    /// PostgreSQL (`SLUICE_TEST_DATABASE_URL`, default the local server), on a new schema named
    /// `{prefix}_{uuid}`; panics if the database is not there.
    pub async fn new(prefix: &str) -> TestDb {
        let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        let url = std::env::var("SLUICE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let store = Store::connect(&StoreConfig {
            url,
            schema: Some(schema.clone()),
            max_connections: 4,
            migrate: true,
            ..StoreConfig::default()
        })
        .await
        .unwrap_or_else(|e| panic!("these tests need PostgreSQL: {e}"));
        TestDb {
            store,
            scratch: Scratch::Schema(schema),
        }
    }

    /// SQLite, in a new file `{prefix}_{uuid}.db` under the temporary directory; the file is
    /// removed by [`TestDb::drop`], or when the value is dropped (a test that panicked).
    pub async fn sqlite(prefix: &str) -> TestDb {
        let path =
            std::env::temp_dir().join(format!("{prefix}_{}.db", uuid::Uuid::now_v7().simple()));
        let store = Store::connect(&StoreConfig {
            url: format!("sqlite://{}", path.display()),
            max_connections: 4,
            migrate: true,
            ..StoreConfig::default()
        })
        .await
        .unwrap_or_else(|e| panic!("cannot create SQLite test database {path:?}: {e}"));
        TestDb {
            store,
            scratch: Scratch::File(path),
        }
    }

    /// A store of the given backend: [`TestDb::new`] or [`TestDb::sqlite`].
    pub async fn on(backend: Backend, prefix: &str) -> TestDb {
        match backend {
            Backend::Postgres => TestDb::new(prefix).await,
            Backend::Sqlite => TestDb::sqlite(prefix).await,
        }
    }

    /// The SQLite file, for tests that reopen it; `None` on PostgreSQL.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        match &self.scratch {
            Scratch::File(path) => Some(path),
            Scratch::Schema(_) => None,
        }
    }

    /// Drop the schema and everything in it, or close and delete the SQLite file.
    pub async fn drop(self) {
        match &self.scratch {
            Scratch::Schema(schema) => {
                if let Err(e) = self.store.drop_schema(schema).await {
                    panic!("could not drop test schema {schema}: {e}");
                }
            }
            // Closed first so the files go with no connection left writing to them; the
            // `Drop` impl then deletes them.
            Scratch::File(_) => self.store.close().await,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Scratch::File(path) = &self.scratch {
            // A failure only leaves a temp file behind.
            let _ = crate::remove_sqlite_files(path);
        }
    }
}
