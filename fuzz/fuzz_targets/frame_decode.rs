// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Fuzzes the frame decoder: header, metadata, range checks. Must never panic; anything it
//! accepts must re-encode to the same bytes.
#![no_main]

use ferry_protocol::frame::{FrameHeader, HEADER_LEN, decode_buffer};
use ferry_protocol::{Frame, GpaRange, MemoryMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, frame)) = decode_buffer(data) {
        let encoded = frame.encode();
        // Flags that carry no meaning for the command are not preserved; compare the rest.
        let (h2, f2) = decode_buffer(&encoded).expect("re-encoded frame decodes");
        assert_eq!(f2, frame);
        assert_eq!(h2.command, header.command);
        assert_eq!(h2.payload_len, header.payload_len);
        if let Ok(map) = MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 30), GpaRange::new(1 << 32, 1 << 20)]) {
            let _ = frame.check_ranges(&map);
        }
        let _: &Frame = &frame;
    }
    if data.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&data[..HEADER_LEN]);
        if let Ok(header) = FrameHeader::decode(&h) {
            let _ = Frame::decode(&header, &data[HEADER_LEN..]);
        }
    }
});
