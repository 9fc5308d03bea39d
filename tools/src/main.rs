// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The `ferry` command: live-migrate VMs (`demo`, `send`, `recv`), measure (`bench`), report,
//! and make keys (`keygen`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_protocol::Psk;

mod harvest_cmd;
mod migrate_cmd;

/// ferry: a live-migration transport for virtual machines.
///
/// Moves a running VM's memory and vCPU state from a source to a destination with a blackout
/// below one millisecond, over io_uring zero-copy TCP, RDMA or plain sockets.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a running KVM guest to a destination process on this machine, then check it.
    ///
    /// Starts a KVM guest here, starts `ferry recv` as a second process on loopback, migrates
    /// the running guest, lets it run on at the destination, and checks it: the whole-memory
    /// digest, the verifier guest's memory model, and the guest's own measurement of its
    /// longest pause.
    Demo(migrate_cmd::DemoArgs),
    /// Start a KVM guest and migrate it live to a `ferry recv` on another host.
    Send(migrate_cmd::SendArgs),
    /// Receive a live-migrated KVM guest from `ferry send`, run it on and check it.
    Recv(migrate_cmd::RecvArgs),
    /// Run benchmarks (transport, migrate) against their same-run floors.
    ///
    /// `ferry bench transport ...` and `ferry bench migrate ...` run one suite; without a
    /// suite, the matrix (`--quick` for a small one). `--json` prints one JSON object per
    /// result; `--out FILE` appends them to FILE for `ferry report`.
    Bench(ferry_bench::cli::BenchArgs),
    /// Render benchmark results (JSON lines) as one self-contained HTML file with SVG charts.
    Report {
        /// The results file (JSON lines from `ferry bench --out` or `--json`).
        results: PathBuf,
        /// Where to write the HTML.
        #[arg(short, long, default_value = "report.html")]
        output: PathBuf,
    },
    /// The second process of a benchmark (started by `ferry bench`).
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer(ferry_bench::cli::PeerArgs),
    /// The final dirty harvest in both dirty modes (started by `ferry bench harvest`).
    #[command(name = "__harvest", hide = true)]
    Harvest(ferry_bench::cli::HarvestArgs),
    /// Generate a pre-shared key for authenticating migrations.
    ///
    /// Give the same key file to both sides (`--key-file`), or its contents in FERRY_KEY.
    Keygen {
        /// Write the key to this file (mode 0600) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Keygen { output } => keygen(output),
        Command::Demo(a) => migrate_cmd::demo(a),
        Command::Send(a) => migrate_cmd::send(a),
        Command::Recv(a) => migrate_cmd::recv(a),
        Command::Bench(a) => ferry_bench::cli::run(a),
        Command::BenchPeer(a) => ferry_bench::cli::peer_main(a),
        Command::Harvest(a) => harvest_cmd::run(a),
        Command::Report { results, output } => report(&results, &output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(results: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("Cannot read results {}", results.display()))?;
    let html = ferry_bench::report::render_html(&text).context("Cannot render the report")?;
    std::fs::write(output, html).with_context(|| format!("Cannot write {}", output.display()))?;
    eprintln!("ferry: wrote {}", output.display());
    Ok(())
}

fn keygen(output: Option<PathBuf>) -> Result<()> {
    let key = Psk::generate().context("Cannot generate a key")?;
    match output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("Cannot create key file {}", path.display()))?;
            writeln!(f, "{}", key.to_hex())?;
            eprintln!("ferry: wrote a new key to {}", path.display());
        }
        None => println!("{}", key.to_hex()),
    }
    Ok(())
}
