// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The `ferry bench` command line: argument structs (clap derive), the runner of single suites
//! and of the matrix, output (readable tables, `--json` lines, `--out` files), live progress,
//! and the link to the second process every suite needs.
//!
//! The `ferry` binary embeds [`BenchArgs`] as `ferry bench ...` (calling [`run`]) and
//! [`PeerArgs`] as the hidden `ferry __bench-peer ...` (calling [`peer_main`]). A suite runs in
//! this process and starts its peer as `<exe> __bench-peer --suite <suite>`: the executable is
//! `$FERRY_BIN` when set, else [`std::env::current_exe`] ([`PeerLauncher::from_env`]). Tests of
//! the library run the peer in a thread of the same process instead ([`PeerLauncher::Thread`]),
//! with the same code on both ends of the same pipes.
//!
//! The peer protocol is JSON, one message per line: the job goes to the peer's standard input
//! as the first line (so keys never appear in `ps`); the peer answers on standard output with
//! lines prefixed by [`PEER_PREFIX`] (anything else it prints there is passed through to
//! standard error), and errors as `{"msg":"error","error":...}` before exiting non-zero.
//!
//! Not here: what a suite measures ([`crate::transport_bench`], [`crate::migrate_bench`]), the
//! machine description ([`crate::machine`]), the HTML report ([`crate::report`]).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::migrate_bench::{self, MigrateBench, MigrateResult, WriteRate};
use crate::transport_bench::{self, TransportBench, TransportChoice, TransportResult};

/// Prefix of every protocol line the peer prints on standard output.
pub const PEER_PREFIX: &str = "FERRY-PEER ";

/// Environment variable naming the `ferry` executable to start as the peer.
pub const FERRY_BIN_ENV: &str = "FERRY_BIN";

/// `ferry bench`: run one suite, or (without a suite) the matrix of both.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The suite to run; without one, the matrix over `--suites`.
    #[command(subcommand)]
    pub suite: Option<SuiteArgs>,
    /// Matrix options (used when no suite is named).
    #[command(flatten)]
    pub matrix: MatrixArgs,
    /// Output options.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One suite.
#[derive(Debug, Clone, Subcommand)]
pub enum SuiteArgs {
    /// Move memory between two processes over a transport, beside a plain-TCP floor.
    Transport(TransportArgs),
    /// Migrate a process VM with live writers to a second process.
    Migrate(MigrateArgs),
    /// Live-migrate a real KVM guest to a second process (`ferry demo --json`), with the
    /// guest's own measurement of its stalls.
    Kvm(KvmArgs),
    /// Time the blackout's final dirty harvest of a real KVM guest, dirty bitmap against dirty
    /// ring, alternating in the same run.
    Harvest(HarvestArgs),
}

/// `ferry bench harvest`.
#[derive(Debug, Clone, Args)]
pub struct HarvestArgs {
    /// Guest memory in MiB (each of the two VMs; several sizes are run one after the other).
    #[arg(long, value_delimiter = ',', default_values_t = [1024u64, 8192])]
    pub mem_mib: Vec<u64>,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// The writer guest's working set in MiB (it writes it as fast as it can).
    #[arg(long, default_value_t = 256)]
    pub working_set_mib: u64,
    /// Guest writes between the last round's harvest and the pause, in ms.
    #[arg(long, default_value_t = 20)]
    pub run_ms: u64,
    /// Final harvests timed per mode and size.
    #[arg(long, default_value_t = 30)]
    pub iterations: u32,
}

/// `ferry bench kvm`: the options of `ferry demo` that matter for a benchmark.
#[derive(Debug, Clone, Args)]
pub struct KvmArgs {
    /// Migration mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Hybrid)]
    pub mode: ModeArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Built-in guest: idle, writer or verifier.
    #[arg(long, default_value = "verifier")]
    pub workload: String,
    /// Writer guest: MiB/s (0 = as fast as it can).
    #[arg(long, default_value_t = 0)]
    pub write_mib_s: u64,
    /// Transport: uring or tcp.
    #[arg(long, default_value = "uring")]
    pub transport: String,
    /// Bulk streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u16,
    /// Blackout budget in µs.
    #[arg(long, default_value_t = 1000)]
    pub max_blackout_us: u64,
    /// The VM's part of the stop-and-copy prediction in µs (`ferry demo
    /// --switch-overhead-us`); the engine's default when absent.
    #[arg(long)]
    pub switch_overhead_us: Option<u64>,
    /// Hybrid's reserve of the budget, 0 to 1 (`ferry demo --hybrid-reserve`); the engine's
    /// default when absent.
    #[arg(long)]
    pub hybrid_reserve: Option<f64>,
    /// Runs (one result each).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// How the blackout's threads are raised: fifo, nice, slice or off.
    #[arg(long, default_value = "fifo")]
    pub blackout_priority: String,
    /// How the destination receives memfd memory: mapping or page-cache (splice).
    #[arg(long, default_value = "mapping")]
    pub recv_into: String,
    /// Seconds the guest runs before each migration (`ferry demo --warmup-s`).
    #[arg(long, default_value_t = 0.5)]
    pub warmup_s: f64,
}

/// Output options (accepted before or after the suite name).
#[derive(Debug, Clone, Default, Args)]
pub struct OutputArgs {
    /// Print one JSON object per result on standard output (instead of the table).
    #[arg(long, global = true)]
    pub json: bool,
    /// Append every result as a JSON line to this file.
    #[arg(long, global = true, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `ferry bench transport`.
#[derive(Debug, Clone, Args)]
pub struct TransportArgs {
    /// Transport to measure.
    #[arg(long, value_enum, default_value_t = TransportChoice::Uring)]
    pub transport: TransportChoice,
    /// Parallel streams (connections).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// GiB of memory to move (fractions allowed, e.g. 0.25).
    #[arg(long, default_value_t = 1.0)]
    pub size_gib: f64,
    /// Bytes of guest memory per frame, in KiB.
    #[arg(long, default_value_t = 1024)]
    pub frame_kib: u64,
    /// Repeat the measurement this many times (one result each).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

/// `ferry bench migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Migration mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Hybrid)]
    pub mode: ModeArg,
    /// GiB of guest memory (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub mem_gib: f64,
    /// Writers' dirtying rate in MiB/s: a number, 0 = idle, or `max` = unlimited.
    #[arg(long, default_value = "max")]
    pub write_mib_s: WriteRate,
    /// Writer threads (the guest's "vCPUs").
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Bulk streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u16,
    /// Transport (rdma is not available for migrations here).
    #[arg(long, value_enum, default_value_t = TransportChoice::Uring)]
    pub transport: TransportChoice,
    /// Guest memory backing.
    #[arg(long, value_enum, default_value_t = migrate_bench::BackingArg::Anon)]
    pub backing: migrate_bench::BackingArg,
    /// Which pages the writers write.
    #[arg(long, value_enum, default_value_t = migrate_bench::PatternArg::Random)]
    pub pattern: migrate_bench::PatternArg,
    /// Blackout budget in µs (pre-copy and hybrid switch over when the prediction fits).
    #[arg(long, default_value_t = 1000)]
    pub max_blackout_us: u64,
    /// Per-page xxh3 checksums on the wire.
    #[arg(long)]
    pub checksums: bool,
    /// Runs (one result each; a fresh peer process per run).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

/// Migration mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    /// Iterative pre-copy, then stop-and-copy.
    Precopy,
    /// Switch over at once; pages follow on demand and in the background.
    Postcopy,
    /// Pre-copy while it converges, then post-copy.
    Hybrid,
}

impl ModeArg {
    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            ModeArg::Precopy => "precopy",
            ModeArg::Postcopy => "postcopy",
            ModeArg::Hybrid => "hybrid",
        }
    }
}

/// Suites the matrix runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SuiteName {
    /// `ferry bench transport`.
    Transport,
    /// `ferry bench migrate`.
    Migrate,
}

/// The matrix runner's options (`ferry bench [--quick] ...`).
#[derive(Debug, Clone, Args)]
pub struct MatrixArgs {
    /// A small matrix that finishes in about two minutes on a 2-core machine (transport
    /// 256 MiB over uring and tcp with 1 and 2 streams; migrate 256 MiB over uring with
    /// 2 streams in each mode with a 256 MiB/s writer). Explicit options below override its
    /// choices. Without `--quick` the defaults are 1 GiB, 1/2/4 streams, uring and tcp,
    /// writers at 256 MiB/s and unlimited.
    #[arg(long)]
    pub quick: bool,
    /// Suites to run.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub suites: Vec<SuiteName>,
    /// Migration modes.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<ModeArg>,
    /// Sizes in GiB (transport bytes and guest memory).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<f64>,
    /// Stream counts.
    #[arg(long, value_delimiter = ',')]
    pub streams: Vec<u16>,
    /// Transports.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub transports: Vec<TransportChoice>,
    /// Writer rates for migrations (MiB/s, 0 = idle, `max`).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<WriteRate>,
    /// Runs per matrix point.
    #[arg(long)]
    pub runs: Option<u32>,
}

impl MatrixArgs {
    /// Whether any matrix option was given.
    pub fn is_set(&self) -> bool {
        self.quick
            || !self.suites.is_empty()
            || !self.modes.is_empty()
            || !self.sizes.is_empty()
            || !self.streams.is_empty()
            || !self.transports.is_empty()
            || !self.rates.is_empty()
            || self.runs.is_some()
    }
}

/// Re-emits every JSON line of a child's `stdout` with the machine description, after `tag`,
/// and returns them (lines that are not JSON are skipped).
fn reemit(
    stdout: &[u8],
    out: &mut Output,
    tag: impl Fn(&mut serde_json::Value),
) -> Result<Vec<serde_json::Value>> {
    let machine = serde_json::to_value(crate::machine::Machine::detect())?;
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        tag(&mut v);
        v["machine"] = machine.clone();
        out.emit(&v)?;
        rows.push(v);
    }
    Ok(rows)
}

/// Runs `ferry __harvest` (every size, one after the other, in one process) and re-emits its
/// results (one per size and dirty mode) with the machine description.
fn run_harvest(h: &HarvestArgs, peer: &PeerLauncher, out: &mut Output) -> Result<()> {
    let PeerLauncher::Process(exe) = peer else {
        bail!("The harvest suite needs the ferry binary (it runs `ferry __harvest`)");
    };
    let sizes: Vec<String> = h.mem_mib.iter().map(u64::to_string).collect();
    let output = std::process::Command::new(exe)
        .arg("__harvest")
        .args([
            "--mem-mib",
            &sizes.join(","),
            "--vcpus",
            &h.vcpus.to_string(),
        ])
        .args(["--working-set-mib", &h.working_set_mib.to_string()])
        .args(["--run-ms", &h.run_ms.to_string()])
        .args(["--iterations", &h.iterations.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("Cannot run ferry __harvest")?;
    let rows = reemit(&output.stdout, out, |_| {})?;
    if !output.status.success() || rows.len() != 2 * h.mem_mib.len() {
        bail!(
            "ferry __harvest failed ({}), {} of {} results reported",
            output.status,
            rows.len(),
            2 * h.mem_mib.len()
        );
    }
    if !out.json {
        let p50 = |v: &serde_json::Value| v["final_harvest"]["p50_us"].as_f64().unwrap_or(f64::NAN);
        for pair in rows.chunks(2) {
            let mib = pair[0]["mem_bytes"].as_u64().unwrap_or(0) >> 20;
            for v in pair {
                println!(
                    "harvest {mib} MiB x{} vCPU, {}: final harvest p50 {:.0} µs, p99 {:.0} µs (tracker p50 {:.0} µs), {:.0} dirty pages p50, {} ring-full exits",
                    h.vcpus,
                    v["dirty_mode"].as_str().unwrap_or("?"),
                    p50(v),
                    v["final_harvest"]["p99_us"].as_f64().unwrap_or(f64::NAN),
                    v["tracker"]["p50_us"].as_f64().unwrap_or(f64::NAN),
                    v["pages_p50"].as_f64().unwrap_or(f64::NAN),
                    v["ring_full_exits"]
                );
            }
            println!(
                "harvest {mib} MiB: ring / bitmap p50 = {:.2}",
                p50(&pair[1]) / p50(&pair[0])
            );
        }
    }
    Ok(())
}

/// Runs `ferry demo --json` (two processes: the source here, `ferry recv` as its child) and
/// re-emits each run as a `kvm` result with the machine description.
fn run_kvm(k: &KvmArgs, peer: &PeerLauncher, out: &mut Output) -> Result<()> {
    let PeerLauncher::Process(exe) = peer else {
        bail!("The kvm suite needs the ferry binary (it runs `ferry demo`)");
    };
    let mode = match k.mode {
        ModeArg::Precopy => "precopy",
        ModeArg::Postcopy => "postcopy",
        ModeArg::Hybrid => "hybrid",
    };
    let output = std::process::Command::new(exe)
        .args(["demo", "--json", "--mode", mode, "--workload", &k.workload])
        .args([
            "--mem-mib",
            &k.mem_mib.to_string(),
            "--vcpus",
            &k.vcpus.to_string(),
        ])
        .args([
            "--write-mib-s",
            &k.write_mib_s.to_string(),
            "--transport",
            &k.transport,
        ])
        .args([
            "--streams",
            &k.streams.to_string(),
            "--runs",
            &k.runs.to_string(),
        ])
        .args(["--max-blackout-us", &k.max_blackout_us.to_string()])
        .args(
            k.switch_overhead_us
                .map(|us| format!("--switch-overhead-us={us}")),
        )
        .args(k.hybrid_reserve.map(|r| format!("--hybrid-reserve={r}")))
        .args(["--blackout-priority", &k.blackout_priority])
        .args(["--recv-into", &k.recv_into])
        .args(["--warmup-s", &k.warmup_s.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("Cannot run ferry demo")?;
    let rows = reemit(&output.stdout, out, |v| {
        v["suite"] = serde_json::json!("kvm")
    })?;
    if !out.json {
        for v in &rows {
            println!(
                "kvm {mode} {} MiB x{} vCPU: blackout {:.0} µs, faults {} (p50 {} µs, p99 {} µs), guest longest gap {} µs (before the switchover {} µs, across it {} µs, after it {} µs, stalls after {:.1} ms), verified {}",
                k.mem_mib,
                k.vcpus,
                v["blackout_us"].as_f64().unwrap_or(f64::NAN),
                v["faults"]["count"],
                v["faults"]["p50_us"],
                v["faults"]["p99_us"],
                v["guest_max_gap_us"],
                v["guest_pre_max_gap_us"],
                v["guest_switch_gap_us"],
                v["guest_after_max_gap_us"],
                v["guest_after_stall_ms"].as_f64().unwrap_or(f64::NAN),
                v["verified"]
            );
        }
    }
    if !output.status.success() || rows.len() < k.runs as usize {
        bail!(
            "ferry demo failed ({}), {} of {} runs reported",
            output.status,
            rows.len(),
            k.runs
        );
    }
    Ok(())
}

/// `ferry __bench-peer` (hidden): the second process of a suite. Reads its job from standard
/// input; not for direct use.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// Which suite's peer to run.
    #[arg(long, value_enum)]
    pub suite: SuiteName,
}

/// Runs `ferry bench ...`.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.suite.is_some() && args.matrix.is_set() {
        bail!(
            "Matrix options (--quick, --suites, --modes, --sizes, --streams before the suite, \
             --transports, --rates, --runs before the suite) apply only without a suite name"
        );
    }
    let peer = PeerLauncher::from_env()?;
    let mut out = Output::new(&args.output)?;
    match args.suite {
        Some(SuiteArgs::Transport(t)) => {
            let cfg = TransportBench::from_args(&t)?;
            for _ in 0..t.runs.max(1) {
                let bar = Bar::new(&out, "transport");
                let r = transport_bench::run(&cfg, &peer, &|m, d, t| bar.update(m, d, t))?;
                bar.finish();
                out.transport(&r)?;
            }
        }
        Some(SuiteArgs::Migrate(m)) => {
            let cfg = MigrateBench::from_args(&m)?;
            for _ in 0..m.runs.max(1) {
                let bar = Bar::new(&out, "migrate");
                let r = migrate_bench::run(&cfg, &peer, &|m, d, t| bar.update(m, d, t))?;
                bar.finish();
                out.migrate(&r)?;
            }
        }
        Some(SuiteArgs::Kvm(k)) => return run_kvm(&k, &peer, &mut out),
        Some(SuiteArgs::Harvest(h)) => return run_harvest(&h, &peer, &mut out),
        None => {
            run_matrix(&args.matrix, &peer, &mut out)?;
            out.summary();
            return Ok(());
        }
    }
    out.summary();
    let bad = out.transports.iter().filter(|r| !r.verified).count()
        + out.migrations.iter().filter(|r| !r.verified).count();
    if bad > 0 {
        bail!("{bad} run(s) failed or were not verified (see above)");
    }
    Ok(())
}

/// Runs the second process of a suite: reads the job from standard input, speaks the peer
/// protocol on standard output.
pub fn peer_main(args: PeerArgs) -> Result<()> {
    // Do not outlive the main process (it may be killed mid-run).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = PeerOut::new(Box::new(std::io::stdout()));
    let r = match args.suite {
        SuiteName::Transport => transport_bench::peer(&mut input, &mut out),
        SuiteName::Migrate => migrate_bench::peer(&mut input, &mut out),
    };
    if let Err(e) = &r {
        let _ = out.send(&serde_json::json!({"msg": "error", "error": format!("{e:#}")}));
    }
    r
}

/// One matrix point.
#[derive(Debug, Clone)]
enum Job {
    Transport(TransportBench),
    Migrate(MigrateBench),
}

impl Job {
    fn label(&self) -> String {
        match self {
            Job::Transport(t) => format!(
                "transport {} x{} {}",
                t.transport.name(),
                t.streams,
                fmt_bytes(t.bytes)
            ),
            Job::Migrate(m) => format!(
                "migrate {} {} {} x{} {}",
                m.mode.name(),
                fmt_bytes(m.mem_bytes),
                m.write_rate,
                m.streams,
                m.transport.name()
            ),
        }
    }
}

fn matrix_jobs(m: &MatrixArgs) -> Result<Vec<Job>> {
    fn pick<T: Clone>(v: &[T], quick: bool, q: Vec<T>, full: Vec<T>) -> Vec<T> {
        if !v.is_empty() {
            v.to_vec()
        } else if quick {
            q
        } else {
            full
        }
    }
    let q = m.quick;
    let suites = pick(
        &m.suites,
        q,
        vec![SuiteName::Transport, SuiteName::Migrate],
        vec![SuiteName::Transport, SuiteName::Migrate],
    );
    let sizes: Vec<f64> = pick(&m.sizes, q, vec![0.25], vec![1.0]);
    let streams: Vec<u16> = pick(&m.streams, q, vec![1, 2], vec![1, 2, 4]);
    let transports = pick(
        &m.transports,
        q,
        vec![TransportChoice::Uring, TransportChoice::Tcp],
        vec![TransportChoice::Uring, TransportChoice::Tcp],
    );
    let modes = pick(
        &m.modes,
        q,
        vec![ModeArg::Precopy, ModeArg::Postcopy, ModeArg::Hybrid],
        vec![ModeArg::Precopy, ModeArg::Postcopy, ModeArg::Hybrid],
    );
    let rates = pick(
        &m.rates,
        q,
        vec![WriteRate::MibS(256)],
        vec![WriteRate::MibS(256), WriteRate::Max],
    );
    let runs = m.runs.unwrap_or(1).max(1);
    // Migrations use 2 streams unless told otherwise, and in the quick matrix only io_uring.
    let mig_streams: Vec<u16> = if m.streams.is_empty() {
        vec![2]
    } else {
        m.streams.clone()
    };
    let mig_transports = pick(
        &m.transports,
        q,
        vec![TransportChoice::Uring],
        vec![TransportChoice::Uring, TransportChoice::Tcp],
    );
    let mut jobs = Vec::new();
    for _ in 0..runs {
        if suites.contains(&SuiteName::Transport) {
            for &size in &sizes {
                for &t in &transports {
                    for &s in &streams {
                        jobs.push(Job::Transport(TransportBench::from_args(&TransportArgs {
                            transport: t,
                            streams: usize::from(s),
                            size_gib: size,
                            frame_kib: 1024,
                            runs: 1,
                        })?));
                    }
                }
            }
        }
        if suites.contains(&SuiteName::Migrate) {
            for &size in &sizes {
                for &mode in &modes {
                    for &rate in &rates {
                        for &t in &mig_transports {
                            if t == TransportChoice::Rdma {
                                continue;
                            }
                            for &s in &mig_streams {
                                jobs.push(Job::Migrate(MigrateBench::from_args(&MigrateArgs {
                                    mode,
                                    mem_gib: size,
                                    write_mib_s: rate,
                                    writers: 1,
                                    streams: s,
                                    transport: t,
                                    backing: migrate_bench::BackingArg::Anon,
                                    pattern: migrate_bench::PatternArg::Random,
                                    max_blackout_us: 1000,
                                    checksums: false,
                                    runs: 1,
                                })?));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(jobs)
}

fn run_matrix(m: &MatrixArgs, peer: &PeerLauncher, out: &mut Output) -> Result<()> {
    let jobs = matrix_jobs(m)?;
    if jobs.is_empty() {
        bail!("The matrix is empty: check --suites, --sizes, --streams, --transports, --modes");
    }
    let start = Instant::now();
    let multi = indicatif::MultiProgress::new();
    let overall = out.progress.then(|| {
        let pb = multi.add(indicatif::ProgressBar::new(jobs.len() as u64));
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let mut failures = 0usize;
    for job in &jobs {
        let label = job.label();
        if let Some(pb) = &overall {
            pb.set_message(label.clone());
        }
        let bar = Bar::new_under(out, Some(&multi), &label);
        let progress = |m: &str, d: u64, t: u64| bar.update(m, d, t);
        let res = match job {
            Job::Transport(cfg) => transport_bench::run(cfg, peer, &progress).map(Ok),
            Job::Migrate(cfg) => migrate_bench::run(cfg, peer, &progress).map(Err),
        };
        bar.finish();
        match res {
            Ok(Ok(r)) => out.transport(&r)?,
            Ok(Err(r)) => out.migrate(&r)?,
            Err(e) => {
                failures += 1;
                let msg = format!("{label}: {e:#}");
                match &overall {
                    Some(pb) => pb.println(format!("skipped or failed: {msg}")),
                    None => eprintln!("ferry bench: skipped or failed: {msg}"),
                }
                out.failed.push(msg);
            }
        }
        if let Some(pb) = &overall {
            pb.inc(1);
        }
    }
    if let Some(pb) = overall {
        pb.finish_and_clear();
    }
    eprintln!(
        "ferry bench: {} of {} matrix points done in {:.1} s{}",
        jobs.len() - failures,
        jobs.len(),
        start.elapsed().as_secs_f64(),
        if failures > 0 {
            format!(", {failures} skipped or failed (listed above)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// A live progress bar for one suite run (hidden when standard output is not a terminal).
struct Bar {
    pb: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn new(out: &Output, label: &str) -> Self {
        Self::new_under(out, None, label)
    }

    /// A bar of its own, or one line of `multi` (under the matrix's overall bar).
    fn new_under(out: &Output, multi: Option<&indicatif::MultiProgress>, label: &str) -> Self {
        let pb = out.progress.then(|| {
            let pb = indicatif::ProgressBar::new(0);
            let pb = match multi {
                Some(m) => m.add(pb),
                None => pb,
            };
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "  {prefix} {msg} {bar:25} {bytes}/{total_bytes} ({bytes_per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_prefix(label.to_owned());
            pb
        });
        Self { pb }
    }

    fn update(&self, msg: &str, done: u64, total: u64) {
        if let Some(pb) = &self.pb {
            pb.set_length(total);
            pb.set_position(done);
            pb.set_message(msg.to_owned());
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Where results go: table rows (printed at the end), JSON lines, the `--out` file.
struct Output {
    json: bool,
    file: Option<std::fs::File>,
    progress: bool,
    transports: Vec<TransportResult>,
    migrations: Vec<MigrateResult>,
    failed: Vec<String>,
}

impl Output {
    fn new(args: &OutputArgs) -> Result<Self> {
        let file = match &args.out {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("Cannot open {} for appending", p.display()))?,
            ),
            None => None,
        };
        Ok(Self {
            json: args.json,
            file,
            progress: std::io::stdout().is_terminal(),
            transports: Vec::new(),
            migrations: Vec::new(),
            failed: Vec::new(),
        })
    }

    fn emit<T: Serialize>(&mut self, r: &T) -> Result<()> {
        let line = serde_json::to_string(r).context("Cannot serialise a result")?;
        if self.json {
            let mut o = std::io::stdout().lock();
            writeln!(o, "{line}")?;
            o.flush()?;
        }
        if let Some(f) = &mut self.file {
            writeln!(f, "{line}").context("Cannot append to the --out file")?;
            f.flush()?;
        }
        Ok(())
    }

    fn transport(&mut self, r: &TransportResult) -> Result<()> {
        self.emit(r)?;
        self.transports.push(r.clone());
        Ok(())
    }

    fn migrate(&mut self, r: &MigrateResult) -> Result<()> {
        self.emit(&r.to_json())?;
        self.migrations.push(r.clone());
        Ok(())
    }

    /// The readable summary: on standard output without `--json`, else on standard error.
    fn summary(&self) {
        let mut s = String::new();
        if let Some(m) = self
            .transports
            .first()
            .map(|r| &r.machine)
            .or(self.migrations.first().map(|r| &r.machine))
        {
            let _ = writeln!(s, "Machine: {}", m.summary());
        }
        if !self.transports.is_empty() {
            s.push_str(&transport_table(&self.transports));
        }
        if !self.migrations.is_empty() {
            s.push_str(&migrate_table(&self.migrations));
        }
        if !self.failed.is_empty() {
            let _ = writeln!(s, "\nSkipped or failed:");
            for f in &self.failed {
                let _ = writeln!(s, "  {f}");
            }
        }
        if s.is_empty() {
            return;
        }
        if self.json {
            eprint!("{s}");
        } else {
            print!("{s}");
        }
    }
}

fn transport_table(rows: &[TransportResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nTransport (same-run floor: plain blocking TCP, same streams, 1 MiB writes)"
    );
    let _ = writeln!(
        s,
        "{:<9} {:>3} {:>9} {:>9} {:>9} {:>7} {:>15} {:>15} {:>9} {:>9} {:>4}",
        "transport",
        "N",
        "size",
        "Gb/s",
        "floor",
        "ratio",
        "tx CPU s/GiB",
        "rx CPU s/GiB",
        "CPU ratio",
        "zc/copied",
        "ok"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>3} {:>9} {:>9.2} {:>9.2} {:>6.2}x {:>6.3} ({:>5.3}) {:>6.3} ({:>5.3}) {:>8.2}x {:>9} {:>4}",
            r.transport,
            r.streams,
            fmt_bytes(r.bytes),
            r.gbit_per_s,
            r.floor_gbit_per_s,
            r.ratio_to_floor,
            r.sender_cpu_s_per_gib,
            r.floor_sender_cpu_s_per_gib,
            r.receiver_cpu_s_per_gib,
            r.floor_receiver_cpu_s_per_gib,
            r.cpu_ratio_to_floor,
            format!("{}/{}", r.zc_sends, r.zc_copied),
            if r.verified { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(
        s,
        "(CPU: user + system per GiB in each process, the floor's in parentheses; CPU ratio = \
         (tx + rx) / floor's (tx + rx))"
    );
    s
}

fn migrate_table(rows: &[MigrateResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nMigrate (fault floor: local userfaultfd fault p50 + 4 KiB round trip p50, same run; \
         guest: what the destination's writers saw)"
    );
    let _ = writeln!(
        s,
        "{:<8} {:>9} {:>5} {:<5} {:>2} {:<13} {:>10} {:>8} {:>3} {:>7} {:>15} {:>15} {:>11} {:>9} {:>3}",
        "mode",
        "mem",
        "rate",
        "tport",
        "N",
        "switchover",
        "blackout",
        "total",
        "rnd",
        "faults",
        "fault p50",
        "fault p99",
        "guest gap",
        "stall",
        "ok"
    );
    for r in rows {
        let head = format!(
            "{:<8} {:>9} {:>5} {:<5} {:>2}",
            r.mode,
            fmt_bytes(r.mem_bytes),
            r.write_rate.to_string(),
            r.transport,
            r.streams
        );
        if let Some(e) = &r.error {
            let _ = writeln!(s, "{head} FAILED: {e}");
            continue;
        }
        let fault = |v: u64| match r.fault_floor_us {
            _ if r.fault_count == 0 => "-".to_owned(),
            Some(f) if f > 0.0 => format!("{v}µs {:.1}x", u64_f64(v) / f),
            _ => format!("{v}µs"),
        };
        let _ = writeln!(
            s,
            "{head} {:<13} {:>8.0}µs {:>6.0}ms {:>3} {:>7} {:>15} {:>15} {:>9.0}µs {:>7.1}ms {:>3}",
            r.switchover,
            r.blackout_us,
            r.total_ms,
            r.rounds,
            r.fault_count,
            fault(r.fault_p50_us),
            fault(r.fault_p99_us),
            r.guest_max_gap_us,
            r.guest_stall_ms,
            if r.verified { "yes" } else { "NO" }
        );
    }
    let floors: Vec<String> = rows
        .iter()
        .filter_map(|r| r.fault_floor_us.map(|f| format!("{f:.0}")))
        .collect();
    if !floors.is_empty() {
        let _ = writeln!(
            s,
            "(faults: µs and ratio to the same-run floor; floors µs: {}; blackout budget {} µs)",
            floors.join(", "),
            rows.first().map_or(1000, |r| r.max_blackout_us)
        );
    }
    s
}

#[allow(clippy::cast_precision_loss)] // Display and ratios only.
pub(crate) fn u64_f64(v: u64) -> f64 {
    v as f64
}

/// `1.00 GiB`, `256 MiB`, `31.5 MiB`.
pub(crate) fn fmt_bytes(b: u64) -> String {
    let gib = u64_f64(b) / u64_f64(1 << 30);
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        let mib = u64_f64(b) / u64_f64(1 << 20);
        if mib.fract() == 0.0 {
            format!("{mib:.0} MiB")
        } else {
            format!("{mib:.1} MiB")
        }
    }
}

/// GiB (fractional) to bytes, rounded down to a multiple of `align`, at least `align`.
pub(crate) fn gib_to_bytes(gib: f64, align: u64) -> Result<u64> {
    if !gib.is_finite() || gib <= 0.0 || gib > 4096.0 {
        bail!("Size {gib} GiB is not a positive size up to 4096 GiB");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // Checked above: positive, finite and at most 2^42.
    let bytes = (gib * u64_f64(1 << 30)) as u64;
    Ok((bytes / align * align).max(align))
}

/// How a suite starts its second process.
#[derive(Debug, Clone)]
pub enum PeerLauncher {
    /// Run `<path> __bench-peer --suite <suite>` (the `ferry` binary).
    Process(PathBuf),
    /// Run the peer in a thread of this process (tests of the library; CPU figures then mix
    /// both sides, since `RUSAGE_SELF` covers the whole process).
    Thread,
}

impl PeerLauncher {
    /// `$FERRY_BIN` when set, else the current executable.
    pub fn from_env() -> Result<Self> {
        if let Some(p) = std::env::var_os(FERRY_BIN_ENV) {
            return Ok(PeerLauncher::Process(PathBuf::from(p)));
        }
        Ok(PeerLauncher::Process(std::env::current_exe().context(
            "Cannot find the ferry executable for the peer",
        )?))
    }
}

/// The peer's side of the link: protocol lines on its output.
pub(crate) struct PeerOut {
    w: Box<dyn Write + Send>,
}

impl PeerOut {
    pub(crate) fn new(w: Box<dyn Write + Send>) -> Self {
        Self { w }
    }

    /// Sends one message (a JSON object) to the main process.
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let line = serde_json::to_string(msg).context("Cannot serialise a peer message")?;
        writeln!(self.w, "{PEER_PREFIX}{line}").context("Cannot write to the main process")?;
        self.w.flush().context("Cannot write to the main process")?;
        Ok(())
    }
}

/// Reads one JSON line (the job, or a command) from the main process.
pub(crate) fn peer_read<T: DeserializeOwned>(input: &mut dyn BufRead) -> Result<T> {
    let mut line = String::new();
    let n = input
        .read_line(&mut line)
        .context("Cannot read from the main process")?;
    if n == 0 {
        bail!("The main process closed the link");
    }
    serde_json::from_str(line.trim())
        .with_context(|| format!("Bad message from the main process: {line}"))
}

/// The main process's side of the link to a running peer.
pub(crate) struct PeerLink {
    tx: Option<Box<dyn Write + Send>>,
    rx: mpsc::Receiver<String>,
    child: Option<Child>,
    thread: Option<JoinHandle<Result<()>>>,
    reader: Option<JoinHandle<()>>,
}

impl PeerLink {
    /// Starts the peer of `suite` and sends it `job` as its first line.
    pub(crate) fn spawn<T: Serialize>(
        launcher: &PeerLauncher,
        suite: SuiteName,
        job: &T,
    ) -> Result<Self> {
        let (tx, out, child, thread): (Box<dyn Write + Send>, Box<dyn Read + Send>, _, _) =
            match launcher {
                PeerLauncher::Process(exe) => {
                    let mut child = Command::new(exe)
                        .arg("__bench-peer")
                        .arg("--suite")
                        .arg(match suite {
                            SuiteName::Transport => "transport",
                            SuiteName::Migrate => "migrate",
                        })
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::inherit())
                        .spawn()
                        .with_context(|| format!("Cannot start the peer {}", exe.display()))?;
                    let stdin = child.stdin.take().context("Peer has no stdin")?;
                    let stdout = child.stdout.take().context("Peer has no stdout")?;
                    (Box::new(stdin), Box::new(stdout), Some(child), None)
                }
                PeerLauncher::Thread => {
                    let (in_r, in_w) = std::io::pipe().context("Cannot create a pipe")?;
                    let (out_r, out_w) = std::io::pipe().context("Cannot create a pipe")?;
                    let handle = std::thread::Builder::new()
                        .name("ferry-bench-peer".into())
                        .spawn(move || -> Result<()> {
                            let mut input = BufReader::new(in_r);
                            let mut out = PeerOut::new(Box::new(out_w));
                            let r = match suite {
                                SuiteName::Transport => transport_bench::peer(&mut input, &mut out),
                                SuiteName::Migrate => migrate_bench::peer(&mut input, &mut out),
                            };
                            if let Err(e) = &r {
                                let _ = out.send(
                                    &serde_json::json!({"msg": "error", "error": format!("{e:#}")}),
                                );
                            }
                            r
                        })
                        .context("Cannot start the peer thread")?;
                    (Box::new(in_w), Box::new(out_r), None, Some(handle))
                }
            };
        let (line_tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("ferry-bench-link".into())
            .spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    match line.trim_end().strip_prefix(PEER_PREFIX) {
                        Some(msg) => {
                            if line_tx.send(msg.to_owned()).is_err() {
                                return;
                            }
                        }
                        // Anything else the peer printed on stdout (e.g. logs).
                        None => eprint!("{line}"),
                    }
                }
            })
            .context("Cannot start the peer reader thread")?;
        let mut link = Self {
            tx: Some(tx),
            rx,
            child,
            thread,
            reader: Some(reader),
        };
        link.send(job)?;
        Ok(link)
    }

    /// Sends one message to the peer.
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let line = serde_json::to_string(msg).context("Cannot serialise a message")?;
        let tx = self.tx.as_mut().context("The link to the peer is closed")?;
        writeln!(tx, "{line}").context("Cannot write to the peer (did it exit?)")?;
        tx.flush()
            .context("Cannot write to the peer (did it exit?)")?;
        Ok(())
    }

    /// Waits at most `timeout` for the next message; the peer's errors become errors here.
    pub(crate) fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T> {
        let line = match self.rx.recv_timeout(timeout) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("The peer sent nothing for {} s", timeout.as_secs())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.reap();
                bail!("The peer exited without answering{status}");
            }
        };
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("Bad peer message: {line}"))?;
        if v.get("msg").and_then(Value::as_str) == Some("error") {
            let e = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            bail!("Peer: {e}");
        }
        serde_json::from_value(v).with_context(|| format!("Unexpected peer message: {line}"))
    }

    fn reap(&mut self) -> String {
        if let Some(c) = &mut self.child {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = c.try_wait() {
                    return format!(" ({st})");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        String::new()
    }

    /// Closes the link and waits at most `timeout` for the peer to end (then kills it).
    pub(crate) fn finish(mut self, timeout: Duration) -> Result<()> {
        self.tx = None;
        let deadline = Instant::now() + timeout;
        if let Some(mut c) = self.child.take() {
            loop {
                if let Some(st) = c.try_wait().context("Cannot wait for the peer")? {
                    if !st.success() {
                        bail!("The peer exited with {st}");
                    }
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("The peer did not exit within {} s", timeout.as_secs());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                if Instant::now() >= deadline {
                    bail!("The peer thread did not end within {} s", timeout.as_secs());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join()
                .map_err(|_| anyhow!("The peer thread panicked"))??;
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(())
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.tx = None;
        // A peer still running here means the suite failed: end the process we started. (A
        // peer thread ends on its own once its input closes or its sockets time out.)
        if let Some(c) = &mut self.child {
            if matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(200));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// CPU time a process used, from `getrusage(RUSAGE_SELF)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct CpuTime {
    /// User time, seconds.
    pub user_s: f64,
    /// System time, seconds.
    pub sys_s: f64,
}

impl CpuTime {
    /// This process, now.
    pub fn now() -> Self {
        sys::rusage_self()
    }

    /// The CPU used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
        }
    }

    /// User + system.
    pub fn total(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

mod sys {
    //! The one system call the benchmark needs that rustix does not wrap.

    use super::CpuTime;

    #[allow(clippy::cast_precision_loss)] // Seconds of CPU time fit f64 exactly enough.
    fn tv(t: libc::timeval) -> f64 {
        t.tv_sec as f64 + t.tv_usec as f64 / 1e6
    }

    /// `getrusage(RUSAGE_SELF)` user and system time (zero if the call fails, which it cannot
    /// with these arguments).
    pub(super) fn rusage_self() -> CpuTime {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` points to writable memory of the size of `struct rusage`, which the
        // kernel fills; RUSAGE_SELF is a valid `who`.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
        if rc != 0 {
            return CpuTime::default();
        }
        // SAFETY: zero-initialised plain-data struct, filled by the successful call above.
        let ru = unsafe { ru.assume_init() };
        CpuTime {
            user_s: tv(ru.ru_utime),
            sys_s: tv(ru.ru_stime),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, clap::Subcommand)]
    #[allow(clippy::large_enum_variant)] // Parsed once per test.
    enum Cmd {
        Bench(BenchArgs),
        #[command(name = "__bench-peer", hide = true)]
        Peer(PeerArgs),
    }

    fn bench(args: &[&str]) -> BenchArgs {
        let mut v = vec!["ferry", "bench"];
        v.extend_from_slice(args);
        match Top::try_parse_from(v).unwrap().cmd {
            Cmd::Bench(b) => b,
            Cmd::Peer(_) => panic!("parsed as the peer"),
        }
    }

    #[test]
    fn output_flags_before_or_after_the_suite() {
        for args in [
            &["--json", "transport", "--size-gib", "0.03"][..],
            &["transport", "--size-gib", "0.03", "--json"][..],
        ] {
            let b = bench(args);
            assert!(b.output.json);
            match b.suite {
                Some(SuiteArgs::Transport(t)) => {
                    assert!((t.size_gib - 0.03).abs() < 1e-12);
                    assert_eq!(t.transport, TransportChoice::Uring);
                    assert_eq!(t.streams, 2);
                }
                other => panic!("wrong suite {other:?}"),
            }
        }
    }

    #[test]
    fn migrate_arguments_and_rates() {
        let b = bench(&[
            "migrate",
            "--mode",
            "postcopy",
            "--mem-gib",
            "0.5",
            "--write-mib-s",
            "max",
            "--transport",
            "unix",
            "--out",
            "/tmp/x.jsonl",
        ]);
        let Some(SuiteArgs::Migrate(m)) = b.suite else {
            panic!("not migrate")
        };
        assert_eq!(m.mode, ModeArg::Postcopy);
        assert_eq!(m.write_mib_s, WriteRate::Max);
        assert_eq!(m.transport, TransportChoice::Unix);
        assert_eq!(
            b.output.out.as_deref(),
            Some(std::path::Path::new("/tmp/x.jsonl"))
        );
        assert_eq!("0".parse::<WriteRate>().unwrap(), WriteRate::Idle);
        assert_eq!("250".parse::<WriteRate>().unwrap(), WriteRate::MibS(250));
        "fast".parse::<WriteRate>().unwrap_err();
        let cfg = MigrateBench::from_args(&m).unwrap();
        assert_eq!(cfg.mem_bytes, 512 << 20);
    }

    #[test]
    fn matrix_options_conflict_with_a_suite() {
        let b = bench(&["--quick", "transport"]);
        assert!(b.matrix.is_set());
        let e = run(b).unwrap_err();
        assert!(format!("{e}").contains("only without a suite"), "{e}");
    }

    #[test]
    fn quick_matrix_is_small_and_complete() {
        let b = bench(&["--quick"]);
        let jobs = matrix_jobs(&b.matrix).unwrap();
        let transports: Vec<_> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Transport(t) => Some((t.transport, t.streams, t.bytes)),
                Job::Migrate(_) => None,
            })
            .collect();
        assert_eq!(
            transports,
            vec![
                (TransportChoice::Uring, 1, 256 << 20),
                (TransportChoice::Uring, 2, 256 << 20),
                (TransportChoice::Tcp, 1, 256 << 20),
                (TransportChoice::Tcp, 2, 256 << 20),
            ]
        );
        let modes: Vec<_> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Migrate(m) => Some((m.mode, m.mem_bytes, m.write_rate)),
                Job::Transport(_) => None,
            })
            .collect();
        assert_eq!(
            modes,
            vec![
                (ModeArg::Precopy, 256 << 20, WriteRate::MibS(256)),
                (ModeArg::Postcopy, 256 << 20, WriteRate::MibS(256)),
                (ModeArg::Hybrid, 256 << 20, WriteRate::MibS(256)),
            ]
        );
        // Explicit options override the quick choices; rdma is never a migration.
        let b = bench(&[
            "--quick",
            "--suites",
            "migrate",
            "--transports",
            "tcp,rdma",
            "--runs",
            "2",
            "--modes",
            "hybrid",
        ]);
        let jobs = matrix_jobs(&b.matrix).unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| matches!(j, Job::Migrate(m)
            if m.transport == TransportChoice::Tcp && m.mode == ModeArg::Hybrid)));
    }

    #[test]
    fn sizes_round_down_to_alignment() {
        assert_eq!(gib_to_bytes(0.03, 4096).unwrap(), 32_212_254 / 4096 * 4096);
        assert_eq!(gib_to_bytes(1e-9, 4096).unwrap(), 4096);
        gib_to_bytes(0.0, 4096).unwrap_err();
        gib_to_bytes(f64::NAN, 4096).unwrap_err();
        assert_eq!(fmt_bytes(256 << 20), "256 MiB");
        assert_eq!(fmt_bytes(1 << 30), "1.00 GiB");
    }

    #[test]
    fn peer_link_reports_peer_errors() {
        // A peer thread fed a job it cannot parse answers with an error message.
        let mut link =
            PeerLink::spawn(&PeerLauncher::Thread, SuiteName::Transport, &"not a job").unwrap();
        let e = link.recv::<Value>(Duration::from_secs(10)).unwrap_err();
        assert!(format!("{e}").starts_with("Peer: "), "{e}");
        link.finish(Duration::from_secs(10)).unwrap_err();
    }

    #[test]
    fn cpu_time_advances() {
        let a = CpuTime::now();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let d = CpuTime::now().since(&a);
        assert!(d.total() > 0.0, "{d:?}");
    }
}
