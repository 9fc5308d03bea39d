// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Fuzzes both sides of the handshake with arbitrary peer messages. Must never panic, and a
//! peer without the key must never be authenticated.
#![no_main]

use ferry_protocol::frame::{FrameHeader, HEADER_LEN};
use ferry_protocol::handshake::{
    Auth, Capabilities, ClientConfig, ClientHandshake, Mode, Params, Psk, Role, ServerConfig,
    ServerHandshake, SessionId, TransportKind, Compression,
};
use ferry_protocol::{GpaRange, MemoryMap};
use libfuzzer_sys::fuzz_target;

fn split(data: &[u8]) -> Option<(FrameHeader, &[u8])> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let h = FrameHeader::decode(data[..HEADER_LEN].try_into().ok()?).ok()?;
    Some((h, &data[HEADER_LEN..]))
}

fuzz_target!(|data: &[u8]| {
    let key = Auth::Psk(Psk::from_bytes([0x5a; 32]));
    let server = ServerConfig {
        auth: key.clone(),
        capabilities: Capabilities {
            modes: vec![Mode::PreCopy, Mode::PostCopy, Mode::Hybrid],
            compression: true,
            checksums: true,
            max_streams: 8,
            transports: vec![TransportKind::Tcp, TransportKind::Uring],
            memory: None,
            rdma: vec![],
        },
    };
    // Split the input: first part is a ClientHello, the rest a ClientAuth.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (a, b) = data.split_at(cut);
    if let Some((h, m)) = split(a) {
        if let Ok((s, _)) = ServerHandshake::on_client_hello_with_nonce(
            &server, &h, m, SessionId([1; 16]), &|s| s.0 == [2; 16], [3; 32],
        ) {
            if let Some((h2, m2)) = split(b) {
                // The attacker does not know the key: authentication must fail.
                assert!(s.on_client_auth(&h2, m2).is_err());
            }
        }
    }
    // Client side: a control stream receiving arbitrary ServerHellos.
    let params = Params {
        mode: Mode::Hybrid,
        compression: Compression::None,
        checksums: false,
        streams: 2,
        transport: TransportKind::Tcp,
        memory: MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 20)]).expect("valid map"),
        rdma: vec![],
    };
    let (c, _) = ClientHandshake::start_with_nonce(
        ClientConfig { auth: key, role: Role::Control, stream_index: 0, session: None, params: Some(params) },
        [4; 32],
    );
    if let Some((h, m)) = split(data) {
        assert!(c.on_server_hello(&h, m).is_err());
    }
});
