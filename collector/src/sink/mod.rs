//! Where points go: one module per kind of store, all behind [`Sink`]. The status-code policy
//! (split on 413, back off on 429/503, drop only the bad lines on 400/422) lives in
//! the writer module, so every sink gets it the same way.

pub mod file;
pub mod influx;

use std::time::Duration;

/// The store's answer to one write, in HTTP terms (the file sink answers like InfluxDB would).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot reach {what}: {err}")]
    Unreachable { what: String, err: String },
    #[error("{0}")]
    Setup(String),
    /// Reachable, but what we write to (retention policy, bucket, organisation) is missing:
    /// a start-up error, since retrying cannot fix it.
    #[error("{0}")]
    NotFound(String),
}

pub trait Sink: Send + Sync {
    /// Write newline-separated line protocol with ns timestamps: the body is `parts` one after
    /// the other (each part whole lines, so the reports of a batch need not be copied into
    /// one buffer first).
    fn write(&self, parts: &[&[u8]]) -> Result<Response, SinkError>;
    /// Make ready to write (e.g. create the database); called at start and after a 404.
    fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    /// For logs and /healthz: where the points go, without credentials.
    fn describe(&self) -> String;
}
