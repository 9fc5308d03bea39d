// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Renders the HTML report from a synthetic results file and checks it in headless Chromium.
//!
//! TEST INPUT ONLY: every figure below is made up (shaped like this machine's measurements so
//! the charts look like real ones); nothing here was measured.
//!
//! With `FERRY_REPORT_OUT=DIR` the rendered `report.html`, `results.jsonl` and `report.png` are
//! also copied to DIR (handy for looking at the report or putting a screenshot in the README).

#[cfg(test)]
// Synthetic input: small counts and quantile indexes, far from any cast limit.
#[allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use ferry_bench::machine::Machine;
    use ferry_bench::report::render_html;
    use serde_json::{Value, json};

    /// Deterministic xorshift, so the synthetic input is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Roughly log-normal around `median` with spread `sigma`.
        fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
            // Sum of six uniforms, scaled to unit variance, approximates a normal.
            let z: f64 = ((0..6).map(|_| self.unit()).sum::<f64>() - 3.0) * 2f64.sqrt();
            median * (sigma * z).exp()
        }
    }

    const GIB: u64 = 1 << 30;

    fn machine() -> Value {
        // The real description of the machine running the test: exercises Machine's serde shape.
        serde_json::to_value(Machine::detect()).unwrap()
    }

    /// A hybrid migration with every detail field: pre-copy rounds, switchover, post-copy faults.
    fn detailed_hybrid(rng: &mut Rng) -> Value {
        let blackout_start_ms = 662.0;
        let total_ms = 1180.0;
        // Two streams, a sample every 20 ms, ~1.1 GB/s each until switchover, then the
        // background push of the rest at ~0.8 GB/s each.
        let mut series = Vec::new();
        let mut t = 20.0;
        while t <= total_ms {
            for s in 0..2u32 {
                let base = if t <= blackout_start_ms { 1.1e9 } else { 0.8e9 };
                let rate = base * (0.9 + 0.2 * rng.unit());
                let bytes = (rate * 0.020).round();
                if !(t > blackout_start_ms && t < blackout_start_ms + 20.0) {
                    series.push(json!([t, s, bytes]));
                }
            }
            t += 20.0;
        }
        let rounds = json!([
            {"round": 1, "start_ms": 0.0, "duration_ms": 480.0, "pages": 262144, "bytes": 262144u64 * 4096, "dirty_pages": 51200},
            {"round": 2, "start_ms": 480.0, "duration_ms": 130.0, "pages": 51200, "bytes": 51200u64 * 4096, "dirty_pages": 14100},
            {"round": 3, "start_ms": 610.0, "duration_ms": 50.0, "pages": 14100, "bytes": 14100u64 * 4096, "dirty_pages": 9800}
        ]);
        let mut timeline = Vec::new();
        let mut lat = Vec::new();
        let mut t: f64 = blackout_start_ms + 1.0;
        while t < total_ms - 40.0 {
            let mut l = rng.lognormal(66.0, 0.22).max(18.0);
            if rng.unit() < 0.01 {
                // A few slow faults (queued behind the background push).
                l *= 2.0 + 6.0 * rng.unit();
            }
            // The engine's convention: [ms since the destination resumed, latency µs].
            let since_resume = t - (blackout_start_ms + 0.742);
            timeline.push(json!([(since_resume * 100.0).round() / 100.0, l.round()]));
            lat.push(l);
            // Faults thin out as the background push fills memory in.
            t += 0.05 + (t - blackout_start_ms) / 400.0 * rng.unit();
        }
        lat.sort_by(f64::total_cmp);
        let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].round();
        let mut hist = Vec::new();
        let mut upper = 1.0;
        while upper < 2.0 * lat[lat.len() - 1] {
            let lower = upper / 2f64.sqrt();
            let c = lat.iter().filter(|l| **l > lower && **l <= upper).count();
            if upper >= 8.0 {
                hist.push(json!([(upper * 10.0_f64).round() / 10.0, c]));
            }
            upper *= 2f64.sqrt();
        }
        json!({
            "suite": "demo",
            "mode": "hybrid",
            "mem_bytes": GIB,
            "vcpus": 1,
            "workload": "writer",
            "write_mib_s": 400,
            "transport": "uring",
            "streams": 2,
            "blackout_us": 742,
            "blackout_start_ms": blackout_start_ms,
            "blackout_phases_us": {"pause": 35, "harvest": 118, "save": 61, "send": 212,
                                    "apply": 96, "restore": 149, "resume": 41},
            "total_ms": total_ms,
            "bytes_sent": 1_190_000_000u64,
            "rounds": 3,
            "rounds_detail": rounds,
            "throughput_series": series,
            "faults": {"count": lat.len(), "p50_us": q(0.5), "p99_us": q(0.99),
                       "max_us": q(1.0), "total_stall_ms": (lat.iter().sum::<f64>() / 1e3).round(),
                       "timeline": timeline, "histogram": hist},
            "fault_floor_us": 41,
            "guest_max_gap_us": 905,
            "guest_stall_ms": 12.4,
            "verified": true,
            "machine": machine(),
        })
    }

    /// A pre-copy run that converged (no faults), with rounds and phases but no fault data.
    fn detailed_precopy(rng: &mut Rng) -> Value {
        // Rounds at ~3.5 GB/s, each re-sending what the writer dirtied during the previous one.
        let mut rounds = Vec::new();
        let mut start = 0.0;
        let mut pages = 1_048_576.0_f64;
        for r in 1..=6 {
            let dur = pages * 4096.0 / 3.5e9 * 1e3;
            let dirty = (pages * 0.28).round();
            rounds.push(json!({"round": r, "start_ms": start, "duration_ms": dur,
                               "pages": pages, "bytes": pages * 4096.0, "dirty_pages": dirty}));
            start += dur;
            pages = dirty;
        }
        // Four streams sharing those 3.5 GB/s, a sample every 20 ms until the switchover.
        let mut series = Vec::new();
        let mut t = 20.0;
        while t <= start + 20.0 {
            for s in 0..4u32 {
                series.push(json!([t, s, (1.75e7 * (0.85 + 0.3 * rng.unit())).round()]));
            }
            t += 20.0;
        }
        json!({
            "suite": "migrate", "mode": "precopy", "mem_bytes": 4 * GIB, "write_mib_s": 200,
            "transport": "tcp", "streams": 4, "blackout_us": 2950, "blackout_start_ms": start,
            "blackout_phases_us": {"pause": 40, "harvest": 410, "save": 58, "send": 1720,
                                    "apply": 480, "restore": 150, "resume": 39},
            "total_ms": (start + 4.0).round(), "bytes_sent": 5_720_000_000u64, "rounds": 6,
            "rounds_detail": rounds, "throughput_series": series,
            "faults": {"count": 0}, "verified": true, "machine": machine(),
        })
    }

    /// The scalar-only results of a matrix run (what `--quick` prints), three modes.
    fn matrix(rng: &mut Rng) -> Vec<Value> {
        let mut out = Vec::new();
        for mode in ["precopy", "postcopy", "hybrid"] {
            for gib in [1u64, 4, 8] {
                for rate in [100u32, 400] {
                    for _run in 0..2 {
                        let blackout = match mode {
                            "precopy" => 900.0 + 600.0 * f64::from(rate) / 100.0,
                            _ => 520.0 + 40.0 * (gib as f64).log2(),
                        } * (0.85 + 0.3 * rng.unit());
                        let bps = match mode {
                            "precopy" => 2.6e9,
                            "postcopy" => 2.9e9,
                            _ => 2.8e9,
                        } * (0.9 + 0.2 * rng.unit());
                        let sent = (gib * GIB) as f64 * if mode == "precopy" { 1.4 } else { 1.05 };
                        let mut r = json!({
                            "suite": "migrate", "mode": mode, "mem_bytes": gib * GIB,
                            "write_mib_s": rate, "transport": "uring", "streams": 2,
                            "blackout_us": blackout.round(),
                            "total_ms": (sent / bps * 1e3).round(),
                            "bytes_sent": sent.round(), "rounds": if mode == "postcopy" { 0 } else { 4 },
                            "verified": true, "machine": machine(),
                        });
                        if mode != "precopy" {
                            r["faults"] = json!({"count": 1200 * gib, "p50_us": 66, "p99_us": 150,
                                                  "max_us": 610, "total_stall_ms": 95 * gib});
                            r["fault_floor_us"] = json!(40);
                        }
                        out.push(r);
                    }
                }
            }
        }
        out
    }

    fn transports() -> Vec<Value> {
        [
            ("tcp", 1, 13.9, 13.9, 0.62, 0.71),
            ("tcp", 2, 22.1, 22.1, 0.55, 0.66),
            ("uring", 1, 16.2, 14.1, 0.44, 0.69),
            ("uring", 2, 24.9, 22.6, 0.39, 0.61),
            ("uring", 4, 25.8, 19.4, 0.41, 0.63),
        ]
        .iter()
        .map(|&(t, s, g, f, sc, rc)| {
            json!({"suite": "transport", "transport": t, "streams": s, "bytes": 4 * GIB,
                   "seconds": (4.0 * 8.0 * 1.073_741_824 / g), "gbit_per_s": g,
                   "floor_gbit_per_s": f, "ratio_to_floor": g / f,
                   "sender_cpu_s_per_gib": sc, "receiver_cpu_s_per_gib": rc,
                   "verified": true, "machine": machine()})
        })
        .collect()
    }

    fn results_jsonl() -> String {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut all = vec![detailed_hybrid(&mut rng), detailed_precopy(&mut rng)];
        all.extend(transports());
        all.extend(matrix(&mut rng));
        // An unknown suite and a migration result missing nearly everything.
        all.push(
            json!({"suite": "kvm", "what": "dirty_ring_harvest", "per_entry_ns": 241,
                        "p99_us": 1.9, "machine": machine()}),
        );
        all.push(json!({"suite": "migrate", "mode": "postcopy"}));
        let mut s = String::new();
        for v in all {
            s.push_str(&serde_json::to_string(&v).unwrap());
            s.push('\n');
        }
        s
    }

    const CHARTS: [&str; 9] = [
        "timeline",
        "blackout-phases",
        "fault-histogram",
        "matrix-blackout-mem",
        "matrix-throughput-mem",
        "matrix-blackout-rate",
        "matrix-throughput-rate",
        "blackout-histogram",
        "transport",
    ];

    #[test]
    fn report_has_every_chart_and_is_self_contained() -> Result<()> {
        let html = render_html(&results_jsonl())?;
        for c in CHARTS {
            assert!(
                html.contains(&format!("data-chart=\"{c}\"")),
                "chart {c} missing"
            );
        }
        // Two detailed runs: two timelines and two phase charts; one fault histogram.
        assert_eq!(html.matches("data-chart=\"timeline\"").count(), 2);
        assert_eq!(html.matches("data-chart=\"blackout-phases\"").count(), 2);
        assert_eq!(html.matches("data-chart=\"fault-histogram\"").count(), 1);
        // Self-contained: no scripts, no external resources.
        assert!(!html.contains("<script"));
        assert!(!html.contains("src=\"http"));
        assert!(!html.contains("href=\"http"));
        assert!(!html.contains("@import"));
        assert!(!html.contains("url("));
        // Blackout phases in engine order, and the machine is named.
        let phase = |p: &str| html.find(&format!("data-phase=\"{p}\"")).unwrap();
        assert!(phase("pause") < phase("harvest") && phase("restore") < phase("resume"));
        assert!(html.contains("How to read this report"));
        assert!(html.contains("not recorded"), "the sparse result says so");
        Ok(())
    }

    fn find_chromium() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        for dir in std::env::split_paths(&path) {
            for name in ["chromium", "chromium-browser", "google-chrome"] {
                let p = dir.join(name);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }

    /// Runs chromium headless with `extra` args on `page`, killing it after `limit`.
    fn chromium(bin: &Path, profile: &Path, extra: &[String], limit: Duration) -> Result<Vec<u8>> {
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        // Drain stdout on a thread so a large DOM cannot block the browser on a full pipe.
        let mut stdout = child.stdout.take().context("stdout")?;
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
            buf
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("chromium did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("chromium failed: {status}: {err}");
        }
        Ok(out)
    }

    #[test]
    fn report_renders_in_headless_chromium() -> Result<()> {
        let Some(bin) = find_chromium() else {
            if std::env::var("FERRY_REQUIRE_CAPS").as_deref() == Ok("1") {
                bail!("chromium is not on PATH and FERRY_REQUIRE_CAPS=1");
            }
            eprintln!("skipping: chromium (or chromium-browser) is not on PATH");
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let jsonl = results_jsonl();
        let html = render_html(&jsonl)?;
        let page = dir.path().join("report.html");
        std::fs::write(&page, &html)?;
        let url = format!("file://{}", page.display());

        let dom = chromium(
            &bin,
            &dir.path().join("profile-dom"),
            &["--dump-dom".to_owned(), url.clone()],
            Duration::from_secs(90),
        )?;
        let dom = String::from_utf8_lossy(&dom);
        for c in CHARTS {
            assert!(
                dom.contains(&format!("data-chart=\"{c}\"")),
                "chart {c} missing from the rendered DOM"
            );
        }
        // The browser parsed the SVG content: shapes inside the charts survive into the DOM.
        assert!(dom.contains("class=\"phase\""), "phase bars missing");
        assert!(
            dom.contains("class=\"blackout-band\""),
            "blackout band missing"
        );
        assert!(dom.matches("<circle").count() > 100, "fault dots missing");

        let png = dir.path().join("report.png");
        chromium(
            &bin,
            &dir.path().join("profile-shot"),
            &[
                format!("--screenshot={}", png.display()),
                "--window-size=1400,3000".to_owned(),
                url,
            ],
            Duration::from_secs(90),
        )?;
        let bytes = std::fs::read(&png).context("screenshot written")?;
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        // A blank 1400x3000 page compresses to a few KiB; charts and text make it far larger.
        assert!(
            bytes.len() > 100 * 1024,
            "screenshot only {} bytes: page looks empty",
            bytes.len()
        );
        if let Some(out) = std::env::var_os("FERRY_REPORT_OUT") {
            let out = PathBuf::from(out);
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("results.jsonl"), &jsonl)?;
            std::fs::write(out.join("report.html"), &html)?;
            std::fs::copy(&png, out.join("report.png"))?;
        }
        Ok(())
    }
}
