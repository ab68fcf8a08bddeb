//! Request-level guards beyond the token check: rate limits and the mutual-TLS switch.
//!
//! Rate limits are token buckets. Reports are limited per instance id (after decoding), since
//! a whole fleet shares its agent tokens and one noisy or compromised box must not starve the
//! rest; every other role is limited per token. Over the limit: 429 with Retry-After, which the
//! agent's sender honours.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::reply::ApiError;

/// Buckets kept at most; past it, buckets that have refilled (and so mean nothing) are dropped,
/// and if that is not enough, new keys share one bucket. Bounds memory against a sender that
/// invents a new instance id per request.
const MAX_KEYS: usize = 100_000;

/// Requests per second and the burst allowed on top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    /// `20/s`, `600/m`, `3600/h`, or `off`; `burst` defaults to twice the per-second rate
    /// (at least 5).
    pub fn parse(s: &str, burst: Option<u32>) -> Result<Option<Rate>, String> {
        let s = s.trim();
        if matches!(s, "off" | "0" | "none") {
            return Ok(None);
        }
        let bad = || format!("--rate-limit {s:?}: write e.g. 20/s, 600/m or off");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(bad());
        }
        let per_sec = n / per;
        let burst = burst
            .map(f64::from)
            .unwrap_or((per_sec * 2.0).max(5.0))
            .max(1.0);
        Ok(Some(Rate { per_sec, burst }))
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<String, Bucket>,
    /// Pruning walks every bucket: at most once a second, or a flood of new keys would make
    /// every request pay for it.
    pruned: Option<Instant>,
}

#[derive(Debug)]
pub struct Limiter {
    rate: Option<Rate>,
    buckets: Mutex<Buckets>,
}

impl Limiter {
    pub fn new(rate: Option<Rate>) -> Limiter {
        Limiter {
            rate,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Take one request from `key`'s bucket, or say how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else { return Ok(()) };
        let mut g = self.buckets.lock().unwrap();
        if !g.map.contains_key(key)
            && g.map.len() >= MAX_KEYS
            && g.pruned
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            g.map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate.per_sec
                    < rate.burst
            });
            g.pruned = Some(now);
        }
        let key = if g.map.contains_key(key) || g.map.len() < MAX_KEYS {
            key
        } else {
            "\0overflow"
        };
        let b = g.map.entry(key.to_owned()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate.per_sec)
            .min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate.per_sec))
        }
    }
}

/// What `api` consults besides the tokens.
#[derive(Debug)]
pub struct Security {
    pub limiter: Limiter,
    /// Reports per peer address, taken before the body is read or unzipped.
    pub peers: Limiter,
    /// Agent requests per caller proof (see [`crate::identity::Gate::caller_key`]), before
    /// the body: `--rate-limit`.
    pub callers: Limiter,
    /// Agent requests per agent token, before the body: `--agent-token-rate-limit`.
    pub agent_tokens: Limiter,
    /// `--client-ca` is set: a report's instance id must match the client certificate.
    pub mtls: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            limiter: Limiter::new(None),
            peers: Limiter::new(None),
            callers: Limiter::new(None),
            agent_tokens: Limiter::new(None),
            mtls: false,
        }
    }
}

impl Security {
    /// The per-peer limit, before a byte of the body is read: a flood costs a hash lookup,
    /// not a gunzip and a parse.
    pub fn check_peer(&self, req: &axum::extract::Request) -> Result<(), ApiError> {
        let Some(addr) = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        else {
            return Ok(());
        };
        let ip = addr.0.ip();
        self.peers
            .check(&format!("peer/{ip}"))
            .map_err(|wait| too_many(wait, &format!("peer {ip} (--peer-rate-limit)")))
    }
}

/// 429 with a whole-second Retry-After (at least 1: HTTP has no finer unit).
pub fn too_many(wait: Duration, what: &str) -> ApiError {
    ApiError::too_many(
        wait,
        format!(
            "rate limit for {what} exceeded (--rate-limit); retry after {} s",
            crate::reply::retry_secs(wait)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(
            Rate::parse("20/s", None).unwrap(),
            Some(Rate {
                per_sec: 20.0,
                burst: 40.0
            })
        );
        assert_eq!(
            Rate::parse("60/m", Some(3)).unwrap(),
            Some(Rate {
                per_sec: 1.0,
                burst: 3.0
            })
        );
        assert_eq!(Rate::parse("off", None).unwrap(), None);
        assert!(Rate::parse("20", None).unwrap_err().contains("20/s"));
        assert!(Rate::parse("-1/s", None).is_err());
        assert!(Rate::parse("5/y", None).is_err());
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let l = Limiter::new(Some(Rate {
            per_sec: 10.0,
            burst: 5.0,
        }));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check_at("i-1", t0).is_ok());
        }
        let wait = l.check_at("i-1", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert!(l.check_at("i-2", t0).is_ok());
        // 100 ms later one more request fits, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check_at("i-1", t1).is_ok());
        assert!(l.check_at("i-1", t1).is_err());
        // Over 10 s at 10/s: about 100 pass out of 1000 tries.
        let mut ok = 0;
        for i in 0..1000 {
            if l.check_at("i-3", t1 + Duration::from_millis(i * 10))
                .is_ok()
            {
                ok += 1;
            }
        }
        assert!((100..=106).contains(&ok), "{ok}");
    }

    #[test]
    fn off_lets_everything_through() {
        let l = Limiter::new(None);
        let t = Instant::now();
        assert!((0..10_000).all(|_| l.check_at("x", t).is_ok()));
    }

    #[test]
    fn memory_stays_bounded_under_invented_keys() {
        let l = Limiter::new(Some(Rate {
            per_sec: 1.0,
            burst: 2.0,
        }));
        let t = Instant::now();
        for i in 0..(MAX_KEYS + 50) {
            l.check_at(&format!("i-{i}"), t).ok();
        }
        assert!(l.buckets.lock().unwrap().map.len() <= MAX_KEYS + 1);
        // A second later the refilled buckets make room for new keys again.
        assert!(l.check_at("i-new", t + Duration::from_secs(5)).is_ok());
        assert!(l.buckets.lock().unwrap().map.len() < 10);
    }
}
