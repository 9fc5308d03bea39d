// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `ferry send`, `ferry recv` and `ferry demo`: live migration of a KVM guest between two
//! processes (on one host for the demo, between hosts for send/recv).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use ferry_engine::MigrateError;
use ferry_engine::dest::{DestRecovery, DestVm, receive_with};
use ferry_engine::layout::Layout;
use ferry_engine::policy::{Compression, Mode, Policy};
use ferry_engine::session::{
    SessionOptions, accept_destination, accept_recovery, check_transport, connect_source,
    reconnect_source, server_config,
};
use ferry_engine::source::{Phase, Progress, SourceRecovery, SourceVm, migrate_with};
use ferry_kvm::{DirtyMode, KvmVm, MemBacking, VmConfig, Workload};
use ferry_protocol::handshake::{Auth, Psk, TransportKind};
use ferry_transport::Endpoint;
use ferry_transport::session::SessionListener;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

/// Migration mode.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ModeArg {
    /// Iterative pre-copy, then stop-and-copy within the blackout budget.
    Precopy,
    /// Switch at once; pages follow on demand and by background push.
    Postcopy,
    /// Pre-copy while it converges, then post-copy (the default).
    Hybrid,
}

impl ModeArg {
    fn mode(self) -> Mode {
        match self {
            ModeArg::Precopy => Mode::PreCopy,
            ModeArg::Postcopy => Mode::PostCopy,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

/// Data transport.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TransportArg {
    /// io_uring over TCP: fixed buffers, SEND_ZC.
    Uring,
    /// Plain blocking TCP sockets.
    Tcp,
    /// RDMA verbs: pages pushed by RDMA WRITE, frame headers over TCP (needs an RDMA NIC on
    /// both hosts, with on-demand paging for hybrid and post-copy, and the `rdma` build
    /// feature; `send`/`recv` only).
    Rdma,
}

/// Built-in guest workloads.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum WorkloadArg {
    /// Sleeps.
    Idle,
    /// Dirties a working set at a given rate.
    Writer,
    /// Memory is a pure function of its progress: checkable page by page after migration.
    Verifier,
}

/// The VM to run (must be the same on both sides).
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Guest memory in MiB (multiple of 2).
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Built-in guest (ignored with --kernel).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Verifier)]
    pub workload: WorkloadArg,
    /// A multiboot (v1) kernel to boot instead of a built-in guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The kernel's command line.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Writer: dirtying rate in MiB/s (0 = as fast as it can).
    #[arg(long, default_value_t = 0)]
    pub write_mib_s: u64,
    /// Writer: working set in MiB.
    #[arg(long, default_value_t = 256)]
    pub working_set_mib: u64,
    /// Back guest memory with anonymous memory instead of a memfd.
    #[arg(long)]
    pub anonymous: bool,
    /// Destination: allocate all guest memory before listening (`fallocate` of the memfd; like
    /// QEMU's `-mem-prealloc`), so pages arrive into backed memory and a host short of memory
    /// fails before the switchover. Not with `--anonymous`.
    #[arg(long, conflicts_with = "anonymous")]
    pub prefault: bool,
    /// Destination: how pages of memfd-backed guest memory arriving for the first time are
    /// received: through a mapping of the memfd, or into it through the page cache (`splice`:
    /// no page fault per page, but the streams' writes serialise on the file's inode lock).
    #[arg(long, value_enum, default_value_t = RecvIntoArg::Mapping)]
    pub recv_into: RecvIntoArg,
    /// Dirty tracking: auto (the ring if KVM has it, else the bitmap), bitmap or ring.
    #[arg(long, default_value = "auto")]
    pub dirty: String,
    /// How the threads on the blackout's critical path (control and vCPU threads) are raised
    /// while it lasts.
    #[arg(long, value_enum, default_value_t = PriorityArg::Fifo)]
    pub blackout_priority: PriorityArg,
}

/// A duration option given in seconds: refused with its name when negative, not a number or
/// too large (`Duration::from_secs_f64` would panic).
fn seconds(option: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow!("{option} {value}: not a duration in seconds (0 or more)"))
}

/// `--recv-into`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecvIntoArg {
    /// `splice` from the socket into the memfd.
    PageCache,
    /// Receive through a shared mapping of the memfd (one page fault per fresh page; the
    /// default).
    Mapping,
}

impl RecvIntoArg {
    fn name(self) -> &'static str {
        match self {
            Self::PageCache => "page-cache",
            Self::Mapping => "mapping",
        }
    }
}

/// `--blackout-priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    /// Nice -10.
    Nice,
    /// Nice -10 and a 100 µs scheduler slice (preempts on wake-up; Linux 6.12+).
    Slice,
    /// SCHED_FIFO priority 1.
    Fifo,
    /// Normal priority.
    Off,
}

impl PriorityArg {
    fn name(self) -> &'static str {
        match self {
            Self::Nice => "nice",
            Self::Slice => "slice",
            Self::Fifo => "fifo",
            Self::Off => "off",
        }
    }

    /// Applies it to this process.
    fn apply(self) {
        use ferry_engine::boost::{Class, set_class};
        set_class(match self {
            Self::Nice => Class::Nice,
            Self::Slice => Class::ShortSlice,
            Self::Fifo => Class::Fifo,
            Self::Off => Class::Off,
        });
    }
}

impl VmArgs {
    fn config(&self) -> Result<VmConfig> {
        self.blackout_priority.apply();
        let workload = match (&self.kernel, self.workload) {
            (Some(path), _) => Workload::Kernel {
                path: path.clone(),
                cmdline: self.append.clone(),
            },
            (None, WorkloadArg::Idle) => Workload::Idle,
            (None, WorkloadArg::Writer) => Workload::Writer {
                working_set_mib: self.working_set_mib,
                rate_mib_s: (self.write_mib_s > 0).then_some(self.write_mib_s),
            },
            (None, WorkloadArg::Verifier) => Workload::Verifier,
        };
        let dirty = match self.dirty.as_str() {
            "auto" => DirtyMode::Auto,
            "bitmap" => DirtyMode::Bitmap,
            "ring" => DirtyMode::Ring,
            other => bail!("Unknown dirty mode {other:?}: auto, bitmap or ring"),
        };
        Ok(VmConfig {
            mem_bytes: self.mem_mib << 20,
            vcpus: self.vcpus,
            workload,
            backing: if self.anonymous {
                MemBacking::Anonymous
            } else {
                MemBacking::Memfd
            },
            thp: false,
            dirty,
            serial: ferry_kvm::SerialSink::Buffer,
        })
    }

    fn workload_name(&self) -> &'static str {
        if self.kernel.is_some() {
            return "kernel";
        }
        match self.workload {
            WorkloadArg::Idle => "idle",
            WorkloadArg::Writer => "writer",
            WorkloadArg::Verifier => "verifier",
        }
    }
}

/// How to migrate.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Migration mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Hybrid)]
    pub mode: ModeArg,
    /// Data transport.
    #[arg(long, value_enum, default_value_t = TransportArg::Uring)]
    pub transport: TransportArg,
    /// Parallel bulk streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u16,
    /// Blackout budget in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub max_blackout_us: u64,
    /// The VM's part of a stop-and-copy blackout the switchover prediction assumes (pause,
    /// save, restore, resume), µs; the final harvest, the final copy and the round trips are
    /// measured from the pre-copy rounds. Calibrate it from the pause, restore and resume
    /// phases of a stop-and-copy on this host (its save overlaps the final copy; 300–600 on
    /// the 2-core nested PVM machine of the README, depending on load).
    #[arg(long, default_value_t = default_switch_overhead_us())]
    pub switch_overhead_us: u64,
    /// Hybrid only: the fraction of the budget a stop-and-copy keeps in reserve for the
    /// prediction's error (0 to 1; 0.1: it must be predicted to fit 90% of the budget, else
    /// hybrid goes on and switches to post-copy).
    #[arg(long, default_value_t = ferry_engine::policy::DEFAULT_HYBRID_RESERVE, value_parser = parse_reserve)]
    pub hybrid_reserve: f64,
    /// Per-page xxh3 checksums on page data.
    #[arg(long)]
    pub checksums: bool,
    /// zstd compression level for page data (used only when it pays); off when absent.
    #[arg(long)]
    pub compress: Option<i8>,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Seconds to keep trying to resume the session after losing the connection once the VM
    /// state was sent (post-copy, or before the destination confirmed the switchover; 0: fail
    /// at once, leaving the VM paused if the switchover is unconfirmed).
    #[arg(long, default_value_t = 30)]
    pub recovery_window_s: u64,
}

/// `--hybrid-reserve`: a number from 0 to 1.
fn parse_reserve(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("Not a number: {s:?} ({e})"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("Reserve {s} is outside 0 to 1"))
    }
}

/// The engine's default [`Policy::switch_overhead`], µs.
fn default_switch_overhead_us() -> u64 {
    u64::try_from(Policy::default().switch_overhead.as_micros()).unwrap_or(u64::MAX)
}

impl MigrateArgs {
    fn policy(&self) -> Policy {
        Policy {
            mode: self.mode.mode(),
            max_blackout: Duration::from_micros(self.max_blackout_us),
            switch_overhead: Duration::from_micros(self.switch_overhead_us),
            hybrid_reserve: self.hybrid_reserve,
            max_rounds: self.max_rounds,
            checksums: self.checksums,
            compression: self
                .compress
                .map_or(Compression::None, |level| Compression::Zstd { level }),
            ..Policy::default()
        }
    }

    fn transport(&self) -> Result<TransportKind> {
        match self.transport {
            TransportArg::Uring => Ok(TransportKind::Uring),
            TransportArg::Tcp => Ok(TransportKind::Tcp),
            // The engine refuses it with the reason when this build lacks the `rdma` feature
            // or the host has no device.
            TransportArg::Rdma => Ok(TransportKind::Rdma),
        }
    }
}

/// Authentication.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// File holding the pre-shared key (from `ferry keygen`); or set FERRY_KEY.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Run without authentication: anyone who can connect can send you memory. Benchmarks only.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

impl AuthArgs {
    fn auth(&self) -> Result<Auth> {
        if self.insecure_no_auth {
            eprintln!(
                "ferry: WARNING: --insecure-no-auth: this migration is NOT authenticated; any peer that can connect is trusted"
            );
            return Ok(Auth::Insecure);
        }
        let text = match (&self.key_file, std::env::var("FERRY_KEY")) {
            (Some(p), _) => std::fs::read_to_string(p)
                .with_context(|| format!("Cannot read key file {}", p.display()))?,
            (None, Ok(k)) => k,
            (None, Err(_)) => bail!(
                "No key: give --key-file FILE (make one with `ferry keygen -o FILE`) or FERRY_KEY, or --insecure-no-auth"
            ),
        };
        Ok(Auth::Psk(Psk::from_hex(&text).context("Invalid key")?))
    }
}

/// `ferry send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The receiver, HOST:PORT.
    #[arg(long)]
    pub to: SocketAddr,
    /// Seconds to let the guest run before migrating.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// One JSON object with the result on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds of steal time of all CPUs so far (`/proc/stat`), if readable.
fn host_steal() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal ...
    let ticks: u64 = cpu.split_whitespace().nth(8)?.parse().ok()?;
    // USER_HZ, the unit of /proc/stat, is 100 in the x86-64 (and arm64) ABI.
    Some(ticks * 10)
}

/// `ferry recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Address to listen on, ADDR:PORT (port 0 picks one; it is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Seconds to let the guest run on after the migration before checking it.
    #[arg(long, default_value_t = 1.0)]
    pub run_after_s: f64,
    /// Seconds to wait for the sender.
    #[arg(long, default_value_t = 120)]
    pub wait_s: u64,
    /// Seconds to wait for the sender to resume the session after losing the connection once
    /// the switchover began (0: fail at once).
    #[arg(long, default_value_t = 30)]
    pub recovery_window_s: u64,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Print `LISTENING <addr>` and the result as one JSON line (used by `ferry demo`).
    #[arg(long, hide = true)]
    pub machine_output: bool,
    /// Fault injection for tests: shut every connection down right after the VM resumed, so
    /// the `Resumed` frame cannot be sent (the source must not resume its VM).
    #[arg(long, hide = true)]
    pub fault_cut_after_resume: bool,
}

/// `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// Migrations to run.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// One JSON object per run on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seconds the guest runs before each migration. A built-in guest touches its memory as
    /// it runs: a large guest needs a long warm-up before all of it is in use.
    #[arg(long, default_value_t = 0.5)]
    pub warmup_s: f64,
}

fn require_kvm() -> Result<()> {
    if !ferry_kvm::kvm_available() {
        bail!("/dev/kvm cannot be opened: this command needs KVM (run as root on a KVM host)");
    }
    Ok(())
}

fn progress_bar(json: bool) -> ProgressBar {
    let pb = ProgressBar::new(100);
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Runs the source side against `to`; returns the report as JSON (with guest statistics).
fn run_source(
    to: SocketAddr,
    vm_args: &VmArgs,
    margs: &MigrateArgs,
    auth: Auth,
    warmup: Duration,
    json: bool,
) -> Result<(Value, KvmVm)> {
    let opts = SessionOptions {
        transport: margs.transport()?,
        streams: margs.streams,
        auth,
        ..SessionOptions::default()
    };
    // Before a VM is started for nothing.
    check_transport(&opts)?;
    require_kvm()?;
    let cfg = vm_args.config()?;
    let mut vm = KvmVm::new_source(&cfg).context("Cannot create the source VM")?;
    vm.start().context("Cannot start the source VM")?;
    std::thread::sleep(warmup);
    if let Some(f) = vm.fault() {
        bail!("The source guest failed before migration: {f}");
    }
    let policy = margs.policy();
    let mem = vm.memory();
    let layout = Layout::new(&*mem)?;
    let endpoint = Endpoint::Tcp(to);
    let (streams, reg) = connect_source(&endpoint, &layout, &policy, &opts)
        .with_context(|| format!("Cannot open a migration session to {to}"))?;
    let session = streams.session;
    let mut reconnect = || reconnect_source(&endpoint, session, &layout, &policy, &opts, &reg);
    let recovery = (margs.recovery_window_s > 0).then_some(SourceRecovery {
        window: Duration::from_secs(margs.recovery_window_s),
        reconnect: &mut reconnect,
    });
    let mut dirty = vm.dirty_tracker();
    let pb = progress_bar(json);
    let t0 = Instant::now();
    let mut on_progress = |p: &Progress| {
        let pct = (p.pages_done.min(p.total_pages) * 100)
            .checked_div(p.total_pages)
            .unwrap_or(0);
        pb.set_position(pct);
        let phase = match p.phase {
            Phase::Round(n) => format!("pre-copy round {n}"),
            Phase::Switchover => "switchover".into(),
            Phase::PostCopy => "post-copy".into(),
            Phase::Verifying => "verifying".into(),
        };
        pb.set_message(format!(
            "{phase}: {:.0} MiB sent, {} pages dirty",
            p.bytes_sent as f64 / (1 << 20) as f64,
            p.dirty_pages
        ));
    };
    let result = migrate_with(
        SourceVm {
            memory: &*mem,
            dirty: &mut dirty,
            control: &mut vm,
        },
        streams,
        &policy,
        &mut on_progress,
        recovery,
    );
    pb.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let running = vm.is_running();
            let what = match &e {
                // Never resumed here: the destination may run the VM.
                MigrateError::SwitchoverUnconfirmed { .. } => {
                    "Migration NOT confirmed (the paused source VM ends with this process; `ferry recv` on the destination reports whether it runs the VM)"
                }
                _ if running => "Migration failed; the VM keeps running on the source",
                _ => "Migration failed",
            };
            return Err(anyhow!(e)).context(what);
        }
    };
    let _ = t0;
    let mut v = serde_json::to_value(&report)?;
    v["vcpus"] = json!(cfg.vcpus);
    v["workload"] = json!(vm_args.workload_name());
    v["write_mib_s"] = json!(vm_args.write_mib_s);
    v["dirty_mode"] = json!(format!("{:?}", vm.dirty_mode()));
    v["blackout_priority"] = json!(vm_args.blackout_priority.name());
    v["switch_overhead_us"] = json!(margs.switch_overhead_us);
    v["hybrid_reserve"] = json!(margs.hybrid_reserve);
    Ok((v, vm))
}

/// How `run_dest` receives and what it does after.
#[derive(Clone, Copy)]
struct DestOptions {
    /// How long the guest runs on before its check.
    run_after: Duration,
    /// How long to wait for a migration.
    wait: Duration,
    /// Post-copy recovery window (zero: none).
    recovery_window: Duration,
    /// Test hook: cut the connections right after the resume.
    cut_after_resume: bool,
    /// `--recv-into`.
    recv_into: RecvIntoArg,
}

/// Runs the destination side on `listener`; returns its report as JSON, after letting the
/// guest run on and checking it.
fn run_dest(
    listener: &SessionListener,
    mut vm: KvmVm,
    cfg: &VmConfig,
    o: &DestOptions,
) -> Result<Value> {
    let DestOptions {
        run_after,
        wait,
        recovery_window,
        cut_after_resume,
        recv_into,
    } = *o;
    let mem = vm.memory();
    let layout = Layout::new(&*mem)?;
    let opts = SessionOptions {
        page_cache: recv_into == RecvIntoArg::PageCache,
        ..SessionOptions::default()
    };
    let (streams, reg, params) =
        accept_destination(listener, &layout, &opts, wait).context("No migration arrived")?;
    let mut cut = Vec::new();
    if cut_after_resume {
        cut.push(streams.control.socket().try_clone()?);
        for s in &streams.sockets {
            cut.push(s.try_clone()?);
        }
    }
    let mut accept = |id, left| accept_recovery(listener, id, &reg, &opts, left);
    let recovery = (!recovery_window.is_zero()).then_some(DestRecovery {
        window: recovery_window,
        accept: &mut accept,
    });
    let mut control = CutAfterResume {
        vm: &mut vm,
        sockets: cut,
    };
    let report = match receive_with(
        DestVm {
            memory: &*mem,
            control: &mut control,
            // Created by this process for this migration (`recv` takes one), never written;
            // `--prefault` only allocated it.
            zeroed: true,
        },
        streams,
        Duration::from_secs(60),
        recovery,
    ) {
        Ok(r) => r,
        Err(e) => {
            let what = if vm.is_running() {
                "Receiving the VM failed after it was resumed here: the VM runs on this side, which owns it, until this process exits"
            } else {
                "Receiving the VM failed; the VM does not run here"
            };
            return Err(anyhow!(e)).context(what);
        }
    };
    let before = vm.guest_stats();
    // Each vCPU's last progress point when the migration ended here: the end of the
    // `guest_migrating_*` window.
    let done_tsc: Vec<u64> = before.per_vcpu.iter().map(|s| s.last_tsc).collect();
    std::thread::sleep(run_after);
    let fault = vm.fault().map(|f| f.to_string());
    use ferry_engine::vm::VmControl;
    vm.pause()
        .map_err(|e| anyhow!("Cannot pause the migrated VM: {e}"))?;
    let after = vm.guest_stats();
    let split = gap_split_json(&vm, &done_tsc);
    let model = match cfg.workload {
        Workload::Verifier => Some(
            vm.verify_memory()
                .context("Verifier model check failed to run")?,
        ),
        _ => None,
    };
    let serial = vm.serial_output();
    let mut v = json!({
        "dest": serde_json::to_value(&report)?,
        "negotiated_streams": params.streams,
        "guest_progress_after": after.iterations.saturating_sub(before.iterations),
        "guest_max_gap_us": after.max_gap_us,
        "guest_stall_ms": after.stall_us_over_100 as f64 / 1000.0,
        "guest_fault": fault,
        "model_pages_checked": model.as_ref().map(|m| m.pages_checked),
        "model_bad_pages": model.as_ref().map(|m| m.bad_pages),
        "serial_tail": serial.chars().rev().take(400).collect::<String>().chars().rev().collect::<String>(),
    });
    for (k, x) in split {
        v[k] = x;
    }
    Ok(v)
}

/// The destination VM's control; with sockets (`recv --fault-cut-after-resume`), shuts them
/// down right after the first resume, so the destination's `Resumed` cannot be sent.
struct CutAfterResume<'a> {
    vm: &'a mut KvmVm,
    sockets: Vec<ferry_transport::Socket>,
}

impl ferry_engine::vm::VmControl for CutAfterResume<'_> {
    fn pause(&mut self) -> Result<(), ferry_engine::vm::BoxError> {
        self.vm.pause()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, ferry_engine::vm::BoxError> {
        self.vm.save_state()
    }
    fn restore_state(&mut self, blob: &[u8]) -> Result<(), ferry_engine::vm::BoxError> {
        self.vm.restore_state(blob)
    }
    fn resume(&mut self) -> Result<(), ferry_engine::vm::BoxError> {
        self.vm.resume()?;
        if !self.sockets.is_empty() {
            eprintln!("ferry: fault injection: cutting every connection after the resume");
        }
        for s in self.sockets.drain(..) {
            let _ = s.shutdown();
        }
        Ok(())
    }
    fn prepare_restore(&mut self) {
        self.vm.prepare_restore();
    }
    fn throttle(&mut self, percent: u8) -> Result<bool, ferry_engine::vm::BoxError> {
        self.vm.throttle(percent)
    }
    fn first_touch_pages(&mut self) -> Vec<u64> {
        self.vm.first_touch_pages()
    }
}

/// The guest-measured gaps, split at the switchover, as JSON fields (see [`GAP_SPLIT_KEYS`]).
/// The split point is each vCPU's guest TSC in the state the source saved at the pause (this
/// VM restored it). Fields are null for guests without a gap log, the pre-copy ones and the
/// switchover gap are null when ring overflow lost entries from the switchover on, and the
/// pre-copy longest gap is null when overflow lost it (the whole-run longest still stands).
fn gap_split_json(vm: &KvmVm, done_tsc: &[u64]) -> Vec<(&'static str, Value)> {
    let ms = |us: u64| us as f64 / 1000.0;
    let sp = match vm.guest_gap_split() {
        Ok(sp) if vm.plan().gap_log_entries > 0 => sp,
        _ => return GAP_SPLIT_KEYS.iter().map(|k| (*k, Value::Null)).collect(),
    };
    let known = |x: Value| if sp.complete { x } else { Value::Null };
    let migrating = vm.guest_gap_log().between(vm.state_tsc(), done_tsc).ok();
    vec![
        ("guest_switch_gap_us", known(json!(sp.switch_gap_us))),
        (
            "guest_switch_gap_src_us",
            known(json!(sp.switch_parts_us.map(|p| p.0))),
        ),
        (
            "guest_switch_gap_dst_us",
            known(json!(sp.switch_parts_us.map(|p| p.1))),
        ),
        (
            "guest_pre_max_gap_us",
            known(json!(sp.pre_max_exact.then_some(sp.pre.max_us))),
        ),
        ("guest_pre_stall_ms", known(json!(ms(sp.pre.sum_us)))),
        ("guest_pre_stalls", known(json!(sp.pre.count))),
        ("guest_after_max_gap_us", json!(sp.after.max_us)),
        ("guest_after_stall_ms", json!(ms(sp.after.sum_us))),
        ("guest_after_stalls", json!(sp.after.count)),
        (
            "guest_migrating_max_gap_us",
            json!(migrating.map(|m| m.max_us)),
        ),
        (
            "guest_migrating_stall_ms",
            json!(migrating.map(|m| ms(m.sum_us))),
        ),
        ("guest_migrating_stalls", json!(migrating.map(|m| m.count))),
        ("guest_gap_log_lost", json!(sp.lost)),
        ("guest_gap_split_complete", json!(sp.complete)),
    ]
}

/// The JSON fields of [`gap_split_json`]: `guest_switch_gap_us` is the longest gap any vCPU
/// saw across the pause point (the blackout as the guest saw it; null if below the 100 µs
/// threshold), split at the source's saved TSC into `_src_us` (the guest's last progress on
/// the source until then) and `_dst_us` (from then until its first progress on the
/// destination); `guest_{pre,after}_*` the longest gap, the summed stalls over 100 µs and their
/// count before the pause and after the switchover (sums and counts of the most-affected
/// vCPU, like `guest_stall_ms`); `guest_migrating_*` the same for the gaps that started after
/// the switchover gap and before the destination finished the migration (post-copy faults and
/// push, the digest: the window QEMU's post-copy figures cover), where `guest_after_*` also
/// counts the half second the guest runs on before it is checked; `guest_gap_log_lost`
/// entries overwritten in the rings.
const GAP_SPLIT_KEYS: [&str; 14] = [
    "guest_switch_gap_us",
    "guest_switch_gap_src_us",
    "guest_switch_gap_dst_us",
    "guest_pre_max_gap_us",
    "guest_pre_stall_ms",
    "guest_pre_stalls",
    "guest_after_max_gap_us",
    "guest_after_stall_ms",
    "guest_after_stalls",
    "guest_migrating_max_gap_us",
    "guest_migrating_stall_ms",
    "guest_migrating_stalls",
    "guest_gap_log_lost",
    "guest_gap_split_complete",
];

/// One line: the guest's gaps before, across and after the switchover (empty without a log).
fn gap_split_line(v: &Value) -> String {
    if v["guest_gap_split_complete"].is_null() {
        return String::new();
    }
    let lost = match v["guest_gap_log_lost"].as_u64() {
        Some(0) | None => String::new(),
        Some(n) if v["guest_gap_split_complete"] == json!(true) => {
            format!(" ({n} oldest gap-log entries overwritten; pre-copy totals from counters)")
        }
        Some(n) => format!(
            " ({n} gap-log entries overwritten, some after the switchover: after-figures are a lower bound)"
        ),
    };
    let or_dash = |x: &Value| x.as_u64().map_or("-".into(), |n| n.to_string());
    format!(
        "  guest gaps split at the switchover: before it longest {} µs, {:.2} ms in {} stalls | across it {} | after it, until the migration ended, longest {} µs, {:.2} ms in {} stalls (and with the run-on: {} µs, {:.2} ms in {}){lost}",
        or_dash(&v["guest_pre_max_gap_us"]),
        v["guest_pre_stall_ms"].as_f64().unwrap_or(f64::NAN),
        or_dash(&v["guest_pre_stalls"]),
        match v["guest_switch_gap_us"].as_u64() {
            Some(us) => format!(
                "{us} µs ({} to the source's save, {} more to the first step on the destination)",
                or_dash(&v["guest_switch_gap_src_us"]),
                or_dash(&v["guest_switch_gap_dst_us"])
            ),
            None if v["guest_gap_split_complete"] == json!(true) => "< 100 µs".into(),
            None => "unknown (lost)".into(),
        },
        or_dash(&v["guest_migrating_max_gap_us"]),
        v["guest_migrating_stall_ms"].as_f64().unwrap_or(f64::NAN),
        or_dash(&v["guest_migrating_stalls"]),
        or_dash(&v["guest_after_max_gap_us"]),
        v["guest_after_stall_ms"].as_f64().unwrap_or(f64::NAN),
        or_dash(&v["guest_after_stalls"]),
    )
}

/// `ferry send`.
pub fn send(a: SendArgs) -> Result<()> {
    if a.vm.prefault {
        bail!(
            "--prefault is for the destination (`ferry recv`): the source's memory is its running guest's"
        );
    }
    let auth = a.auth.auth()?;
    let (v, _vm) = run_source(
        a.to,
        &a.vm,
        &a.migrate,
        auth,
        seconds("--warmup-s", a.warmup_s)?,
        a.json,
    )?;
    if a.json {
        println!("{v}");
    } else {
        print_source_summary(&v);
    }
    if v["verified"] != json!(true) {
        bail!("The destination's memory digest does not match the source's");
    }
    Ok(())
}

/// `ferry recv`.
pub fn recv(a: RecvArgs) -> Result<()> {
    require_kvm()?;
    let auth = a.auth.auth()?;
    let cfg = a.vm.config()?;
    // The VM exists before the listener, so the handshake insists on its memory map.
    let vm = KvmVm::new_destination(&cfg).context("Cannot create the destination VM")?;
    let mut prefault_ms = None;
    if a.vm.prefault {
        let t = Instant::now();
        vm.memory()
            .prefault()
            .context("Cannot preallocate the destination's guest memory")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(mib = a.vm.mem_mib, ms, "guest memory preallocated");
        prefault_ms = Some(ms);
    }
    let layout = Layout::new(&*vm.memory())?;
    let listener = SessionListener::bind(
        &Endpoint::Tcp(a.listen),
        server_config(&layout, auth, 16),
        Duration::from_secs(10),
    )?;
    let ep = listener.endpoint()?;
    if a.machine_output {
        println!("LISTENING {ep}");
        std::io::stdout().flush()?;
    } else {
        eprintln!("ferry: waiting for a migration on {ep}");
    }
    let mut v = run_dest(
        &listener,
        vm,
        &cfg,
        &DestOptions {
            run_after: seconds("--run-after-s", a.run_after_s)?,
            wait: Duration::from_secs(a.wait_s),
            recovery_window: Duration::from_secs(a.recovery_window_s),
            cut_after_resume: a.fault_cut_after_resume,
            recv_into: a.vm.recv_into,
        },
    )?;
    // Before the listener existed, so not part of the migration's time.
    v["prefault_ms"] = json!(prefault_ms);
    v["recv_into"] = json!(a.vm.recv_into.name());
    for r in listener.refusals() {
        eprintln!("ferry: {r}");
    }
    if a.machine_output {
        println!("RESULT {v}");
    } else {
        println!(
            "received: verified {} | guest ran on: {} iterations, longest gap {} µs, stalls {:.2} ms{}",
            v["dest"]["verified"],
            v["guest_progress_after"],
            v["guest_max_gap_us"],
            v["guest_stall_ms"].as_f64().unwrap_or(0.0),
            match v["model_bad_pages"].as_u64() {
                Some(0) => format!(
                    ", verifier model: all {} pages match",
                    v["model_pages_checked"]
                ),
                Some(n) => format!(", verifier model: {n} pages WRONG"),
                None => String::new(),
            }
        );
        let line = gap_split_line(&v);
        if !line.is_empty() {
            println!("{line}");
        }
    }
    Ok(())
}

fn us(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.0}"))
}

fn print_source_summary(v: &Value) {
    let p = &v["blackout_phases_us"];
    println!(
        "ferry: {} migration of {} MiB over {} x{}: {}",
        v["mode"].as_str().unwrap_or("?"),
        v["mem_bytes"].as_u64().unwrap_or(0) >> 20,
        v["transport"].as_str().unwrap_or("?"),
        v["streams"],
        if v["verified"] == json!(true) {
            "VERIFIED"
        } else {
            "NOT VERIFIED"
        }
    );
    println!(
        "  blackout {} µs  (pause {} · harvest {} · save {} · send {} | dest apply {} · restore {} · resume {})",
        us(&v["blackout_us"]),
        us(&p["pause"]),
        us(&p["harvest"]),
        us(&p["save"]),
        us(&p["send"]),
        us(&p["apply"]),
        us(&p["restore"]),
        us(&p["resume"])
    );
    println!(
        "  switchover {} after {} pre-copy rounds; total {:.1} ms; {:.1} MiB sent ({} data pages, {} zero pages skipped)",
        v["switchover"].as_str().unwrap_or("?"),
        v["rounds"],
        v["total_ms"].as_f64().unwrap_or(0.0),
        v["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        v["data_pages"],
        v["zero_pages"]
    );
    let f = &v["faults"];
    if f["count"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  post-copy: {} stale pages, {} faults: p50 {} µs, p99 {} µs, max {} µs, total stall {:.2} ms",
            v["stale_pages"],
            f["count"],
            f["p50_us"],
            f["p99_us"],
            f["max_us"],
            f["total_stall_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

/// `ferry demo`: the source here, the destination in a child process on loopback.
pub fn demo(a: DemoArgs) -> Result<()> {
    let warmup = seconds("--warmup-s", a.warmup_s)?;
    if a.migrate.transport == TransportArg::Rdma {
        bail!(
            "The demo migrates over loopback (127.0.0.1), which rdmacm cannot route: run `ferry recv --listen ADDR:PORT` and `ferry send --to ADDR:PORT --transport rdma` with ADDR on an RDMA interface"
        );
    }
    require_kvm()?;
    let key = Psk::generate().context("Cannot generate a session key")?;
    let exe = std::env::current_exe().context("Cannot find the ferry executable")?;
    for run in 1..=a.runs {
        let steal0 = host_steal();
        let mut child = Command::new(&exe);
        child
            .arg("recv")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--machine-output")
            .arg("--run-after-s")
            .arg("0.5")
            .args(vm_arg_list(&a.vm))
            .env("FERRY_KEY", key.to_hex())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = child
            .spawn()
            .context("Cannot start the destination process")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("No stdout from the destination"))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr: SocketAddr = loop {
            let line = lines
                .next()
                .ok_or_else(|| anyhow!("The destination process exited before listening"))??;
            if let Some(rest) = line.strip_prefix("LISTENING tcp:") {
                break rest
                    .trim()
                    .parse()
                    .context("Bad address from the destination")?;
            }
        };
        if !a.json {
            eprintln!(
                "ferry demo (run {run}/{}): source VM ({} MiB, {} vCPUs, {} guest) in this process, destination process {} on {addr}",
                a.runs,
                a.vm.mem_mib,
                a.vm.vcpus,
                a.vm.workload_name(),
                child.id()
            );
        }
        let source = run_source(
            addr,
            &a.vm,
            &a.migrate,
            Auth::Psk(key.clone()),
            warmup,
            a.json,
        );
        let mut dest_result = None;
        for line in lines.map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("RESULT ") {
                dest_result = Some(serde_json::from_str::<Value>(rest)?);
            }
        }
        let status = child.wait()?;
        // The paused source VM is torn down only now: two hosts do not share CPUs, but here
        // freeing its memory (a 1 GiB guest: up to 24 ms of a CPU) competed with the
        // destination's guest while it ran on.
        let (mut v, source_vm) = source?;
        drop(source_vm);
        let d = dest_result
            .ok_or_else(|| anyhow!("The destination process gave no result ({status})"))?;
        for k in [
            "guest_max_gap_us",
            "guest_stall_ms",
            "guest_progress_after",
            "guest_fault",
            "prefault_ms",
            "recv_into",
            "model_pages_checked",
            "model_bad_pages",
        ]
        .into_iter()
        .chain(GAP_SPLIT_KEYS)
        {
            v[k] = d[k].clone();
        }
        v["run"] = json!(run);
        v["suite"] = json!("demo");
        // CPU time the hypervisor below this machine took from it during the run (both
        // processes, the whole run): on a shared nested host it explains many tails.
        v["host_steal_ms"] = json!(steal0.zip(host_steal()).map(|(a, b)| b.saturating_sub(a)));
        let model_ok = d["model_bad_pages"].as_u64().is_none_or(|n| n == 0);
        let progressed = d["guest_progress_after"].as_u64().unwrap_or(0) > 0
            || a.vm.workload == WorkloadArg::Idle;
        v["verified"] =
            json!(v["verified"] == json!(true) && model_ok && d["guest_fault"].is_null());
        if a.json {
            println!("{v}");
        } else {
            print_source_summary(&v);
            println!(
                "  guest, measured from inside: longest gap {} µs, stalls over 100 µs {:.2} ms; after migration it ran {} more iterations{}",
                v["guest_max_gap_us"],
                v["guest_stall_ms"].as_f64().unwrap_or(0.0),
                v["guest_progress_after"],
                match d["model_bad_pages"].as_u64() {
                    Some(0) => format!(
                        "; verifier model: all {} pages match",
                        d["model_pages_checked"]
                    ),
                    Some(n) => format!("; verifier model: {n} pages WRONG"),
                    None => String::new(),
                }
            );
            let line = gap_split_line(&v);
            if !line.is_empty() {
                println!("{line}");
            }
            if let Some(ms) = v["host_steal_ms"].as_u64().filter(|ms| *ms > 0) {
                println!(
                    "  host: the hypervisor below this machine took {ms} ms of CPU during the run (steal)"
                );
            }
        }
        if v["verified"] != json!(true) || !progressed {
            bail!("Run {run}: the migrated guest did not check out (see above)");
        }
    }
    Ok(())
}

fn vm_arg_list(v: &VmArgs) -> Vec<String> {
    let mut a = vec![
        "--mem-mib".into(),
        v.mem_mib.to_string(),
        "--vcpus".into(),
        v.vcpus.to_string(),
        "--workload".into(),
        v.workload_name().replace("kernel", "verifier"),
        "--write-mib-s".into(),
        v.write_mib_s.to_string(),
        "--working-set-mib".into(),
        v.working_set_mib.to_string(),
        "--dirty".into(),
        v.dirty.clone(),
        "--blackout-priority".into(),
        v.blackout_priority.name().into(),
        "--recv-into".into(),
        v.recv_into.name().into(),
    ];
    if let Some(k) = &v.kernel {
        a.push("--kernel".into());
        a.push(k.display().to_string());
        a.push("--append".into());
        a.push(v.append.clone());
    }
    if v.anonymous {
        a.push("--anonymous".into());
    }
    if v.prefault {
        a.push("--prefault".into());
    }
    a
}
