// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Sessions over real loopback sockets: authenticated handshakes, refusals with reasons, and
//! streams bound to their session.

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::thread;
    use std::time::Duration;

    use ferry_protocol::handshake::{
        Auth, Capabilities, ClientConfig, ClientHandshake, Mode, Params, Psk, Role, ServerConfig,
        SessionId, TransportKind,
    };
    use ferry_protocol::{GpaRange, MemoryMap};
    use ferry_transport::Endpoint;
    use ferry_transport::Socket;
    use ferry_transport::session::{ConnectConfig, SessionError, SessionListener, connect};

    fn params(streams: u16) -> Params {
        Params {
            mode: Mode::PreCopy,
            compression: ferry_protocol::handshake::Compression::None,
            checksums: false,
            streams,
            transport: TransportKind::Tcp,
            memory: MemoryMap::new(4096, vec![GpaRange::new(0, 1 << 20)]).unwrap(),
            rdma: vec![],
        }
    }

    fn server(auth: Auth) -> SessionListener {
        SessionListener::bind(
            &Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            ServerConfig {
                auth,
                capabilities: Capabilities {
                    modes: vec![Mode::PreCopy, Mode::PostCopy, Mode::Hybrid],
                    compression: false,
                    checksums: true,
                    max_streams: 8,
                    transports: vec![TransportKind::Tcp],
                    memory: None,
                    rdma: vec![],
                },
            },
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn key(b: u8) -> Auth {
        Auth::Psk(Psk::from_bytes([b; 32]))
    }

    fn cfg(auth: Auth, streams: u16) -> ConnectConfig {
        ConnectConfig {
            auth,
            params: params(streams),
            urgent: false,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn two_streams_join_one_session() {
        let l = server(key(1));
        let ep = l.endpoint().unwrap();
        let t = thread::spawn(move || connect(&ep, &cfg(key(1), 2)).unwrap());
        let s = l.accept_session(false, Duration::from_secs(10)).unwrap();
        let c = t.join().unwrap();
        assert_eq!(s.id, c.id);
        assert_eq!(s.bulk.len(), 2);
        assert_eq!(c.bulk.len(), 2);
        assert!(s.authenticated && c.authenticated);
    }

    #[test]
    fn wrong_key_is_refused_with_a_reason_on_both_sides() {
        let l = server(key(1));
        let ep = l.endpoint().unwrap();
        let t = thread::spawn(move || connect(&ep, &cfg(key(2), 1)));
        let err = l
            .accept_session(false, Duration::from_millis(1500))
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Incomplete { joined: 0, .. }),
            "{err}"
        );
        let client = t.join().unwrap().unwrap_err();
        let msg = ferry_protocol::handshake::error_chain(&client);
        assert!(msg.contains("Authentication failed"), "{msg}");
        let refusals = l.refusals();
        assert_eq!(refusals.len(), 1);
        assert!(
            refusals[0].contains("wrong key") || refusals[0].contains("Authentication failed"),
            "{refusals:?}"
        );
    }

    #[test]
    fn peer_without_key_is_refused() {
        let l = server(key(1));
        let ep = l.endpoint().unwrap();
        let t = thread::spawn(move || connect(&ep, &cfg(Auth::Insecure, 1)));
        let _ = l
            .accept_session(false, Duration::from_millis(1500))
            .unwrap_err();
        let msg = ferry_protocol::handshake::error_chain(&t.join().unwrap().unwrap_err());
        assert!(msg.contains("requires a pre-shared key"), "{msg}");
        assert!(
            l.refusals()[0].contains("does not authenticate"),
            "{:?}",
            l.refusals()
        );
    }

    #[test]
    fn replayed_handshake_is_refused() {
        use std::io::{Read, Write};
        let l = server(key(1));
        let ep = l.endpoint().unwrap();
        // A legitimate client's bytes, recorded.
        let (state, hello) = ClientHandshake::start(ClientConfig {
            auth: key(1),
            role: Role::Control,
            stream_index: 0,
            session: None,
            params: Some(params(1)),
        })
        .unwrap();
        drop(state);
        let ep2 = ep.clone();
        let t = thread::spawn(move || {
            // Replay: send the recorded hello, then a ClientAuth copied from elsewhere (here: a MAC
            // computed for another transcript is as good as any) without knowing the server nonce.
            let Socket::Tcp(mut s, _) = Socket::connect(&ep2, Duration::from_secs(5)).unwrap()
            else {
                unreachable!()
            };
            s.write_all(&hello).unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            let mut fake_auth = ferry_protocol::FrameHeader {
                command: ferry_protocol::Command::ClientAuth,
                flags: 0,
                meta_len: 32,
                payload_len: 0,
            }
            .encode()
            .to_vec();
            fake_auth.extend_from_slice(&[0x42; 32]);
            s.write_all(&fake_auth).unwrap();
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp);
            resp
        });
        let _ = l
            .accept_session(false, Duration::from_millis(1500))
            .unwrap_err();
        let resp = t.join().unwrap();
        assert!(String::from_utf8_lossy(&resp).contains("Authentication failed"));
        assert!(l.refusals()[0].contains("client MAC"), "{:?}", l.refusals());
    }

    #[test]
    fn forged_session_id_is_refused() {
        let l = server(key(1));
        let ep = l.endpoint().unwrap();
        let ep2 = ep.clone();
        let t = thread::spawn(move || {
            let c = connect(&ep2, &cfg(key(1), 2)).unwrap();
            // A third stream naming a session that does not exist.
            let sock = Socket::connect(&ep2, Duration::from_secs(5)).unwrap();
            let forged = SessionId([0xAB; 16]);
            let (_, hello) = ClientHandshake::start(ClientConfig {
                auth: key(1),
                role: Role::Bulk,
                stream_index: 2,
                session: Some(forged),
                params: None,
            })
            .unwrap();
            let Socket::Tcp(mut s, _) = sock else {
                unreachable!()
            };
            use std::io::{Read, Write};
            s.write_all(&hello).unwrap();
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp);
            (c, resp)
        });
        let s = l.accept_session(false, Duration::from_secs(10)).unwrap();
        assert_eq!(s.bulk.len(), 2);
        // Serve the forged stream's connection: the listener refuses it while waiting.
        let _ = l.accept_session(false, Duration::from_millis(1500));
        let (_c, resp) = t.join().unwrap();
        assert!(
            String::from_utf8_lossy(&resp).contains("Unknown session abab"),
            "{resp:?}"
        );
        assert!(
            l.refusals().iter().any(|r| r.contains("Unknown session")),
            "{:?}",
            l.refusals()
        );
    }
}
