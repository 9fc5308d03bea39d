// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Text helpers for the report: HTML escaping and human-readable numbers with units.

use std::fmt::Write as _;

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A plain number with a sensible number of decimals and thousands separators.
pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        return fixed(v, 0);
    }
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    fixed(v, decimals)
}

/// The shortest text for `v` at 6 significant digits ("0.5", "2.5", "1,000"): tick labels.
pub(crate) fn short(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let r: f64 = format!("{v:.5e}").parse().unwrap_or(v);
    let s = format!("{r}");
    match s.split_once('.') {
        Some((_, f)) => fixed(r, f.len()),
        None => fixed(r, 0),
    }
}

/// `v` with exactly `decimals` decimals and thousands separators in the integer part.
pub(crate) fn fixed(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), Some(f.to_owned())),
        None => (s.clone(), None),
    };
    let mut grouped = String::new();
    let n = int.len();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (n - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let neg = v < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0');
    let mut out = String::new();
    if neg {
        out.push('−');
    }
    out.push_str(&grouped);
    if let Some(f) = frac {
        out.push('.');
        out.push_str(&f);
    }
    out
}

/// Bytes with binary units: "512 MiB", "1.5 GiB".
pub(crate) fn bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let s = if (v - v.round()).abs() < 0.005 {
        fixed(v.round(), 0)
    } else {
        num(v)
    };
    format!("{s} {}", UNITS[u])
}

/// A duration given in µs: "812 µs", "1.23 ms", "2.50 s".
pub(crate) fn dur_us(us: f64) -> String {
    let a = us.abs();
    if a < 1_000.0 {
        format!("{} µs", num(us))
    } else if a < 1_000_000.0 {
        format!("{} ms", num(us / 1e3))
    } else {
        format!("{} s", num(us / 1e6))
    }
}

/// A data rate given in bytes/s, decimal units: "2.31 GB/s".
pub(crate) fn rate(bps: f64) -> String {
    let (div, unit) = rate_unit(bps);
    format!("{} {unit}", num(bps / div))
}

/// The decimal unit to show rates up to `max_bps` in: (divisor, name).
pub(crate) fn rate_unit(max_bps: f64) -> (f64, &'static str) {
    let a = max_bps.abs();
    if a >= 1e9 {
        (1e9, "GB/s")
    } else if a >= 1e6 {
        (1e6, "MB/s")
    } else if a >= 1e3 {
        (1e3, "kB/s")
    } else {
        (1.0, "B/s")
    }
}

/// A count with an SI suffix for large values: "12.3k", "4.56M".
pub(crate) fn count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{}G", num(v / 1e9))
    } else if a >= 1e6 {
        format!("{}M", num(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", num(v / 1e3))
    } else {
        num(v)
    }
}

/// Joins `parts` with a separator, skipping empty ones.
pub(crate) fn join(parts: &[String], sep: &str) -> String {
    let mut out = String::new();
    for p in parts.iter().filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push_str(sep);
        }
        let _ = write!(out, "{p}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(0.5), "0.500");
        assert_eq!(num(3.0), "3");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(2500.0), "2,500");
        assert_eq!(short(0.1 + 0.2), "0.3");
        assert_eq!(num(-1500.0), "−1,500");
        assert_eq!(bytes(1024.0 * 1024.0 * 1024.0), "1 GiB");
        assert_eq!(bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.50 GiB");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(dur_us(812.0), "812 µs");
        assert_eq!(dur_us(1234.0), "1.23 ms");
        assert_eq!(dur_us(2_500_000.0), "2.50 s");
        assert_eq!(rate(2.31e9), "2.31 GB/s");
        assert_eq!(count(12_345.0), "12.3k");
        assert_eq!(
            join(&["a".into(), String::new(), "b".into()], " · "),
            "a · b"
        );
    }
}
