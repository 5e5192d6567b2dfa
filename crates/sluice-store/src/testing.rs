//! Test support for this and other crates' tests: a store on a scratch schema of the real
//! PostgreSQL (`SLUICE_TEST_DATABASE_URL`, default the local server), dropped when done.

use crate::{Store, StoreConfig};

/// A migrated store in a schema of its own.
pub struct TestDb {
    pub store: Store,
    schema: String,
}

impl TestDb {
    /// Connect to a new schema named `{prefix}_{uuid}`; panics if the database is not there.
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
        TestDb { store, schema }
    }

    /// Drop the schema and everything in it.
    pub async fn drop(self) {
        if let Err(e) = self.store.drop_schema(&self.schema).await {
            panic!("could not drop test schema {}: {e}", self.schema);
        }
    }
}
