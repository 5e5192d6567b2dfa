//! The SQL queue: lanes as a table in PostgreSQL or SQLite (work in progress).
