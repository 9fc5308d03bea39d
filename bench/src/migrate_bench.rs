// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry bench migrate`: a whole migration of a process VM with live writers, from this process
//! to a second one on loopback, beside the same-run fault floor.
//!
//! The source is a `ferry_engine::procmem::ProcessVm` in this process whose writer threads dirty
//! memory at the asked rate (0 = idle: the writers never run; `max` = unlimited). The peer
//! process (see [`crate::cli`]) builds the destination with `ProcessVm::new_destination`, accepts
//! the session and runs `ferry_engine::dest::receive`; the writers resume there. The result is
//! the source's `MigrationReport` (blackout and its phases, rounds, throughput series, post-copy
//! faults) plus:
//!
//! - `faults.histogram`: `[upper_bound_us, count]` pairs (half-octave buckets) of the fault
//!   latencies the destination sampled (`faults.timeline`; `faults.histogram_samples` says how
//!   many samples that was);
//! - `fault_floor_us`: the unavoidable part of a post-copy fault, measured in the same run
//!   before the migration: the p50 of a locally resolved userfaultfd fault
//!   (`ferry_engine::uffd::probe_fault_latency`, in the destination process, in the placement
//!   mode the backing uses) plus the p50 of a 4 KiB `PageRequest`/`PageReply` round trip between
//!   the two processes over a separate loopback connection, built like the engine's urgent
//!   stream (same endpoint kind, socket data path, request written on the raw socket, reply
//!   received into registered memory); parts in `fault_floor`;
//! - the writers' own view from the destination (`ProcessVm::stats` a moment after the
//!   migration): `guest_max_gap_us`, the longest gap between two writes (the blackout as the
//!   guest saw it is one such gap), and `guest_stall_ms`, the summed gaps over 100 µs
//!   (post-copy fault waits among them);
//! - `verified`: the source's and the destination's digests matched.
//!
//! Not here: KVM guests (that is `ferry demo`), RDMA.

use std::fmt;
use std::io::{BufRead, Write};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::ValueEnum;
use ferry_engine::dest::{DestVm, receive};
use ferry_engine::layout::Layout;
use ferry_engine::memory::{MemBacking, MemOptions, PAGE_SIZE, ProcessMemory};
use ferry_engine::policy::{Mode, OnStall, Policy};
use ferry_engine::procmem::{ProcVmConfig, ProcessVm, WritePattern};
use ferry_engine::session::{SessionOptions, accept_destination, connect_source, server_config};
use ferry_engine::source::{Phase, Progress, SourceVm, migrate};
use ferry_engine::uffd::ProbeMode;
use ferry_engine::vm::{BoxError, VmControl};
use ferry_protocol::frame::{FrameHeader, HEADER_LEN};
use ferry_protocol::handshake::{Auth, Psk, TransportKind};
use ferry_protocol::{Frame, GpaRange};
use ferry_transport::memory::RegistrationConfig;
use ferry_transport::session::SessionListener;
use ferry_transport::urgent::{Priority, raise_thread_priority, urgent_config};
use ferry_transport::{Endpoint, Listener, MemoryRegistration, Socket, Target, open_stream};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::{
    MigrateArgs, ModeArg, PeerLauncher, PeerLink, PeerOut, SuiteName, gib_to_bytes, peer_read,
    u64_f64,
};
use crate::hist::LatencyHist;
use crate::machine::Machine;
use crate::transport_bench::{TransportChoice, endpoint_string, loopback_endpoint, parse_endpoint};

/// Regions the process VM's memory is split into.
const REGIONS: usize = 2;

/// The writers' dirtying rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteRate {
    /// No writes: the writers never run.
    Idle,
    /// MiB of pages dirtied per second, all writers together.
    MibS(u64),
    /// As fast as the writers can.
    Max,
}

impl FromStr for WriteRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "max" | "unlimited" => Ok(WriteRate::Max),
            "0" | "idle" => Ok(WriteRate::Idle),
            n => n
                .parse::<u64>()
                .map(WriteRate::MibS)
                .map_err(|_| format!("'{s}' is not a rate: a number of MiB/s, 0 or max")),
        }
    }
}

impl fmt::Display for WriteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteRate::Idle => f.write_str("idle"),
            WriteRate::MibS(n) => write!(f, "{n}"),
            WriteRate::Max => f.write_str("max"),
        }
    }
}

/// Guest memory backing on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingArg {
    /// Private anonymous memory (post-copy places pages with `UFFDIO_COPY`).
    Anon,
    /// Shared memfd memory (post-copy writes through an alias and maps with `UFFDIO_CONTINUE`).
    Memfd,
}

/// Writer pattern on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternArg {
    /// Each writer sweeps its share in order.
    Sequential,
    /// Uniformly random pages.
    Random,
    /// 90 % of writes into 10 % of the pages.
    Hotset,
}

/// One migration benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateBench {
    /// Mode.
    pub mode: ModeArg,
    /// Guest memory, bytes (a multiple of 4 KiB × 2 regions).
    pub mem_bytes: u64,
    /// Writers' rate.
    pub write_rate: WriteRate,
    /// Writer threads.
    pub writers: usize,
    /// Bulk streams.
    pub streams: u16,
    /// Transport (not RDMA).
    pub transport: TransportChoice,
    /// Backing.
    pub backing: BackingArg,
    /// Writer pattern.
    pub pattern: PatternArg,
    /// Blackout budget, µs.
    pub max_blackout_us: u64,
    /// Per-page checksums.
    pub checksums: bool,
    /// Round trips measured for the fault floor (after 20 warm-up ones).
    pub rtt_samples: usize,
    /// Local userfaultfd faults measured for the fault floor.
    pub fault_probe_samples: usize,
    /// How long the writers run on the source before the migration starts, ms.
    pub warmup_ms: u64,
    /// How long the writers run on the destination after it, before their view is read, ms.
    pub settle_ms: u64,
}

impl MigrateBench {
    /// From the command line.
    pub fn from_args(a: &MigrateArgs) -> Result<Self> {
        let cfg = Self {
            mode: a.mode,
            mem_bytes: gib_to_bytes(a.mem_gib, (1 << 20) * REGIONS as u64)?,
            write_rate: a.write_mib_s,
            writers: a.writers,
            streams: a.streams,
            transport: a.transport,
            backing: a.backing,
            pattern: a.pattern,
            max_blackout_us: a.max_blackout_us,
            checksums: a.checksums,
            rtt_samples: 200,
            fault_probe_samples: 200,
            warmup_ms: 200,
            settle_ms: 200,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.transport != TransportChoice::Rdma,
            "This benchmark migrates over loopback, which rdmacm cannot route: migrations over RDMA run between two hosts with `ferry send`/`ferry recv --transport rdma`"
        );
        ensure!(
            (1..=64).contains(&self.streams),
            "--streams must be 1 to 64"
        );
        ensure!(
            (1..=64).contains(&self.writers),
            "--writers must be 1 to 64"
        );
        ensure!(
            self.mem_bytes > 0 && self.mem_bytes.is_multiple_of(PAGE_SIZE * REGIONS as u64),
            "Memory size must be a positive multiple of 8 KiB"
        );
        ensure!(
            self.max_blackout_us > 0,
            "--max-blackout-us must be positive"
        );
        Ok(())
    }

    fn proc_config(&self) -> ProcVmConfig {
        ProcVmConfig {
            mem_bytes: self.mem_bytes,
            regions: REGIONS,
            backing: match self.backing {
                BackingArg::Anon => MemBacking::Anonymous,
                BackingArg::Memfd => MemBacking::Memfd,
            },
            hugepage: false,
            writers: self.writers,
            write_mib_s: match self.write_rate {
                WriteRate::Max => None,
                WriteRate::MibS(n) => Some(n.max(1)),
                // Never started; any valid rate.
                WriteRate::Idle => Some(1),
            },
            pattern: match self.pattern {
                PatternArg::Sequential => WritePattern::Sequential,
                PatternArg::Random => WritePattern::Random,
                PatternArg::Hotset => WritePattern::HotSet,
            },
            seed: 0x5eed,
            fill_percent: 50,
        }
    }

    fn engine_mode(&self) -> Mode {
        match self.mode {
            ModeArg::Precopy => Mode::PreCopy,
            ModeArg::Postcopy => Mode::PostCopy,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }

    fn kind(&self) -> TransportKind {
        match self.transport {
            TransportChoice::Tcp => TransportKind::Tcp,
            TransportChoice::Unix => TransportKind::Unix,
            TransportChoice::Uring => TransportKind::Uring,
            TransportChoice::Rdma => TransportKind::Rdma,
        }
    }

    fn probe_mode(&self) -> ProbeMode {
        match self.backing {
            BackingArg::Anon => ProbeMode::MissingCopy,
            BackingArg::Memfd => ProbeMode::MinorContinue,
        }
    }

    fn needs_uffd(&self) -> bool {
        self.mode != ModeArg::Precopy
    }
}

/// Why userfaultfd cannot be used here, if it cannot (post-copy and hybrid need it on the
/// destination).
pub fn uffd_unavailable() -> Option<String> {
    match ferry_engine::uffd::Uffd::open(false, ferry_engine::uffd::Features::NONE) {
        Ok(_) => None,
        Err(e) => Some(format!("{e}")),
    }
}

/// One migration result: the figures the summary table shows, and the whole JSON object.
#[derive(Debug, Clone)]
pub struct MigrateResult {
    /// Mode asked.
    pub mode: String,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// Writers' rate.
    pub write_rate: WriteRate,
    /// Streams.
    pub streams: usize,
    /// Transport.
    pub transport: String,
    /// `stop-and-copy` or `post-copy`.
    pub switchover: String,
    /// Blackout, µs.
    pub blackout_us: f64,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Post-copy faults.
    pub fault_count: u64,
    /// Fault p50, µs.
    pub fault_p50_us: u64,
    /// Fault p99, µs.
    pub fault_p99_us: u64,
    /// The same-run fault floor, µs (absent when userfaultfd is unavailable).
    pub fault_floor_us: Option<f64>,
    /// Longest gap the destination's writers saw, µs.
    pub guest_max_gap_us: f64,
    /// Summed writer gaps over 100 µs on the destination, ms.
    pub guest_stall_ms: f64,
    /// Both digests matched.
    pub verified: bool,
    /// The blackout budget, µs.
    pub max_blackout_us: u64,
    /// Why the migration failed (then the figures above are zero).
    pub error: Option<String>,
    /// The machine.
    pub machine: Machine,
    /// The whole result as one JSON object (the `--json` line).
    pub json: Value,
}

impl MigrateResult {
    /// The JSON object.
    pub fn to_json(&self) -> &Value {
        &self.json
    }
}

/// The job the peer gets.
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    bench: MigrateBench,
    key: String,
}

/// The writers' view.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct GuestView {
    writes: u64,
    max_gap_us: f64,
    stalls: u64,
    stall_ms: f64,
}

impl GuestView {
    fn of(vm: &ProcessVm) -> Self {
        let s = vm.stats();
        Self {
            writes: s.writes,
            max_gap_us: u64_f64(s.max_gap_ns) / 1e3,
            stalls: s.stalls,
            stall_ms: u64_f64(s.stall_ns) / 1e6,
        }
    }
}

/// Messages from the destination peer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum FromPeer {
    Ready {
        session: String,
        rtt: String,
        uffd_p50_us: Option<f64>,
        uffd_p99_us: Option<f64>,
        uffd_error: Option<String>,
    },
    Done {
        dest: Value,
        guest: GuestView,
    },
}

fn quantile_us(samples: &[Duration], q: f64) -> f64 {
    let mut h = LatencyHist::new();
    for d in samples {
        h.record(*d);
    }
    u64_f64(h.quantile_ns(q)) / 1e3
}

/// Runs one migration benchmark with its peer; `progress(message, done, total)` is called
/// with bytes of guest memory covered.
pub fn run(
    cfg: &MigrateBench,
    launcher: &PeerLauncher,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<MigrateResult> {
    cfg.check()?;
    if cfg.needs_uffd()
        && let Some(why) = uffd_unavailable()
    {
        bail!(
            "userfaultfd unavailable ({why}): {} mode needs it on the destination",
            cfg.mode.name()
        );
    }
    let machine = Machine::detect();
    let key = Psk::generate().context("Cannot make a session key")?;
    let mut link = PeerLink::spawn(
        launcher,
        SuiteName::Migrate,
        &Job {
            bench: cfg.clone(),
            key: key.to_hex(),
        },
    )?;
    progress("building the source VM", 0, cfg.mem_bytes);
    let pcfg = cfg.proc_config();
    let mut src = ProcessVm::new(pcfg).context("Cannot build the source VM")?;
    let gib = cfg.mem_bytes.div_ceil(1 << 30);
    let setup_timeout = Duration::from_secs(60 + 20 * gib);
    let (session_ep, rtt_ep, uffd_p50, uffd_p99, uffd_error) = match link.recv(setup_timeout)? {
        FromPeer::Ready {
            session,
            rtt,
            uffd_p50_us,
            uffd_p99_us,
            uffd_error,
        } => (
            parse_endpoint(&session)?,
            parse_endpoint(&rtt)?,
            uffd_p50_us,
            uffd_p99_us,
            uffd_error,
        ),
        other => bail!("Unexpected peer message {other:?}"),
    };
    progress("fault floor: round trips", 0, cfg.mem_bytes);
    let rtt = std::thread::scope(|s| {
        s.spawn(|| measure_rtt(&rtt_ep, cfg.rtt_samples))
            .join()
            .map_err(|_| anyhow!("The round-trip thread panicked"))
    })??;
    let rtt_p50 = quantile_us(&rtt, 0.5);
    let rtt_p99 = quantile_us(&rtt, 0.99);

    if cfg.write_rate != WriteRate::Idle {
        src.start()
            .map_err(|e| anyhow!("Cannot start the writers: {e}"))?;
        std::thread::sleep(Duration::from_millis(cfg.warmup_ms));
    }
    let policy = Policy {
        mode: cfg.engine_mode(),
        max_blackout: Duration::from_micros(cfg.max_blackout_us),
        on_stall: OnStall::Throttle,
        checksums: cfg.checksums,
        timeout: Duration::from_secs(60),
        ..Policy::default()
    };
    let opts = SessionOptions {
        transport: cfg.kind(),
        streams: cfg.streams,
        auth: Auth::Psk(key),
        ..SessionOptions::default()
    };
    let src_mem = src.memory();
    let layout = Layout::new(&*src_mem)?;
    let (streams, reg) = connect_source(&session_ep, &layout, &policy, &opts)
        .context("Cannot open the migration session")?;
    let mut tracker = src.tracker();
    let page = layout.page_size();
    let mut on_progress = |p: &Progress| {
        let what = match p.phase {
            Phase::Round(n) => format!("pre-copy round {n} ({} pages dirty)", p.dirty_pages),
            Phase::Switchover => "switchover".into(),
            Phase::PostCopy => "post-copy".into(),
            Phase::Verifying => "verifying".into(),
        };
        // Pages covered so far, all rounds together (pre-copy covers memory more than once).
        let done = p.pages_done.saturating_mul(page);
        progress(&what, done, done.max(cfg.mem_bytes));
    };
    let outcome = migrate(
        SourceVm {
            memory: &*src_mem,
            dirty: &mut tracker,
            control: &mut src,
        },
        streams,
        &policy,
        &mut on_progress,
    );
    drop(reg);
    let fault_floor_us = uffd_p50.map(|u| u + rtt_p50);
    let floor_json = json!({
        "uffd_p50_us": uffd_p50,
        "uffd_p99_us": uffd_p99,
        "uffd_mode": match cfg.backing {
            BackingArg::Anon => "missing+copy",
            BackingArg::Memfd => "minor+continue",
        },
        "uffd_error": uffd_error,
        "rtt_p50_us": rtt_p50,
        "rtt_p99_us": rtt_p99,
        "rtt_min_us": quantile_us(&rtt, 0.0),
        "rtt_samples": rtt.len(),
    });
    let report = match outcome {
        Ok(r) => r,
        // A migration that fails (e.g. pre-copy that does not converge under its budget) is a
        // result too: the source VM keeps running, and the reason is reported.
        Err(e) => {
            let error = ferry_protocol::handshake::error_chain(&e);
            drop(link);
            return Ok(failed_result(
                cfg,
                machine,
                error,
                fault_floor_us,
                floor_json,
            ));
        }
    };
    let source_view = GuestView::of(&src);
    let (dest, guest) = match link.recv(setup_timeout + Duration::from_secs(60))? {
        FromPeer::Done { dest, guest } => (dest, guest),
        other => bail!("Unexpected peer message {other:?}"),
    };
    link.finish(Duration::from_secs(30))?;
    drop(src);

    let dest_verified = dest
        .get("verified")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let verified = report.verified && dest_verified;
    let mut hist = LatencyHist::new();
    for [_, us] in &report.faults.timeline {
        hist.record_us(u64::from(*us));
    }
    let histogram: Vec<[f64; 2]> = hist
        .log_buckets(4_000, std::f64::consts::SQRT_2)
        .into_iter()
        .map(|(upper, n)| [(upper * 10.0).round() / 10.0, u64_f64(n)])
        .collect();

    let mut v = serde_json::to_value(&report).context("Cannot serialise the report")?;
    let obj = v
        .as_object_mut()
        .context("The migration report is not a JSON object")?;
    let mut out = serde_json::Map::new();
    out.insert("suite".into(), json!("migrate"));
    for (k, val) in std::mem::take(obj) {
        out.insert(k, val);
    }
    let ratio = |x: u64| match fault_floor_us {
        Some(f) if f > 0.0 && report.faults.count > 0 => json!(u64_f64(x) / f),
        _ => Value::Null,
    };
    if let Value::Object(c) = config_json(cfg) {
        for (k, val) in c {
            // The report's own figures (mode, streams, transport, mem_bytes) stay as they are.
            out.entry(k).or_insert(val);
        }
    }
    let extra = json!({
        "fault_floor_us": fault_floor_us,
        "fault_floor": floor_json,
        "fault_p50_ratio_to_floor": ratio(report.faults.p50_us),
        "fault_p99_ratio_to_floor": ratio(report.faults.p99_us),
        "guest_max_gap_us": guest.max_gap_us,
        "guest_stall_ms": guest.stall_ms,
        "guest_stalls": guest.stalls,
        "guest_writes": guest.writes,
        "source_guest_max_gap_us": source_view.max_gap_us,
        "source_guest_stall_ms": source_view.stall_ms,
        "dest": dest,
        "verified": verified,
        "machine": machine,
    });
    if let Value::Object(m) = extra {
        out.extend(m);
    }
    if let Some(Value::Object(f)) = out.get_mut("faults") {
        f.insert("histogram".into(), json!(histogram));
        f.insert("histogram_samples".into(), json!(hist.count()));
    }
    Ok(MigrateResult {
        mode: report.mode.clone(),
        mem_bytes: report.mem_bytes,
        write_rate: cfg.write_rate,
        streams: report.streams,
        transport: report.transport.clone(),
        switchover: report.switchover.clone(),
        blackout_us: report.blackout_us,
        total_ms: report.total_ms,
        rounds: report.rounds,
        fault_count: report.faults.count,
        fault_p50_us: report.faults.p50_us,
        fault_p99_us: report.faults.p99_us,
        fault_floor_us,
        guest_max_gap_us: guest.max_gap_us,
        guest_stall_ms: guest.stall_ms,
        verified,
        max_blackout_us: cfg.max_blackout_us,
        error: None,
        machine,
        json: Value::Object(out),
    })
}

/// The configuration part of a result.
fn config_json(cfg: &MigrateBench) -> Value {
    json!({
        "mode": cfg.mode.name(),
        "mem_bytes": cfg.mem_bytes,
        "write_mib_s": match cfg.write_rate {
            WriteRate::Idle => json!(0),
            WriteRate::MibS(n) => json!(n),
            WriteRate::Max => Value::Null,
        },
        "write_rate": cfg.write_rate.to_string(),
        "writers": cfg.writers,
        "streams": cfg.streams,
        "transport": cfg.transport.name(),
        "backing": cfg.backing,
        "pattern": cfg.pattern,
        "max_blackout_us": cfg.max_blackout_us,
        "checksums": cfg.checksums,
    })
}

fn failed_result(
    cfg: &MigrateBench,
    machine: Machine,
    error: String,
    fault_floor_us: Option<f64>,
    floor: Value,
) -> MigrateResult {
    let mut json = json!({"suite": "migrate"});
    if let (Value::Object(o), Value::Object(c)) = (&mut json, config_json(cfg)) {
        o.extend(c);
        o.insert("fault_floor_us".into(), json!(fault_floor_us));
        o.insert("fault_floor".into(), floor);
        o.insert("verified".into(), json!(false));
        o.insert("error".into(), json!(error));
        o.insert("machine".into(), json!(machine));
    }
    MigrateResult {
        mode: cfg.mode.name().into(),
        mem_bytes: cfg.mem_bytes,
        write_rate: cfg.write_rate,
        streams: usize::from(cfg.streams),
        transport: cfg.transport.name().into(),
        switchover: "failed".into(),
        blackout_us: 0.0,
        total_ms: 0.0,
        rounds: 0,
        fault_count: 0,
        fault_p50_us: 0,
        fault_p99_us: 0,
        fault_floor_us,
        guest_max_gap_us: 0.0,
        guest_stall_ms: 0.0,
        verified: false,
        max_blackout_us: cfg.max_blackout_us,
        error: Some(error),
        machine,
        json,
    }
}

/// A protocol range as a transport range.
fn tr(r: GpaRange) -> ferry_transport::GpaRange {
    ferry_transport::GpaRange::new(r.gpa, r.len)
}

/// Small registered memory for the round-trip measurement (both ends).
struct RttMemory {
    _mem: ProcessMemory,
    reg: Arc<MemoryRegistration>,
}

const RTT_PAGES: u64 = 256;

impl RttMemory {
    fn new() -> Result<Self> {
        let mem = ProcessMemory::new(
            &[(0, RTT_PAGES * PAGE_SIZE)],
            MemBacking::Anonymous,
            MemOptions {
                hugepage: false,
                populate: true,
            },
        )?;
        for p in 0..RTT_PAGES {
            mem.write_gpa(p * PAGE_SIZE, &(p + 1).to_le_bytes())?;
        }
        let layout = Layout::new(&mem)?;
        let reg = layout.register(None, false, RegistrationConfig::default())?;
        Ok(Self { _mem: mem, reg })
    }
}

/// The requesting side of the round-trip floor: `samples` timed 4 KiB page requests (after 20
/// warm-up ones), each written on the raw socket and answered into registered memory, as the
/// destination's fault handler does.
fn measure_rtt(ep: &Endpoint, samples: usize) -> Result<Vec<Duration>> {
    // Like the destination's fault handler thread.
    let _ = raise_thread_priority(Priority::default());
    let mem = RttMemory::new()?;
    let timeout = Duration::from_secs(10);
    let sock = Socket::connect(ep, timeout)?;
    let writer = sock.try_clone()?;
    let mut stream = open_stream(sock, 0, &mem.reg, &urgent_config(timeout))?;
    let write = |buf: &[u8]| -> std::io::Result<()> {
        match &writer {
            Socket::Tcp(s, _) => (&*s).write_all(buf),
            Socket::Unix(s, _) => (&*s).write_all(buf),
        }
    };
    const WARMUP: usize = 20;
    let mut out = Vec::with_capacity(samples);
    for k in 0..WARMUP + samples {
        let gpa = (k as u64 % RTT_PAGES) * PAGE_SIZE;
        let req = Frame::PageRequest {
            id: k as u64,
            range: GpaRange::new(gpa, PAGE_SIZE),
        }
        .encode();
        let t = Instant::now();
        write(&req).context("Round trip: cannot write the request")?;
        let mut h = [0u8; HEADER_LEN];
        stream.recv_exact(&mut h)?;
        let header = FrameHeader::decode(&h)?;
        let mut meta = vec![0u8; usize::try_from(header.meta_len)?];
        stream.recv_exact(&mut meta)?;
        match Frame::decode(&header, &meta)? {
            Frame::PageReply { id, range, .. } if id == k as u64 && range.len == PAGE_SIZE => {
                stream.recv_into(&[tr(range)], Target::Guest)?;
            }
            other => bail!("Round trip: unexpected reply {:?}", other.command()),
        }
        if k >= WARMUP {
            out.push(t.elapsed());
        }
    }
    write(&Frame::EndOfStream.encode()).context("Round trip: cannot end")?;
    Ok(out)
}

/// The replying side of the round-trip floor (in the peer), like the source's urgent server.
fn serve_rtt(listener: &Listener) -> Result<()> {
    let _ = raise_thread_priority(Priority::default());
    let mem = RttMemory::new()?;
    let sock = listener.accept(Duration::from_secs(60))?;
    let mut stream = open_stream(sock, 0, &mem.reg, &urgent_config(Duration::from_secs(30)))?;
    loop {
        let mut h = [0u8; HEADER_LEN];
        stream.recv_exact(&mut h)?;
        let header = FrameHeader::decode(&h)?;
        let mut meta = vec![0u8; usize::try_from(header.meta_len)?];
        stream.recv_exact(&mut meta)?;
        match Frame::decode(&header, &meta)? {
            Frame::PageRequest { id, range } => {
                ensure!(
                    range
                        .gpa
                        .checked_add(range.len)
                        .is_some_and(|e| e <= RTT_PAGES * PAGE_SIZE),
                    "Round trip: request {:#x}+{:#x} out of range",
                    range.gpa,
                    range.len
                );
                let reply = Frame::PageReply {
                    id,
                    range,
                    checksums: None,
                };
                stream.send_frame(&reply.encode(), &[tr(range)])?;
                stream.flush()?;
            }
            Frame::EndOfStream => return Ok(()),
            other => bail!("Round trip: unexpected frame {:?}", other.command()),
        }
    }
}

/// A destination that restores but never resumes its writers (the idle benchmark: the VM's
/// vCPUs have nothing to do).
struct IdleControl<'a>(&'a mut ProcessVm);

impl VmControl for IdleControl<'_> {
    fn pause(&mut self) -> Result<(), BoxError> {
        self.0.pause()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
        self.0.save_state()
    }
    fn restore_state(&mut self, blob: &[u8]) -> Result<(), BoxError> {
        self.0.restore_state(blob)
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The destination peer (runs in the second process).
pub(crate) fn peer(input: &mut dyn BufRead, out: &mut PeerOut) -> Result<()> {
    let job: Job = peer_read(input)?;
    let cfg = job.bench;
    cfg.check()?;
    let key = Psk::from_hex(&job.key).map_err(|e| anyhow!("Bad session key: {e}"))?;
    let pcfg = cfg.proc_config();
    let mut dst = ProcessVm::new_destination(&pcfg).context("Cannot build the destination VM")?;
    let dst_mem = dst.memory();
    let layout = Layout::new(&*dst_mem)?;
    let listener = SessionListener::bind(
        &loopback_endpoint(cfg.transport, "session"),
        server_config(&layout, Auth::Psk(key.clone()), 64),
        Duration::from_secs(30),
    )?;
    let rtt_listener = Listener::bind(&loopback_endpoint(cfg.transport, "rtt"))?;
    let (uffd_p50_us, uffd_p99_us, uffd_error) =
        match ferry_engine::uffd::probe_fault_latency(cfg.fault_probe_samples, cfg.probe_mode()) {
            Ok(s) => (
                Some(quantile_us(&s, 0.5)),
                Some(quantile_us(&s, 0.99)),
                None,
            ),
            Err(e) => (None, None, Some(format!("{e}"))),
        };
    out.send(&FromPeer::Ready {
        session: endpoint_string(&listener.endpoint()?),
        rtt: endpoint_string(&rtt_listener.endpoint()?),
        uffd_p50_us,
        uffd_p99_us,
        uffd_error,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| serve_rtt(&rtt_listener))
            .join()
            .map_err(|_| anyhow!("The round-trip server panicked"))
    })??;
    drop(rtt_listener);

    let opts = SessionOptions {
        transport: cfg.kind(),
        streams: cfg.streams,
        auth: Auth::Psk(key),
        ..SessionOptions::default()
    };
    let gib = cfg.mem_bytes.div_ceil(1 << 30);
    let (streams, reg, _params) =
        accept_destination(&listener, &layout, &opts, Duration::from_secs(120))
            .context("Cannot accept the migration session")?;
    let idle = cfg.write_rate == WriteRate::Idle;
    let report = {
        let mut idle_ctl;
        let control: &mut dyn VmControl = if idle {
            idle_ctl = IdleControl(&mut dst);
            &mut idle_ctl
        } else {
            &mut dst
        };
        receive(
            DestVm {
                memory: &*dst_mem,
                control,
                // Created for this run, never written.
                zeroed: true,
            },
            streams,
            Duration::from_secs(60 + 30 * gib),
        )
        .context("Receiving the migration failed")?
    };
    drop(reg);
    // Let the writers run on here, then read what they saw.
    std::thread::sleep(Duration::from_millis(cfg.settle_ms));
    let guest = GuestView::of(&dst);
    let _ = dst.pause();
    out.send(&FromPeer::Done {
        dest: serde_json::to_value(&report)?,
        guest,
    })?;
    Ok(())
}
