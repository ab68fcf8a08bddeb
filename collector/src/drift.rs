//! Drift verdicts: which hash an instance should have, whether it drifted, and what changed.
//!
//! Pure functions, no I/O: the HTTP handlers and the fleet state feed them what they hold.
//! The order of authority is fixed: a baseline registered by the image pipeline, else the
//! baseline the agent reports, else the hash most instances of the same image agree on. An
//! agent can never replace a registered baseline: what it reports as its baseline is only
//! compared with it (a mismatch is flagged), never stored in its place.

use phoenix_wire::drift::{computes, diff, root_of_entries, Manifest, HASH_VERSION};
use phoenix_wire::{DriftState, FileChange};

/// Where the expected hash came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Registered,
    Agent,
    Majority,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Registered => "registered baseline",
            Reason::Agent => "agent baseline",
            Reason::Majority => "majority",
        }
    }
}

/// The judgement on one instance's latest drift state.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The hash the instance should have; None when nothing can tell (no baseline, no majority).
    pub expected: Option<String>,
    pub reason: Option<Reason>,
    pub drifted: bool,
    /// Which files differ and how, when it can be known (see [`judge`]).
    pub changes: Vec<FileChange>,
    /// The agent reports a baseline root other than the registered one: its baked copy was
    /// altered, or it was built from another image. The registered one still decides.
    pub agent_baseline_mismatch: bool,
    /// For a person: why the verdict is what it is, when that is not obvious.
    pub note: Option<String>,
}

/// The hash held by more than half of `hashes` (one per instance), if any.
pub fn majority<'a>(hashes: &[&'a str]) -> Option<&'a str> {
    let mut sorted: Vec<&str> = hashes.to_vec();
    sorted.sort_unstable();
    let mut best: Option<(&str, usize)> = None;
    for run in sorted.chunk_by(|a, b| a == b) {
        if best.is_none_or(|(_, n)| run.len() > n) {
            best = Some((run[0], run.len()));
        }
    }
    best.filter(|(_, n)| *n * 2 > hashes.len()).map(|(h, _)| h)
}

/// The expected hash and its source, by the order of authority.
pub fn expected_hash(
    registered_root: Option<&str>,
    agent_baseline: Option<&str>,
    peer_hashes: &[&str],
) -> Option<(String, Reason)> {
    if let Some(r) = registered_root {
        return Some((r.to_string(), Reason::Registered));
    }
    if let Some(a) = agent_baseline.filter(|a| !a.is_empty()) {
        return Some((a.to_string(), Reason::Agent));
    }
    majority(peer_hashes).map(|m| (m.to_string(), Reason::Majority))
}

/// Judge one instance. `peer_hashes` are the current hashes of every instance of the same
/// image, this one included; they matter only when there is no baseline at all.
///
/// The changed files come from diffing the registered baseline's entries with the entry list
/// the agent sent, or, against the agent's own baseline, from the changes the agent computed.
/// Against a majority hash there is no entry list to diff, so `changes` stays empty.
pub fn judge(registered: Option<&Manifest>, state: &DriftState, peer_hashes: &[&str]) -> Verdict {
    if let Some(why) = version_gap(registered, state) {
        // Hashes of two versions are never compared: an upgrade that changed the hashing
        // must not look like a drifted fleet. No verdict until both sides agree.
        return Verdict {
            expected: None,
            reason: None,
            drifted: false,
            changes: Vec::new(),
            agent_baseline_mismatch: false,
            note: Some(why),
        };
    }
    let mut notes = Vec::new();
    // An entry list that does not hash to the reported root means the report cannot be
    // trusted either way; it counts as drifted.
    let list_root = state.entries_list.as_deref().map(root_of_entries);
    let inconsistent = list_root.as_deref().is_some_and(|r| r != state.hash);
    if inconsistent {
        notes.push(
            "the entry list the agent sent does not hash to the root it reported".to_string(),
        );
    }
    let agent_baseline_mismatch = match (registered, state.baseline.as_deref()) {
        (Some(m), Some(a)) => m.root != a,
        _ => false,
    };
    if agent_baseline_mismatch {
        notes.push(
            "the agent's baseline differs from the registered one; the registered baseline decides"
                .to_string(),
        );
    }
    let Some((expected, reason)) = expected_hash(
        registered.map(|m| m.root.as_str()),
        state.baseline.as_deref(),
        peer_hashes,
    ) else {
        notes.push(format!(
            "no baseline registered or reported, and no majority among {} instances",
            peer_hashes.len()
        ));
        return Verdict {
            expected: None,
            reason: None,
            drifted: inconsistent,
            changes: Vec::new(),
            agent_baseline_mismatch,
            note: Some(notes.join("; ")),
        };
    };
    let drifted = state.hash != expected || inconsistent;
    let changes = if !drifted {
        Vec::new()
    } else {
        match (reason, registered, &state.entries_list) {
            (Reason::Registered, Some(m), Some(list)) => diff(&m.entries, list),
            (Reason::Registered, _, None) => {
                notes.push(
                    "the agent sent no entry list, so the changed files are unknown".to_string(),
                );
                Vec::new()
            }
            (Reason::Agent, _, _) => state.changes.clone(),
            _ => {
                if reason == Reason::Majority {
                    notes.push(format!("no baseline: compared with the hash most of the {} instances of this image have", peer_hashes.len()));
                }
                Vec::new()
            }
        }
    };
    let changes = keep_some(changes, &mut notes);
    Verdict {
        expected: Some(expected),
        reason: Some(reason),
        drifted,
        changes,
        agent_baseline_mismatch,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

/// Why `state` cannot be compared with the baseline that would decide, if it cannot: the
/// agent hashes with a version this collector does not compute, or the deciding baseline
/// (registered, else the agent's own) has another hash version than the agent's scan.
pub fn version_gap(registered: Option<&Manifest>, state: &DriftState) -> Option<String> {
    let scan = state.hash_version.unwrap_or(1);
    if !computes(scan) {
        return Some(format!(
            "no verdict: the agent hashes with drift hash version {scan}, which this collector (v{HASH_VERSION}) does not compute; upgrade the collector"
        ));
    }
    if let Some(m) = registered {
        if m.hash_version != scan {
            return Some(format!(
                "no verdict: the registered baseline has drift hash version {}, the agent's scan {scan}; re-register the baseline baked with this agent, or upgrade the agent",
                m.hash_version
            ));
        }
        return None;
    }
    let base = state.baseline_hash_version.unwrap_or(1);
    if state.baseline.is_some() && base != scan {
        return Some(format!(
            "no verdict: the agent's baseline has drift hash version {base}, its scan {scan}; bake the baseline with this agent, or upgrade the agent"
        ));
    }
    None
}

/// Changes kept per instance (fleet state, the page, `phoenix_drift`); the rest are counted.
pub const MAX_CHANGES_KEPT: usize = 1000;
/// Bytes of paths kept per instance: a thousand long paths must not cost megabytes each.
pub const MAX_CHANGE_BYTES: usize = 256 << 10;

/// The first changes within [`MAX_CHANGES_KEPT`] and [`MAX_CHANGE_BYTES`]; a note counts the rest.
/// One report with a million changes must not cost a million entries in memory and on disk.
fn keep_some(mut changes: Vec<FileChange>, notes: &mut Vec<String>) -> Vec<FileChange> {
    let all = changes.len();
    let mut bytes = 0usize;
    let mut keep = 0;
    for c in changes.iter_mut().take(MAX_CHANGES_KEPT) {
        // Decode already refused more than MAX_VALUES per change; this keeps older or
        // hand-made states within the same bound.
        c.values.truncate(phoenix_wire::drift::MAX_VALUES);
        let values: usize = c
            .values
            .iter()
            .map(|v| v.attr.len() + v.old.len() + v.new.len() + 8)
            .sum();
        bytes += c.path.len() + c.attrs.iter().map(String::len).sum::<usize>() + values + 16;
        if bytes > MAX_CHANGE_BYTES {
            break;
        }
        keep += 1;
    }
    if keep < all {
        changes.truncate(keep);
        changes.shrink_to_fit();
        notes.push(format!(
            "{all} files changed; the first {keep} are listed (the agent's own `phoenix-agent drift` lists all)"
        ));
    }
    changes
}

/// What a baseline registration does to the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// First baseline for this image: 201.
    Created,
    /// The same root again (a retried pipeline step): 200, nothing changes.
    Unchanged,
    /// The pipeline re-baked the image: 200, the new one replaces it. Only the pipeline token
    /// gets here; agents have no path to this function.
    Replaced { old_root: String },
}

/// Check a registration for `url_image_id` (from the path): the manifest must be internally
/// consistent (version, order, root over entries) and name the same image.
pub fn check_registration(
    url_image_id: &str,
    m: &Manifest,
    existing: Option<&Manifest>,
) -> Result<Registration, String> {
    if !phoenix_wire::valid_id(url_image_id) {
        return Err(format!("image id {url_image_id:?} in the URL is not a valid id (1-128 chars of A-Z a-z 0-9 - _ . : /)"));
    }
    m.verify()?;
    if m.image_id != url_image_id {
        return Err(format!(
            "the manifest is for image {:?} but was posted to /v1/images/{url_image_id}/baseline",
            m.image_id
        ));
    }
    Ok(match existing {
        None => Registration::Created,
        Some(old) if old.root == m.root => Registration::Unchanged,
        Some(old) => Registration::Replaced {
            old_root: old.root.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_changes_keep_a_thousand_and_a_count() {
        let changes: Vec<FileChange> = (0..1_000_000)
            .map(|i| FileChange {
                path: format!("/etc/f{i}"),
                change: "added".into(),
                attrs: vec![],
                values: vec![],
            })
            .collect();
        let state = DriftState {
            hash: "x".into(),
            baseline: Some("y".into()),
            changes,
            ..Default::default()
        };
        let v = judge(None, &state, &[]);
        assert!(v.drifted);
        assert_eq!(v.changes.len(), MAX_CHANGES_KEPT);
        assert!(v.note.unwrap().contains("1000000 files changed"));
        let long: Vec<FileChange> = (0..900)
            .map(|i| FileChange {
                path: format!("/{i}/{}", "a".repeat(4000)),
                change: "added".into(),
                attrs: vec![],
                values: vec![],
            })
            .collect();
        let v = judge(
            None,
            &DriftState {
                changes: long,
                ..state
            },
            &[],
        );
        assert!(v.changes.len() < 100, "{}", v.changes.len());
    }
    use phoenix_wire::drift::MANIFEST_VERSION;
    use phoenix_wire::FileEntry;

    fn file(path: &str, content: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: 'f',
            mode: 0o644,
            uid: 0,
            gid: 0,
            hash: content.into(),
            target: None,
            error: None,
            size: None,
        }
    }

    fn manifest(entries: Vec<FileEntry>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            hash_version: phoenix_wire::drift::HASH_VERSION,
            image_id: "img-1".into(),
            created: "2024-01-01T00:00:00Z".into(),
            paths: vec!["/etc".into()],
            excludes: vec![],
            root: root_of_entries(&entries),
            entries,
        }
    }

    fn state(entries: Vec<FileEntry>, baseline: Option<&str>) -> DriftState {
        DriftState {
            hash: root_of_entries(&entries),
            baseline: baseline.map(str::to_string),
            entries: entries.len() as u64,
            entries_list: Some(entries),
            ..Default::default()
        }
    }

    #[test]
    fn majority_needs_more_than_half() {
        assert_eq!(majority(&["a", "a", "b"]), Some("a"));
        assert_eq!(majority(&["a", "b"]), None);
        assert_eq!(majority(&["a", "a", "b", "b"]), None);
        assert_eq!(majority(&["x"]), Some("x"));
        assert_eq!(majority(&[]), None);
    }

    #[test]
    fn registered_baseline_wins_over_a_forged_agent_baseline() {
        let good = vec![file("/etc/passwd", "p1"), file("/etc/sudoers", "s1")];
        let reg = manifest(good.clone());
        // The agent tampered with sudoers and reports a baseline baked from the tampered tree.
        let tampered = vec![file("/etc/passwd", "p1"), file("/etc/sudoers", "evil")];
        let forged = root_of_entries(&tampered);
        let st = state(tampered.clone(), Some(&forged));
        let v = judge(Some(&reg), &st, &[st.hash.as_str()]);
        assert!(v.drifted);
        assert_eq!(v.reason, Some(Reason::Registered));
        assert_eq!(v.expected.as_deref(), Some(reg.root.as_str()));
        assert!(v.agent_baseline_mismatch);
        assert_eq!(
            v.changes,
            vec![FileChange {
                path: "/etc/sudoers".into(),
                change: "changed".into(),
                attrs: vec!["content".into()],
                // The collector's own diff against the registered baseline shows hashes.
                values: vec![phoenix_wire::AttrValue {
                    attr: "content".into(),
                    old: "s1".into(),
                    new: "evil".into(),
                }],
            }]
        );
        // Without a registered baseline the forged one would have passed: that is the point.
        assert!(!judge(None, &st, &[st.hash.as_str()]).drifted);
        // A clean instance is clean against the registered baseline.
        let clean = state(good, Some(&reg.root));
        let v = judge(Some(&reg), &clean, &[]);
        assert!(
            !v.drifted && v.changes.is_empty() && !v.agent_baseline_mismatch && v.note.is_none()
        );
    }

    #[test]
    fn agent_baseline_then_majority() {
        let base = vec![file("/etc/a", "1")];
        let now = vec![file("/etc/a", "2")];
        let mut st = state(now.clone(), Some(&root_of_entries(&base)));
        st.changes = phoenix_wire::drift::diff(&base, &now);
        let v = judge(None, &st, &[]);
        assert_eq!(
            (v.reason, v.drifted, v.changes.len()),
            (Some(Reason::Agent), true, 1)
        );

        let odd = state(now, None);
        let norm = root_of_entries(&base);
        let peers = [norm.as_str(), norm.as_str(), odd.hash.as_str()];
        let v = judge(None, &odd, &peers);
        assert_eq!((v.reason, v.drifted), (Some(Reason::Majority), true));
        assert_eq!(v.expected.as_deref(), Some(norm.as_str()));
        // Two instances that disagree: nobody can say which one drifted.
        let v = judge(None, &odd, &[norm.as_str(), odd.hash.as_str()]);
        assert_eq!((v.expected, v.drifted), (None, false));
        assert!(v.note.unwrap().contains("no majority"));
    }

    #[test]
    fn a_list_that_does_not_match_its_root_is_drifted() {
        let reg = manifest(vec![file("/etc/a", "1")]);
        let mut st = state(vec![file("/etc/a", "2")], None);
        st.hash = reg.root.clone(); // claims to be clean, but the list says otherwise
        let v = judge(Some(&reg), &st, &[]);
        assert!(v.drifted);
        assert!(v.note.unwrap().contains("does not hash"));
        assert_eq!(v.changes.len(), 1);
    }

    #[test]
    fn registration_rules() {
        let m = manifest(vec![file("/etc/a", "1")]);
        assert_eq!(
            check_registration("img-1", &m, None),
            Ok(Registration::Created)
        );
        assert_eq!(
            check_registration("img-1", &m, Some(&m)),
            Ok(Registration::Unchanged)
        );
        let newer = manifest(vec![file("/etc/a", "2")]);
        assert_eq!(
            check_registration("img-1", &newer, Some(&m)),
            Ok(Registration::Replaced {
                old_root: m.root.clone()
            })
        );
        assert!(check_registration("img-2", &m, None)
            .unwrap_err()
            .contains("img-1"));
        let mut edited = m.clone();
        edited.entries[0].hash = "x".into();
        assert!(check_registration("img-1", &edited, None)
            .unwrap_err()
            .contains("does not match"));
        assert!(check_registration("bad id", &m, None).is_err());
    }

    #[test]
    fn a_hash_version_this_side_does_not_share_gives_no_verdict_not_drift() {
        let base = vec![file("/etc/a", "1"), file("/etc/b", "2")];
        let now = vec![file("/etc/a", "1"), file("/etc/b", "changed")];
        let m = manifest(base);
        // Same version: drifted, as before.
        assert!(judge(Some(&m), &state(now.clone(), None), &[]).drifted);
        // A registered baseline of a future version: no verdict, not drifted.
        let future = Manifest {
            hash_version: 2,
            ..m.clone()
        };
        let v = judge(Some(&future), &state(now.clone(), None), &[]);
        assert!(!v.drifted && v.expected.is_none());
        assert!(v.note.unwrap().contains("hash version 2"));
        // The agent's own baseline of a future version (no registered one).
        let mut st = state(now.clone(), Some(&m.root));
        st.baseline_hash_version = Some(7);
        let v = judge(None, &st, &[]);
        assert!(!v.drifted);
        assert!(v
            .note
            .unwrap()
            .contains("baseline has drift hash version 7"));
        // An agent hashing with a version this collector does not compute.
        let mut st = state(now, None);
        st.hash_version = Some(2);
        let v = judge(Some(&m), &st, &["x", "x"]);
        assert!(!v.drifted);
        assert!(v.note.unwrap().contains("upgrade the collector"));
        // Old agents and baselines (no version field) are v1 and still compared.
        let old: Manifest = serde_json::from_value({
            let mut j = serde_json::to_value(&m).unwrap();
            j.as_object_mut().unwrap().remove("hash_version");
            j
        })
        .unwrap();
        assert_eq!(old.hash_version, 1);
        assert!(old.verify().is_ok());
        assert!(judge(Some(&old), &state(vec![file("/etc/a", "x")], None), &[]).drifted);
        // A future-version manifest is structurally checked but its root is not recomputed.
        let mut f2 = future.clone();
        f2.root = "0".repeat(64);
        assert!(f2.verify().is_ok());
    }
}
