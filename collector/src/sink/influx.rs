//! InfluxDB over HTTP: the v1 API (`/write?db=&rp=`, user/password), spoken by 1.x, and the
//! v2 API (`/api/v2/write?org=&bucket=`, `Authorization: Token`), spoken by 2.x, 1.8+ and 3.x.
//! Written over ureq rather than the `influxdb2` crate: that crate pulls in reqwest and its
//! own TLS stack, only speaks v2, and hides the status codes the write policy needs.

use std::io::Read;
use std::time::Duration;

use super::{Response, Sink, SinkError};

#[derive(Clone)]
pub enum Api {
    V1 {
        db: String,
        rp: Option<String>,
        user: Option<String>,
        password: Option<String>,
    },
    V2 {
        org: String,
        bucket: String,
        token: Option<String>,
    },
}

/// Credentials are shown only as present or absent.
impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Api::V1 {
                db,
                rp,
                user,
                password,
            } => f
                .debug_struct("V1")
                .field("db", db)
                .field("rp", rp)
                .field("user", user)
                .field("password", &password.as_ref().map(|_| "<set>"))
                .finish(),
            Api::V2 { org, bucket, token } => f
                .debug_struct("V2")
                .field("org", org)
                .field("bucket", bucket)
                .field("token", &token.as_ref().map(|_| "<set>"))
                .finish(),
        }
    }
}

#[derive(Debug)]
pub struct Influx {
    base: String,
    api: Api,
    gzip: bool,
    /// v1: create a missing database (Telegraf's default); `--influx-skip-database-creation`.
    create_database: bool,
    http: ureq::Agent,
}

impl Influx {
    pub fn new(base: &str, api: Api, gzip: bool, timeout: Duration) -> Influx {
        let cfg = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(Duration::from_secs(3)))
            .http_status_as_error(false)
            .max_idle_connections_per_host(4)
            .user_agent(concat!("phoenix-collector/", env!("CARGO_PKG_VERSION")))
            .build();
        Influx {
            base: base.trim_end_matches('/').to_owned(),
            api,
            gzip,
            create_database: true,
            http: ureq::Agent::new_with_config(cfg),
        }
    }

    /// Whether a missing v1 database is created at start-up (on unless turned off).
    pub fn create_database(mut self, on: bool) -> Influx {
        self.create_database = on;
        self
    }

    /// The v1 `/query` URL with credentials in the query, as 1.x wants.
    fn query_url(&self, q: &str) -> String {
        let mut url = format!("{}/query?q={}", self.base, enc(q));
        if let Api::V1 {
            user: Some(u),
            password: Some(p),
            ..
        } = &self.api
        {
            url += &format!("&u={}&p={}", enc(u), enc(p));
        }
        url
    }

    /// Run a read-only `SHOW ...` and take the first column of its rows.
    fn v1_list(&self, q: &str) -> Result<Listing, SinkError> {
        let mut r =
            self.http
                .get(&self.query_url(q))
                .call()
                .map_err(|e| SinkError::Unreachable {
                    what: self.describe(),
                    err: e.to_string(),
                })?;
        let status = r.status().as_u16();
        Ok(parse_listing(
            status,
            &read_limited(r.body_mut().as_reader()),
        ))
    }

    fn create_db(&self, db: &str) -> Result<(), SinkError> {
        let mut url = format!("{}/query", self.base);
        if let Api::V1 {
            user: Some(u),
            password: Some(p),
            ..
        } = &self.api
        {
            url += &format!("?u={}&p={}", enc(u), enc(p));
        }
        let q = format!("CREATE DATABASE {}", quote_ident(db));
        let resp = self
            .http
            .post(&url)
            .content_type("application/x-www-form-urlencoded")
            .send(format!("q={}", enc(&q)));
        match resp {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(mut r) => Err(SinkError::Setup(format!(
                "InfluxDB refused CREATE DATABASE {db}: HTTP {} {} (create it yourself, or give a user allowed to)",
                r.status().as_u16(),
                read_limited(r.body_mut().as_reader()).trim()
            ))),
            Err(e) => Err(SinkError::Unreachable {
                what: self.describe(),
                err: e.to_string(),
            }),
        }
    }

    /// The write URL with its query string (credentials for v1 go in the query, as 1.x wants).
    pub fn write_url(&self) -> String {
        match &self.api {
            Api::V1 {
                db,
                rp,
                user,
                password,
            } => {
                let mut u = format!("{}/write?db={}&precision=ns", self.base, enc(db));
                if let Some(rp) = rp {
                    u += &format!("&rp={}", enc(rp));
                }
                if let (Some(user), Some(p)) = (user, password) {
                    u += &format!("&u={}&p={}", enc(user), enc(p));
                }
                u
            }
            Api::V2 { org, bucket, .. } => format!(
                "{}/api/v2/write?org={}&bucket={}&precision=ns",
                self.base,
                enc(org),
                enc(bucket)
            ),
        }
    }

    /// Headers of a write besides Content-Type: the v2 token, and gzip when on.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Api::V2 { token: Some(t), .. } = &self.api {
            h.push(("Authorization", format!("Token {t}")));
        }
        if self.gzip {
            h.push(("Content-Encoding", "gzip".to_string()));
        }
        h
    }
}

/// zlib's fastest level: on loopback or a LAN the bytes saved by a higher one cost more CPU
/// than they save (docs/benchmarks.md measures off against this).
pub const GZIP_LEVEL: u32 = 1;

/// The parts one after the other, gzip-compressed at `level` (1 fastest .. 9 smallest).
pub fn gzip_parts(parts: &[&[u8]], level: u32) -> Vec<u8> {
    use std::io::Write;
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(len / 4 + 64),
        flate2::Compression::new(level.clamp(1, 9)),
    );
    for p in parts {
        enc.write_all(p).expect("writing to a Vec cannot fail");
    }
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Percent-encode a query value.
fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// An InfluxQL identifier in double quotes, escaped.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn read_limited(r: impl Read) -> String {
    let mut text = String::new();
    r.take(1 << 20).read_to_string(&mut text).ok();
    text
}

/// The first column of a 1.x `SHOW ...` answer, or why it could not be had.
#[derive(Debug, PartialEq)]
enum Listing {
    Names(Vec<String>),
    Refused(String),
}

fn parse_listing(status: u16, body: &str) -> Listing {
    if !(200..300).contains(&status) {
        return Listing::Refused(format!("HTTP {status} {}", body.trim()));
    }
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return Listing::Refused(format!("unreadable answer: {e}")),
    };
    let first = &v["results"][0];
    if let Some(err) = first["error"].as_str() {
        return Listing::Refused(err.to_owned());
    }
    let names = first["series"][0]["values"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r[0].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Listing::Names(names)
}

/// What a v2 `GET /api/v2/buckets?org=&name=` answer means for start-up.
fn v2_verdict(
    base: &str,
    org: &str,
    bucket: &str,
    status: u16,
    body: &str,
) -> Result<(), SinkError> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let message = v["message"].as_str().unwrap_or("");
    match status {
        200 => match v["buckets"].as_array() {
            Some(b) if b.iter().any(|b| b["name"].as_str() == Some(bucket)) => Ok(()),
            Some(_) => Err(SinkError::NotFound(format!(
                "InfluxDB at {base} has no bucket {bucket:?} in organisation {org:?}: create it (influx bucket create --org {org} --name {bucket}) or fix --influx-bucket"
            ))),
            None => {
                tracing::info!(url = %base, "InfluxDB's bucket list is not in the expected shape; not checking the bucket");
                Ok(())
            }
        },
        404 if message.contains("organization") => Err(SinkError::NotFound(format!(
            "InfluxDB at {base} has no organisation {org:?} ({message}): fix --influx-org"
        ))),
        401 | 403 => Err(SinkError::Setup(format!(
            "InfluxDB at {base} refused the token (HTTP {status} {message}): check --influx-token; it needs read access to buckets and write access to {bucket:?}"
        ))),
        _ => {
            // 1.8 and 3.x take /api/v2/write but have no buckets API: nothing to check.
            tracing::info!(url = %base, status, "InfluxDB has no v2 buckets API; not checking org and bucket");
            Ok(())
        }
    }
}

impl Sink for Influx {
    fn write(&self, parts: &[&[u8]]) -> Result<Response, SinkError> {
        let mut req = self
            .http
            .post(&self.write_url())
            .header("Content-Type", "text/plain; charset=utf-8");
        for (k, v) in self.headers() {
            req = req.header(k, &v);
        }
        let payload = if self.gzip {
            gzip_parts(parts, GZIP_LEVEL)
        } else {
            parts.concat()
        };
        let mut resp = req.send(&payload[..]).map_err(|e| SinkError::Unreachable {
            what: self.describe(),
            err: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .take(1 << 20)
            .read_to_string(&mut text)
            .ok();
        Ok(Response {
            status,
            retry_after,
            body: text,
        })
    }

    /// Check that what we write to exists, once at start-up (and again after a 404), so a
    /// typo is a loud start-up error rather than a 503 on every report.
    /// - v1: a missing database is created, as Telegraf does, unless
    ///   [`Influx::create_database`] turned that off; either way a warning names it and the
    ///   URL. A missing retention policy is [`SinkError::NotFound`]: we never invent one.
    /// - v2: a missing organisation or bucket is [`SinkError::NotFound`]; servers without the
    ///   buckets API (1.8's and 3.x's v2 write endpoint) are only written to.
    fn prepare(&self) -> Result<(), SinkError> {
        match &self.api {
            Api::V1 { db, rp, .. } => {
                match self.v1_list("SHOW DATABASES")? {
                    Listing::Names(names) if names.iter().any(|n| n == db) => {}
                    Listing::Names(_) if !self.create_database => {
                        tracing::warn!(db = %db, url = %self.base, "InfluxDB has no such database and --influx-skip-database-creation is set: writes fail until it is created (CREATE DATABASE, or fix --influx-db)");
                    }
                    Listing::Names(_) => {
                        tracing::warn!(db = %db, url = %self.base, "InfluxDB had no such database; creating it (if that name is a typo, fix --influx-db; --influx-skip-database-creation turns creation off)");
                        self.create_db(db)?;
                    }
                    Listing::Refused(why) => {
                        // A user with write rights only may not list databases: write anyway.
                        tracing::warn!(db = %db, url = %self.base, reason = %why, "cannot list InfluxDB databases; not checking that the database exists");
                    }
                }
                if let Some(rp) = rp {
                    let q = format!("SHOW RETENTION POLICIES ON {}", quote_ident(db));
                    match self.v1_list(&q)? {
                        Listing::Names(names) if names.iter().any(|n| n == rp) => {}
                        Listing::Names(names) => {
                            return Err(SinkError::NotFound(format!(
                                "InfluxDB at {} has no retention policy {rp:?} on database {db:?} (it has: {}): create it (CREATE RETENTION POLICY {} ON {} DURATION 30d REPLICATION 1) or fix --influx-rp",
                                self.base,
                                names.join(", "),
                                quote_ident(rp),
                                quote_ident(db)
                            )))
                        }
                        Listing::Refused(why) => {
                            tracing::warn!(db = %db, rp = %rp, url = %self.base, reason = %why, "cannot list retention policies; not checking that --influx-rp exists");
                        }
                    }
                }
                Ok(())
            }
            Api::V2 { org, bucket, token } => {
                let url = format!(
                    "{}/api/v2/buckets?org={}&name={}",
                    self.base,
                    enc(org),
                    enc(bucket)
                );
                let mut req = self.http.get(&url);
                if let Some(t) = token {
                    req = req.header("Authorization", &format!("Token {t}"));
                }
                let mut r = req.call().map_err(|e| SinkError::Unreachable {
                    what: self.describe(),
                    err: e.to_string(),
                })?;
                let status = r.status().as_u16();
                let body = read_limited(r.body_mut().as_reader());
                v2_verdict(&self.base, org, bucket, status, &body)
            }
        }
    }

    fn describe(&self) -> String {
        match &self.api {
            Api::V1 { db, rp, .. } => format!(
                "InfluxDB v1 API at {} (db {db}{})",
                self.base,
                rp.as_ref().map(|r| format!(", rp {r}")).unwrap_or_default()
            ),
            Api::V2 { org, bucket, .. } => format!(
                "InfluxDB v2 API at {} (org {org}, bucket {bucket})",
                self.base
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shapes() {
        let v1 = Influx::new(
            "http://db:8086/",
            Api::V1 {
                db: "phoenix".into(),
                rp: Some("week".into()),
                user: Some("u".into()),
                password: Some("p&q".into()),
            },
            true,
            Duration::from_secs(1),
        );
        assert_eq!(
            v1.write_url(),
            "http://db:8086/write?db=phoenix&precision=ns&rp=week&u=u&p=p%26q"
        );
        assert_eq!(v1.headers(), vec![("Content-Encoding", "gzip".to_string())]);
        let v2 = Influx::new(
            "http://db:8086",
            Api::V2 {
                org: "my org".into(),
                bucket: "b".into(),
                token: Some("t0k".into()),
            },
            false,
            Duration::from_secs(1),
        );
        assert_eq!(
            v2.write_url(),
            "http://db:8086/api/v2/write?org=my%20org&bucket=b&precision=ns"
        );
        assert_eq!(
            v2.headers(),
            vec![("Authorization", "Token t0k".to_string())]
        );
    }

    #[test]
    fn listings_and_v2_answers() {
        let body = r#"{"results":[{"statement_id":0,"series":[{"name":"databases","columns":["name"],"values":[["_internal"],["phoenix"]]}]}]}"#;
        assert_eq!(
            parse_listing(200, body),
            Listing::Names(vec!["_internal".into(), "phoenix".into()])
        );
        let none = r#"{"results":[{"statement_id":0}]}"#;
        assert_eq!(parse_listing(200, none), Listing::Names(vec![]));
        let err = r#"{"results":[{"statement_id":0,"error":"database not found: x"}]}"#;
        assert!(matches!(parse_listing(200, err), Listing::Refused(e) if e.contains("not found")));
        assert!(matches!(parse_listing(401, "{}"), Listing::Refused(e) if e.contains("401")));
        let b = "http://db:8086";
        let found = r#"{"buckets":[{"name":"metrics","id":"1"}]}"#;
        assert!(v2_verdict(b, "o", "metrics", 200, found).is_ok());
        let e = v2_verdict(b, "o", "metrix", 200, r#"{"buckets":[]}"#).unwrap_err();
        assert!(
            matches!(&e, SinkError::NotFound(m) if m.contains("\"metrix\"")),
            "{e}"
        );
        let org = r#"{"code":"not found","message":"organization name \"nope\" not found"}"#;
        let e = v2_verdict(b, "nope", "metrics", 404, org).unwrap_err();
        assert!(
            matches!(&e, SinkError::NotFound(m) if m.contains("--influx-org")),
            "{e}"
        );
        // 1.8 and 3.x: no buckets API; only written to.
        assert!(v2_verdict(b, "o", "metrics", 404, "404 page not found").is_ok());
        assert!(v2_verdict(b, "o", "metrics", 401, "{}").is_err());
    }
}
