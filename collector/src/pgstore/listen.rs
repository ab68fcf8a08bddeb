//! Cross-collector wake-ups: one connection per collector LISTENs on the wake channel and
//! turns each notification into a `Notify`, so the decider runs its pass when another
//! collector wrote a changed verdict or an ack, instead of at its next tick. Reconnects
//! with a capped back-off; a lost notification only delays a pass until the next tick.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify};
use tokio_postgres::{AsyncMessage, Config, NoTls};

use super::health::StoreHealth;
use super::{PgError, OP_TIMEOUT, WAKE_CHANNEL};

/// Payload of the message sent to subscribers after a reconnect: notifications may have
/// been missed, so whatever they cache is to be reloaded.
pub const RELOAD: &str = "reload";

/// Runs until the process ends; every notification (and every reconnect, since some may have
/// been missed) wakes `wake`, and its payload goes to `payloads` (`RELOAD` on reconnect).
pub async fn run(
    cfg: Config,
    wake: Arc<Notify>,
    payloads: broadcast::Sender<String>,
    health: Arc<StoreHealth>,
    now_ms: fn() -> i64,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match listen_once(&cfg, &wake, &payloads).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                health.failed(&e, now_ms());
                tracing::debug!(error = %e, "LISTEN connection to PostgreSQL failed; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    cfg: &Config,
    wake: &Notify,
    payloads: &broadcast::Sender<String>,
) -> Result<(), PgError> {
    let (client, mut conn) = tokio::time::timeout(OP_TIMEOUT, cfg.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout(OP_TIMEOUT))??;
    // The connection must be polled for the LISTEN itself to complete, so its messages are
    // read in this task and forwarded over a channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let out = payloads.clone();
    let pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // No subscriber is fine; a slow one sees `Lagged` and reloads.
                    if out.send(n.payload().to_string()).is_err() {
                        tracing::trace!("no subscriber for fleet store notifications");
                    }
                    // A full channel already holds a wake-up: coalesce.
                    if tx.try_send(()).is_err() && tx.is_closed() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(PgError::from(e)),
                None => return Ok(()),
            }
        }
    });
    let listen = format!("LISTEN {WAKE_CHANNEL}");
    super::timed(async { Ok(client.batch_execute(&listen).await?) }).await?;
    wake.notify_one();
    if payloads.send(RELOAD.to_string()).is_err() {
        tracing::trace!("no subscriber for fleet store notifications");
    }
    while rx.recv().await.is_some() {
        wake.notify_one();
    }
    drop(client);
    match pump.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
