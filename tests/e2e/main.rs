//! End-to-end tests: the real `sluice` binary (api and worker processes) against this machine's
//! PostgreSQL and RabbitMQ, with the provider simulator; one fresh schema and queue prefix per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod admission;
mod api;
mod chaos;
mod connections;
mod dashboard;
mod delivery;
mod embedded;
mod events;
mod fairness;
mod faults;
mod helpers;
mod input;
mod limits;
mod logs;
mod metrics;
mod notify;
mod openai;
mod openai_batch;
mod openapi;
mod reconcile;
mod watch;
