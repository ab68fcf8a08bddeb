//! The fleet list (`GET /`): a summary, the phoenix queue, and one dense table per group
//! with each instance's state, reason, checks, drift, trend and latest figures.

use std::collections::BTreeMap;

use maud::{html, Markup};

use super::{badge, pct, pct_cell, spark, when};
use crate::app::AppState;
use crate::fleet::view::{FleetView, InstanceView, QueueView};

pub(super) fn fragment(s: &AppState, view: &FleetView, now: i64) -> Markup {
    let rows = &view.instances;
    let phx = &view.queue;
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows.iter() {
        *by_state.entry(view.shown(r)).or_default() += 1;
    }
    // Instances by group (the list is sorted by id already).
    let mut groups: BTreeMap<&str, Vec<&InstanceView>> = BTreeMap::new();
    for r in rows.iter() {
        groups.entry(r.group_key.as_str()).or_default().push(r);
    }
    let writer_down = s.writer.unavailable();
    let fleet_store_down = s.fleet.store_status().filter(|f| !f.up);
    html! {
        ul.chips #summary {
            li { b { (rows.len()) } " instances" }
            @for (st, n) in &by_state {
                li { (n) " " (badge(st)) }
            }
        }
        @if let Some(d) = writer_down {
            p.banner.bad #store-down { "The store is not taking writes: " (d.reason) ". Agents keep their data and retry; silence does not count meanwhile." }
        }
        @if let Some(fs) = fleet_store_down {
            p.banner.bad #fleet-store-down { (fs.reason.as_deref().unwrap_or("fleet store unavailable")) }
        }
        @if !phx.decider {
            p.banner { "This collector is not the decider: another one makes the marks." }
        }
        @if phx.log_only {
            p.banner { "--log-only: nothing is marked for replacement; would-be marks are listed as held." }
        }
        @for a in &phx.alerts {
            p.banner.bad { "Mass event in group " b { (a.group) } ": " (a.message) }
        }
        // The instances first (what a glance is for), the queue and its budgets after.
        section #instances {
            @if groups.is_empty() {
                h2 { "Instances" }
                p.muted { "No agent has reported yet." }
            }
            @for (group, list) in &groups {
                (group_table(s, view, group, list, now))
            }
        }
        (queue_section(phx, now))
    }
}

fn group_table(
    s: &AppState,
    view: &FleetView,
    group: &str,
    list: &[&InstanceView],
    now: i64,
) -> Markup {
    let mut images: Vec<&str> = list.iter().map(|r| r.summary.image_id.as_str()).collect();
    images.sort_unstable();
    images.dedup();
    let grafana = s.page.grafana_url.is_some();
    html! {
        h2 data-group=(group) {
            (group) " "
            small { (list.len()) " instance" @if list.len() != 1 { "s" } ", image " (images.join(", ")) }
        }
        table.fleet {
            // Fixed column widths, so the tables of every group line up.
            thead { tr {
                th.c-id { "Instance" } th.c-state { "State" } th { "Reason" } th.c-checks { "Checks" } th.c-drift { "Drift" }
                th.trend title="CPU (solid) and memory (dashed) of the latest reports, 0–100%" { "Trend" }
                th.num.c-pct { "CPU" } th.num.c-pct { "Mem" } th.c-seen { "Last seen" } th.c-agent { "Agent" }
                @if grafana { th.c-link { "Grafana" } }
            } }
            tbody {
                @for v in list { (row(s, view.shown(v), v, now)) }
            }
        }
    }
}

fn row(s: &AppState, shown: &str, v: &InstanceView, now: i64) -> Markup {
    let r = &v.summary;
    html! {
        tr.inst data-instance=(r.instance_id) data-state=(shown) {
            td data-label="Instance" {
                a href={ "/instances/" (pct(&r.instance_id)) } { (r.instance_id) }
                small.evidence { (r.hostname) }
            }
            td data-label="State" { (badge(shown)) }
            td data-label="Reason" {
                @match r.reason {
                    Some(reason) => {
                        span.reason { (reason.as_str()) }
                        span.evidence { (r.evidence.as_deref().unwrap_or("")) }
                    }
                    None => { span.muted { "–" } }
                }
                @if let Some(h) = &r.held { span.held { "held: " (h) } }
            }
            td.checks data-label="Checks" { (checks_cell(v)) }
            td.drift data-label="Drift" { (drift_cell(v)) }
            td.trend data-label="Trend" { (spark::sparkline(&v.trend)) }
            td.num data-label="CPU" { (pct_cell(r.cpu_used_percent)) }
            td.num data-label="Mem" { (pct_cell(r.mem_used_percent)) }
            td.seen data-label="Last seen" { (when(now, r.last_seen_ms)) }
            td.agent data-label="Agent" { (r.agent_version) }
            @if let Some(link) = s.page.grafana_link(&r.instance_id) {
                td data-label="Grafana" { a.grafana href=(link) rel="noopener noreferrer" { "dashboard" } }
            }
        }
    }
}

/// Failing check names, or `ok n/n`; `–` when the agent runs no checks.
fn checks_cell(v: &InstanceView) -> Markup {
    let total = v.checks.len();
    let failing: Vec<&str> = v
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    html! {
        @if total == 0 {
            span.muted title="No checks configured (--check)" { "–" }
        } @else if failing.is_empty() {
            span.ok { "ok " (total) "/" (total) }
        } @else {
            span.bad title={ (failing.len()) " of " (total) " failing" } {
                "failing: " (failing.join(", "))
            }
        }
    }
}

/// clean, drifted (n changes), or unknown (no drift state from the agent).
fn drift_cell(v: &InstanceView) -> Markup {
    html! {
        @match &v.drift {
            None => { span.muted title="The agent sends no drift state (no --drift-path), or has not yet" { "unknown" } }
            Some(d) if d.drifted => {
                span.bad { "drifted" }
                " "
                small { "(" (d.changes.len()) " change" @if d.changes.len() != 1 { "s" } ")" }
            }
            Some(_) => { span.ok { "clean" } }
        }
    }
}

fn queue_section(phx: &QueueView, now: i64) -> Markup {
    let b = &phx.budget;
    html! {
        section #queue {
            h2 {
                "Phoenix queue "
                small {
                    "budget " (b.spec) " of a group, " (b.marks_last_minute) " of " (b.rate_per_min) " marks in the last minute"
                    @if !b.windows.is_empty() { "; voluntary marks in " (b.windows.join("; ")) }
                    " ("
                    a href="/v1/phoenix/preview" id="preview" { "preview a policy" }
                    ", docs/policy.md)"
                }
            }
            @if !b.groups.is_empty() {
                table.budget {
                    thead { tr { th { "Group" } th.num { "Size" } th.num { "Bad" } th.num { "Budget in use" } th.num { "Free" } } }
                    tbody {
                        @for g in &b.groups {
                            tr {
                                td data-label="Group" { (g.group) }
                                td.num data-label="Size" { (g.size) }
                                td.num data-label="Bad" { (g.bad) }
                                td.num data-label="In use" {
                                    (g.marked.saturating_add(g.acked).saturating_add(g.not_ready)) " of " (g.allowed)
                                    @match (g.acked, g.not_ready) {
                                        (0, 0) => {}
                                        (a, 0) => { " (" (a) " acked)" }
                                        (0, n) => { " (" (n) " not ready)" }
                                        (a, n) => { " (" (a) " acked, " (n) " not ready)" }
                                    }
                                }
                                td.num data-label="Free" { (g.free) }
                            }
                        }
                    }
                }
            }
            h3 { "Marked for replacement" }
            @if phx.marked.is_empty() {
                p.muted #no-marks { "No instance is marked." }
            } @else {
                table #marked {
                    thead { tr { th { "Instance" } th { "Group" } th { "Reason" } th { "Since" } th { "Recycler" } } }
                    tbody {
                        @for m in &phx.marked {
                            tr data-instance=(m.instance_id) {
                                td data-label="Instance" { a href={ "/instances/" (pct(&m.instance_id)) } { (m.instance_id) } }
                                td data-label="Group" { (m.group) }
                                td data-label="Reason" { span.reason { (m.reason.as_str()) } span.evidence { (m.evidence) } }
                                td data-label="Since" { (when(now, m.since_ms.unwrap_or(0))) }
                                td data-label="Recycler" {
                                    @match m.acked_ms.flatten() {
                                        Some(t) => { "acked " (when(now, t)) }
                                        None => { "waiting" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if !phx.held.is_empty() {
                h3 { "Held marks" }
                table #held {
                    thead { tr { th { "Instance" } th { "Group" } th { "Reason" } th { "Held because" } } }
                    tbody {
                        @for m in &phx.held {
                            tr data-instance=(m.instance_id) {
                                td data-label="Instance" { a href={ "/instances/" (pct(&m.instance_id)) } { (m.instance_id) } }
                                td data-label="Group" { (m.group) }
                                td data-label="Reason" { span.reason { (m.reason.as_str()) } span.evidence { (m.evidence) } }
                                td data-label="Held" { (m.hold.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
    }
}
