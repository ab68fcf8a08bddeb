//! An agent started under a lower open-file limit (`ulimit -n`), set in the child between
//! fork and exec so it holds from the agent's first instruction.

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::{bin, rand_u64, Agent, Proc, AGENT_TOKEN};

impl Agent {
    /// Like [`Agent::start`], with RLIMIT_NOFILE (soft and hard) at `nofile`.
    pub fn start_with_nofile(
        collector: &str,
        instance_id: &str,
        extra: &[&str],
        nofile: u64,
    ) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Agent {
            state_dir: tmp.path().join("state"),
            instance_id: instance_id.into(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            collector: collector.into(),
            proc: None,
            _tmp: tmp,
        };
        a.up_with_nofile(nofile);
        a
    }

    /// Like [`Agent::up`], under RLIMIT_NOFILE `nofile`.
    pub fn up_with_nofile(&mut self, nofile: u64) {
        let mut cmd = Command::new(bin("phoenix-agent"));
        cmd.arg("run")
            .args(["--collector", &self.collector, "--token", AGENT_TOKEN])
            .args(["--instance-id", &self.instance_id, "--image-id", "img-test"])
            .args(["--interval", "1s"])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.args)
            .env("PHOENIX_LOG_LEVEL", "info");
        let lim = libc::rlimit {
            rlim_cur: nofile,
            rlim_max: nofile,
        };
        // SAFETY: setrlimit is async-signal-safe and touches only the child being exec'd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log = self._tmp.path().join(format!("agent-{}.log", rand_u64()));
        self.proc = Some(Proc::spawn(cmd, log));
    }
}
