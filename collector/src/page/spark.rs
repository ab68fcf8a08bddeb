//! Inline SVG sparklines of an instance's CPU and memory over its latest reports, from the
//! fleet core's per-instance ring (no query to the metrics store). Both series share one fixed
//! 0–100 % scale, so a pegged box reads as pegged at a glance; the newest sample sits at the
//! right edge, and a report without a figure leaves a gap.

use std::fmt::Write as _;

use maud::{html, Markup};

use crate::fleet::state::{Trend, TREND_LEN};

const W: f32 = 120.0;
const H: f32 = 24.0;
const PAD: f32 = 2.0;

/// The SVG path of one series.
fn path(series: &[Option<u8>]) -> String {
    let step = W / (TREND_LEN - 1) as f32;
    let n = series.len();
    let mut d = String::with_capacity(n * 12);
    let mut pen_down = false;
    for (k, v) in series.iter().enumerate() {
        let Some(v) = v else {
            pen_down = false;
            continue;
        };
        let x = W - (n - 1 - k) as f32 * step;
        let y = PAD + (100.0 - f32::from(*v)) / 100.0 * (H - 2.0 * PAD);
        let op = if pen_down { 'L' } else { 'M' };
        write!(d, "{op}{x:.1} {y:.1}").ok();
        // A lone sample still shows, as a dot (the stroke's round cap).
        let next_missing = series.get(k + 1).is_none_or(|n| n.is_none());
        if !pen_down && next_missing {
            d.push_str("h0.1");
        }
        pen_down = true;
    }
    d
}

fn span(series: &[Option<u8>]) -> String {
    let vals: Vec<u8> = series.iter().flatten().copied().collect();
    match (vals.last(), vals.iter().min(), vals.iter().max()) {
        (Some(last), Some(lo), Some(hi)) => format!("{last}% now, {lo}–{hi}%"),
        _ => "no figures".into(),
    }
}

pub(super) fn sparkline(t: &Trend) -> Markup {
    if t.is_empty() {
        return html! { span.muted { "–" } };
    }
    let (cpu, mem) = (t.cpu(), t.mem());
    let title = format!(
        "last {} reports: CPU {}; memory {}",
        cpu.len(),
        span(&cpu),
        span(&mem)
    );
    html! {
        svg.spark width="120" height="24" viewBox="0 0 120 24" role="img" aria-label=(title) data-samples=(cpu.len()) {
            title { (title) }
            rect.frame x="0" y="0" width="120" height="24" rx="2" {}
            line.grid x1="0" y1="12" x2="120" y2="12" {}
            path.mem d=(path(&mem)) {}
            path.cpu d=(path(&cpu)) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_at_the_right_gaps_left_open_and_the_scale_fixed() {
        assert_eq!(path(&[]), "");
        // One sample: a dot at the right edge; 100 % at the top, 0 % at the bottom.
        assert_eq!(path(&[Some(100)]), "M120.0 2.0h0.1");
        assert_eq!(path(&[Some(0), Some(100)]), "M118.0 22.0L120.0 2.0");
        // A report without the figure breaks the line.
        let p = path(&[Some(50), None, Some(50), Some(50)]);
        assert_eq!(p.matches('M').count(), 2, "{p}");
        let mut t = Trend::default();
        assert_eq!(
            sparkline(&t).into_string(),
            "<span class=\"muted\">–</span>"
        );
        for k in 0..(TREND_LEN + 5) {
            t.push(Some(k as f64), Some(200.0));
        }
        let svg = sparkline(&t).into_string();
        assert!(
            svg.contains(&format!("data-samples=\"{TREND_LEN}\"")),
            "{svg}"
        );
        assert!(svg.contains("CPU 64% now, 5–64%"), "{svg}");
        assert!(svg.contains("memory 100% now"), "clamped: {svg}");
    }
}
