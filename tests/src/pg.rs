//! A throw-away PostgreSQL per test, as `Influx` is a throw-away influxd: `initdb` into a
//! temp dir, a free loopback port, `listen_addresses = 127.0.0.1`, trust auth for loopback
//! TCP only (no unix-socket or remote lines in pg_hba.conf), and helpers to stop, restart
//! and kill it for the fault tests.
//!
//! PostgreSQL refuses to run as root, and the tests run as root in CI; then every server
//! binary runs as the `postgres` user through `runuser -u postgres --` with an argv (never a
//! shell string), and the temp dir is chowned to that user. As any other user the binaries
//! run directly.
//!
//! Env: `PHOENIX_TEST_PGBIN` names the directory of initdb/pg_ctl/postgres/psql
//! (default `/usr/lib/postgresql/15/bin`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{free_port, wait_for};

/// Name of the database the harness creates for the collectors.
pub const PG_DB: &str = "phoenix";

fn pg_bin_dir() -> PathBuf {
    std::env::var_os("PHOENIX_TEST_PGBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Looks up the uid/gid of `postgres` in /etc/passwd (the Debian package creates it).
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return (f[2].parse().unwrap(), f[3].parse().unwrap());
        }
    }
    panic!("no `postgres` user: install the `postgresql` package (see .ci/packages)");
}

/// A command for the PostgreSQL binary `name`, run as `postgres` when we are root.
fn pg_cmd(name: &str) -> Command {
    let path = pg_bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: install `postgresql` or set PHOENIX_TEST_PGBIN",
        path.display()
    );
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run_ok(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PostgreSQL server of its own, stopped (immediate mode) when dropped.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    running: bool,
}

impl Postgres {
    /// initdb, configure, start, and create the `phoenix` database.
    pub fn start() -> Postgres {
        Self::start_with(&[])
    }

    /// `extra_conf` lines are appended to postgresql.conf (e.g.
    /// `shared_preload_libraries = 'pg_stat_statements'`).
    pub fn start_with(extra_conf: &[&str]) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown of the PostgreSQL temp dir to postgres");
        }
        let mut pg = Postgres {
            dir,
            port: free_port(),
            running: false,
        };
        let mut init = pg_cmd("initdb");
        init.args(["-D"])
            .arg(pg.data_dir())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"]);
        run_ok(init, "initdb");

        // Loopback TCP only; the socket lives in the temp dir so nothing shared is touched.
        // fsync off survives a killed server (the kernel keeps the pages); commits stay
        // synchronous, or a `kill` would lose the last ones and the fault tests would lie.
        let mut conf = format!(
            "\n# phoenix test harness\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{sock}'\nfsync = off\n\
             max_connections = 200\nlogging_collector = off\n",
            port = pg.port,
            sock = pg.dir.path().display(),
        );
        for l in extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        let conf_path = pg.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        std::fs::write(
            pg.data_dir().join("pg_hba.conf"),
            "# phoenix test harness: trust, loopback TCP only\n\
             host all all 127.0.0.1/32 trust\n",
        )
        .unwrap();

        pg.up();
        pg.psql("postgres", &format!("CREATE DATABASE {PG_DB}"));
        pg
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The URL a collector takes as `--fleet-store`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{PG_DB}", self.port)
    }

    /// (Re)start on the same port and data; waits until it takes connections.
    pub fn up(&mut self) {
        let mut c = pg_cmd("pg_ctl");
        c.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"]);
        let out = c.output().expect("running pg_ctl start");
        if !out.status.success() {
            panic!(
                "pg_ctl start failed: {}\n{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        self.running = true;
        let ok = wait_for(Duration::from_secs(30), || {
            self.try_psql("postgres", "SELECT 1")
                .filter(|s| s.trim() == "1")
                .map(|_| ())
        });
        assert!(
            ok.is_some(),
            "PostgreSQL does not answer; log:\n{}",
            self.log_text()
        );
    }

    /// Clean stop (`pg_ctl stop -m fast`: open sessions are cut, as in a failover).
    pub fn down(&mut self) {
        self.stop_mode("fast");
    }

    /// The postmaster and every backend SIGKILLed: a crash. The next `up` runs recovery.
    pub fn kill(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            // SAFETY: kill(2) of the postmaster we started; backends die with it below.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_for(Duration::from_secs(10), || {
                // SAFETY: signal 0 only probes whether the pid still exists.
                (unsafe { libc::kill(pid, 0) } != 0).then_some(())
            });
        }
        // Orphaned backends notice the dead postmaster and exit; stop -m immediate cleans up
        // whatever is left so the next start does not find the port taken.
        self.stop_mode("immediate");
        self.running = false;
    }

    fn stop_mode(&mut self, mode: &str) {
        if !self.data_dir().join("postmaster.pid").exists() {
            self.running = false;
            return;
        }
        let mut c = pg_cmd("pg_ctl");
        c.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        c.output().ok();
        self.running = false;
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs one SQL text in `db` with psql (unaligned, tuples only); its stdout, or None when
    /// psql failed (server down, SQL error).
    pub fn try_psql(&self, db: &str, sql: &str) -> Option<String> {
        let mut c = Command::new(psql_path());
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5");
        let out = c.output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// As `try_psql`, panicking with psql's message on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut c = Command::new(psql_path());
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql]);
        let out = run_ok(c, &format!("psql {sql}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One value from the `phoenix` database, trimmed.
    pub fn scalar(&self, sql: &str) -> String {
        self.psql(PG_DB, sql).trim().to_string()
    }
}

fn psql_path() -> PathBuf {
    let p = pg_bin_dir().join("psql");
    if p.exists() {
        p
    } else {
        Path::new("psql").to_path_buf()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            self.stop_mode("immediate");
        }
    }
}

/// CPU seconds (user + system) used so far by the postmaster and all its backends.
pub fn server_cpu_s(pg: &Postgres) -> f64 {
    let Some(master) = pg.postmaster_pid() else {
        return 0.0;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces), from field 3 on.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let pid: i32 = head
            .split(' ')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let f: Vec<&str> = rest.split(' ').collect();
        let ppid: i32 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if pid == master || ppid == master {
            let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            total += (ut + st) / hz;
        }
    }
    total
}
