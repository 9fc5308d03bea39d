// SPDX-License-Identifier: Apache-2.0 OR MIT
//! CPU priority for the threads on the blackout's critical path.
//!
//! The blackout lasts under a millisecond, and on a busy host its critical path (the source's
//! control thread and vCPU threads while they stop and save, the destination's control thread
//! and vCPU threads while they restore) otherwise waits behind bulk transfer threads, the
//! guest's own vCPUs or other tenants for scheduler slices of milliseconds. Those threads are
//! raised for the blackout only (see [`Class`]; `SCHED_FIFO` by default). Without
//! `CAP_SYS_NICE` nothing changes (logged at debug level).
//!
//! Measured on a 2-core nested PVM host, 1 GiB KVM guest, 20 runs per variant interleaved in
//! the same minutes: post-copy blackout p50 / p99 1.01 / 1.42 ms before this module (and the
//! switchover changes that came with it), 0.87 / 1.26 ms at nice -10, 0.79 / 0.95 ms with
//! `SCHED_FIFO`; hybrid 0.80 / 3.86, 0.84 / 1.86 and 0.88 / 1.01 ms.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

/// How a thread on the blackout's critical path is raised (process-wide: [`set_class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Nice [`BLACKOUT_NICE`].
    Nice,
    /// Nice [`BLACKOUT_NICE`] and a 100 µs EEVDF slice, so that it preempts on wake-up
    /// (Linux 6.12+).
    ShortSlice,
    /// `SCHED_FIFO` priority 1 (the default): ahead of every normal thread. The raised
    /// threads sleep while they wait (the longest poll is the vCPU threads' restore
    /// hand-shake, bounded at 2 ms), so they hold a CPU only for their own work.
    Fifo,
    /// Not raised.
    Off,
}

/// The nice value of a raised thread.
pub const BLACKOUT_NICE: i32 = -10;
const SLICE_NS: u64 = 100_000;

static CLASS: AtomicU8 = AtomicU8::new(2);

/// Chooses how the blackout's threads are raised, for the whole process.
pub fn set_class(c: Class) {
    let v = match c {
        Class::Nice => 0,
        Class::ShortSlice => 1,
        Class::Fifo => 2,
        Class::Off => 3,
    };
    CLASS.store(v, Ordering::Relaxed);
}

/// The class in use.
pub fn class() -> Class {
    match CLASS.load(Ordering::Relaxed) {
        0 => Class::Nice,
        1 => Class::ShortSlice,
        3 => Class::Off,
        _ => Class::Fifo,
    }
}

/// A thread's scheduling before it was raised, to put back with [`restore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prior(crate::sys::SchedAttr);

/// Raises thread `tid` (the calling thread when `None`) and returns what to put back, or
/// `None` when nothing changed: raising is off, not permitted, or the thread already runs
/// under a real-time policy (a VMM's real-time vCPU thread keeps its own priority, which
/// `SCHED_FIFO` 1 could only lower) or, for the nice-based classes, at
/// [`BLACKOUT_NICE`] or below.
pub fn raise(tid: Option<i32>) -> Option<Prior> {
    let tid = tid.unwrap_or(0);
    if class() == Class::Off {
        return None;
    }
    let prior = match crate::sys::get_sched(tid) {
        Ok(a) if a.is_realtime() => return None,
        // Already at least as high as a nice-based raise would put it.
        Ok(a) if class() != Class::Fifo && a.nice() <= BLACKOUT_NICE => return None,
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(tid, %e, "cannot read a thread's scheduling");
            return None;
        }
    };
    let r = match class() {
        Class::Off => return None,
        Class::Nice => crate::sys::set_sched(tid, BLACKOUT_NICE, 0, None, true),
        Class::ShortSlice => crate::sys::set_sched(tid, BLACKOUT_NICE, SLICE_NS, None, true),
        Class::Fifo => crate::sys::set_sched(tid, 0, 0, Some(1), true),
    };
    match r {
        Ok(()) => Some(Prior(prior)),
        Err(e) => {
            tracing::debug!(tid, %e, "cannot raise a thread's priority");
            None
        }
    }
}

/// Puts thread `tid` (the calling thread when `None`) back to the scheduling it had before
/// [`raise`]: policy, priority, nice value and reset-on-fork flag (a custom slice goes back to
/// the default).
pub fn restore(tid: Option<i32>, prior: Prior) {
    if let Err(e) = crate::sys::set_sched_attr(tid.unwrap_or(0), &prior.0) {
        tracing::debug!(?tid, %e, "cannot restore a thread's priority");
    }
}

/// The calling thread raised until dropped, then back at its previous scheduling.
#[derive(Debug)]
pub struct Boost {
    prior: Option<Prior>,
}

impl Boost {
    /// Raises the calling thread.
    pub fn current() -> Self {
        Self { prior: raise(None) }
    }

    /// Whether the thread was raised (false without `CAP_SYS_NICE`, with raising off, or for
    /// a thread already real-time).
    pub fn raised(&self) -> bool {
        self.prior.is_some()
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(p) = self.prior.take() {
            restore(None, p);
        }
    }
}

/// Threads on the blackout's critical path in some switchovers only: the bulk stream threads
/// carry a stop-and-copy's final pages (at normal priority their wake-ups took 0.2-2.3 ms
/// here, most of such a blackout). Each enrols for its lifetime ([`ThreadSet::enrol`]);
/// [`ThreadSet::raise`] raises every enrolled thread until the returned guard drops.
#[derive(Debug, Default)]
pub struct ThreadSet {
    tids: Mutex<Vec<i32>>,
}

impl ThreadSet {
    /// Enrols the calling thread until the returned guard drops (keep it for the thread's
    /// life).
    pub fn enrol(&self) -> Enrolment<'_> {
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        self.lock().push(tid);
        Enrolment { set: self, tid }
    }

    /// Raises every enrolled thread (see [`raise`]) until the guard drops. Under the set's
    /// lock, as the restore is: a thread leaves the set (under the lock) before it ends, so
    /// neither touches a thread id that was reused.
    pub fn raise(&self) -> RaisedSet<'_> {
        let tids = self.lock();
        RaisedSet {
            set: self,
            raised: tids
                .iter()
                .filter_map(|t| raise(Some(*t)).map(|p| (*t, p)))
                .collect(),
        }
    }

    /// Threads enrolled now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No thread is enrolled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<i32>> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A thread's membership of a [`ThreadSet`]; it leaves the set when dropped.
#[derive(Debug)]
pub struct Enrolment<'a> {
    set: &'a ThreadSet,
    tid: i32,
}

impl Drop for Enrolment<'_> {
    fn drop(&mut self) {
        self.set.lock().retain(|t| *t != self.tid);
    }
}

/// Threads of a [`ThreadSet`] raised until this drops.
#[derive(Debug)]
pub struct RaisedSet<'a> {
    set: &'a ThreadSet,
    raised: Vec<(i32, Prior)>,
}

impl RaisedSet<'_> {
    /// How many threads were raised.
    pub fn count(&self) -> usize {
        self.raised.len()
    }
}

impl Drop for RaisedSet<'_> {
    fn drop(&mut self) {
        // Only threads still enrolled: one that left has ended (or is ending).
        let tids = self.set.lock();
        for (tid, p) in self.raised.drain(..) {
            if tids.contains(&tid) {
                restore(Some(tid), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boost_is_undone_on_drop() {
        let before = crate::sys::get_sched(0).expect("sched_getattr");
        {
            let b = Boost::current();
            if !b.raised() {
                eprintln!("skipped: cannot raise the thread (no CAP_SYS_NICE?)");
            }
        }
        assert_eq!(crate::sys::get_sched(0).expect("sched_getattr"), before);
    }

    #[test]
    fn a_nice_thread_gets_its_nice_value_back() {
        // The thread's own nice value, not 0, comes back (lowering a thread is always allowed).
        if rustix::process::setpriority_process(Some(rustix::thread::gettid()), 5).is_err() {
            eprintln!("skipped: cannot set the thread's nice value");
            return;
        }
        let b = Boost::current();
        if !b.raised() {
            eprintln!("skipped: cannot raise the thread (no CAP_SYS_NICE?)");
            return;
        }
        assert_ne!(stat_field(41), 0, "raised");
        drop(b);
        assert_eq!((stat_field(41), current_nice()), (0, 5));
    }

    #[test]
    fn a_thread_set_raises_its_members_until_dropped() {
        let set = ThreadSet::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let set = &set;
            s.spawn(move || {
                let _e = set.enrol();
                ready_tx.send(()).expect("ready");
                // Raised by the other thread, then back.
                for _ in 0..2 {
                    go_rx.recv().expect("go");
                    seen_tx.send(stat_field(41)).expect("seen");
                }
            });
            ready_rx.recv().expect("ready");
            assert_eq!(set.len(), 1);
            let raised = set.raise();
            if raised.count() == 0 {
                eprintln!("skipped: cannot raise the thread (no CAP_SYS_NICE?)");
                go_tx.send(()).expect("go");
                go_tx.send(()).expect("go");
                return;
            }
            go_tx.send(()).expect("go");
            assert_ne!(seen_rx.recv().expect("seen"), 0, "member raised");
            drop(raised);
            go_tx.send(()).expect("go");
            assert_eq!(seen_rx.recv().expect("seen"), 0, "member back to normal");
        });
        assert!(set.is_empty(), "a thread that ended left the set");
    }

    #[test]
    fn a_realtime_thread_is_left_alone() {
        // A VMM's vCPU thread at SCHED_FIFO 10: raising must not move it to FIFO 1 and back
        // to normal.
        if crate::sys::set_sched(0, 0, 0, Some(10), false).is_err() {
            eprintln!("skipped: cannot make the thread real-time (no CAP_SYS_NICE?)");
            return;
        }
        let before = crate::sys::get_sched(0).expect("sched_getattr");
        let b = Boost::current();
        assert!(!b.raised(), "a real-time thread was raised");
        drop(b);
        let after = crate::sys::get_sched(0).expect("sched_getattr");
        assert_eq!(after, before);
        assert_eq!(stat_field(40), 10, "rt_priority kept");
        let _ = crate::sys::set_sched(0, 0, 0, None, false);
    }

    /// The calling thread's nice value.
    fn current_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
    }

    /// Field `n` (1-based, as in proc(5)) of /proc/thread-self/stat.
    fn stat_field(n: usize) -> i64 {
        let s = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let rest = &s[s.rfind(')').expect("comm") + 2..];
        rest.split_whitespace()
            .nth(n - 3)
            .and_then(|v| v.parse().ok())
            .expect("field")
    }

    #[test]
    fn threads_started_while_raised_run_at_normal_priority() {
        let b = Boost::current();
        if !b.raised() {
            eprintln!("skipped: cannot raise the thread (no CAP_SYS_NICE?)");
            return;
        }
        // policy is field 41, nice field 19.
        let raised = (stat_field(41), stat_field(19));
        let child = std::thread::spawn(|| (stat_field(41), stat_field(19)))
            .join()
            .expect("thread");
        drop(b);
        assert_ne!(raised, (0, 0), "the thread was raised");
        assert_eq!(
            child,
            (0, 0),
            "a thread started while raised inherits normal priority"
        );
    }
}
