//! Cross-collector wake-ups: one connection per collector LISTENs on the wake channel and
//! turns each notification into a `Notify`, so the decider runs its pass when another
//! collector wrote a changed verdict or an ack, instead of at its next tick. Reconnects
//! with a capped back-off; a lost notification only delays a pass until the next tick.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Config, NoTls};

use super::health::StoreHealth;
use super::{PgError, OP_TIMEOUT, WAKE_CHANNEL};

/// Runs until the process ends; every notification (and every reconnect, since some may have
/// been missed) wakes `wake`.
pub async fn run(cfg: Config, wake: Arc<Notify>, health: Arc<StoreHealth>, now_ms: fn() -> i64) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match listen_once(&cfg, &wake).await {
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

async fn listen_once(cfg: &Config, wake: &Notify) -> Result<(), PgError> {
    let (client, mut conn) = tokio::time::timeout(OP_TIMEOUT, cfg.connect(NoTls))
        .await
        .map_err(|_| PgError::Timeout(OP_TIMEOUT))??;
    // The connection must be polled for the LISTEN itself to complete, so its messages are
    // read in this task and forwarded over a channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
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
    while rx.recv().await.is_some() {
        wake.notify_one();
    }
    drop(client);
    match pump.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
