// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The benchmark report: one self-contained HTML file from a JSON-lines results file.
//!
//! [`render_html`] reads one JSON object per line (the shape the suites print with `--json`)
//! and writes a page with inline CSS and inline SVG charts — no scripts, no fonts, nothing
//! fetched from the network, so the file can be mailed or archived and opened anywhere. It
//! shows:
//!
//! - a short "how to read this report", the machine(s) the results came from (the `machine`
//!   object of each result), and a summary table of every result;
//! - transport results (`"suite": "transport"`): throughput against the same-run floor per
//!   (transport, streams) as a bar chart, and a table;
//! - a migration matrix (two or more `"suite": "migrate"`/`"demo"` results): blackout and
//!   throughput against memory size and writer rate, one series per mode, and a histogram of
//!   blackouts;
//! - every migration run: key figures, a timeline (throughput per stream, dirty pages per round,
//!   post-copy faults, blackout shaded), the blackout split into its phases, and the fault
//!   latency histogram.
//!
//! Missing fields never break rendering: what exists is drawn and the rest says
//! "not recorded". Unknown suites appear in the summary table with their scalar fields.
//! Every chart is an `<svg class="chart" data-chart="KIND">` (kinds listed in `charts`).
//!
//! Not here: running benchmarks or reading files (the `ferry report` command does that).

mod charts;
mod fmt;
mod svg;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use self::fmt::esc;

/// Why a results file could not be turned into a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A line is not valid JSON.
    #[error("Line {line}: invalid JSON")]
    Json {
        /// 1-based line number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A line is valid JSON but not an object.
    #[error("Line {line}: expected a JSON object, found {found}")]
    NotObject {
        /// 1-based line number.
        line: usize,
        /// What was found instead ("array", "string", ...).
        found: &'static str,
    },
}

/// Renders the HTML report for a JSON-lines results file (one result object per line; blank
/// lines are skipped). Returns the complete HTML document.
pub fn render_html(jsonl: &str) -> Result<String, ReportError> {
    let results = parse(jsonl)?;
    Ok(Page::new(&results).render())
}

fn parse(jsonl: &str) -> Result<Vec<Value>, ReportError> {
    let mut out = Vec::new();
    for (i, line) in jsonl.lines().enumerate() {
        let line_no = i + 1;
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(t).map_err(|source| ReportError::Json {
            line: line_no,
            source,
        })?;
        if !v.is_object() {
            return Err(ReportError::NotObject {
                line: line_no,
                found: kind_name(&v),
            });
        }
        out.push(v);
    }
    Ok(out)
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The number at a JSON pointer (`"/faults/p50_us"`), if it is one.
pub(crate) fn num_at(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr)
        .and_then(Value::as_f64)
        .filter(|f| f.is_finite())
}

/// The string (or number, shown as text) at a JSON pointer.
pub(crate) fn str_at(v: &Value, ptr: &str) -> Option<String> {
    match v.pointer(ptr)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The array at a JSON pointer (empty when absent or not an array).
pub(crate) fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

const NR: &str = "<span class=\"nr\">not recorded</span>";

/// An HTML-escaped value, or "not recorded".
fn or_nr(v: Option<String>) -> String {
    v.map_or_else(|| NR.to_owned(), |s| esc(&s))
}

fn suite_of(r: &Value) -> String {
    str_at(r, "/suite").unwrap_or_else(|| "suite not recorded".to_owned())
}

fn is_migration(r: &Value) -> bool {
    matches!(str_at(r, "/suite").as_deref(), Some("migrate" | "demo"))
}

fn is_transport(r: &Value) -> bool {
    str_at(r, "/suite").as_deref() == Some("transport")
}

fn verified_html(r: &Value) -> String {
    match r.pointer("/verified").and_then(Value::as_bool) {
        Some(true) => "<span class=\"ok\">✔ verified</span>".to_owned(),
        Some(false) => "<span class=\"bad\">✘ not verified</span>".to_owned(),
        None => NR.to_owned(),
    }
}

/// One line describing what a result measured.
fn configuration(r: &Value) -> String {
    let mut parts = Vec::new();
    if is_migration(r) {
        parts.push(charts::mode_of(r));
        if let Some(m) = num_at(r, "/mem_bytes") {
            parts.push(fmt::bytes(m));
        }
        if let Some(v) = num_at(r, "/vcpus") {
            parts.push(format!("{} vCPU", fmt::num(v)));
        }
        if let Some(w) = str_at(r, "/workload") {
            parts.push(w);
        }
        if let Some(w) = num_at(r, "/write_mib_s") {
            parts.push(format!("writes {} MiB/s", fmt::num(w)));
        } else if let Some(w) = str_at(r, "/write_rate") {
            parts.push(format!("writes {w}"));
        }
    }
    if let Some(t) = str_at(r, "/transport") {
        match num_at(r, "/streams") {
            Some(s) => parts.push(format!("{t} ×{}", fmt::num(s))),
            None => parts.push(t),
        }
    }
    if is_transport(r)
        && let Some(b) = num_at(r, "/bytes")
    {
        parts.push(fmt::bytes(b));
    }
    if parts.is_empty() {
        // Unknown suite: its first few scalar fields.
        let Some(obj) = r.as_object() else {
            return String::new();
        };
        for (k, v) in obj.iter().filter(|(k, _)| *k != "suite" && *k != "machine") {
            if parts.len() >= 4 {
                break;
            }
            match v {
                Value::String(s) => parts.push(format!("{k}={s}")),
                Value::Number(n) => parts.push(format!("{k}={n}")),
                Value::Bool(b) => parts.push(format!("{k}={b}")),
                _ => {}
            }
        }
    }
    fmt::join(&parts, " · ")
}

/// The headline figures of a result (plain text).
fn figures(r: &Value) -> String {
    let mut parts = Vec::new();
    if is_migration(r) {
        if let Some(b) = num_at(r, "/blackout_us") {
            parts.push(format!("blackout {}", fmt::dur_us(b)));
        }
        if let Some(t) = num_at(r, "/total_ms") {
            parts.push(format!("total {}", fmt::dur_us(t * 1e3)));
        }
        if let Some(bps) = charts::throughput_bps(r) {
            parts.push(fmt::rate(bps));
        }
        if let Some(c) = num_at(r, "/faults/count") {
            let mut s = format!("{} faults", fmt::count(c));
            if let Some(p) = num_at(r, "/faults/p99_us") {
                let _ = write!(s, " (p99 {})", fmt::dur_us(p));
            }
            parts.push(s);
        }
        if let Some(g) = num_at(r, "/guest_max_gap_us") {
            parts.push(format!("guest max gap {}", fmt::dur_us(g)));
        }
    } else if is_transport(r) {
        if let Some(g) = num_at(r, "/gbit_per_s") {
            parts.push(format!("{} Gbit/s", fmt::num(g)));
        }
        if let Some(x) = num_at(r, "/ratio_to_floor") {
            parts.push(format!("{x:.2}× floor"));
        } else if let (Some(g), Some(f)) =
            (num_at(r, "/gbit_per_s"), num_at(r, "/floor_gbit_per_s"))
            && f > 0.0
        {
            parts.push(format!("{:.2}× floor", g / f));
        }
        if let Some(c) = num_at(r, "/sender_cpu_s_per_gib") {
            parts.push(format!("send CPU {c:.2} s/GiB"));
        }
    } else if let Some(obj) = r.as_object() {
        // Unknown suites: the summaries they carry (anything ending in _us / _ms / _per_s).
        for (k, v) in obj {
            if parts.len() >= 3 {
                break;
            }
            if (k.ends_with("_us") || k.ends_with("_ms") || k.ends_with("_per_s"))
                && let Some(n) = v.as_f64()
            {
                parts.push(format!("{k} {}", fmt::num(n)));
            }
        }
    }
    fmt::join(&parts, " · ")
}

/// Scalar fields of a result flattened to (path, text); arrays summarised by length.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if prefix.is_empty() && k == "machine" {
                    continue;
                }
                flatten(&p, x, out);
            }
        }
        Value::Array(a) => out.push((prefix.to_owned(), format!("list of {}", a.len()))),
        Value::Null => out.push((prefix.to_owned(), "null".to_owned())),
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        Value::Number(n) => out.push((prefix.to_owned(), n.to_string())),
        Value::Bool(b) => out.push((prefix.to_owned(), b.to_string())),
    }
}

/// Up to this many results, the table of all results comes before the charts.
const SUMMARY_FIRST_MAX: usize = 12;

/// Past this many migration runs, each run's section is collapsed (the first few stay open).
const OPEN_RUNS: usize = 4;

struct Page<'a> {
    results: &'a [Value],
    /// Distinct machine descriptions, in order of first appearance.
    machines: Vec<&'a Value>,
    /// For each result, the index into `machines`.
    machine_of: Vec<Option<usize>>,
}

impl<'a> Page<'a> {
    fn new(results: &'a [Value]) -> Page<'a> {
        let mut machines: Vec<&Value> = Vec::new();
        let mut machine_of = Vec::new();
        for r in results {
            let m = r.get("machine").filter(|m| m.is_object());
            machine_of.push(m.map(|m| {
                machines.iter().position(|x| *x == m).unwrap_or_else(|| {
                    machines.push(m);
                    machines.len() - 1
                })
            }));
        }
        Page {
            results,
            machines,
            machine_of,
        }
    }

    fn render(&self) -> String {
        let mut h = String::with_capacity(64 * 1024);
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        h.push_str("<title>ferry benchmark report</title>\n<style>\n");
        h.push_str(CSS);
        h.push_str("</style>\n</head>\n<body>\n<main>\n");
        self.header(&mut h);
        h.push_str("<div class=\"intro\">\n");
        self.how_to_read(&mut h);
        self.machines_section(&mut h);
        h.push_str("</div>\n");
        // A long table first would push every chart below the fold: past a dozen results the
        // table goes last (the navigation bar links to it).
        let table_last = self.results.len() > SUMMARY_FIRST_MAX;
        if !table_last {
            self.summary(&mut h);
        }
        self.transport_section(&mut h);
        self.matrix_section(&mut h);
        self.runs_section(&mut h);
        if table_last {
            self.summary(&mut h);
        }
        h.push_str(
            "<footer>Generated by <code>ferry report</code> from JSON lines. \
             Self-contained: inline CSS and SVG, no scripts, no network.</footer>\n",
        );
        h.push_str("</main>\n</body>\n</html>\n");
        h
    }

    fn header(&self, h: &mut String) {
        let mut by_suite: BTreeMap<String, usize> = BTreeMap::new();
        for r in self.results {
            *by_suite.entry(suite_of(r)).or_default() += 1;
        }
        let counts: Vec<String> = by_suite.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let _ = writeln!(
            h,
            "<header><h1>ferry benchmark report</h1><p class=\"sub\">{} result{}{}{}</p></header>",
            self.results.len(),
            if self.results.len() == 1 { "" } else { "s" },
            if counts.is_empty() { "" } else { ": " },
            esc(&counts.join(", "))
        );
        let table_last = self.results.len() > SUMMARY_FIRST_MAX;
        let mut toc = vec![("how", "How to read this report"), ("machine", "Machine")];
        if !table_last {
            toc.push(("summary", "All results"));
        }
        if self.results.iter().any(is_transport) {
            toc.push(("transport", "Transport"));
        }
        if self.results.iter().filter(|r| is_migration(r)).count() >= 2 {
            toc.push(("matrix", "Migration matrix"));
        }
        if self.results.iter().any(is_migration) {
            toc.push(("runs", "Migration runs"));
        }
        if table_last {
            toc.push(("summary", "All results"));
        }
        h.push_str("<nav>");
        for (id, t) in toc {
            let _ = write!(h, "<a href=\"#{id}\">{t}</a>");
        }
        h.push_str("</nav>\n");
    }

    fn how_to_read(&self, h: &mut String) {
        h.push_str(
            "<section id=\"how\"><h2>How to read this report</h2>\n\
<p>Each line of the results file is one benchmark result; the table under <em>All results</em> \
lists them all. <strong>Blackout</strong> is the time the guest cannot run: from the moment the \
source stops its vCPUs to the moment the destination's vCPUs run again; it is split into its \
phases (pause, harvest dirty pages, save vCPU state, send, apply, restore, resume). \
<strong>Throughput</strong> is bytes sent divided by total migration time. In post-copy and \
hybrid migrations the destination runs before all memory has arrived, so a first touch of a \
missing page is a <strong>fault</strong> served over the network: every fault is a small stall \
the guest sees after the blackout, shown as dots over time and as a latency histogram; the \
<em>floor</em> is the unavoidable part of a fault measured in the same run (a locally resolved \
userfaultfd fault plus one request/response round trip). Transport figures are shown beside \
their <em>floor</em>: the same bytes over plain blocking TCP with the same number of streams in \
the same run, so the ratio is comparable across machines while absolute numbers are not.</p>\n\
<p>In the timeline, time runs left to right from the start of the migration; the red band is \
the blackout (widened to stay visible: it is usually under a millisecond in a run of seconds). \
Dirty-page bars span their pre-copy round; a round that ends with few dirty pages lets the \
switchover happen. Hover over bars and dots for exact values. Fields a result did not record \
are marked <span class=\"nr\">not recorded</span>. Every figure is from the machine named \
below, which is shared and noisy: compare runs from the same report, not across machines.</p>\n\
</section>\n",
        );
    }

    fn machines_section(&self, h: &mut String) {
        h.push_str("<section id=\"machine\"><h2>Machine</h2>\n");
        if self.machines.is_empty() {
            let _ = writeln!(h, "<p>Machine description: {NR}.</p>");
        }
        for (i, m) in self.machines.iter().enumerate() {
            let label = if self.machines.len() > 1 {
                format!("M{}", i + 1)
            } else {
                String::new()
            };
            let mem = num_at(m, "/mem_bytes").map(fmt::bytes);
            let cores = num_at(m, "/cores").map(fmt::num);
            let rows = [
                ("CPU", str_at(m, "/cpu_model")),
                ("Logical CPUs", cores),
                ("Memory", mem),
                ("Kernel", str_at(m, "/kernel")),
                ("KVM", str_at(m, "/kvm")),
                ("Runs under hypervisor", str_at(m, "/hypervisor")),
                ("Host name", str_at(m, "/hostname")),
            ];
            let _ = write!(h, "<table class=\"kv machine\">");
            if !label.is_empty() {
                let _ = write!(h, "<caption>{label}</caption>");
            }
            for (k, v) in rows {
                let v = if k == "Runs under hypervisor" && v.is_none() {
                    Some("none (bare metal) or not detected".to_owned())
                } else {
                    v
                };
                let _ = write!(h, "<tr><th>{k}</th><td>{}</td></tr>", or_nr(v));
            }
            h.push_str("</table>\n");
        }
        let without = self.machine_of.iter().filter(|m| m.is_none()).count();
        if without > 0 && !self.machines.is_empty() {
            let _ = writeln!(
                h,
                "<p class=\"note\">{without} result(s) carry no machine description.</p>"
            );
        }
        h.push_str("</section>\n");
    }

    fn machine_label(&self, i: usize) -> String {
        match self.machine_of.get(i).copied().flatten() {
            Some(m) if self.machines.len() > 1 => format!("M{}", m + 1),
            Some(_) => "<span title=\"described under Machine\">✔</span>".to_owned(),
            None => NR.to_owned(),
        }
    }

    fn summary(&self, h: &mut String) {
        h.push_str("<section id=\"summary\"><h2>All results</h2>\n");
        if self.results.is_empty() {
            h.push_str("<p>The results file holds no results.</p></section>\n");
            return;
        }
        h.push_str(
            "<table class=\"results\"><thead><tr><th>#</th><th>suite</th><th>configuration</th>\
             <th>figures</th><th>verified</th><th>machine</th></tr></thead><tbody>\n",
        );
        for (i, r) in self.results.iter().enumerate() {
            let link = if is_migration(r) {
                format!("<a href=\"#run-{}\">{}</a>", i + 1, i + 1)
            } else {
                (i + 1).to_string()
            };
            let conf = configuration(r);
            let fig = figures(r);
            let _ = writeln!(
                h,
                "<tr><td>{link}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&suite_of(r)),
                if conf.is_empty() {
                    NR.to_owned()
                } else {
                    esc(&conf)
                },
                if fig.is_empty() {
                    NR.to_owned()
                } else {
                    esc(&fig)
                },
                verified_html(r),
                self.machine_label(i)
            );
        }
        h.push_str("</tbody></table>\n</section>\n");
    }

    fn transport_section(&self, h: &mut String) {
        let ts: Vec<&Value> = self.results.iter().filter(|r| is_transport(r)).collect();
        if ts.is_empty() {
            return;
        }
        h.push_str("<section id=\"transport\"><h2>Transport</h2>\n");
        h.push_str(
            "<p>Each transport moved the same bytes as the floor, plain blocking TCP over the \
             same number of connections, measured in the same run; bars show Gbit/s, the ratio \
             under each group is measured ÷ floor (≥ 1 means at least as fast as plain TCP).</p>\n",
        );
        match charts::transport(&ts) {
            Some(svg) => h.push_str(&figure(&svg)),
            None => {
                let _ = writeln!(h, "<p>Throughput chart: {NR} (no gbit_per_s).</p>");
            }
        }
        h.push_str(
            "<table class=\"results num\"><thead><tr><th>transport</th><th>streams</th>\
             <th>bytes</th><th>seconds</th><th>Gbit/s</th><th>floor Gbit/s</th>\
             <th>ratio to floor</th><th>sender CPU s/GiB</th><th>receiver CPU s/GiB</th>\
             <th>verified</th></tr></thead><tbody>\n",
        );
        for r in ts {
            let n = |k: &str, f: &dyn Fn(f64) -> String| or_nr(num_at(r, k).map(f));
            let ratio = num_at(r, "/ratio_to_floor").or_else(|| {
                let g = num_at(r, "/gbit_per_s")?;
                let f = num_at(r, "/floor_gbit_per_s")?;
                (f > 0.0).then(|| g / f)
            });
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                or_nr(str_at(r, "/transport")),
                n("/streams", &fmt::num),
                n("/bytes", &fmt::bytes),
                n("/seconds", &|v| format!("{v:.3}")),
                n("/gbit_per_s", &|v| format!("{v:.2}")),
                n("/floor_gbit_per_s", &|v| format!("{v:.2}")),
                or_nr(ratio.map(|v| format!("{v:.2}×"))),
                n("/sender_cpu_s_per_gib", &|v| format!("{v:.3}")),
                n("/receiver_cpu_s_per_gib", &|v| format!("{v:.3}")),
                verified_html(r)
            );
        }
        h.push_str("</tbody></table>\n</section>\n");
    }

    fn matrix_section(&self, h: &mut String) {
        let ms: Vec<&Value> = self.results.iter().filter(|r| is_migration(r)).collect();
        if ms.len() < 2 {
            return;
        }
        h.push_str("<section id=\"matrix\"><h2>Migration matrix</h2>\n");
        let _ = writeln!(
            h,
            "<p>{} migration runs. Each dot is one run; lines join each mode's medians. \
             Throughput is bytes sent ÷ total migration time.</p>",
            ms.len()
        );
        h.push_str("<div class=\"grid2\">\n");
        let mut drawn = 0;
        for (xk, yk) in [
            (charts::MatrixX::Memory, charts::MatrixY::Blackout),
            (charts::MatrixX::Memory, charts::MatrixY::Throughput),
            (charts::MatrixX::WriteRate, charts::MatrixY::Blackout),
            (charts::MatrixX::WriteRate, charts::MatrixY::Throughput),
        ] {
            if let Some(svg) = charts::matrix(&ms, xk, yk) {
                h.push_str(&figure(&svg));
                drawn += 1;
            }
        }
        h.push_str("</div>\n");
        if drawn == 0 {
            let _ = writeln!(
                h,
                "<p>Matrix charts: {NR} (the runs carry no mem_bytes or write_mib_s together \
                 with blackout_us or bytes_sent and total_ms).</p>"
            );
        }
        if let Some(svg) = charts::blackout_histogram(&ms) {
            h.push_str(&figure(&svg));
        }
        h.push_str("</section>\n");
    }

    fn runs_section(&self, h: &mut String) {
        let runs: Vec<(usize, &Value)> = self
            .results
            .iter()
            .enumerate()
            .filter(|(_, r)| is_migration(r))
            .collect();
        if runs.is_empty() {
            return;
        }
        h.push_str("<section id=\"runs\"><h2>Migration runs</h2>\n");
        let (detailed, plain): (Vec<_>, Vec<_>) = runs.iter().partition(|(_, r)| has_detail(r));
        let collapse = detailed.len() > OPEN_RUNS;
        if collapse {
            let _ = writeln!(
                h,
                "<p class=\"note\">{} runs with timelines: the first {OPEN_RUNS} are open, the \
                 others are collapsed (click a title to open it).</p>",
                detailed.len()
            );
        }
        for (k, (i, r)) in detailed.iter().enumerate() {
            self.run(h, *i, r, collapse, k < OPEN_RUNS);
        }
        if !plain.is_empty() {
            let _ = writeln!(
                h,
                "<details class=\"plain-runs\"><summary>{} run{} recorded summary figures only \
                 (no timeline, phase or histogram data): they appear in the table and the \
                 matrix above; open for each run's figures.</summary>",
                plain.len(),
                if plain.len() == 1 { "" } else { "s" }
            );
            for (i, r) in &plain {
                self.run(h, *i, r, false, false);
            }
            h.push_str("</details>\n");
        }
        h.push_str("</section>\n");
    }

    fn run(&self, h: &mut String, i: usize, r: &Value, collapse: bool, open: bool) {
        let conf = configuration(r);
        let title = format!("#{} {} — {}", i + 1, suite_of(r), conf);
        let _ = writeln!(h, "<article class=\"run\" id=\"run-{}\">", i + 1);
        if collapse {
            let _ = writeln!(
                h,
                "<details{}><summary><h3>{}</h3></summary>",
                if open { " open" } else { "" },
                esc(&title)
            );
        } else {
            let _ = writeln!(h, "<h3>{}</h3>", esc(&title));
        }
        // Key figures.
        let f = |k: &str| num_at(r, k);
        let faults = match f("/faults/count") {
            Some(c) => {
                let mut s = fmt::num(c);
                let pct = [
                    ("p50", "/faults/p50_us"),
                    ("p99", "/faults/p99_us"),
                    ("max", "/faults/max_us"),
                ];
                let q: Vec<String> = pct
                    .iter()
                    .filter_map(|(n, k)| f(k).map(|v| format!("{n} {}", fmt::dur_us(v))))
                    .collect();
                if !q.is_empty() {
                    let _ = write!(s, " ({})", q.join(", "));
                }
                Some(s)
            }
            None => None,
        };
        let cards: [(&str, Option<String>); 16] = [
            ("blackout", f("/blackout_us").map(fmt::dur_us)),
            ("total time", f("/total_ms").map(|t| fmt::dur_us(t * 1e3))),
            ("throughput", charts::throughput_bps(r).map(fmt::rate)),
            ("bytes sent", f("/bytes_sent").map(fmt::bytes)),
            ("memory", f("/mem_bytes").map(fmt::bytes)),
            ("rounds", f("/rounds").map(fmt::num)),
            ("faults", faults),
            (
                "fault stall total",
                f("/faults/total_stall_ms").map(|v| fmt::dur_us(v * 1e3)),
            ),
            ("fault floor", f("/fault_floor_us").map(fmt::dur_us)),
            ("guest max gap", f("/guest_max_gap_us").map(fmt::dur_us)),
            (
                "guest stalls > 100 µs",
                f("/guest_stall_ms").map(|v| fmt::dur_us(v * 1e3)),
            ),
            // The guest's gaps split at the switchover (KVM guests that log their gaps).
            (
                "guest gap across the switchover",
                f("/guest_switch_gap_us").map(|v| {
                    match (f("/guest_switch_gap_src_us"), f("/guest_switch_gap_dst_us")) {
                        (Some(a), Some(b)) => format!(
                            "{} ({} + {})",
                            fmt::dur_us(v),
                            fmt::dur_us(a),
                            fmt::dur_us(b)
                        ),
                        _ => fmt::dur_us(v),
                    }
                }),
            ),
            (
                "guest longest gap before it",
                f("/guest_pre_max_gap_us").map(fmt::dur_us),
            ),
            (
                "guest longest gap after it",
                f("/guest_after_max_gap_us").map(fmt::dur_us),
            ),
            (
                "guest stalls after it",
                f("/guest_after_stall_ms").map(|v| fmt::dur_us(v * 1e3)),
            ),
            ("transport", {
                let t = str_at(r, "/transport");
                match (t, f("/streams")) {
                    (Some(t), Some(s)) => Some(format!("{t} ×{}", fmt::num(s))),
                    (t, _) => t,
                }
            }),
        ];
        h.push_str("<div class=\"cards\">");
        if let Some(sw) = str_at(r, "/switchover") {
            let _ = write!(
                h,
                "<div class=\"card\"><div class=\"k\">switchover</div><div class=\"v\">{}</div></div>",
                esc(&sw)
            );
        }
        for (k, v) in cards {
            let _ = write!(
                h,
                "<div class=\"card\"><div class=\"k\">{k}</div><div class=\"v\">{}</div></div>",
                or_nr(v)
            );
        }
        let _ = write!(
            h,
            "<div class=\"card\"><div class=\"k\">memory check</div><div class=\"v\">{}</div></div>",
            verified_html(r)
        );
        h.push_str("</div>\n");

        if has_detail(r) {
            match charts::timeline(r) {
                Some(svg) => h.push_str(&figure(&svg)),
                None => {
                    let _ = writeln!(
                        h,
                        "<p class=\"missing\">Timeline: {NR} (no throughput_series, rounds_detail or \
                         faults.timeline in this result).</p>"
                    );
                }
            }
            match charts::blackout_phases(r) {
                Some(svg) => h.push_str(&figure(&svg)),
                None => {
                    let _ = writeln!(
                        h,
                        "<p class=\"missing\">Blackout phases: {NR} (no blackout_phases_us).</p>"
                    );
                }
            }
            match charts::fault_histogram(r) {
                Some(svg) => h.push_str(&figure(&svg)),
                None => {
                    if f("/faults/count") == Some(0.0) {
                        h.push_str("<p class=\"missing\">Fault-latency histogram: no faults in this run.</p>\n");
                    } else {
                        let _ = writeln!(
                            h,
                            "<p class=\"missing\">Fault-latency histogram: {NR} (no faults.histogram).</p>"
                        );
                    }
                }
            }
        } else {
            let _ = writeln!(
                h,
                "<p class=\"missing\">Timeline, blackout phases and fault histogram: {NR} \
                 (this result has summary figures only).</p>"
            );
        }
        let mut fields = Vec::new();
        flatten("", r, &mut fields);
        h.push_str(
            "<details class=\"fields\"><summary>All recorded fields</summary><table class=\"kv\">",
        );
        for (k, v) in fields {
            let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&v));
        }
        h.push_str("</table></details>\n");
        if collapse {
            h.push_str("</details>\n");
        }
        h.push_str("</article>\n");
    }
}

/// Whether a migration result carries any of the per-run series the charts draw.
fn has_detail(r: &Value) -> bool {
    [
        "/throughput_series",
        "/rounds_detail",
        "/faults/timeline",
        "/faults/histogram",
    ]
    .iter()
    .any(|p| !arr(r, p).is_empty())
        || r.pointer("/blackout_phases_us")
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
}

fn figure(svg: &str) -> String {
    format!("<figure>{svg}</figure>\n")
}

const CSS: &str = r#":root { --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#ffffff; --panel:#f8fafc; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 2px; font-size: 28px; letter-spacing: -0.01em; }
header .sub { margin: 0; color: var(--muted); }
nav { margin: 14px 0 8px; display:flex; flex-wrap:wrap; gap: 6px 18px; padding: 8px 0; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); text-decoration: none; font-weight: 500; }
h2 { margin: 32px 0 10px; font-size: 21px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { margin: 22px 0 10px; font-size: 17px; display: inline; }
article.run { margin: 18px 0 30px; padding: 16px 18px; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
article.run > h3 { display:block; margin-top: 0; }
summary { cursor: pointer; }
p { max-width: 95ch; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: #f1f5f9; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafafa; }
table.results { width: 100%; }
table.num td { font-variant-numeric: tabular-nums; }
table.kv th { color: var(--muted); font-weight: 500; white-space: nowrap; }
table.kv caption { text-align:left; font-weight:600; }
.nr { color: #9ca3af; font-style: italic; }
.ok { color: #047857; font-weight: 600; white-space: nowrap; }
.bad { color: #b91c1c; font-weight: 600; white-space: nowrap; }
.note, .missing { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); gap: 8px; margin: 10px 0 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
.card .k { color: var(--muted); font-size: 12.5px; }
.card .v { font-size: 15px; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
.intro { display: grid; grid-template-columns: minmax(0, 2fr) minmax(280px, 1fr); gap: 0 36px; align-items: start; }
@media (max-width: 900px) { .intro { grid-template-columns: 1fr; } }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 12px; }
.grid2 figure { margin: 0; }
svg.chart { display:block; width: 100%; height: auto; max-width: 100%; }
svg.chart text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; font-size: 12px; fill: #374151; }
svg.chart .chart-title { font-size: 15px; font-weight: 600; fill: #111827; }
svg.chart .panel-title { font-size: 13px; font-weight: 600; fill: #111827; }
svg.chart .axis-title { font-size: 12px; fill: #4b5563; }
svg.chart .tick { font-size: 11px; fill: #6b7280; font-variant-numeric: tabular-nums; }
svg.chart .tick.strong { fill: #111827; font-weight: 600; }
svg.chart .grid { stroke: #eef0f3; stroke-width: 1; }
svg.chart .axis { stroke: #9ca3af; stroke-width: 1; fill: none; }
svg.chart .bar-label { font-size: 11px; fill: #111827; }
svg.chart .bar-label.muted { fill: #6b7280; }
svg.chart .phase-label { font-size: 11px; fill: #111827; font-weight: 600; }
svg.chart .annotation { font-size: 12px; fill: #b91c1c; font-weight: 600; }
svg.chart .blackout-band { fill: #e15759; fill-opacity: 0.22; stroke: #e15759; stroke-opacity: 0.7; stroke-width: 1; }
svg.chart .no-data { fill: #9ca3af; font-style: italic; }
details.fields { margin-top: 8px; font-size: 14px; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; border-top: 1px solid var(--line); padding-top: 10px; }
"#;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let e = render_html("{\"suite\":\"x\"}\n\n{oops\n").unwrap_err();
        assert!(matches!(e, ReportError::Json { line: 3, .. }), "{e:?}");
        assert_eq!(e.to_string(), "Line 3: invalid JSON");
        let e = render_html("[1,2]\n").unwrap_err();
        assert!(matches!(e, ReportError::NotObject { line: 1, .. }), "{e:?}");
    }

    #[test]
    fn empty_and_minimal_inputs_render() {
        let h = render_html("").unwrap();
        assert!(h.contains("holds no results"));
        // A migration result with nothing but its suite: everything "not recorded".
        let h = render_html("{\"suite\":\"migrate\"}\n{\"suite\":\"transport\"}\n{}\n").unwrap();
        assert!(h.contains(
            "Timeline, blackout phases and fault histogram: <span class=\"nr\">not recorded"
        ));
        assert!(h.contains("suite not recorded"));
        assert!(!h.contains("<script"));
        // Phases but no series: the timeline alone is "not recorded".
        let h = render_html(
            "{\"suite\":\"demo\",\"blackout_us\":900,\"blackout_phases_us\":{\"pause\":20}}\n",
        )
        .unwrap();
        assert!(h.contains("Timeline: <span class=\"nr\">not recorded"));
        assert!(h.contains("data-chart=\"blackout-phases\""));
    }

    #[test]
    fn text_from_results_is_escaped() {
        let h = render_html("{\"suite\":\"migrate\",\"mode\":\"<script>alert(1)</script>\"}\n")
            .unwrap();
        assert!(!h.contains("<script>alert"));
        assert!(h.contains("&lt;script&gt;"));
    }
}
