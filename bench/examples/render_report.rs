// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Renders a JSON-lines results file as the HTML report, without the `ferry` binary:
//! `cargo run -p ferry-bench --example render_report -- RESULTS.jsonl report.html`.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .context("usage: render_report RESULTS.jsonl OUT.html")?;
    let output = args
        .next()
        .context("usage: render_report RESULTS.jsonl OUT.html")?;
    let jsonl = std::fs::read_to_string(&input).with_context(|| format!("Cannot read {input}"))?;
    let html = ferry_bench::report::render_html(&jsonl).with_context(|| format!("In {input}"))?;
    std::fs::write(&output, html).with_context(|| format!("Cannot write {output}"))?;
    eprintln!("wrote {output}");
    Ok(())
}
