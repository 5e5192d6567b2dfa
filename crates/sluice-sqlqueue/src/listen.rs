//! The PostgreSQL wake-up listener: one `LISTEN` connection per queue that turns a
//! namespace's notifications into wake-ups for this process's idle consumers.
//!
//! Notifications are only a hint. Whenever some may have been missed (at start, after a
//! lost connection) every consumer is woken to look for itself, and the fallback poll
//! covers whatever still slips through.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sluice_broker::Lane;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::Wakers;
use sluice_broker::Backoff;

/// How long `consume` waits for the first `LISTEN` before relying on the fallback poll.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the listener and waits (boundedly) until it listens, so that a message
/// published after `consume` returns wakes the consumer.
pub(crate) async fn start(
    pool: PgPool,
    channel: String,
    wakers: Arc<Wakers>,
) -> tokio::task::AbortHandle {
    let (ready_tx, ready_rx) = oneshot::channel();
    let task = tokio::spawn(run(pool, channel, wakers, ready_tx));
    if tokio::time::timeout(READY_TIMEOUT, ready_rx).await.is_err() {
        warn!("no LISTEN connection yet; idle consumers poll until it is up");
    }
    task.abort_handle()
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

async fn run(pool: PgPool, channel: String, wakers: Arc<Wakers>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::default();
    loop {
        if pool.is_closed() {
            return;
        }
        let mut listener = match connect(&pool, &channel).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(%channel, error = %e, "cannot LISTEN; will retry");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        match ready.take() {
            Some(tx) => {
                let _ = tx.send(());
            }
            None => info!(%channel, "listening again"),
        }
        backoff = Backoff::default();
        // Whatever was published while nobody listened was missed: everyone looks now.
        wakers.wake_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) => match Lane::from_str(note.payload()) {
                    Ok(lane) => wakers.wake(lane),
                    Err(_) => wakers.wake_all(),
                },
                Ok(None) => {
                    // sqlx has already reconnected and re-issued the LISTEN.
                    warn!(%channel, "LISTEN connection lost and re-established");
                    wakers.wake_all();
                }
                Err(e) => {
                    if !pool.is_closed() {
                        warn!(%channel, error = %e, "LISTEN connection failed; reconnecting");
                    }
                    break;
                }
            }
        }
        drop(listener);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
