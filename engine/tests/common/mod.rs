// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Helpers shared by the engine's integration tests.

use ferry_engine::layout::Layout;
use ferry_engine::procmem::ProcessVm;
use ferry_engine::vm::{BoxError, GuestMemory, VmControl};
use ferry_protocol::GpaRange;

/// Whether a kernel-mode userfaultfd can be created; prints why not (and fails under
/// `FERRY_REQUIRE_CAPS=1`, where the machine is supposed to have it).
pub fn uffd_available() -> bool {
    match ferry_engine::uffd::Uffd::open(false, ferry_engine::uffd::Features::NONE) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("FERRY_REQUIRE_CAPS").as_deref() != Ok("1"),
                "userfaultfd required (FERRY_REQUIRE_CAPS=1) but unavailable: {e}"
            );
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            false
        }
    }
}

/// A destination control that restores but never resumes, so the received memory stays
/// exactly as the migration placed it (for byte-for-byte comparisons with the source).
pub struct NoResume<'a>(pub &'a mut ProcessVm);

impl VmControl for NoResume<'_> {
    fn pause(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, BoxError> {
        self.0.save_state()
    }
    fn restore_state(&mut self, b: &[u8]) -> Result<(), BoxError> {
        self.0.restore_state(b)
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// How many 4 KiB pages of `a` and `b` differ (same layout), region by region.
pub fn differing_pages(a: &dyn GuestMemory, b: &dyn GuestMemory) -> anyhow::Result<usize> {
    let la = Layout::new(a)?;
    let lb = Layout::new(b)?;
    let mut differing = 0;
    for region in la.regions() {
        let range = GpaRange::new(region.gpa, region.len);
        differing += la
            .bytes(range)?
            .chunks(4096)
            .zip(lb.bytes(range)?.chunks(4096))
            .filter(|(x, y)| x != y)
            .count();
    }
    Ok(differing)
}
