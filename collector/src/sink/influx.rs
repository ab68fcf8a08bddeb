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
            http: ureq::Agent::new_with_config(cfg),
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

impl Sink for Influx {
    fn write(&self, body: &[u8]) -> Result<Response, SinkError> {
        let mut req = self
            .http
            .post(&self.write_url())
            .header("Content-Type", "text/plain; charset=utf-8");
        for (k, v) in self.headers() {
            req = req.header(k, &v);
        }
        let payload = if self.gzip {
            phoenix_wire::gzip(body)
        } else {
            body.to_vec()
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

    /// 1.x: create the database if it is missing (as Telegraf does); 2.x buckets are made by
    /// their owners, so only say clearly when it is missing.
    fn prepare(&self) -> Result<(), SinkError> {
        match &self.api {
            Api::V1 {
                db, user, password, ..
            } => {
                let mut url = format!("{}/query", self.base);
                if let (Some(u), Some(p)) = (user, password) {
                    url += &format!("?u={}&p={}", enc(u), enc(p));
                }
                let q = format!(
                    "CREATE DATABASE \"{}\"",
                    db.replace('\\', "\\\\").replace('"', "\\\"")
                );
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
                        r.body_mut().read_to_string().unwrap_or_default().trim()
                    ))),
                    Err(e) => Err(SinkError::Unreachable { what: self.describe(), err: e.to_string() }),
                }
            }
            Api::V2 { .. } => Ok(()),
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
}
