//! A real bake: a minimal Debian root filesystem (debootstrap, cached between runs) stands in for
//! the stock cloud image. The Packer template's own provisioners are carried out on it: its file
//! provisioners' sources copied to their destinations, its shell provisioner's inline steps run
//! as one script in a chroot, exactly as evaluated from the HCL. Then instances are started from
//! copies of the baked tree, each agent chrooted in its own mount namespace with the systemd
//! unit's identity (an unprivileged uid whose only capability is CAP_DAC_READ_SEARCH), and the
//! copy changed by hand is the one the collector reports drifted.
//!
//! Needs root, debootstrap and the Debian mirror apt uses (first run only), buildah for the
//! container image.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hcl::eval::{Context, Evaluate};
use phoenix_e2e::{wait_for, Collector, Proc, PIPELINE_TOKEN, READER_TOKEN};

/// The systemd unit's DynamicUser stand-in: a uid with no entry and no rights of its own.
const AGENT_UID: &str = "61873";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn must(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed:\n{}", text(&o));
    o
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bake test chroots and mounts: run it as root (CI does)"
    );
}

/// The cached stock root filesystem; built on first use (about 4 minutes here).
fn rootfs() -> PathBuf {
    require_root();
    let script = root().join("image-snippets/test/debootstrap-cache.sh");
    let o = must(Command::new("sh").arg(script));
    let dir = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .expect("the script prints the tree")
        .to_string();
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("usr/bin/cloud-init").exists(),
        "{} has no cloud-init",
        dir.display()
    );
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    must(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Write `content` at `path` inside `tree`, creating parents.
fn put(tree: &Path, path: &str, content: &str, mode: u32) {
    let p = tree.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a VM booted from the stock image has by the time Packer's provisioners run, and what an
/// instance gets at its own first boot: all of it must stay out of "drifted".
fn boot(tree: &Path, host: &str, seed: u8) {
    put(
        tree,
        "/etc/machine-id",
        &format!("{:032x}\n", u128::from(seed) * 0x1234_5678_9abc_def1),
        0o444,
    );
    put(tree, "/etc/hostname", &format!("{host}\n"), 0o644);
    put(
        tree,
        "/etc/ssh/ssh_host_ed25519_key",
        &format!("private key of {host}\n"),
        0o600,
    );
    put(
        tree,
        "/etc/ssh/ssh_host_ed25519_key.pub",
        &format!("ssh-ed25519 AAAA{seed} root@{host}\n"),
        0o644,
    );
    put(tree, "/var/lib/cloud/instance/obj.pkl", host, 0o600);
    put(
        tree,
        "/var/log/cloud-init.log",
        &format!("booted {host}\n"),
        0o644,
    );
}

struct Baked {
    image: PathBuf,
    image_id: String,
}

/// Carry out the Packer template's provisioners on `image`, with `vars` for its variables.
fn packer_provision(image: &Path, vars: &[(&str, String)], image_id: &str) {
    let tpl = std::fs::read_to_string(root().join("image-snippets/packer/phoenix-agent.pkr.hcl"))
        .unwrap();
    let body = hcl::parse(&tpl).expect("HCL2");
    let mut var = hcl::Map::new();
    for (k, v) in vars {
        var.insert(k.to_string(), hcl::Value::from(v.clone()));
    }
    let mut local = hcl::Map::new();
    local.insert("image_id".to_string(), hcl::Value::from(image_id));
    let mut ctx = Context::new();
    ctx.declare_var("var", hcl::Value::Object(var));
    ctx.declare_var("local", hcl::Value::Object(local));
    let eval_str = |e: &hcl::Expression| match e
        .evaluate(&ctx)
        .unwrap_or_else(|err| panic!("evaluating {e}: {err}"))
    {
        hcl::Value::String(s) => s,
        other => panic!("{e} is {other:?}, not a string"),
    };
    let eval_list = |e: &hcl::Expression| match e
        .evaluate(&ctx)
        .unwrap_or_else(|err| panic!("evaluating {e}: {err}"))
    {
        hcl::Value::Array(a) => a
            .into_iter()
            .map(|v| v.as_str().expect("strings").to_string())
            .collect::<Vec<_>>(),
        other => panic!("{e} is {other:?}, not a list"),
    };
    let build = body.blocks().find(|b| b.identifier() == "build").unwrap();
    let mut shells = 0;
    for p in build
        .body()
        .blocks()
        .filter(|b| b.identifier() == "provisioner")
    {
        let attr = |k: &str| {
            p.body()
                .attributes()
                .find(|a| a.key() == k)
                .map(|a| a.expr().clone())
        };
        match p.labels()[0].as_str() {
            "file" => {
                let src = PathBuf::from(eval_str(&attr("source").unwrap()));
                let src = if src.is_absolute() {
                    src
                } else {
                    root().join(src)
                };
                let dest =
                    image.join(eval_str(&attr("destination").unwrap()).trim_start_matches('/'));
                std::fs::copy(&src, &dest).unwrap_or_else(|e| {
                    panic!(
                        "file provisioner {} -> {}: {e}",
                        src.display(),
                        dest.display()
                    )
                });
            }
            "shell" => {
                shells += 1;
                // Packer joins inline steps into one script and runs it with execute_command.
                let steps = eval_list(&attr("inline").unwrap());
                let script = format!("{}\n", steps.join("\n"));
                std::fs::write(image.join("tmp/packer-shell.sh"), script).unwrap();
                let exec = eval_str(&attr("execute_command").unwrap());
                let exec = exec
                    .strip_prefix("sudo -E ")
                    .expect("the steps need root: execute_command runs sudo -E")
                    .replace("{{ .Path }}", "/tmp/packer-shell.sh");
                let mut cmd = Command::new("chroot");
                cmd.arg(image)
                    .args(["sh", "-c", &exec])
                    .env_clear()
                    .env("PATH", PATH_ENV)
                    .env("HOME", "/root");
                for kv in attr("environment_vars")
                    .map(|e| eval_list(&e))
                    .unwrap_or_default()
                {
                    let (k, v) = kv.split_once('=').unwrap();
                    cmd.env(k, v);
                }
                let o = must(&mut cmd);
                assert!(
                    String::from_utf8_lossy(&o.stdout).contains("registered with"),
                    "bake did not register:\n{}",
                    text(&o)
                );
                std::fs::remove_file(image.join("tmp/packer-shell.sh")).unwrap();
            }
            other => panic!("no emulation for a {other} provisioner"),
        }
    }
    assert_eq!(shells, 1);
}

/// The phoenix-agent package, made by `scripts/build-deb.sh` from the binary just built.
fn agent_deb(dir: &Path) -> PathBuf {
    let bin_dir = phoenix_e2e::bin("phoenix-agent")
        .parent()
        .unwrap()
        .to_path_buf();
    let o = must(
        Command::new(root().join("scripts/build-deb.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(dir.join("debs"))
            .arg("agent")
            .env("DEB_COMPRESSION", "none"),
    );
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn bake(dir: &Path, collector: &str) -> Baked {
    let image = dir.join("image");
    copy_tree(&rootfs(), &image);
    boot(&image, "packer-build", 1);
    // The application's own provisioning, before Phoenix's: one config readable only by root.
    put(
        &image,
        "/opt/app/config/app.conf",
        "listen = 8080\nworkers = 4\n",
        0o644,
    );
    put(
        &image,
        "/etc/app/secret.conf",
        "db_password = hunter2\n",
        0o600,
    );

    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, format!("collector = \"{collector}\"\ntoken_file = \"/etc/phoenix-agent/token\"\ninterval = \"1s\"\ndrift_path = [\"/etc\", \"/opt/app/config\"]\ngroup = \"web\"\n")).unwrap();
    let image_id = format!("phoenix-web-test-{}", std::process::id());
    let vars = [
        ("collector_url", collector.to_string()),
        ("pipeline_token", PIPELINE_TOKEN.to_string()),
        ("agent_token", phoenix_e2e::AGENT_TOKEN.to_string()),
        ("agent_deb", agent_deb(dir).display().to_string()),
        (
            "snippets_dir",
            root().join("image-snippets").display().to_string(),
        ),
        ("agent_config", cfg.display().to_string()),
    ];
    packer_provision(&image, &vars, &image_id);
    Baked { image, image_id }
}

/// The systemd unit's identity, by setpriv: DynamicUser (a bare uid), NoNewPrivileges, and
/// CAP_DAC_READ_SEARCH as the only ambient and bounding capability.
const UNIT_IDENTITY: [&str; 11] = [
    "setpriv",
    "--reuid",
    AGENT_UID,
    "--regid",
    AGENT_UID,
    "--clear-groups",
    "--no-new-privs",
    "--inh-caps=-all,+dac_read_search",
    "--ambient-caps=-all,+dac_read_search",
    "--bounding-set=-all,+dac_read_search",
    "--",
];

/// `chroot TREE setpriv <the unit's identity> ARGS`: what systemd runs, minus systemd.
fn as_unit(tree: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(tree)
        .args(UNIT_IDENTITY)
        .args(args)
        .env_clear()
        .env("PATH", PATH_ENV)
        .env("PHOENIX_STATE_DIR", "/var/lib/phoenix-agent");
    cmd
}

/// Name and wait channel of each thread of `pid`: where a stuck agent is stuck.
fn threads(pid: u32) -> String {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let r = |f: &str| {
            std::fs::read_to_string(t.path().join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push(format!(
            "{}({})@{}",
            r("comm"),
            t.file_name().to_string_lossy(),
            r("wchan")
        ));
    }
    out.join(" ")
}

#[test]
fn baked_image_copies_are_clean_until_one_is_changed_by_hand() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let collector = Collector::start(&[]);
    let baked = bake(dir.path(), &collector.url());
    let img = &baked.image;

    // What the last provisioner must leave behind.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(img.join("usr/share/phoenix-agent/baseline.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["image_id"].as_str(), Some(baked.image_id.as_str()));
    assert_eq!(
        std::fs::read(img.join("etc/machine-id")).unwrap(),
        b"",
        "machine-id must be emptied"
    );
    let host_keys: Vec<_> = std::fs::read_dir(img.join("etc/ssh"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
        .collect();
    assert!(host_keys.is_empty(), "ssh host keys left in the image");
    assert!(
        !img.join("var/lib/cloud/instance").exists(),
        "cloud-init state left in the image"
    );
    for f in [
        "tmp/phoenix-agent.deb",
        "tmp/phoenix-agent.toml",
        "tmp/phoenix-install.sh",
    ] {
        assert!(!img.join(f).exists(), "{f} left in the image");
    }
    assert_eq!(
        std::fs::metadata(img.join("etc/phoenix-agent/token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(img
        .join("etc/systemd/system/multi-user.target.wants/phoenix-agent.service")
        .is_symlink());
    // Installed by dpkg from the package: dpkg knows it, the files are where the package puts
    // them, its unit passes systemd-analyze verify in the image, and no user was created.
    let st = must(Command::new("chroot").arg(img).args([
        "dpkg-query",
        "-W",
        "-f",
        "${Status} ${Version}",
        "phoenix-agent",
    ]));
    assert!(
        String::from_utf8_lossy(&st.stdout).starts_with("install ok installed"),
        "{}",
        text(&st)
    );
    let unit_path = img.join("lib/systemd/system/phoenix-agent.service");
    assert!(unit_path.is_file(), "the package's unit");
    assert!(img.join("usr/bin/phoenix-agent").is_file());
    let verify = Command::new("chroot")
        .arg(img)
        .args([
            "systemd-analyze",
            "verify",
            "/lib/systemd/system/phoenix-agent.service",
        ])
        .env_clear()
        .env("PATH", PATH_ENV)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "systemd-analyze verify in the image:\n{}",
        text(&verify)
    );
    let passwd = std::fs::read_to_string(img.join("etc/passwd")).unwrap();
    assert!(
        !passwd.contains("phoenix"),
        "the package must create no user (the unit's DynamicUser does): {passwd}"
    );
    let cfg = std::fs::read_to_string(img.join("etc/phoenix-agent/agent.toml")).unwrap();
    assert!(
        cfg.contains(&format!("image_id = \"{}\"", baked.image_id)),
        "{cfg}"
    );
    // Registered: the collector already has exactly this baseline.
    let again = phoenix_e2e::post(
        &format!("{}/v1/images/{}/baseline", collector.url(), baked.image_id),
        Some(PIPELINE_TOKEN),
        &[("Content-Type", "application/json")],
        &std::fs::read(img.join("usr/share/phoenix-agent/baseline.json")).unwrap(),
    );
    assert_eq!(
        again.status, 200,
        "the baseline was not registered by bake: {}",
        again.body
    );

    // Three instances from the one image; each boots (new machine-id, host keys, cloud-init run).
    let mut trees = Vec::new();
    for n in 1..=3u8 {
        let t = dir.path().join(format!("inst-{n}"));
        copy_tree(img, &t);
        boot(&t, &format!("web-{n}"), 10 + n);
        // systemd's StateDirectory=: created for, and owned by, the unit's user.
        let state = t.join("var/lib/phoenix-agent");
        std::fs::create_dir_all(&state).unwrap();
        must(
            Command::new("chown")
                .arg(format!("{AGENT_UID}:{AGENT_UID}"))
                .arg(&state),
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        trees.push(t);
    }
    // Someone logs into instance 2 and "just fixes" a config file.
    let conf = trees[1].join("opt/app/config/app.conf");
    let mut c = std::fs::read_to_string(&conf).unwrap();
    c.push_str("workers = 64\n");
    std::fs::write(&conf, c).unwrap();

    // `phoenix-agent drift` on each, with the unit's rights only: the 0600 secret is read through
    // CAP_DAC_READ_SEARCH, and only the changed copy differs.
    for (n, t) in trees.iter().enumerate() {
        let o = as_unit(t, &["/usr/bin/phoenix-agent", "drift"])
            .output()
            .unwrap();
        let out = text(&o);
        if n == 1 {
            assert_eq!(
                o.status.code(),
                Some(1),
                "the hand-changed copy must be drifted:\n{out}"
            );
            assert!(out.contains("/opt/app/config/app.conf"), "{out}");
            assert!(
                !out.contains("secret.conf")
                    && !out.contains("machine-id")
                    && !out.contains("ssh_host"),
                "{out}"
            );
        } else {
            assert_eq!(
                o.status.code(),
                Some(0),
                "untouched copy {} must be clean:\n{out}",
                n + 1
            );
        }
    }
    // Without the capability the same user cannot vouch for the root-only file: not "clean".
    let mut no_cap = Command::new("chroot");
    no_cap.arg(&trees[0]).args([
        "setpriv",
        "--reuid",
        AGENT_UID,
        "--regid",
        AGENT_UID,
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]);
    no_cap
        .args(["/usr/bin/phoenix-agent", "drift"])
        .env_clear()
        .env("PATH", PATH_ENV)
        .env("PHOENIX_STATE_DIR", "/var/lib/phoenix-agent");
    let o = no_cap.output().unwrap();
    assert_ne!(
        o.status.code(),
        Some(0),
        "without CAP_DAC_READ_SEARCH the secret cannot be hashed, so the copy cannot be clean:\n{}",
        text(&o)
    );

    // The agents themselves, as the unit starts them, each in its own mount namespace with
    // /proc, /sys and /dev of the host (an instance's kernel) bound into its tree.
    let unit = std::fs::read_to_string(unit_path).unwrap();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .to_string();
    let mut agents = Vec::new();
    for (n, t) in trees.iter().enumerate() {
        let id = format!("i-bake-{}", n + 1);
        let n = n + 1;
        let script = format!(
            "set -e; hostname web-{n}; for d in proc sys dev; do mount --rbind /$d \"$1/$d\"; done; exec chroot \"$1\" {} {exec_start} --instance-id {id}",
            UNIT_IDENTITY.join(" ")
        );
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(t)
        .env_clear()
        .env("PATH", PATH_ENV)
        .env("PHOENIX_STATE_DIR", "/var/lib/phoenix-agent")
        .env("PHOENIX_LOG_LEVEL", "debug");
        agents.push((
            id,
            Proc::spawn(cmd, dir.path().join(format!("agent-{n}.log"))),
        ));
    }
    for (n, (id, p)) in agents.iter().enumerate() {
        let inst = wait_for(Duration::from_secs(60), || {
            let r = collector.get(&format!("/v1/instances/{id}"), Some(READER_TOKEN));
            (r.status == 200).then(|| r.json()).filter(|v| v["drifted"].is_boolean())
        })
        .unwrap_or_else(|| {
            let seen = collector.get(&format!("/v1/instances/{id}"), Some(READER_TOKEN)).body;
            panic!("{id} never reported drift; collector has: {seen}\nagent threads: {}\nagent log:\n{}\ncollector log:\n{}", threads(p.pid()), p.log_text(), collector.log_text())
        });
        assert_eq!(
            inst["image_id"].as_str(),
            Some(baked.image_id.as_str()),
            "{inst}"
        );
        assert_eq!(inst["group"].as_str(), Some("web"), "{inst}");
        let drifted = inst["drifted"].as_bool().unwrap();
        let changes = inst["drift"]["changes"].to_string();
        if n == 1 {
            assert!(drifted, "the hand-changed instance must be drifted: {inst}");
            assert!(changes.contains("/opt/app/config/app.conf"), "{inst}");
            assert!(
                !changes.contains("secret.conf") && !changes.contains("machine-id"),
                "{inst}"
            );
        } else {
            assert!(
                !drifted,
                "untouched {id} must be clean: {inst}\nagent log:\n{}",
                p.log_text()
            );
        }
        assert!(
            inst["drift"]["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("registered")),
            "judged against the registered baseline: {inst}"
        );
        assert_eq!(
            inst["hostname"].as_str(),
            Some(format!("web-{}", n + 1).as_str()),
            "{inst}"
        );
        // The process really has the unit's identity: its uid, and one effective capability.
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap()
        };
        assert!(field("Uid:").iter().all(|u| *u == AGENT_UID), "{status}");
        // CAP_DAC_READ_SEARCH is capability 2: bit 0x4.
        assert_eq!(field("CapEff:"), ["0000000000000004"], "{status}");
        assert_eq!(field("CapBnd:"), ["0000000000000004"], "{status}");
        assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    }
    for (_, mut p) in agents {
        p.kill();
    }
}

#[test]
fn dockerfile_builds_on_the_debian_rootfs_and_runs_as_its_own_user() {
    let fs = rootfs();
    let store = tempfile::tempdir_in("/var/tmp").unwrap();
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(store.path().join("root"))
            .arg("--runroot")
            .arg(store.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c.current_dir(root()).env("BUILDAH_ISOLATION", "chroot");
        let o = c
            .output()
            .unwrap_or_else(|e| panic!("buildah: {e}; apt-get install buildah"));
        assert!(o.status.success(), "buildah {args:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // The debootstrap tree as the base image: no registry is reachable, and none is needed.
    let c = buildah(&["from", "scratch"]);
    buildah(&["copy", &c, fs.to_str().unwrap(), "/"]);
    buildah(&["commit", "--quiet", &c, "localhost/phoenix-test-base"]);
    buildah(&["rm", &c]);

    let agent = phoenix_e2e::bin("phoenix-agent");
    // The build context is the repo root; the binary must be inside it.
    let rel = agent
        .strip_prefix(root())
        .expect("the agent is built under the workspace")
        .to_str()
        .unwrap()
        .to_string();
    buildah(&[
        "build",
        "--pull-never",
        "--isolation",
        "chroot",
        "-f",
        "image-snippets/Dockerfile",
        "--build-arg",
        "BASE_IMAGE=localhost/phoenix-test-base",
        "--build-arg",
        &format!("AGENT_BINARY={rel}"),
        "-t",
        "localhost/phoenix-agent-test",
        ".",
    ]);
    let user = buildah(&[
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.OCIv1.Config.User}}",
        "localhost/phoenix-agent-test",
    ]);
    assert_eq!(user, "10001:10001");
    let c = buildah(&["from", "--pull-never", "localhost/phoenix-agent-test"]);
    let id = buildah(&["run", "--isolation", "chroot", &c, "--", "id", "-u"]);
    assert_eq!(id, "10001", "the agent's user in the image");
    let v = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &c,
        "--",
        "/usr/local/bin/phoenix-agent",
        "--version",
    ]);
    assert!(v.starts_with("phoenix-agent "), "{v}");
    // It can write its state directory and nothing else.
    buildah(&[
        "run",
        "--isolation",
        "chroot",
        &c,
        "--",
        "sh",
        "-c",
        "touch /var/lib/phoenix-agent/spool.test && ! touch /etc/phoenix-agent/x 2>/dev/null",
    ]);
    buildah(&["rm", &c]);
}
