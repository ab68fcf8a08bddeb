//! One instance (`GET /instances/{id}`): what an SRE used to log in for. Its facts and mark,
//! checks, drift changes, the SSH finding, top processes, listening sockets, kernel events,
//! the latest diagnostics snapshot (with the button that asks for a new one) and the last
//! log lines.

use maud::{html, Markup};
use phoenix_wire::diag::Snapshot;
use phoenix_wire::FileChange;

use super::{badge, bytes, pct, pct_cell, short, when, Settings};
use crate::fleet::state::Listener;
use crate::fleet::view::InstanceView;
use crate::selfmetrics::KeptLine;

/// Processes of a diagnostics snapshot shown (the JSON has them all).
const SNAPSHOT_PROCESSES_SHOWN: usize = 40;
/// Kernel lines of a diagnostics snapshot shown (the newest).
const SNAPSHOT_KERNEL_SHOWN: usize = 30;

/// `shown` and `silent_ms`: what the view says of `v` now ([`crate::fleet::view::FleetView::shown`]).
pub(super) fn fragment(
    page: &Settings,
    (shown, silent_ms): (&str, i64),
    v: &InstanceView,
    logs: &[KeptLine],
    now: i64,
) -> Markup {
    let i = &v.summary;
    let id = i.instance_id.as_str();
    html! {
        p.crumbs {
            a href="/" { "← fleet" }
            @if let Some(g) = page.grafana_link(id) {
                " · " a #grafana href=(g) rel="noopener noreferrer" { "Grafana dashboard" }
            }
            " · " a href={ "/v1/instances/" (pct(id)) } { "JSON" }
        }
        h2 #instance data-instance=(id) data-state=(shown) { (id) " " (badge(shown)) }
        (facts((shown, silent_ms), v, now))
        div.cols {
            div { (checks(v)) (ssh(v)) }
            (drift(v, now))
        }
        div.cols {
            (processes(v, now))
            (listening(v, now))
        }
        (kernel(v))
        (diagnostics(v, now))
        (log_lines(logs, now))
    }
}

fn facts((shown, silent_ms): (&str, i64), v: &InstanceView, now: i64) -> Markup {
    let i = &v.summary;
    html! {
        dl.facts {
            dt { "Image" } dd { code { (i.image_id) } }
            dt { "Group" } dd { (v.group_key) }
            dt { "Host" } dd { (i.hostname) }
            dt { "Agent" } dd { (i.agent_version) }
            dt { "Boot" } dd { code { (i.boot_id) } }
            dt { "First seen" } dd { (when(now, i.first_seen_ms)) }
            dt { "Last seen" } dd {
                (when(now, i.last_seen_ms))
                @if shown != i.state.as_str() {
                    " " span.bad #silence { "silent for " (crate::fleet::clock::human(silent_ms)) ", in grace: no mark yet" }
                }
            }
            dt { "Reports" } dd { (i.reports) " every " (i.interval_ms / 1000) " s" }
            dt { "CPU / memory / fullest disk" } dd {
                (pct_cell(i.cpu_used_percent)) " / " (pct_cell(i.mem_used_percent)) " / " (pct_cell(i.disk_max_used_percent))
            }
            @match (&i.mark, i.reason) {
                (Some(m), _) => {
                    dt { "Marked" } dd {
                        span.reason #reason { (m.reason.as_str()) } " " (when(now, m.since_ms))
                        @if let Some(t) = m.acked_ms {
                            "; acked " (when(now, t)) " by " (m.acked_by.as_deref().unwrap_or("?"))
                        }
                        span.evidence { (m.evidence) }
                    }
                }
                (None, Some(reason)) => {
                    dt { "Problem" } dd {
                        span.reason #reason { (reason.as_str()) }
                        span.evidence { (i.evidence.as_deref().unwrap_or("")) }
                    }
                }
                (None, None) => {}
            }
            @if let Some(h) = &i.held { dt { "Mark held" } dd { (h) } }
        }
    }
}

fn checks(v: &InstanceView) -> Markup {
    let mut list: Vec<_> = v.checks.iter().collect();
    list.sort_by(|a, b| a.ok.cmp(&b.ok).then(a.name.cmp(&b.name)));
    html! {
        section #checks {
            h3 { "Checks" }
            @if list.is_empty() {
                p.muted { "No checks configured (--check)." }
            } @else {
                table {
                    thead { tr { th { "Check" } th { "Result" } th { "Detail" } th.num { "Took" } } }
                    tbody {
                        @for c in &list {
                            tr.check.fail[!c.ok] data-check=(c.name) {
                                td data-label="Check" { (c.name) }
                                td data-label="Result" {
                                    @if c.ok { "ok" } @else {
                                        b { "failed" } " (" (v.check_streaks.get(&c.name).copied().unwrap_or(0)) " in a row)"
                                    }
                                }
                                td data-label="Detail" { (c.detail) }
                                td.num data-label="Took" { (c.duration_ms) " ms" }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn drift(v: &InstanceView, now: i64) -> Markup {
    html! {
        section #drift {
            h3 { "Drift" }
            @match &v.drift {
                None => { p.muted { "This agent watches no files (no --drift-path)." } }
                Some(d) => {
                    p {
                        @if d.drifted { b.bad { "drifted" } } @else { span.ok { "clean" } }
                        " against the " (d.source.as_deref().unwrap_or("(no baseline)"))
                        @if let Some(since) = d.since_ms { ", since " (when(now, since)) }
                        ". Hash " code { (short(&d.hash)) }
                        @if let Some(e) = &d.expected { ", expected " code { (short(e)) } }
                        "."
                    }
                    @if let Some(n) = &d.note { p.muted { (n) } }
                    @if !d.changes.is_empty() {
                        table #changes {
                            thead { tr { th { "File" } th { "Change" } th { "Attributes" } } }
                            tbody { @for c in &d.changes { (change_row(c)) } }
                        }
                    }
                }
            }
        }
    }
}

/// One changed file, with old → new per attribute where the agent sent them.
fn change_row(c: &FileChange) -> Markup {
    html! {
        tr.change {
            td data-label="File" { code { (c.path) } }
            td data-label="Change" { (c.change) }
            td data-label="Attributes" {
                @if c.values.is_empty() {
                    (c.attrs.join(", "))
                } @else {
                    // Old → new per attribute (content is a short hash, never contents).
                    @for (k, a) in c.values.iter().enumerate() {
                        @if k > 0 { ", " }
                        span.attr { (a.attr) " " code { (a.old) } " → " code { (a.new) } }
                    }
                }
            }
        }
    }
}

fn ssh(v: &InstanceView) -> Markup {
    html! {
        section #ssh {
            h3 { "SSH" }
            @match &v.ssh {
                Some(e) => { p.banner.bad { b { "SSH is on: " } (e) } }
                None => { p.muted { "Off: nothing listens on TCP 22, and no sshd or dropbear runs (as the agent last reported)." } }
            }
        }
    }
}

fn processes(v: &InstanceView, now: i64) -> Markup {
    let top = &v.top;
    html! {
        section #processes {
            h3 {
                "Top processes "
                @if top.at_ms > 0 { small { "by CPU and memory, " (when(now, top.at_ms)) } }
            }
            @if top.list.is_empty() {
                p.muted { "No procstat figures from this agent yet (--top-processes 0 turns them off); a diagnostics snapshot below lists every process." }
            } @else {
                (proc_table(&top.list[..top.list.len().min(SHOWN)]))
                @if top.list.len() > SHOWN {
                    details #more-procs {
                        summary { (top.list.len() - SHOWN) " more" }
                        (proc_table(&top.list[SHOWN..]))
                    }
                }
            }
        }
    }
}

/// Rows of the top-process and socket tables shown before a "more" fold: the page stays a
/// glance.
const SHOWN: usize = 10;

fn proc_table(list: &[crate::fleet::state::TopProc]) -> Markup {
    html! {
        table.procs {
            thead { tr { th { "Process" } th { "User" } th.num { "PID" } th.num { "CPU" } th.num { "RSS" } th.num { "Threads" } th.num { "FDs" } } }
            tbody {
                @for p in list {
                    tr.proc data-pid=(p.pid) {
                        td data-label="Process" { code { (p.name) } }
                        td data-label="User" { (p.user) }
                        td.num data-label="PID" { (p.pid) }
                        td.num data-label="CPU" { (p.cpu_usage.map(|c| format!("{c:.1}%")).unwrap_or_else(|| "–".into())) }
                        td.num data-label="RSS" { (p.memory_rss.map(bytes).unwrap_or_else(|| "–".into())) }
                        td.num data-label="Threads" { (opt(p.num_threads)) }
                        td.num data-label="FDs" { (opt(p.num_fds)) }
                    }
                }
            }
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_else(|| "–".into())
}

fn listening(v: &InstanceView, now: i64) -> Markup {
    let l = &v.listening;
    html! {
        section #listening {
            h3 {
                "Listening sockets "
                @if l.at_ms > 0 { small { (l.count) " as of " (when(now, l.at_ms)) } }
            }
            @if l.list.is_empty() {
                p.muted { @if l.at_ms > 0 { "Nothing listens." } @else { "No listening set from this agent yet (sent when it changes, and every 5 minutes)." } }
            } @else {
                @let list = sockets_ssh_first(&l.list);
                (socket_table(&list[..list.len().min(SHOWN)]))
                @if list.len() > SHOWN {
                    details #more-sockets {
                        summary { (list.len() - SHOWN) " more" }
                        (socket_table(&list[SHOWN..]))
                    }
                }
                @if (l.list.len() as u64) < l.count {
                    p.muted { "Showing " (l.list.len()) " of " (l.count) "." }
                }
            }
        }
    }
}

fn is_ssh(s: &Listener) -> bool {
    s.port == 22 && s.proto == "tcp"
}

/// A listener on TCP 22 is the one to see first.
fn sockets_ssh_first(list: &[Listener]) -> Vec<&Listener> {
    let mut v: Vec<&Listener> = list.iter().collect();
    v.sort_by_key(|s| !is_ssh(s));
    v
}

fn socket_table(list: &[&Listener]) -> Markup {
    html! {
        table.sockets {
            thead { tr { th { "Proto" } th { "Address" } th.num { "Port" } th { "Process" } th.num { "PID" } } }
            tbody {
                @for s in list {
                    tr.sock.bad[is_ssh(s)] data-port=(s.port) {
                        td data-label="Proto" { (s.proto) }
                        td data-label="Address" { code { (s.address) } }
                        td.num data-label="Port" { (s.port) }
                        td data-label="Process" { (s.process.as_deref().unwrap_or("?")) }
                        td.num data-label="PID" { (s.pid.map(|p| p.to_string()).unwrap_or_else(|| "–".into())) }
                    }
                }
            }
        }
    }
}

fn kernel(v: &InstanceView) -> Markup {
    let k = &v.kernel;
    html! {
        section #kernel {
            h3 { "Kernel events" }
            @if let Some(c) = &k.counts {
                ul.chips #kernel-counts {
                    li.bad[c.oom_kills > 0] { b { (c.oom_kills) } " OOM kills" }
                    li.bad[c.segfaults > 0] { b { (c.segfaults) } " segfaults" }
                    li.bad[c.hung_tasks > 0] { b { (c.hung_tasks) } " hung tasks" }
                    li.muted { "this boot" }
                }
            }
            @if k.lines.is_empty() {
                p.muted { "No kernel lines since this collector started (the agent reads /dev/kmsg when the journal does not carry the kernel's messages)." }
            } @else {
                ol.logs {
                    @for l in k.lines.iter().rev() {
                        li.log.kmsg {
                            small { (when_ns(l.ts)) " · " code { (l.level) } }
                            span.msg { (l.msg) }
                        }
                    }
                }
            }
        }
    }
}

/// A Unix ns time as UTC (kernel and log lines: their own time, not "ago").
fn when_ns(ts: i64) -> String {
    crate::fleet::clock::utc(ts / 1_000_000)
}

fn diagnostics(v: &InstanceView, now: i64) -> Markup {
    let d = &v.diagnostics;
    let id = &v.summary.instance_id;
    let gone = v.summary.state == crate::fleet::State::Gone;
    html! {
        section #diagnostics {
            h3 { "Diagnostics " small { "a one-off snapshot the agent takes on request: every process, socket and mount, PSI, the last kernel lines, failed units" } }
            div.diag-bar {
                button #diag-request type="button" data-post={ "/instances/" (pct(id)) "/diagnostics" } disabled[d.pending.is_some() || gone] {
                    "Take a snapshot"
                }
                span #diag-status role="status" {
                    @if let Some(p) = &d.pending {
                        "Request " (p.id) " by " (p.requested_by) ", " (when(now, p.requested_ms)) ": "
                        @match p.handed_ms {
                            Some(t) => { "handed to the agent " (when(now, t)) ", waiting for its answer" }
                            None => { "waiting for the agent's next report" }
                        }
                    } @else if gone {
                        "The instance is gone."
                    } @else {
                        span.muted { "Needs script; scripts use POST /v1/instances/{id}/diagnostics." }
                    }
                }
            }
            @match &d.latest {
                None => { p.muted #no-diag { "No snapshot yet." } }
                Some(l) => {
                    p #diag-latest {
                        "Snapshot " (l.id) " (" (l.probes.as_str()) "), asked by " (l.requested_by) " " (when(now, l.requested_ms))
                        ", received " (when(now, l.received_ms)) ", taken in " (l.snapshot.took_ms) " ms, " (bytes(l.bytes as u64))
                        " · " a href={ "/v1/instances/" (pct(id)) "/diagnostics" } { "JSON" }
                    }
                    (snapshot(&l.snapshot))
                }
            }
        }
    }
}

fn snapshot(s: &Snapshot) -> Markup {
    html! {
        @for n in &s.notes { p.muted.note { (n) } }
        @if let Some(p) = &s.pressure {
            (pressure(p))
        }
        @if let Some(units) = &s.failed_units {
            p #failed-units {
                b { "Failed units: " }
                @if units.is_empty() { span.ok { "none" } } @else { span.bad { (units.join(", ")) } }
            }
        }
        @if let Some(procs) = &s.processes {
            @let sorted = by_cpu(procs);
            details #diag-processes open {
                summary { "Processes (" (procs.len()) @if procs.len() > SNAPSHOT_PROCESSES_SHOWN { ", top " (SNAPSHOT_PROCESSES_SHOWN) " by CPU shown" } ")" }
                table.procs {
                    thead { tr { th.num { "PID" } th.num { "PPID" } th { "User" } th { "Name" } th { "St" } th.num { "CPU" } th.num { "RSS" } th.num { "Thr" } th { "Command line" } } }
                    tbody {
                        @for p in sorted.iter().take(SNAPSHOT_PROCESSES_SHOWN) {
                            tr.dproc data-pid=(p.pid) {
                                td.num data-label="PID" { (p.pid) }
                                td.num data-label="PPID" { (p.ppid) }
                                td data-label="User" { (p.user) }
                                td data-label="Name" { code { (p.name) } }
                                td data-label="State" { (p.state) }
                                td.num data-label="CPU" { (format!("{:.1}%", p.cpu_percent)) }
                                td.num data-label="RSS" { (bytes(p.rss_bytes)) }
                                td.num data-label="Threads" { (p.threads) }
                                td.cmd data-label="Command" { code { (p.cmdline) } }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(so) = &s.sockets {
            details #diag-sockets {
                summary { "Sockets (" (so.list.len()) ")" }
                ul.chips { @for (k, n) in &so.counts { li { (k) " " b { (n) } } } }
                table {
                    thead { tr { th { "Proto" } th { "Local" } th { "Remote" } th { "State" } th { "Process" } } }
                    tbody {
                        @for x in &so.list {
                            tr {
                                td data-label="Proto" { (x.proto) }
                                td data-label="Local" { code { (x.local) } }
                                td data-label="Remote" { code { (x.remote) } }
                                td data-label="State" { (x.state) }
                                td data-label="Process" {
                                    (x.process.as_deref().unwrap_or(""))
                                    @if let Some(pid) = x.pid { " [" (pid) "]" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(m) = &s.mounts {
            details #diag-mounts {
                summary { "Mounts (" (m.len()) ")" }
                table {
                    thead { tr { th { "Path" } th { "Device" } th { "Type" } th.num { "Used" } th.num { "Free" } th.num { "Inodes used" } } }
                    tbody {
                        @for x in m {
                            tr {
                                td data-label="Path" { code { (x.path) } @if x.read_only { " " small { "ro" } } }
                                td data-label="Device" { code { (x.device) } }
                                td data-label="Type" { (x.fstype) }
                                td.num data-label="Used" { (share(x.total_bytes.saturating_sub(x.free_bytes), x.total_bytes)) }
                                td.num data-label="Free" { (bytes(x.free_bytes)) }
                                td.num data-label="Inodes" { (share(x.inodes_total.saturating_sub(x.inodes_free), x.inodes_total)) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(k) = &s.kernel {
            details #diag-kernel {
                summary { "Kernel lines (" (k.len()) ", newest first)" }
                ol.logs {
                    @for l in k.iter().rev().take(SNAPSHOT_KERNEL_SHOWN) {
                        li.log {
                            small { "+" (format!("{:.3}", l.usec as f64 / 1e6)) " s · priority " (l.priority) }
                            span.msg { (l.message) }
                        }
                    }
                }
            }
        }
    }
}

fn by_cpu(procs: &[phoenix_wire::diag::Process]) -> Vec<&phoenix_wire::diag::Process> {
    let mut v: Vec<_> = procs.iter().collect();
    v.sort_by(|a, b| {
        b.cpu_percent
            .total_cmp(&a.cpu_percent)
            .then(b.rss_bytes.cmp(&a.rss_bytes))
    });
    v
}

fn share(used: u64, total: u64) -> String {
    if total == 0 {
        return "–".into();
    }
    format!("{:.0}%", used as f64 * 100.0 / total as f64)
}

fn pressure(p: &phoenix_wire::diag::Pressure) -> Markup {
    let avg10 = |what: &str, kind: &str| {
        p.psi
            .get(what)
            .and_then(|m| m.get(kind))
            .and_then(|m| m.get("avg10"))
            .map(|v| format!("{v:.1}%"))
    };
    html! {
        p #pressure {
            b { "Pressure (avg10): " }
            @for what in ["cpu", "memory", "io"] {
                @if let Some(v) = avg10(what, "some") { (what) " " (v) " · " }
            }
            "memory available " (bytes(p.mem_available_bytes)) " of " (bytes(p.mem_total_bytes))
            @if p.swap_total_bytes > 0 { ", swap free " (bytes(p.swap_free_bytes)) " of " (bytes(p.swap_total_bytes)) }
        }
    }
}

fn log_lines(logs: &[KeptLine], now: i64) -> Markup {
    html! {
        section #logs {
            h3 { "Last log lines " small { "up to " (crate::selfmetrics::LOG_LINES_KEPT) "; the store has them all" } }
            @if logs.is_empty() {
                p.muted { "No log lines since this collector started." }
            } @else {
                ol.logs {
                    @for l in logs.iter().rev() {
                        li.log {
                            small {
                                (when(now, l.ts / 1_000_000)) " · " code { (l.src) }
                                @if l.escaped { " · not UTF-8, bytes as \\xNN" }
                                @if l.cut { " · cut" }
                            }
                            span.msg { (l.msg) }
                        }
                    }
                }
            }
        }
    }
}
