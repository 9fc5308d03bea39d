// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Send-queue bookkeeping and completion-status mapping, with no device.
//!
//! Owns: the window of posted-but-uncompleted send work requests of one queue pair
//! ([`SendWindow`]): sequence numbers used as `wr_id`, the choice of which work requests are
//! signalled (every `k`th, the last of a post, and the one that fills the window, so that every
//! unsignalled request is always followed by a signalled one and the queue always drains), the
//! release of buffer guards when a signalled completion retires everything before it (an RC send
//! queue completes in order), and the lookup of the range behind a failed `wr_id`. Also the
//! mapping of a raw `ibv_wc_status` to [`WcStatus`].
//!
//! Does not own: posting or polling (see `stream`), or what the guards are.

use std::collections::VecDeque;
use std::fmt;

use sideway::ibverbs::completion::WorkCompletionStatus as S;
use thiserror::Error;

/// Bit set in the `wr_id` of receive work requests, so send and receive completions that share
/// one completion queue cannot be confused.
pub const RECV_WR_FLAG: u64 = 1 << 63;

/// What a send work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrOp {
    /// RDMA WRITE.
    Write,
    /// RDMA WRITE with immediate data (the batch id).
    WriteImm,
    /// RDMA READ into a local buffer.
    Read,
}

impl fmt::Display for WrOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WrOp::Write => "write",
            WrOp::WriteImm => "write-imm",
            WrOp::Read => "read",
        })
    }
}

/// What a posted work request covers, kept to report a failure with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrInfo {
    /// The operation.
    pub op: WrOp,
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A posted work request and the guard that keeps its buffer registered until it completes.
#[derive(Debug)]
pub struct Posted<T> {
    /// Sequence number, also the `wr_id`.
    pub seq: u64,
    /// Whether it asked for a completion.
    pub signalled: bool,
    /// Its range.
    pub info: WrInfo,
    /// The guard.
    pub payload: T,
}

/// A send work request could not be staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WindowError {
    /// All `depth` send-queue slots are in use.
    #[error("Send window full ({depth} work requests outstanding)")]
    Full {
        /// The window size.
        depth: usize,
    },
    /// A completion named a `wr_id` that is not outstanding.
    #[error("Completion for unknown wr_id {wr_id:#x}")]
    UnknownWrId {
        /// The `wr_id`.
        wr_id: u64,
    },
}

/// The send window of one queue pair.
#[derive(Debug)]
pub struct SendWindow<T> {
    depth: usize,
    signal_every: usize,
    since_signal: usize,
    next_seq: u64,
    inflight: VecDeque<Posted<T>>,
    staged: Vec<Posted<T>>,
}

impl<T> SendWindow<T> {
    /// A window of `depth` slots (the queue pair's `max_send_wr`), signalling at least every
    /// `signal_every` work requests. Both are raised to at least 1.
    pub fn new(depth: usize, signal_every: usize) -> Self {
        Self {
            depth: depth.max(1),
            signal_every: signal_every.max(1),
            since_signal: 0,
            next_seq: 1,
            inflight: VecDeque::new(),
            staged: Vec::new(),
        }
    }

    /// Slots available for staging.
    pub fn free(&self) -> usize {
        self.depth - self.inflight.len() - self.staged.len()
    }

    /// Posted work requests not yet retired.
    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// Work requests staged for the next post.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Stages a work request and returns its `(wr_id, signalled)`. It is signalled when
    /// `force_signal` is set (the caller's last request of a post), every `signal_every`th
    /// request, and when it takes the last free slot.
    pub fn stage(
        &mut self,
        info: WrInfo,
        payload: T,
        force_signal: bool,
    ) -> Result<(u64, bool), WindowError> {
        if self.free() == 0 {
            return Err(WindowError::Full { depth: self.depth });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.since_signal += 1;
        let signalled = force_signal || self.since_signal >= self.signal_every || self.free() == 1;
        if signalled {
            self.since_signal = 0;
        }
        self.staged.push(Posted {
            seq,
            signalled,
            info,
            payload,
        });
        Ok((seq, signalled))
    }

    /// The staged requests were posted: they are now outstanding.
    pub fn commit(&mut self) {
        self.inflight.extend(self.staged.drain(..));
    }

    /// Posting failed and nothing was queued: drop the staged requests and return their guards.
    /// The signal counter restarts so that the next post signals no later than usual.
    pub fn abort(&mut self) -> Vec<T> {
        self.since_signal = 0;
        self.staged.drain(..).map(|p| p.payload).collect()
    }

    /// A successful completion for `wr_id`: retires it and every request posted before it.
    pub fn complete(&mut self, wr_id: u64) -> Result<Vec<Posted<T>>, WindowError> {
        let known = self.inflight.iter().any(|p| p.seq == wr_id && p.signalled);
        if !known {
            return Err(WindowError::UnknownWrId { wr_id });
        }
        let mut done = Vec::new();
        while let Some(front) = self.inflight.front() {
            if front.seq > wr_id {
                break;
            }
            if let Some(p) = self.inflight.pop_front() {
                done.push(p);
            }
        }
        Ok(done)
    }

    /// The range of an outstanding request, for reporting a failed completion.
    pub fn lookup(&self, wr_id: u64) -> Option<WrInfo> {
        self.inflight
            .iter()
            .find(|p| p.seq == wr_id)
            .map(|p| p.info)
    }

    /// Whether the newest outstanding request is signalled (so the window will drain).
    pub fn tail_signalled(&self) -> bool {
        self.inflight.back().is_none_or(|p| p.signalled)
    }
}

/// A work-completion status (`enum ibv_wc_status`), mapped without panicking on values a newer
/// provider might add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// Success.
    Success,
    /// Local length error (a receive buffer too small, or a length over the port's limit).
    LocalLength,
    /// Local queue-pair operation error.
    LocalQpOperation,
    /// Local protection error: the lkey does not cover the local buffer.
    LocalProtection,
    /// Flushed because the queue pair went into the error state.
    Flushed,
    /// Bad response from the peer.
    BadResponse,
    /// Local access error (e.g. a READ response into memory registered without LOCAL_WRITE).
    LocalAccess,
    /// The peer rejected the request as invalid.
    RemoteInvalidRequest,
    /// The peer refused access: wrong rkey, out-of-range address, or missing access flags.
    RemoteAccess,
    /// The peer could not complete the operation.
    RemoteOperation,
    /// Transport retries exhausted: the peer is unreachable or gone.
    RetryExceeded,
    /// Receiver-not-ready retries exhausted: the peer posted no receive for a WRITE_WITH_IMM.
    RnrRetryExceeded,
    /// Fatal device error.
    Fatal,
    /// Response timeout.
    ResponseTimeout,
    /// General error.
    General,
    /// Any other status, with its raw value.
    Other(u32),
}

impl WcStatus {
    /// Maps the raw `ibv_wc_status` value.
    pub fn from_raw(raw: u32) -> Self {
        const TABLE: [(S, WcStatus); 15] = [
            (S::Success, WcStatus::Success),
            (S::LocalLengthError, WcStatus::LocalLength),
            (S::LocalQueuePairOperationError, WcStatus::LocalQpOperation),
            (S::LocalProtectionError, WcStatus::LocalProtection),
            (S::WorkRequestFlushedError, WcStatus::Flushed),
            (S::BadResponseError, WcStatus::BadResponse),
            (S::LocalAccessError, WcStatus::LocalAccess),
            (S::RemoteInvalidRequestError, WcStatus::RemoteInvalidRequest),
            (S::RemoteAccessError, WcStatus::RemoteAccess),
            (S::RemoteOperationError, WcStatus::RemoteOperation),
            (S::RetryCounterExceededError, WcStatus::RetryExceeded),
            (
                S::ResponderNotReadyRetryCounterExceededError,
                WcStatus::RnrRetryExceeded,
            ),
            (S::FatalError, WcStatus::Fatal),
            (S::ResponseTimeoutError, WcStatus::ResponseTimeout),
            (S::GeneralError, WcStatus::General),
        ];
        TABLE
            .iter()
            .find(|(s, _)| *s as u32 == raw)
            .map_or(WcStatus::Other(raw), |&(_, w)| w)
    }

    /// The peer is unreachable or went away (the engine may retry on another path).
    pub fn is_peer_lost(self) -> bool {
        matches!(
            self,
            WcStatus::RetryExceeded | WcStatus::RnrRetryExceeded | WcStatus::ResponseTimeout
        )
    }

    /// A key or address did not match a registration (a bug or a bad descriptor, not a network
    /// problem).
    pub fn is_protection(self) -> bool {
        matches!(
            self,
            WcStatus::LocalProtection | WcStatus::LocalAccess | WcStatus::RemoteAccess
        )
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WcStatus::Other(raw) => write!(f, "status {raw}"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn info(gpa: u64) -> WrInfo {
        WrInfo {
            op: WrOp::Write,
            gpa,
            len: 4096,
        }
    }

    #[test]
    fn signals_every_k_and_the_forced_last() {
        let mut w: SendWindow<u64> = SendWindow::new(64, 4);
        let flags: Vec<bool> = (0..10)
            .map(|i| w.stage(info(i), i, i == 9).unwrap().1)
            .collect();
        assert_eq!(
            flags,
            vec![
                false, false, false, true, false, false, false, true, false, true
            ]
        );
        w.commit();
        assert_eq!(w.outstanding(), 10);
        assert!(w.tail_signalled());
    }

    #[test]
    fn the_request_that_fills_the_window_is_signalled() {
        let mut w: SendWindow<()> = SendWindow::new(3, 100);
        assert!(!w.stage(info(0), (), false).unwrap().1);
        assert!(!w.stage(info(1), (), false).unwrap().1);
        assert!(w.stage(info(2), (), false).unwrap().1);
        assert_eq!(
            w.stage(info(3), (), false),
            Err(WindowError::Full { depth: 3 })
        );
        w.commit();
        assert!(w.tail_signalled());
    }

    #[test]
    fn completion_retires_everything_up_to_it_in_order() {
        let mut w: SendWindow<u64> = SendWindow::new(16, 3);
        let ids: Vec<(u64, bool)> = (0..7)
            .map(|i| w.stage(info(i * 4096), i, i == 6).unwrap())
            .collect();
        w.commit();
        // Signalled: seq 3, 6, 7.
        let signalled: Vec<u64> = ids.iter().filter(|x| x.1).map(|x| x.0).collect();
        assert_eq!(signalled, vec![3, 6, 7]);
        let done = w.complete(3).unwrap();
        assert_eq!(
            done.iter().map(|p| p.payload).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(w.outstanding(), 4);
        assert_eq!(w.free(), 12);
        // An unsignalled or already retired wr_id is not a valid completion.
        assert!(matches!(
            w.complete(4),
            Err(WindowError::UnknownWrId { wr_id: 4 })
        ));
        assert!(matches!(
            w.complete(3),
            Err(WindowError::UnknownWrId { wr_id: 3 })
        ));
        let done = w.complete(7).unwrap();
        assert_eq!(done.len(), 4);
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn failed_wr_id_maps_back_to_its_range() {
        let mut w: SendWindow<()> = SendWindow::new(8, 8);
        let (id, _) = w.stage(info(0x1000), (), false).unwrap();
        let (id2, _) = w
            .stage(
                WrInfo {
                    op: WrOp::Read,
                    gpa: 0x20_0000,
                    len: 512,
                },
                (),
                true,
            )
            .unwrap();
        w.commit();
        assert_eq!(w.lookup(id).map(|i| i.gpa), Some(0x1000));
        assert_eq!(
            w.lookup(id2),
            Some(WrInfo {
                op: WrOp::Read,
                gpa: 0x20_0000,
                len: 512
            })
        );
        assert_eq!(w.lookup(99), None);
        assert_eq!(w.lookup(id | RECV_WR_FLAG), None);
    }

    #[test]
    fn abort_returns_guards_and_keeps_ids_unique() {
        let mut w: SendWindow<&str> = SendWindow::new(8, 2);
        let (a, _) = w.stage(info(0), "a", false).unwrap();
        w.stage(info(1), "b", true).unwrap();
        assert_eq!(w.abort(), vec!["a", "b"]);
        assert_eq!(w.free(), 8);
        let (c, signalled) = w.stage(info(2), "c", false).unwrap();
        assert!(c > a + 1, "ids are never reused");
        assert!(!signalled, "the signal counter restarted");
    }

    #[test]
    fn wc_status_maps_the_verbs_abi_values() {
        // Values from <infiniband/verbs.h>; these are ABI and never change.
        let expect = [
            (0, WcStatus::Success),
            (1, WcStatus::LocalLength),
            (2, WcStatus::LocalQpOperation),
            (4, WcStatus::LocalProtection),
            (5, WcStatus::Flushed),
            (7, WcStatus::BadResponse),
            (8, WcStatus::LocalAccess),
            (9, WcStatus::RemoteInvalidRequest),
            (10, WcStatus::RemoteAccess),
            (11, WcStatus::RemoteOperation),
            (12, WcStatus::RetryExceeded),
            (13, WcStatus::RnrRetryExceeded),
            (19, WcStatus::Fatal),
            (20, WcStatus::ResponseTimeout),
            (21, WcStatus::General),
            (3, WcStatus::Other(3)),
            (999, WcStatus::Other(999)),
        ];
        for (raw, want) in expect {
            assert_eq!(WcStatus::from_raw(raw), want, "raw {raw}");
        }
        assert!(WcStatus::RetryExceeded.is_peer_lost());
        assert!(!WcStatus::RemoteAccess.is_peer_lost());
        assert!(WcStatus::RemoteAccess.is_protection());
        assert_eq!(WcStatus::Other(77).to_string(), "status 77");
        assert_eq!(WcStatus::RemoteAccess.to_string(), "RemoteAccess");
    }
}
