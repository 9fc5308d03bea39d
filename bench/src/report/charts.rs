// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The report's charts, each built from result objects (JSON) into one inline `<svg>`.
//!
//! Every chart is `<svg class="chart" data-chart="KIND">`; the kinds are `timeline`,
//! `blackout-phases`, `fault-histogram`, `matrix-blackout-mem`, `matrix-throughput-mem`,
//! `matrix-blackout-rate`, `matrix-throughput-rate`, `blackout-histogram` and `transport`.
//! A chart whose data is absent is not drawn (the caller says "not recorded").

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::fmt::{self, esc};
use super::svg::{self, Axis, Legend, Mark, Plot, Rect};
use super::{arr, num_at, str_at};

/// Width of full-width charts (user units; the page scales them down on narrow screens).
pub(crate) const WIDE: f64 = 1120.0;
/// Width of half-width charts (two per row).
pub(crate) const HALF: f64 = 550.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 24.0;

/// Blackout phases in the order the engine runs them.
pub(crate) const PHASES: [&str; 7] = [
    "pause", "harvest", "save", "send", "apply", "restore", "resume",
];

/// Phase colours: source-side phases warm, transfer neutral, destination-side cool.
fn phase_color(name: &str, other: usize) -> &'static str {
    match name {
        "pause" => "#e15759",
        "harvest" => "#f28e2b",
        "save" => "#edc948",
        "send" => "#9c755f",
        "apply" => "#76b7b2",
        "restore" => "#4e79a7",
        "resume" => "#59a14f",
        _ => svg::color(6 + other),
    }
}

/// Fault dots drawn at most; beyond that, the minimum and maximum per pixel column are drawn.
const MAX_DOTS: usize = 3000;

/// One stream's throughput samples: (interval start ms, interval end ms, bytes/s).
type Steps = Vec<(f64, f64, f64)>;

/// Per-stream throughput from `"throughput_series": [[t_ms, stream, bytes_in_interval], ...]`.
/// `t_ms` is read as the end of the interval; the interval starts at the stream's previous
/// sample (for its first sample: one median interval earlier, not before 0).
pub(crate) fn stream_rates(res: &Value) -> BTreeMap<String, Steps> {
    let mut raw: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in arr(res, "/throughput_series") {
        let Some(a) = p.as_array() else { continue };
        let (Some(t), Some(b)) = (
            a.first().and_then(Value::as_f64),
            a.get(2).and_then(Value::as_f64),
        ) else {
            continue;
        };
        let stream = match a.get(1) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => continue,
        };
        raw.entry(stream).or_default().push((t, b));
    }
    let mut out = BTreeMap::new();
    for (stream, mut pts) in raw {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut gaps: Vec<f64> = pts.windows(2).map(|w| w[1].0 - w[0].0).collect();
        gaps.retain(|g| *g > 0.0);
        gaps.sort_by(f64::total_cmp);
        let median_gap = gaps.get(gaps.len() / 2).copied();
        let mut steps = Vec::with_capacity(pts.len());
        let mut prev: Option<f64> = None;
        for (t, b) in pts {
            let start = match prev {
                Some(p) => p,
                None => median_gap.map_or(0.0, |g| (t - g).max(0.0)),
            };
            if t > start {
                steps.push((start, t, b / ((t - start) / 1e3)));
            }
            prev = Some(t);
        }
        let label = match stream.parse::<f64>() {
            Ok(n) => format!("stream {}", fmt::num(n)),
            Err(_) => stream,
        };
        out.insert(label, steps);
    }
    out
}

/// One pre-copy round on the timeline.
struct RoundBar {
    round: String,
    start: f64,
    end: f64,
    dirty: Option<f64>,
    sent: Option<f64>,
}

fn rounds(res: &Value) -> Vec<RoundBar> {
    let mut out = Vec::new();
    let mut cursor = 0.0;
    for (i, r) in arr(res, "/rounds_detail").iter().enumerate() {
        let dur = num_at(r, "/duration_ms");
        let start = num_at(r, "/start_ms").unwrap_or(cursor);
        let end = start + dur.unwrap_or(0.0);
        cursor = end;
        out.push(RoundBar {
            round: num_at(r, "/round").map_or_else(|| (i + 1).to_string(), fmt::num),
            start,
            end,
            dirty: num_at(r, "/dirty_pages"),
            sent: num_at(r, "/pages"),
        });
    }
    out
}

/// Post-copy faults as (ms since migration start, latency µs). The engine records
/// `"faults"."timeline"` as `[ms since the destination resumed, latency µs]`, so the samples are
/// shifted by the end of the blackout (`blackout_start_ms + blackout_us / 1000`) when both are
/// recorded; without them they are drawn from 0.
fn faults(res: &Value) -> Vec<(f64, f64)> {
    let origin = blackout_window(res).map_or(0.0, |(s, us)| s + us / 1e3);
    arr(res, "/faults/timeline")
        .iter()
        .filter_map(|p| {
            let a = p.as_array()?;
            Some((origin + a.first()?.as_f64()?, a.get(1)?.as_f64()?))
        })
        .collect()
}

/// The blackout window: (start ms, length µs), when recorded.
fn blackout_window(res: &Value) -> Option<(f64, f64)> {
    Some((
        num_at(res, "/blackout_start_ms")?,
        num_at(res, "/blackout_us")?,
    ))
}

/// Migration timeline: throughput per stream, dirty pages per round and post-copy faults over
/// time, stacked on one time axis, with the blackout window shaded across all panels.
pub(crate) fn timeline(res: &Value) -> Option<String> {
    let streams = stream_rates(res);
    let rounds = rounds(res);
    let faults = faults(res);
    let window = blackout_window(res);
    let has_streams = streams.values().any(|s| !s.is_empty());
    let has_rounds = rounds.iter().any(|r| r.dirty.is_some() || r.sent.is_some());
    let has_faults = !faults.is_empty();
    if !has_streams && !has_rounds && !has_faults {
        return None;
    }

    // Shared time axis.
    let mut tmax = num_at(res, "/total_ms").unwrap_or(0.0);
    for s in streams.values() {
        for &(_, e, _) in s {
            tmax = tmax.max(e);
        }
    }
    for r in &rounds {
        tmax = tmax.max(r.end);
    }
    for &(t, _) in &faults {
        tmax = tmax.max(t);
    }
    if let Some((s, us)) = window {
        tmax = tmax.max(s + us / 1e3);
    }
    let x = Axis::nice(0.0, tmax);

    const PANEL_H: f64 = 150.0;
    const HEAD: f64 = 30.0;
    const GAP: f64 = 20.0;
    let n_panels = [has_streams, has_rounds, has_faults]
        .iter()
        .filter(|b| **b)
        .count();
    let n = f64::from(u32::try_from(n_panels).unwrap_or(3));
    let top = 40.0;
    let height = top + n * (HEAD + PANEL_H + GAP) + 40.0;
    let mut out = svg::open(
        "timeline",
        WIDE,
        height,
        "Migration timeline: throughput per stream, dirty pages per round, post-copy faults",
    );
    svg::title(&mut out, 12.0, 22.0, "Timeline");
    if let Some((s, us)) = window {
        svg::text(
            &mut out,
            WIDE - RIGHT,
            22.0,
            "end",
            "annotation blackout-label",
            &format!(
                "shaded: blackout, {} starting at {} ms",
                fmt::dur_us(us),
                fmt::num(s)
            ),
        );
    }

    let mut y0 = top;
    let mut panel_i = 0;
    let mut panel = |out: &mut String, title: &str, legend: &[Legend]| -> Rect {
        panel_i += 1;
        svg::text(out, LEFT, y0 + 14.0, "start", "panel-title", title);
        let lx = LEFT + svg::text_width(title) * 1.1 + 24.0;
        svg::legend(out, lx, y0 + 14.0, WIDE - RIGHT, legend);
        let r = Rect {
            x: LEFT,
            y: y0 + HEAD,
            w: WIDE - LEFT - RIGHT,
            h: PANEL_H,
        };
        y0 += HEAD + PANEL_H + GAP;
        r
    };
    let last_is = |which: usize| -> bool {
        // 0 = streams, 1 = rounds, 2 = faults: is `which` the last panel drawn?
        let present = [has_streams, has_rounds, has_faults];
        present.iter().rposition(|p| *p) == Some(which)
    };
    let band = |out: &mut String, p: &Plot| {
        if let Some((s, us)) = window {
            let x0 = p.px(s);
            let x1 = p.px(s + us / 1e3).max(x0 + 3.0);
            let _ = writeln!(
                out,
                "<rect class=\"blackout-band\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" \
                 height=\"{:.1}\"/>",
                p.r.y,
                x1 - x0,
                p.r.h
            );
        }
    };
    let x_title = "time since migration start (ms)";

    if has_streams {
        let max_rate = streams
            .values()
            .flat_map(|s| s.iter().map(|p| p.2))
            .fold(0.0, f64::max);
        let (div, unit) = fmt::rate_unit(max_rate);
        let legend: Vec<Legend> = streams
            .keys()
            .enumerate()
            .map(|(i, k)| Legend::new(k.clone(), svg::color(i), Mark::Line))
            .collect();
        let r = panel(&mut out, "Throughput per stream", &legend);
        let p = Plot {
            r,
            x,
            y: Axis::nice(0.0, max_rate / div),
        };
        let last = last_is(0);
        svg::axes(
            &mut out,
            &p,
            None,
            None,
            last.then_some(x_title),
            Some(unit),
            last,
        );
        band(&mut out, &p);
        for (i, steps) in streams.values().enumerate() {
            let mut d = String::new();
            let mut pen: Option<f64> = None;
            for &(s, e, rate) in steps {
                let y = p.py(rate / div);
                match pen {
                    Some(end) if (end - s).abs() < 1e-9 => {
                        let _ = write!(d, "V{y:.1}H{:.1}", p.px(e));
                    }
                    _ => {
                        let _ = write!(d, "M{:.1},{y:.1}H{:.1}", p.px(s), p.px(e));
                    }
                }
                pen = Some(e);
            }
            let _ = writeln!(
                out,
                "<path class=\"series stream\" d=\"{d}\" fill=\"none\" stroke=\"{}\" \
                 stroke-width=\"1.8\"/>",
                svg::color(i)
            );
        }
    }

    if has_rounds {
        let max = rounds
            .iter()
            .flat_map(|r| [r.dirty.unwrap_or(0.0), r.sent.unwrap_or(0.0)])
            .fold(0.0, f64::max);
        let legend = [
            Legend::new("dirty pages at end of round", "#f28e2b", Mark::Swatch),
            Legend::new("pages sent in round", "#4e79a7", Mark::Outline),
        ];
        let r = panel(&mut out, "Pre-copy rounds", &legend);
        let p = Plot {
            r,
            x,
            y: Axis::nice(0.0, max),
        };
        let last = last_is(1);
        svg::axes(
            &mut out,
            &p,
            None,
            Some(&|v| fmt::count(v)),
            last.then_some(x_title),
            Some("pages"),
            last,
        );
        band(&mut out, &p);
        let base = p.py(0.0);
        for rb in &rounds {
            let x0 = p.px(rb.start);
            let w = (p.px(rb.end) - x0).max(2.0);
            if let Some(d) = rb.dirty {
                let y = p.py(d);
                let _ = writeln!(
                    out,
                    "<rect class=\"round-dirty\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" \
                     height=\"{:.1}\" fill=\"#f28e2b\" fill-opacity=\"0.75\"><title>round {}: {} \
                     dirty pages</title></rect>",
                    base - y,
                    esc(&rb.round),
                    fmt::num(d)
                );
            }
            if let Some(s) = rb.sent {
                let y = p.py(s);
                let _ = writeln!(
                    out,
                    "<rect class=\"round-sent\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" \
                     height=\"{:.1}\" fill=\"none\" stroke=\"#4e79a7\" stroke-width=\"1.5\">\
                     <title>round {}: {} pages sent</title></rect>",
                    base - y,
                    esc(&rb.round),
                    fmt::num(s)
                );
            }
            if w >= 18.0 {
                let top = p.py(rb.dirty.unwrap_or(0.0).max(rb.sent.unwrap_or(0.0)));
                svg::text(
                    &mut out,
                    x0 + w / 2.0,
                    (top - 4.0).max(p.r.y + 10.0),
                    "middle",
                    "bar-label",
                    &format!("R{}", rb.round),
                );
            }
        }
    }

    if has_faults {
        let min = faults
            .iter()
            .map(|f| f.1)
            .filter(|v| *v > 0.0)
            .fold(f64::INFINITY, f64::min);
        let max = faults.iter().map(|f| f.1).fold(0.0, f64::max);
        let y = Axis::auto(min, max, 50.0);
        let title = if faults.len() > MAX_DOTS {
            format!(
                "Post-copy faults ({} faults; per-pixel min and max shown)",
                fmt::num(count_f64(faults.len()))
            )
        } else {
            format!("Post-copy faults ({})", fmt::num(count_f64(faults.len())))
        };
        let legend = [Legend::new(
            "fault service latency (µs)",
            "#e15759",
            Mark::Dot,
        )];
        let r = panel(&mut out, &title, &legend);
        let p = Plot { r, x, y };
        let last = last_is(2);
        svg::axes(
            &mut out,
            &p,
            None,
            None,
            last.then_some(x_title),
            Some("latency (µs)"),
            last,
        );
        band(&mut out, &p);
        let dots = thin_dots(&faults, &p);
        let _ = writeln!(
            out,
            "<g class=\"series faults\" fill=\"#e15759\" fill-opacity=\"0.55\">"
        );
        for (cx, cy) in dots {
            let _ = writeln!(out, "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2.2\"/>");
        }
        let _ = writeln!(out, "</g>");
    }
    out.push_str("</svg>\n");
    Some(out)
}

/// Pixel positions of fault dots; above [`MAX_DOTS`], the min and max per pixel column.
fn thin_dots(faults: &[(f64, f64)], p: &Plot) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> = faults.iter().map(|&(t, l)| (p.px(t), p.py(l))).collect();
    if pts.len() <= MAX_DOTS {
        return pts;
    }
    let mut cols: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    for (x, y) in pts {
        #[allow(clippy::cast_possible_truncation)] // pixel column, bounded by the chart width
        let c = x.round() as i64;
        let e = cols.entry(c).or_insert((y, y));
        e.0 = e.0.min(y);
        e.1 = e.1.max(y);
    }
    let mut out = Vec::new();
    for (c, (lo, hi)) in cols {
        #[allow(clippy::cast_precision_loss)] // small pixel column
        let x = c as f64;
        out.push((x, lo));
        if (hi - lo).abs() > 0.5 {
            out.push((x, hi));
        }
    }
    out
}

#[allow(clippy::cast_precision_loss)] // counts of points, far below 2^53
fn count_f64(n: usize) -> f64 {
    n as f64
}

/// The blackout as one horizontal stacked bar of its phases (µs), in engine order.
pub(crate) fn blackout_phases(res: &Value) -> Option<String> {
    let total_us = num_at(res, "/blackout_us");
    let mut phases: Vec<(String, f64)> = Vec::new();
    if let Some(obj) = res
        .pointer("/blackout_phases_us")
        .and_then(Value::as_object)
    {
        for name in PHASES {
            if let Some(v) = obj.get(name).and_then(Value::as_f64) {
                phases.push((name.to_owned(), v));
            }
        }
        for (k, v) in obj {
            if !PHASES.contains(&k.as_str())
                && let Some(v) = v.as_f64()
            {
                phases.push((k.clone(), v));
            }
        }
    }
    if phases.is_empty() {
        return None;
    }
    let sum: f64 = phases.iter().map(|p| p.1).sum();
    if let Some(t) = total_us
        && t > sum * 1.001
    {
        phases.push(("unattributed".to_owned(), t - sum));
    }
    let total = total_us.unwrap_or(sum).max(sum);

    let height = 190.0;
    let mut out = svg::open(
        "blackout-phases",
        WIDE,
        height,
        "Blackout: time per phase, from vCPU pause on the source to resume on the destination",
    );
    let head = match total_us {
        Some(t) => format!("Blackout phases — total {}", fmt::dur_us(t)),
        None => format!(
            "Blackout phases — sum of phases {} (total not recorded)",
            fmt::dur_us(sum)
        ),
    };
    svg::title(&mut out, 12.0, 22.0, &head);
    let r = Rect {
        x: LEFT,
        y: 44.0,
        w: WIDE - LEFT - RIGHT,
        h: 40.0,
    };
    // Long blackouts read better in ms.
    let (scale, unit) = if total >= 10_000.0 {
        (1e3, "ms")
    } else {
        (1.0, "µs")
    };
    let p = Plot {
        r,
        x: Axis::exact(0.0, total / scale),
        y: Axis::nice(0.0, 1.0),
    };
    let mut cursor = 0.0;
    let mut legend = Vec::new();
    let mut other = 0;
    for (name, us) in &phases {
        let c = if name == "unattributed" {
            "#d1d5db"
        } else {
            other += usize::from(!PHASES.contains(&name.as_str()));
            phase_color(name, other)
        };
        let x0 = p.px(cursor / scale);
        let x1 = p.px((cursor + us) / scale);
        let w = (x1 - x0).max(if *us > 0.0 { 1.0 } else { 0.0 });
        let _ = writeln!(
            out,
            "<rect class=\"phase\" data-phase=\"{n}\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{w:.1}\" \
             height=\"{:.1}\" fill=\"{c}\"><title>{n}: {}</title></rect>",
            r.y,
            r.h,
            fmt::dur_us(*us),
            n = esc(name),
        );
        let label = format!("{name} {}", fmt::num(us / scale));
        if w > svg::text_width(&label) + 8.0 {
            svg::text(
                &mut out,
                x0 + w / 2.0,
                r.y + r.h / 2.0 + 4.0,
                "middle",
                "phase-label",
                &label,
            );
        }
        let share = if total > 0.0 { us / total * 100.0 } else { 0.0 };
        legend.push(Legend::new(
            format!("{name} {} ({:.0}%)", fmt::dur_us(*us), share),
            c,
            Mark::Swatch,
        ));
        cursor += us;
    }
    for v in p.x.ticks() {
        let x = p.px(v);
        let _ = writeln!(
            out,
            "<line class=\"axis\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
            r.y + r.h,
            r.y + r.h + 5.0
        );
        svg::text(
            &mut out,
            x,
            r.y + r.h + 18.0,
            "middle",
            "tick",
            &p.x.label(v),
        );
    }
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
        r.x,
        r.x + r.w,
        r.y + r.h,
        r.y + r.h
    );
    svg::text(
        &mut out,
        r.x + r.w / 2.0,
        r.y + r.h + 36.0,
        "middle",
        "axis-title",
        &format!("{unit} since the source paused its vCPUs"),
    );
    svg::legend(&mut out, LEFT, r.y + r.h + 64.0, WIDE - RIGHT, &legend);
    out.push_str("</svg>\n");
    Some(out)
}

/// Histogram buckets: (lower bound, upper bound, count).
type Buckets = Vec<(f64, f64, f64)>;

/// A bar histogram over logarithmic buckets `(upper_bound, count)` with reference lines.
struct HistSpec<'a> {
    kind: &'a str,
    title: String,
    x_title: &'a str,
    /// Stacked series: (name, colour, buckets as (lower, upper, count)).
    series: Vec<(String, String, Buckets)>,
    /// Vertical reference lines: (label, value, dashed).
    refs: Vec<(String, f64, bool)>,
    width: f64,
}

fn log_hist(spec: &HistSpec<'_>) -> String {
    let height = 300.0;
    let mut out = svg::open(spec.kind, spec.width, height, &spec.title);
    svg::title(&mut out, 12.0, 22.0, &spec.title);
    let mut lo = f64::INFINITY;
    let mut hi: f64 = 0.0;
    let mut stack: BTreeMap<u64, f64> = BTreeMap::new();
    for (_, _, b) in &spec.series {
        for &(l, u, c) in b {
            lo = lo.min(l);
            hi = hi.max(u);
            *stack.entry(u.to_bits()).or_default() += c;
        }
    }
    for (_, v, _) in &spec.refs {
        if *v > 0.0 {
            lo = lo.min(*v);
            hi = hi.max(*v);
        }
    }
    let ymax = stack.values().copied().fold(0.0, f64::max);
    let mut legend: Vec<Legend> = spec
        .series
        .iter()
        .map(|(n, c, _)| Legend::new(n.clone(), c, Mark::Swatch))
        .collect();
    let ref_colors = ["#111827", "#6b7280", "#b91c1c", "#047857"];
    for (i, (label, v, dashed)) in spec.refs.iter().enumerate() {
        legend.push(Legend::new(
            format!("{label} {}", fmt::dur_us(*v)),
            ref_colors[i % ref_colors.len()],
            if *dashed { Mark::Dashed } else { Mark::Line },
        ));
    }
    let ly = svg::legend(&mut out, LEFT, 46.0, spec.width - RIGHT, &legend);
    let r = Rect {
        x: LEFT,
        y: ly + 4.0,
        w: spec.width - LEFT - RIGHT,
        h: height - ly - 4.0 - 48.0,
    };
    let p = Plot {
        r,
        x: Axis::log_tight(lo, hi, 1.25),
        y: Axis::nice(0.0, ymax),
    };
    svg::axes(
        &mut out,
        &p,
        None,
        Some(&|v| fmt::count(v)),
        Some(spec.x_title),
        Some("count"),
        true,
    );
    let mut base: BTreeMap<u64, f64> = BTreeMap::new();
    for (_, c, b) in &spec.series {
        for &(l, u, n) in b {
            if n <= 0.0 {
                continue;
            }
            let below = base.entry(u.to_bits()).or_default();
            let x0 = p.px(l) + 0.5;
            let x1 = p.px(u) - 0.5;
            let y_top = p.py(*below + n);
            let y_bot = p.py(*below);
            let _ = writeln!(
                out,
                "<rect class=\"bar\" x=\"{x0:.1}\" y=\"{y_top:.1}\" width=\"{:.1}\" \
                 height=\"{:.1}\" fill=\"{}\"><title>{}–{}: {}</title></rect>",
                (x1 - x0).max(1.0),
                (y_bot - y_top).max(0.5),
                esc(c),
                fmt::num(l),
                fmt::num(u),
                fmt::num(n)
            );
            *below += n;
        }
    }
    for (i, (label, v, dashed)) in spec.refs.iter().enumerate() {
        if *v <= 0.0 {
            continue;
        }
        let x = p.px(*v);
        let dash = if *dashed {
            " stroke-dasharray=\"5 4\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<line class=\"ref\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" \
             stroke=\"{}\" stroke-width=\"1.5\"{dash}><title>{}</title></line>",
            r.y,
            r.y + r.h,
            ref_colors[i % ref_colors.len()],
            esc(label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Fault-latency histogram from `"faults"."histogram": [[upper_bound_us, count], ...]`, with
/// p50/p99/max and the same-run floor marked when recorded.
pub(crate) fn fault_histogram(res: &Value) -> Option<String> {
    let mut pts: Vec<(f64, f64)> = arr(res, "/faults/histogram")
        .iter()
        .filter_map(|p| {
            let a = p.as_array()?;
            Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?))
        })
        .filter(|(u, c)| *u > 0.0 && *c >= 0.0)
        .collect();
    if pts.is_empty() {
        return None;
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Empty buckets below the first and above the last fault only stretch the axis.
    let ratio_all = pts.windows(2).map(|w| w[1].0 / w[0].0).find(|r| *r > 1.0);
    let first = pts.iter().position(|p| p.1 > 0.0).unwrap_or(0);
    let last = pts.iter().rposition(|p| p.1 > 0.0).unwrap_or(pts.len() - 1);
    let pts = &pts[first..=last];
    let ratio = pts
        .windows(2)
        .map(|w| w[1].0 / w[0].0)
        .find(|r| *r > 1.0)
        .or(ratio_all)
        .unwrap_or(2.0);
    let mut buckets = Vec::with_capacity(pts.len());
    let mut prev: Option<f64> = None;
    for &(u, c) in pts {
        let l = prev.unwrap_or(u / ratio);
        buckets.push((l, u, c));
        prev = Some(u);
    }
    let total: f64 = buckets.iter().map(|b| b.2).sum();
    let mut refs = Vec::new();
    for (label, key, dashed) in [
        ("p50", "/faults/p50_us", false),
        ("p99", "/faults/p99_us", false),
        ("max", "/faults/max_us", false),
        ("floor", "/fault_floor_us", true),
    ] {
        if let Some(v) = num_at(res, key) {
            refs.push((label.to_owned(), v, dashed));
        }
    }
    Some(log_hist(&HistSpec {
        kind: "fault-histogram",
        title: format!(
            "Post-copy fault latency ({} faults)",
            fmt::num(num_at(res, "/faults/count").unwrap_or(total))
        ),
        x_title: "fault service latency (µs, log scale)",
        series: vec![("faults".to_owned(), "#e15759".to_owned(), buckets)],
        refs,
        width: WIDE,
    }))
}

/// The mode of a migration result, for grouping ("mode not recorded" when absent).
pub(crate) fn mode_of(res: &Value) -> String {
    str_at(res, "/mode").unwrap_or_else(|| "mode not recorded".to_owned())
}

/// Throughput of a migration result: bytes_sent / total_ms, in bytes/s.
pub(crate) fn throughput_bps(res: &Value) -> Option<f64> {
    let b = num_at(res, "/bytes_sent")?;
    let t = num_at(res, "/total_ms")?;
    (t > 0.0).then(|| b / t * 1e3)
}

/// Which quantity a matrix chart plots.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MatrixY {
    /// `blackout_us`.
    Blackout,
    /// `bytes_sent / total_ms`.
    Throughput,
}

/// Which parameter a matrix chart puts on the x axis.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MatrixX {
    /// `mem_bytes`.
    Memory,
    /// `write_mib_s`.
    WriteRate,
}

/// A matrix chart: every run as a dot, one series per mode, a line through each mode's
/// medians; the x parameter is categorical (the values the matrix ran).
pub(crate) fn matrix(results: &[&Value], xk: MatrixX, yk: MatrixY) -> Option<String> {
    let (xkey, kind_x, x_title) = match xk {
        MatrixX::Memory => ("/mem_bytes", "mem", "guest memory"),
        MatrixX::WriteRate => ("/write_mib_s", "rate", "writer rate (MiB/s)"),
    };
    let mut pts: Vec<(String, f64, f64)> = Vec::new();
    for r in results {
        // A writer "as fast as it can" records no MiB/s but `"write_rate": "max"`: it goes
        // right of every number.
        let xv = match (num_at(r, xkey), xk) {
            (Some(x), _) => x,
            (None, MatrixX::WriteRate) if str_at(r, "/write_rate").as_deref() == Some("max") => {
                f64::INFINITY
            }
            _ => continue,
        };
        let yv = match yk {
            MatrixY::Blackout => num_at(r, "/blackout_us"),
            MatrixY::Throughput => throughput_bps(r),
        };
        if let Some(yv) = yv {
            pts.push((mode_of(r), xv, yv));
        }
    }
    if pts.is_empty() {
        return None;
    }
    let mut xs: Vec<f64> = pts.iter().map(|p| p.1).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let modes: Vec<String> = {
        let mut m: Vec<String> = pts.iter().map(|p| p.0.clone()).collect();
        m.sort();
        m.dedup();
        m
    };
    let ymax = pts.iter().map(|p| p.2).fold(0.0, f64::max);
    let (div, y_title, kind_y, what) = match yk {
        MatrixY::Blackout => (1.0, "blackout (µs)".to_owned(), "blackout", "Blackout"),
        MatrixY::Throughput => {
            let (d, u) = fmt::rate_unit(ymax);
            (d, format!("throughput ({u})"), "throughput", "Throughput")
        }
    };
    let title = format!(
        "{what} vs {}",
        match xk {
            MatrixX::Memory => "memory size",
            MatrixX::WriteRate => "writer rate",
        }
    );
    let height = 340.0;
    let kind = format!("matrix-{kind_y}-{kind_x}");
    let mut out = svg::open(&kind, HALF, height, &title);
    svg::title(&mut out, 12.0, 22.0, &title);
    let legend: Vec<Legend> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| Legend::new(m.clone(), svg::color(i), Mark::Dot))
        .collect();
    let ly = svg::legend(&mut out, LEFT, 46.0, HALF - RIGHT, &legend);
    let r = Rect {
        x: LEFT,
        y: ly + 4.0,
        w: HALF - LEFT - RIGHT,
        h: height - ly - 4.0 - 48.0,
    };
    // Categorical x: slot i of n at the centre of its band.
    let n = xs.len();
    let slot_w = r.w / f64::from(u32::try_from(n).unwrap_or(1).max(1));
    let slot_x = |v: f64| -> f64 {
        let i = xs.iter().position(|x| *x == v).unwrap_or(0);
        r.x + slot_w * (f64::from(u32::try_from(i).unwrap_or(0)) + 0.5)
    };
    let p = Plot {
        r,
        x: Axis::nice(0.0, 1.0),
        y: Axis::nice(0.0, ymax / div),
    };
    for v in p.y.ticks() {
        let y = p.py(v);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
            r.x,
            r.x + r.w
        );
        svg::text(&mut out, r.x - 6.0, y + 4.0, "end", "tick", &p.y.label(v));
    }
    for &xv in &xs {
        let label = match xk {
            MatrixX::Memory => fmt::bytes(xv),
            MatrixX::WriteRate if xv.is_infinite() => "max".to_owned(),
            MatrixX::WriteRate => fmt::num(xv),
        };
        svg::text(
            &mut out,
            slot_x(xv),
            r.y + r.h + 16.0,
            "middle",
            "tick",
            &label,
        );
    }
    svg::frame(&mut out, r);
    svg::text(
        &mut out,
        r.x + r.w / 2.0,
        r.y + r.h + 36.0,
        "middle",
        "axis-title",
        x_title,
    );
    svg::y_axis_title(&mut out, r, &y_title);
    let nm = f64::from(u32::try_from(modes.len()).unwrap_or(1));
    for (mi, m) in modes.iter().enumerate() {
        let off = (f64::from(u32::try_from(mi).unwrap_or(0)) - (nm - 1.0) / 2.0)
            * (slot_w * 0.5 / nm.max(1.0)).min(12.0);
        let c = svg::color(mi);
        let mut line = String::new();
        for &xv in &xs {
            let mut ys: Vec<f64> = pts
                .iter()
                .filter(|p| &p.0 == m && p.1 == xv)
                .map(|p| p.2 / div)
                .collect();
            if ys.is_empty() {
                continue;
            }
            ys.sort_by(f64::total_cmp);
            let cx = slot_x(xv) + off;
            for y in &ys {
                let _ = writeln!(
                    out,
                    "<circle class=\"run\" cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\" \
                     fill-opacity=\"0.7\"><title>{}: {}</title></circle>",
                    p.py(*y),
                    esc(m),
                    fmt::num(*y)
                );
            }
            let med = ys[ys.len() / 2];
            let _ = write!(
                line,
                "{}{cx:.1},{:.1}",
                if line.is_empty() { "M" } else { "L" },
                p.py(med)
            );
        }
        if line.contains('L') {
            let _ = writeln!(
                out,
                "<path class=\"median\" d=\"{line}\" fill=\"none\" stroke=\"{c}\" \
                 stroke-width=\"2\"/>"
            );
        }
    }
    out.push_str("</svg>\n");
    Some(out)
}

/// Histogram of blackout_us across runs, octave buckets, stacked by mode.
pub(crate) fn blackout_histogram(results: &[&Value]) -> Option<String> {
    let mut by_mode: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in results {
        if let Some(b) = num_at(r, "/blackout_us").filter(|b| *b > 0.0) {
            by_mode.entry(mode_of(r)).or_default().push(b);
        }
    }
    let all: Vec<f64> = by_mode.values().flatten().copied().collect();
    if all.len() < 2 {
        return None;
    }
    let octave = |v: f64| v.log2().floor();
    let mut series = Vec::new();
    for (i, (mode, vals)) in by_mode.iter().enumerate() {
        let mut counts: BTreeMap<i64, f64> = BTreeMap::new();
        for v in vals {
            #[allow(clippy::cast_possible_truncation)] // an octave index, |k| < 1100
            let k = octave(*v) as i64;
            *counts.entry(k).or_default() += 1.0;
        }
        let buckets = counts
            .into_iter()
            .map(|(k, c)| {
                let k = f64::from(i32::try_from(k).unwrap_or(0));
                (2f64.powf(k), 2f64.powf(k + 1.0), c)
            })
            .collect();
        series.push((mode.clone(), svg::color(i).to_owned(), buckets));
    }
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let i = ((sorted.len() - 1) as f64 * p).round();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..len
        let i = i as usize;
        sorted[i.min(sorted.len() - 1)]
    };
    let refs = vec![
        ("p50".to_owned(), q(0.5), false),
        ("p99".to_owned(), q(0.99), false),
        ("target".to_owned(), 1000.0, true),
    ];
    Some(log_hist(&HistSpec {
        kind: "blackout-histogram",
        title: format!("Blackout across {} runs", all.len()),
        x_title: "blackout (µs, log scale, octave buckets)",
        series,
        refs,
        width: WIDE,
    }))
}

/// Transport throughput vs the same-run floor, one group per (transport, streams); medians
/// when a configuration ran several times.
pub(crate) fn transport(results: &[&Value]) -> Option<String> {
    // (transport, streams) -> [(gbit_per_s, floor_gbit_per_s)] over runs.
    type Runs = Vec<(f64, Option<f64>)>;
    let mut groups: BTreeMap<(String, i64), Runs> = BTreeMap::new();
    for r in results {
        let Some(g) = num_at(r, "/gbit_per_s") else {
            continue;
        };
        let t = str_at(r, "/transport").unwrap_or_else(|| "transport not recorded".to_owned());
        #[allow(clippy::cast_possible_truncation)] // a stream count
        let s = num_at(r, "/streams").map_or(-1, |s| s as i64);
        groups
            .entry((t, s))
            .or_default()
            .push((g, num_at(r, "/floor_gbit_per_s")));
    }
    if groups.is_empty() {
        return None;
    }
    let median = |mut v: Vec<f64>| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let mut transports: Vec<String> = groups.keys().map(|k| k.0.clone()).collect();
    transports.dedup();
    let bars: Vec<(String, usize, f64, Option<f64>, usize)> = groups
        .into_iter()
        .map(|((t, s), v)| {
            let n = v.len();
            let g = median(v.iter().map(|x| x.0).collect()).unwrap_or(0.0);
            let f = median(v.iter().filter_map(|x| x.1).collect());
            let label = if s >= 0 {
                format!("{t} ×{s}")
            } else {
                t.clone()
            };
            let ti = transports.iter().position(|x| *x == t).unwrap_or(0);
            (label, ti, g, f, n)
        })
        .collect();
    let ymax = bars
        .iter()
        .map(|b| b.2.max(b.3.unwrap_or(0.0)))
        .fold(0.0, f64::max);
    let height = 360.0;
    let title = "Transport throughput vs the same-run floor (plain blocking TCP)";
    let mut out = svg::open("transport", WIDE, height, title);
    svg::title(&mut out, 12.0, 22.0, title);
    let mut legend: Vec<Legend> = transports
        .iter()
        .enumerate()
        .map(|(i, t)| Legend::new(t.clone(), svg::color(i), Mark::Swatch))
        .collect();
    legend.push(Legend::new(
        "floor: same bytes, same streams, plain TCP, same run",
        "#bab0ac",
        Mark::Swatch,
    ));
    let ly = svg::legend(&mut out, LEFT, 46.0, WIDE - RIGHT, &legend);
    let r = Rect {
        x: LEFT,
        y: ly + 12.0,
        w: WIDE - LEFT - RIGHT,
        h: height - ly - 12.0 - 48.0,
    };
    let p = Plot {
        r,
        x: Axis::nice(0.0, 1.0),
        y: Axis::nice(0.0, ymax),
    };
    for v in p.y.ticks() {
        let y = p.py(v);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
            r.x,
            r.x + r.w
        );
        svg::text(&mut out, r.x - 6.0, y + 4.0, "end", "tick", &p.y.label(v));
    }
    svg::frame(&mut out, r);
    svg::y_axis_title(&mut out, r, "Gbit/s");
    let n = f64::from(u32::try_from(bars.len()).unwrap_or(1).max(1));
    let slot = r.w / n;
    let bw = (slot * 0.34).min(70.0);
    for (i, (label, ti, g, f, runs)) in bars.iter().enumerate() {
        let cx = r.x + slot * (f64::from(u32::try_from(i).unwrap_or(0)) + 0.5);
        let base = p.py(0.0);
        let yg = p.py(*g);
        let xg = if f.is_some() {
            cx - bw - 2.0
        } else {
            cx - bw / 2.0
        };
        let _ = writeln!(
            out,
            "<rect class=\"bar measured\" x=\"{xg:.1}\" y=\"{yg:.1}\" width=\"{bw:.1}\" \
             height=\"{:.1}\" fill=\"{}\"><title>{}: {} Gbit/s</title></rect>",
            base - yg,
            svg::color(*ti),
            esc(label),
            fmt::num(*g)
        );
        svg::text(
            &mut out,
            xg + bw / 2.0,
            yg - 4.0,
            "middle",
            "bar-label",
            &fmt::num(*g),
        );
        if let Some(f) = f {
            let yf = p.py(*f);
            let _ = writeln!(
                out,
                "<rect class=\"bar floor\" x=\"{:.1}\" y=\"{yf:.1}\" width=\"{bw:.1}\" \
                 height=\"{:.1}\" fill=\"#bab0ac\"><title>floor: {} Gbit/s</title></rect>",
                cx + 2.0,
                base - yf,
                fmt::num(*f)
            );
            svg::text(
                &mut out,
                cx + 2.0 + bw / 2.0,
                yf - 4.0,
                "middle",
                "bar-label muted",
                &fmt::num(*f),
            );
        }
        svg::text(&mut out, cx, r.y + r.h + 16.0, "middle", "tick", label);
        let mut sub = Vec::new();
        if let Some(f) = f
            && *f > 0.0
        {
            sub.push(format!("{:.2}× floor", g / f));
        }
        if *runs > 1 {
            sub.push(format!("median of {runs}"));
        }
        if !sub.is_empty() {
            svg::text(
                &mut out,
                cx,
                r.y + r.h + 32.0,
                "middle",
                "tick strong",
                &sub.join(", "),
            );
        }
    }
    out.push_str("</svg>\n");
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_rates_from_interval_bytes() {
        let r = json!({"throughput_series": [[10, 0, 1_000_000], [20, 0, 2_000_000], [10, 1, 500_000]]});
        let s = stream_rates(&r);
        let s0 = &s["stream 0"];
        // First interval: one median gap (10 ms) before t=10: 1 MB in 10 ms = 100 MB/s.
        assert_eq!(s0[0], (0.0, 10.0, 1e8));
        assert_eq!(s0[1], (10.0, 20.0, 2e8));
        // A stream with one sample has no gap to infer: its interval starts at 0.
        assert_eq!(s["stream 1"][0], (0.0, 10.0, 5e7));
    }

    #[test]
    fn phases_in_engine_order_with_unattributed_rest() {
        let r = json!({"blackout_us": 100, "blackout_phases_us":
            {"resume": 10, "pause": 20, "send": 30, "custom": 5}});
        let svg = blackout_phases(&r).unwrap();
        let order: Vec<usize> = [
            "\"pause\"",
            "\"send\"",
            "\"resume\"",
            "\"custom\"",
            "\"unattributed\"",
        ]
        .iter()
        .map(|p| svg.find(&format!("data-phase={p}")).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert!(blackout_phases(&json!({"blackout_us": 5})).is_none());
    }

    #[test]
    fn absent_data_draws_nothing() {
        let r = json!({"suite": "migrate"});
        assert!(timeline(&r).is_none());
        assert!(fault_histogram(&r).is_none());
        assert!(matrix(&[&r], MatrixX::Memory, MatrixY::Blackout).is_none());
        assert!(transport(&[&r]).is_none());
        assert!(blackout_histogram(&[&r]).is_none());
    }

    #[test]
    fn matrix_places_max_rate_last() {
        let a = json!({"mode": "hybrid", "write_mib_s": 100, "blackout_us": 500});
        let b = json!({"mode": "hybrid", "write_rate": "max", "blackout_us": 700});
        let svg = matrix(&[&b, &a], MatrixX::WriteRate, MatrixY::Blackout).unwrap();
        let (p100, pmax) = (
            svg.find(">100</text>").unwrap(),
            svg.find(">max</text>").unwrap(),
        );
        assert!(p100 < pmax, "{svg}");
        assert_eq!(svg.matches("class=\"run\"").count(), 2);
    }
}
