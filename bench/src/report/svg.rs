// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Minimal SVG plotting for the report: axes with "nice" ticks (linear, logarithmic or
//! categorical), grid lines, axis titles and legends. Charts are composed from these pieces in
//! `report::charts`. Everything is plain SVG 1.1 text; styling comes from the page's CSS
//! (classes `grid`, `axis`, `tick`, `axis-title`, `chart-title`, `legend`).

use std::fmt::Write as _;

use super::fmt::esc;

/// Series colours (Tableau 10: distinguishable, print-friendly).
pub(crate) const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// The colour of series `i`.
pub(crate) fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// A rectangle in SVG user units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// A value axis: linear or base-10 logarithmic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
}

impl Axis {
    /// A linear axis from `lo` to `hi` widened to "nice" tick multiples.
    pub fn nice(lo: f64, hi: f64) -> Axis {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else if hi == lo && lo != 0.0 {
            (lo.min(0.0), lo.abs().max(hi.abs()) * 1.1)
        } else {
            (0.0, 1.0)
        };
        let step = nice_step((hi - lo) / 5.0);
        Axis {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            log: false,
        }
    }

    /// A log-10 axis covering `lo..hi` (both > 0), widened to powers of ten.
    pub fn log(lo: f64, hi: f64) -> Axis {
        let lo = if lo > 0.0 { lo } else { 1.0 };
        let hi = if hi > lo { hi } else { lo * 10.0 };
        Axis {
            lo: 10f64.powf(lo.log10().floor()),
            hi: 10f64.powf(hi.log10().ceil()),
            log: true,
        }
    }

    /// Linear from `lo`, unless the positive values span more than `ratio`x, then log.
    pub fn auto(min_pos: f64, hi: f64, ratio: f64) -> Axis {
        if min_pos > 0.0 && hi / min_pos > ratio {
            Axis::log(min_pos, hi)
        } else {
            Axis::nice(0.0, hi)
        }
    }

    /// Position of `v` as a fraction of the axis (clamped to 0..1).
    pub fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// The label of tick `v`: as many decimals as the tick step needs (linear), or the
    /// shortest form (log).
    pub fn label(&self, v: f64) -> String {
        if self.log {
            return super::fmt::short(v);
        }
        let step = nice_step((self.hi - self.lo) / 5.0);
        let d = (0..6usize)
            .find(|d| {
                let m = step * 10f64.powi(i32::try_from(*d).unwrap_or(0));
                (m - m.round()).abs() < 1e-6
            })
            .unwrap_or(6);
        super::fmt::fixed(v, d)
    }

    /// A linear axis spanning exactly `lo..hi`; ticks are the nice multiples inside it.
    pub fn exact(lo: f64, hi: f64) -> Axis {
        if hi > lo {
            Axis { lo, hi, log: false }
        } else {
            Axis::nice(lo, hi)
        }
    }

    /// A log-10 axis from `lo / pad` to `hi * pad` (no widening to whole decades).
    pub fn log_tight(lo: f64, hi: f64, pad: f64) -> Axis {
        let lo = if lo > 0.0 { lo / pad } else { 1.0 };
        let hi = if hi * pad > lo { hi * pad } else { lo * 10.0 };
        Axis { lo, hi, log: true }
    }

    /// Tick values.
    pub fn ticks(&self) -> Vec<f64> {
        if self.log {
            let decades = self.hi.log10() - self.lo.log10();
            let mults: &[f64] = if decades <= 1.2 {
                &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
            } else if decades <= 2.5 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut out = Vec::new();
            let mut p = 10f64.powf(self.lo.log10().floor());
            while p <= self.hi * 1.0001 {
                for m in mults {
                    let v = p * m;
                    if v >= self.lo * 0.9999 && v <= self.hi * 1.0001 {
                        out.push(v);
                    }
                }
                p *= 10.0;
            }
            out
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut out = Vec::new();
            let mut i = 0.0;
            loop {
                let v = self.lo + i * step;
                if v > self.hi + step * 1e-6 || out.len() > 50 {
                    break;
                }
                // Avoid "-0".
                out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
                i += 1.0;
            }
            out
        }
    }
}

/// 1, 2, 2.5 or 5 times a power of ten, at least `raw`.
pub(crate) fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A plot area with its two axes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plot {
    pub r: Rect,
    pub x: Axis,
    pub y: Axis,
}

impl Plot {
    /// x in user units.
    pub fn px(&self, v: f64) -> f64 {
        self.r.x + self.x.frac(v) * self.r.w
    }
    /// y in user units (SVG y grows downwards).
    pub fn py(&self, v: f64) -> f64 {
        self.r.y + self.r.h - self.y.frac(v) * self.r.h
    }
}

/// Opens an `<svg class="chart" data-chart="{kind}">` of `w`×`h` with an accessible title.
pub(crate) fn open(kind: &str, w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg class=\"chart\" data-chart=\"{k}\" xmlns=\"http://www.w3.org/2000/svg\" \
         viewBox=\"0 0 {w:.0} {h:.0}\" width=\"{w:.0}\" height=\"{h:.0}\" role=\"img\" \
         aria-label=\"{t}\"><title>{t}</title>\n",
        k = esc(kind),
        t = esc(title),
    )
}

/// The chart's title, top left.
pub(crate) fn title(out: &mut String, x: f64, y: f64, text: &str) {
    let _ = writeln!(
        out,
        "<text class=\"chart-title\" x=\"{x:.1}\" y=\"{y:.1}\">{}</text>",
        esc(text)
    );
}

/// Plain text.
pub(crate) fn text(out: &mut String, x: f64, y: f64, anchor: &str, class: &str, s: &str) {
    let _ = writeln!(
        out,
        "<text class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\">{}</text>",
        esc(s)
    );
}

/// Grid lines, axis lines, tick labels (default: [`Axis::label`]) and axis titles of a plot. `x_labels = false` draws the
/// x grid but no x tick labels (for stacked panels sharing one x axis).
#[allow(clippy::too_many_arguments)]
pub(crate) fn axes(
    out: &mut String,
    p: &Plot,
    xfmt: Option<&dyn Fn(f64) -> String>,
    yfmt: Option<&dyn Fn(f64) -> String>,
    x_title: Option<&str>,
    y_title: Option<&str>,
    x_labels: bool,
) {
    let r = p.r;
    for v in p.y.ticks() {
        let y = p.py(v);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
            r.x,
            r.x + r.w
        );
        let label = yfmt.map_or_else(|| p.y.label(v), |f| f(v));
        text(out, r.x - 6.0, y + 4.0, "end", "tick", &label);
    }
    for v in p.x.ticks() {
        let x = p.px(v);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
            r.y,
            r.y + r.h
        );
        if x_labels {
            let label = xfmt.map_or_else(|| p.x.label(v), |f| f(v));
            text(out, x, r.y + r.h + 16.0, "middle", "tick", &label);
        }
    }
    frame(out, r);
    if let Some(t) = x_title {
        text(
            out,
            r.x + r.w / 2.0,
            r.y + r.h + 36.0,
            "middle",
            "axis-title",
            t,
        );
    }
    if let Some(t) = y_title {
        y_axis_title(out, r, t);
    }
}

/// Left and bottom axis lines of `r`.
pub(crate) fn frame(out: &mut String, r: Rect) {
    let _ = writeln!(
        out,
        "<path class=\"axis\" d=\"M{:.1},{:.1}V{:.1}H{:.1}\"/>",
        r.x,
        r.y,
        r.y + r.h,
        r.x + r.w
    );
}

/// A rotated y-axis title left of `r`.
pub(crate) fn y_axis_title(out: &mut String, r: Rect, t: &str) {
    let x = r.x - 58.0;
    let y = r.y + r.h / 2.0;
    let _ = writeln!(
        out,
        "<text class=\"axis-title\" x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" \
         transform=\"rotate(-90 {x:.1} {y:.1})\">{}</text>",
        esc(t)
    );
}

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A filled square (bars, areas).
    Swatch,
    /// A short line (line series).
    Line,
    /// A dashed line (reference values).
    Dashed,
    /// A dot (scatter series).
    Dot,
    /// An outlined square.
    Outline,
}

/// One legend entry.
#[derive(Debug, Clone)]
pub(crate) struct Legend {
    pub label: String,
    pub color: String,
    pub mark: Mark,
}

impl Legend {
    pub fn new(label: impl Into<String>, color: &str, mark: Mark) -> Legend {
        Legend {
            label: label.into(),
            color: color.to_owned(),
            mark,
        }
    }
}

/// Approximate width of `s` at the 12 px legend font.
pub(crate) fn text_width(s: &str) -> f64 {
    f64::from(u32::try_from(s.chars().count()).unwrap_or(u32::MAX)) * 6.8
}

/// Draws legend entries left to right from (`x`, `y`), wrapping at `max_x`. Returns the y
/// below the last row.
pub(crate) fn legend(out: &mut String, x: f64, y: f64, max_x: f64, items: &[Legend]) -> f64 {
    let mut cx = x;
    let mut cy = y;
    let _ = writeln!(out, "<g class=\"legend\">");
    for it in items {
        let w = 22.0 + text_width(&it.label) + 18.0;
        if cx + w > max_x && cx > x {
            cx = x;
            cy += 18.0;
        }
        let c = esc(&it.color);
        match it.mark {
            Mark::Swatch => {
                let _ = writeln!(
                    out,
                    "<rect x=\"{cx:.1}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"{c}\"/>",
                    cy - 9.0
                );
            }
            Mark::Outline => {
                let _ = writeln!(
                    out,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"13\" height=\"9\" fill=\"none\" \
                     stroke=\"{c}\" stroke-width=\"1.5\"/>",
                    cx + 0.5,
                    cy - 8.5
                );
            }
            Mark::Line | Mark::Dashed => {
                let dash = if it.mark == Mark::Dashed {
                    " stroke-dasharray=\"4 3\""
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "<line x1=\"{cx:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{c}\" \
                     stroke-width=\"2.5\"{dash}/>",
                    cx + 16.0,
                    cy - 4.0,
                    cy - 4.0
                );
            }
            Mark::Dot => {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{c}\"/>",
                    cx + 7.0,
                    cy - 4.0
                );
            }
        }
        text(out, cx + 22.0, cy, "start", "legend-label", &it.label);
        cx += w;
    }
    let _ = writeln!(out, "</g>");
    cy + 18.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        let a = Axis::nice(0.0, 937.0);
        assert_eq!((a.lo, a.hi), (0.0, 1000.0));
        assert_eq!(a.ticks(), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let l = Axis::log(3.0, 4000.0);
        assert_eq!((l.lo, l.hi), (1.0, 10000.0));
        assert_eq!(l.ticks(), vec![1.0, 10.0, 100.0, 1000.0, 10000.0]);
        assert!((l.frac(100.0) - 0.5).abs() < 1e-12);
        let z = Axis::nice(0.0, 0.0);
        assert_eq!((z.lo, z.hi), (0.0, 1.0));
        assert_eq!(nice_step(0.23), 0.25);
        assert_eq!(Axis::nice(0.0, 4.2).label(2.0), "2");
        assert_eq!(Axis::nice(0.0, 1.2).label(0.25), "0.25");
        let t = Axis::log_tight(40.0, 130.0, 1.2);
        assert!(
            t.ticks().contains(&50.0) && t.ticks().contains(&100.0),
            "{:?}",
            t.ticks()
        );
    }
}
