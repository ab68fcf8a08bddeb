//! What the collector knows about each instance: identity, last report, latest figures,
//! and the (boot, seq) of the batches it took, to drop duplicates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use phoenix_wire::{CheckResult, Identity, Report, Value};
use serde::{Deserialize, Serialize};

/// Sequence numbers taken, per boot; a few boots are kept because a spool filled before a
/// reboot is sent after it.
const BOOTS_KEPT: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Instance {
    pub identity: Identity,
    /// Unix ms of the first and the latest report taken.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub interval_ms: u64,
    pub reports: u64,
    /// boot id → highest seq taken.
    pub seqs: BTreeMap<String, (u64, i64)>,
    /// Latest figures, for the fleet list and the health rules.
    pub cpu_used_percent: Option<f64>,
    pub mem_used_percent: Option<f64>,
    pub mem_available_percent: Option<f64>,
    pub disk_max_used_percent: Option<f64>,
    pub checks: Vec<CheckResult>,
    /// The latest drift verdict, if the agent watches files.
    #[serde(default)]
    pub drift: Option<DriftInfo>,
}

/// An instance's drift as the collector judged it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct DriftInfo {
    pub hash: String,
    pub expected: Option<String>,
    /// Where `expected` came from: registered baseline, agent baseline or majority.
    pub source: Option<String>,
    pub drifted: bool,
    pub changes: Vec<phoenix_wire::FileChange>,
    pub note: Option<String>,
    /// Unix ns of the scan or event the agent reported.
    pub ts: i64,
    /// Unix ms when the collector first saw the current drifted state (None when clean).
    pub since_ms: Option<i64>,
}

#[derive(Default)]
pub struct Fleet {
    pub instances: Mutex<HashMap<String, Instance>>,
}

impl Fleet {
    /// True when this (instance, boot, seq) or a later one from the same boot was already taken.
    pub fn is_duplicate(&self, id: &Identity, seq: u64) -> bool {
        let g = self.instances.lock().unwrap();
        g.get(&id.instance_id).and_then(|i| i.seqs.get(&id.boot_id)).is_some_and(|(s, _)| seq <= *s)
    }

    /// Current drift hashes of every instance of `image` (for the majority rule).
    pub fn peer_hashes(&self, image: &str) -> Vec<String> {
        let g = self.instances.lock().unwrap();
        g.values().filter(|i| i.identity.image_id == image).filter_map(|i| i.drift.as_ref().map(|d| d.hash.clone())).collect()
    }

    /// Record a report whose points the store took.
    pub fn record(&self, r: &Report, drift: Option<DriftInfo>, now_ms: i64) {
        let mut g = self.instances.lock().unwrap();
        let inst = g.entry(r.agent.instance_id.clone()).or_insert_with(|| Instance { first_seen_ms: now_ms, ..Default::default() });
        inst.identity = r.agent.clone();
        inst.last_seen_ms = now_ms;
        inst.interval_ms = r.interval_ms;
        inst.reports += 1;
        let e = inst.seqs.entry(r.agent.boot_id.clone()).or_insert((0, now_ms));
        *e = (e.0.max(r.seq), now_ms);
        while inst.seqs.len() > BOOTS_KEPT {
            let oldest = inst.seqs.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()).unwrap();
            inst.seqs.remove(&oldest);
        }
        let f = |p: &phoenix_wire::Point, k: &str| match p.fields.get(k) {
            Some(Value::Float(v)) => Some(*v),
            Some(Value::Int(v)) => Some(*v as f64),
            _ => None,
        };
        let mut disk_max: Option<f64> = None;
        for p in &r.metrics {
            match p.m.as_str() {
                "cpu" if p.tags.get("cpu").map(String::as_str) == Some("cpu-total") => inst.cpu_used_percent = f(p, "usage_idle").map(|i| 100.0 - i),
                "mem" => {
                    inst.mem_used_percent = f(p, "used_percent");
                    inst.mem_available_percent = f(p, "available_percent");
                }
                "disk" => {
                    if let Some(u) = f(p, "used_percent") {
                        disk_max = Some(disk_max.map_or(u, |m: f64| m.max(u)));
                    }
                }
                _ => {}
            }
        }
        if disk_max.is_some() {
            inst.disk_max_used_percent = disk_max;
        }
        if !r.checks.is_empty() {
            inst.checks = r.checks.clone();
        }
        if let Some(mut d) = drift {
            d.since_ms = match &inst.drift {
                _ if !d.drifted => None,
                Some(old) if old.drifted => old.since_ms,
                _ => Some(now_ms),
            };
            inst.drift = Some(d);
        }
    }
}
