//! pgstore-holder: one process contending for the decider lease through the collector's
//! PostgreSQL store, and nothing else, for the process-level lease tests
//! (tests/tests/pgstore.rs): `kill -9` of the holder must hand the lease to another process
//! within twice the lease time.
//!
//!   pgstore-holder URL LEASE_MS
//!
//! Prints `decider <fence>` on stdout each time it becomes the decider, `follower` when it
//! loses the lease.

use std::io::Write;
use std::time::Duration;

use phoenix_collector::pgstore::{PgOptions, PgStore};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(ms)) = (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: pgstore-holder URL LEASE_MS");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let opts = PgOptions {
            lease_ttl: Duration::from_millis(ms),
            ..PgOptions::default()
        };
        let store = match PgStore::open(url, opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pgstore-holder: {e}");
                std::process::exit(1);
            }
        };
        store.start();
        let mut was = None;
        loop {
            let now = store.decider().map(|h| h.fence);
            if now != was {
                let mut out = std::io::stdout().lock();
                let line = match now {
                    Some(f) => format!("decider {f}\n"),
                    None => "follower\n".to_string(),
                };
                if out
                    .write_all(line.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    std::process::exit(1);
                }
                was = now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
