// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Touching, before the blackout, the memory a thread will touch inside it.
//!
//! A thread's first touch of a stack or heap page is a page fault. Inside the blackout such
//! faults add up: on the 2-core nested PVM host each costs ~15 µs, and a trace of one 8 GiB
//! hybrid switchover counted 36 of them on the critical path (the vCPU threads' stacks and
//! allocator arenas while they save or restore their state, the encoded state and the frame
//! buffer on the source's control thread, the state's receive buffer on the destination's
//! control reader): ~0.3 ms of a ~1.5 ms blackout. On bare metal a fault costs ~1 µs and this
//! matters less, but it is never zero.
//!
//! [`thread`] touches a stack depth and a heap amount that cover what the blackout's code paths
//! use, so those pages are resident when the blackout comes. Called when a thread that works in
//! the blackout starts (the VMM's vCPU threads may call it too) and again just before the
//! blackout (cheap when the pages are resident). It relies on the allocator keeping freed
//! memory of this size: glibc returns heap memory only beyond its trim threshold (128 KiB by
//! default) above the top chunk's padding, and this stays below it.

use std::hint::black_box;

/// Stack depth touched by [`thread`].
pub const STACK_BYTES: usize = 128 * 1024;
/// Heap touched by [`thread`], in [`HEAP_CHUNK`] allocations.
pub const HEAP_BYTES: usize = 96 * 1024;
/// Size of one heap allocation of [`heap`]: below every allocator's mmap threshold, so the
/// chunks come from (and return to) the heap the thread allocates from.
pub const HEAP_CHUNK: usize = 16 * 1024;

/// Touches [`STACK_BYTES`] of the calling thread's stack and [`HEAP_BYTES`] of its heap.
pub fn thread() {
    stack();
    heap(HEAP_BYTES);
}

/// Touches [`STACK_BYTES`] of the calling thread's stack below the caller's frame.
#[inline(never)]
pub fn stack() {
    let mut b = [0u8; STACK_BYTES];
    // Every page is written (the zeroing), and `black_box` keeps the writes.
    black_box(&mut b);
}

/// Allocates `bytes` in [`HEAP_CHUNK`] pieces, writes every page, and frees them.
pub fn heap(bytes: usize) {
    let chunks: Vec<Vec<u8>> = (0..bytes.div_ceil(HEAP_CHUNK))
        .map(|_| vec![1u8; HEAP_CHUNK])
        .collect();
    black_box(&chunks);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults taken by the calling thread so far.
    fn thread_faults() -> i64 {
        let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `u` is a valid, writable rusage for the call to fill.
        let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, u.as_mut_ptr()) };
        assert_eq!(r, 0, "getrusage");
        // SAFETY: zero-initialised and filled by the successful call.
        unsafe { u.assume_init() }.ru_minflt
    }

    /// What a blackout-like code path does: a deep stack frame and a few fresh allocations.
    #[inline(never)]
    fn blackout_like_work() {
        let mut frame = [0u8; 64 * 1024];
        black_box(&mut frame);
        let bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![2u8; 16 * 1024]).collect();
        black_box(&bufs);
    }

    fn faults_of_work(warm_first: bool) -> i64 {
        std::thread::spawn(move || {
            if warm_first {
                thread();
            } else {
                // Same code pages executed once, nothing touched ahead.
                heap(0);
            }
            let before = thread_faults();
            blackout_like_work();
            thread_faults() - before
        })
        .join()
        .expect("worker thread")
    }

    /// After warming, the work takes (almost) no page fault; without it, one per page.
    #[test]
    fn warmed_thread_does_not_fault() {
        let cold = faults_of_work(false);
        let warm = faults_of_work(true);
        assert!(
            cold >= 8,
            "the cold thread took only {cold} faults: the test measures nothing"
        );
        assert!(
            warm <= 2,
            "the warmed thread still took {warm} faults (cold: {cold})"
        );
    }

    /// A thread with the default 2 MiB stack can warm itself, more than once.
    #[test]
    fn warms_repeatedly() {
        std::thread::spawn(|| {
            thread();
            thread();
            heap(1);
        })
        .join()
        .expect("warming thread");
    }
}
