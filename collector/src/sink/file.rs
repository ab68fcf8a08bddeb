//! The embedded default when no InfluxDB is configured: line protocol appended to one file
//! per day under `<data-dir>/influx/`, with the header `influx -import` expects, so the data
//! can be loaded into a real InfluxDB later without loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{Response, Sink, SinkError};

#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    db: String,
    open: Mutex<Option<(String, File)>>,
}

impl FileSink {
    pub fn new(dir: PathBuf, db: &str) -> Result<FileSink, SinkError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            SinkError::Setup(format!(
                "creating {}: {e} (check --data-dir)",
                dir.display()
            ))
        })?;
        Ok(FileSink {
            dir,
            db: db.into(),
            open: Mutex::new(None),
        })
    }

    fn day() -> String {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (y, m, d) = phoenix_wire::civil::civil_from_days((secs / 86400) as i64);
        format!("{y:04}-{m:02}-{d:02}")
    }
}

impl Sink for FileSink {
    fn write(&self, parts: &[&[u8]]) -> Result<Response, SinkError> {
        let day = Self::day();
        let mut g = self.open.lock().unwrap();
        if g.as_ref().map(|(d, _)| d != &day).unwrap_or(true) {
            let path = self.dir.join(format!("points-{day}.lp"));
            let fresh = !path.exists();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| SinkError::Unreachable {
                    what: path.display().to_string(),
                    err: e.to_string(),
                })?;
            if fresh {
                writeln!(f, "# DML\n# CONTEXT-DATABASE: {}", self.db).map_err(|e| {
                    SinkError::Unreachable {
                        what: path.display().to_string(),
                        err: e.to_string(),
                    }
                })?;
            }
            *g = Some((day, f));
        }
        let (_, f) = g.as_mut().expect("opened above");
        let res = parts
            .iter()
            .try_for_each(|p| f.write_all(p))
            .and_then(|_| f.sync_data());
        Ok(match res {
            Ok(()) => Response {
                status: 204,
                retry_after: None,
                body: String::new(),
            },
            Err(e) => {
                *g = None;
                Response {
                    status: 503,
                    retry_after: Some(std::time::Duration::from_secs(5)),
                    body: format!("writing {}: {e}", self.dir.display()),
                }
            }
        })
    }

    fn describe(&self) -> String {
        format!("line-protocol files in {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(phoenix_wire::civil::civil_from_days(0), (1970, 1, 1));
        assert_eq!(phoenix_wire::civil::civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(phoenix_wire::civil::civil_from_days(20_512), (2026, 2, 28));
    }
}
