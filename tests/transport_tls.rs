//! QUIC transport over real loopback sockets with real mutual TLS.
#![cfg(feature = "runtime")]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use mantissa::runtime::{
    Channel, ClusterCa, Inbox, NodeCredentials, Received, TlsConfig, TlsError, Transport,
    TransportConfig, TransportError,
};

/// Generous bound for anything that should happen promptly; never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long to watch for something that must *not* happen.
const QUIET: Duration = Duration::from_millis(1500);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn tls(ca: &ClusterCa, name: &str) -> TlsConfig {
    let creds = ca.issue(name, DAY).expect("issue");
    TlsConfig::new(ca.cert_pem(), &creds).expect("tls config")
}

async fn bind(tls: TlsConfig) -> (Transport, Inbox, SocketAddr) {
    bind_with(tls, TransportConfig::default()).await
}

async fn bind_with(tls: TlsConfig, config: TransportConfig) -> (Transport, Inbox, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (transport, inbox) = Transport::bind(any, tls, config).await.expect("bind");
    let addr = transport.local_addr().expect("local addr");
    (transport, inbox, addr)
}

async fn recv(inbox: &mut Inbox) -> Received {
    tokio::time::timeout(PATIENCE, inbox.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("inbox closed")
}

/// Polls `cond` until it holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_streams_and_datagrams() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;
    let (b, mut b_in, b_addr) = bind(tls(&ca, "b")).await;
    let (c, mut c_in, c_addr) = bind(tls(&ca, "c")).await;

    // Stream, name known: b sees a's authenticated name and address.
    a.send(b_addr, Some("b"), Channel::Stream, b"hello b".to_vec())
        .await
        .expect("a -> b");
    let got = recv(&mut b_in).await;
    assert_eq!(
        (got.from.as_str(), got.bytes.as_slice()),
        ("a", &b"hello b"[..])
    );
    assert_eq!(got.channel, Channel::Stream);
    assert_eq!(got.addr, a_addr);

    // Seed dial (no expected name): any cluster member is accepted, the name is still learned.
    c.send(
        a_addr,
        None,
        Channel::Stream,
        b"hi from a seed dial".to_vec(),
    )
    .await
    .expect("c -> a");
    let got = recv(&mut a_in).await;
    assert_eq!(got.from, "c");

    // Datagrams are lossy even on loopback: resend until one arrives as a datagram. On a fresh
    // connection the first ones go as streams, until the handshake is confirmed.
    let got = loop {
        b.send(c_addr, Some("c"), Channel::Datagram, b"dgram".to_vec())
            .await
            .expect("b -> c datagram");
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), c_in.recv()).await
            && got.channel == Channel::Datagram
        {
            break got;
        }
    };
    assert_eq!((got.from.as_str(), got.channel), ("b", Channel::Datagram));
    assert_eq!(got.bytes, b"dgram");

    // Too large for a datagram: falls back to a stream.
    let big_dgram = vec![7u8; 5000];
    b.send(c_addr, Some("c"), Channel::Datagram, big_dgram.clone())
        .await
        .expect("b -> c large datagram");
    let got = loop {
        let got = recv(&mut c_in).await;
        if got.bytes.len() == big_dgram.len() {
            break got;
        }
    };
    assert_eq!(got.channel, Channel::Stream);
    assert_eq!(got.bytes, big_dgram);

    // 5 MiB over one stream arrives intact.
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    a.send(c_addr, Some("c"), Channel::Stream, big.clone())
        .await
        .expect("a -> c 5 MiB");
    let got = recv(&mut c_in).await;
    assert_eq!(got.from, "a");
    assert!(
        got.bytes == big,
        "5 MiB message corrupted ({} bytes)",
        got.bytes.len()
    );

    // 200 small messages all arrive.
    let sends = (0u32..200).map(|i| {
        let b = b.clone();
        async move {
            b.send(a_addr, Some("a"), Channel::Stream, i.to_be_bytes().to_vec())
                .await
        }
    });
    for result in futures_join_all(sends).await {
        result.expect("b -> a small");
    }
    let mut seen = BTreeSet::new();
    while seen.len() < 200 {
        let got = recv(&mut a_in).await;
        assert_eq!(got.from, "b");
        let index = u32::from_be_bytes(got.bytes.as_slice().try_into().expect("4 bytes"));
        assert!(seen.insert(index), "duplicate message {index}");
    }
    // At least: the datagram(s), the large datagram, the 200 small ones.
    assert!(b.stats().messages_sent >= 202, "{:?}", b.stats());
    assert!(a.stats().messages_received >= 201);

    for t in [a, b, c] {
        t.shutdown().await;
    }
}

/// Runs futures concurrently on the runtime and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task panicked"));
    }
    out
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("test").expect("ca");
    let evil = ClusterCa::generate("evil").expect("evil ca");
    let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;

    // Mallory trusts the real CA (so she accepts a) but holds a certificate from another CA:
    // a must refuse her client certificate.
    let creds = evil.issue("mallory", DAY).expect("issue");
    let mallory_tls = TlsConfig::new(ca.cert_pem(), &creds).expect("mallory tls");
    let (mallory, _m_in, _) = bind(mallory_tls).await;
    let _ = mallory
        .send(a_addr, Some("a"), Channel::Stream, b"let me in".to_vec())
        .await;
    eventually("a counts the refused handshake", || {
        a.stats().handshakes_refused >= 1
    })
    .await;

    // A node trusting only the other CA refuses a's certificate itself: its send fails.
    let (eve, _e_in, _) = bind(tls(&evil, "eve")).await;
    let err = eve
        .send(a_addr, None, Channel::Stream, b"hello?".to_vec())
        .await
        .expect_err("eve must not reach a");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err}");

    // Nothing from either got through; a valid node still can.
    let (b, _b_in, _) = bind(tls(&ca, "b")).await;
    b.send(a_addr, Some("a"), Channel::Stream, b"legit".to_vec())
        .await
        .expect("b -> a");
    let got = recv(&mut a_in).await;
    assert_eq!(
        (got.from.as_str(), got.bytes.as_slice()),
        ("b", &b"legit"[..])
    );
    assert!(
        tokio::time::timeout(QUIET, a_in.recv()).await.is_err(),
        "a received a message from a refused peer"
    );
    assert_eq!(a.stats().messages_received, 1);
    assert!(a.stats().handshakes_refused >= 2, "{:?}", a.stats());
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let ca = ClusterCa::generate("test").expect("ca");
    let now = SystemTime::now();
    let expired = ca
        .issue_between("old", now - 3 * DAY, now - DAY)
        .expect("issue expired");
    let old_tls = TlsConfig::new(ca.cert_pem(), &expired).expect("old tls");
    let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;
    let (old, _old_in, old_addr) = bind(old_tls).await;

    // a dialing the expired node fails in a's own verifier.
    let err = a
        .send(old_addr, Some("old"), Channel::Stream, b"x".to_vec())
        .await
        .expect_err("expired server certificate accepted");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");

    // The expired node dialing a is refused by a.
    let refused_before = a.stats().handshakes_refused;
    let _ = old
        .send(a_addr, Some("a"), Channel::Stream, b"y".to_vec())
        .await;
    eventually("a refuses the expired client", || {
        a.stats().handshakes_refused > refused_before
    })
    .await;
    assert!(tokio::time::timeout(QUIET, a_in.recv()).await.is_err());
}

#[tokio::test]
async fn expected_name_must_match_certificate() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, _) = bind(tls(&ca, "a")).await;
    let (_c, mut c_in, c_addr) = bind(tls(&ca, "c")).await;

    let err = a
        .send(c_addr, Some("b"), Channel::Stream, b"for b".to_vec())
        .await
        .expect_err("c accepted as b");
    match &err {
        TransportError::NameMismatch {
            expected, found, ..
        } => assert_eq!((expected.as_str(), found.as_str()), ("b", "c")),
        other => panic!("expected a name mismatch, got {other}"),
    }
    // With the right name the same address works, and c received nothing addressed to b.
    a.send(c_addr, Some("c"), Channel::Stream, b"for c".to_vec())
        .await
        .expect("a -> c");
    assert_eq!(recv(&mut c_in).await.bytes, b"for c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_race_converges_to_one_connection_without_loss() {
    const N: u32 = 100;
    let mut races = 0;
    for round in 0..5 {
        let ca = ClusterCa::generate("test").expect("ca");
        let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;
        let (b, mut b_in, b_addr) = bind(tls(&ca, "b")).await;

        // Both sides fire all their sends at once, so both dial before either connection exists.
        let a_sends = (0..N).map(|i| {
            let a = a.clone();
            async move {
                a.send(b_addr, Some("b"), Channel::Stream, i.to_be_bytes().to_vec())
                    .await
            }
        });
        let b_sends = (0..N).map(|i| {
            let b = b.clone();
            async move {
                b.send(a_addr, Some("a"), Channel::Stream, i.to_be_bytes().to_vec())
                    .await
            }
        });
        let (ra, rb) = tokio::join!(futures_join_all(a_sends), futures_join_all(b_sends));
        for r in ra.into_iter().chain(rb) {
            r.expect("send during dial race");
        }

        for (inbox, from) in [(&mut a_in, "b"), (&mut b_in, "a")] {
            let mut seen = BTreeSet::new();
            while seen.len() < N as usize {
                let got = recv(inbox).await;
                assert_eq!(got.from, from);
                let i = u32::from_be_bytes(got.bytes.as_slice().try_into().expect("4 bytes"));
                assert!(seen.insert(i), "round {round}: duplicate {i}");
            }
        }
        eventually("exactly one connection on each side", || {
            a.connection_count() == 1 && b.connection_count() == 1
        })
        .await;

        // Both sides keep the same connection: the one dialed by the smaller name when both
        // dialed, else the only one there was.
        let (a_conns, b_conns) = (a.connections(), b.connections());
        assert_eq!(
            (a_conns.len(), b_conns.len()),
            (1, 1),
            "{a_conns:?} {b_conns:?}"
        );
        assert_eq!(
            (a_conns[0].peer.as_str(), b_conns[0].peer.as_str()),
            ("b", "a")
        );
        assert_ne!(a_conns[0].dialed_by_us, b_conns[0].dialed_by_us);
        assert!(!a_conns[0].draining && !b_conns[0].draining);
        let raced = a.stats().connections_dialed > 0 && b.stats().connections_dialed > 0;
        if raced {
            races += 1;
            assert!(
                a_conns[0].dialed_by_us,
                "round {round}: kept b's dial: {a_conns:?}"
            );
        }

        // The surviving connection still works both ways.
        a.send(b_addr, Some("b"), Channel::Stream, b"after".to_vec())
            .await
            .expect("a -> b after race");
        assert_eq!(recv(&mut b_in).await.bytes, b"after");
        b.send(a_addr, Some("a"), Channel::Stream, b"after".to_vec())
            .await
            .expect("b -> a after race");
        assert_eq!(recv(&mut a_in).await.bytes, b"after");
        assert_eq!((a.connection_count(), b.connection_count()), (1, 1));
        a.shutdown().await;
        b.shutdown().await;
    }
    // Not asserted (timing decides whether both sides dial), but shown with --nocapture.
    println!("{races} of 5 rounds raced two connections");
}

#[tokio::test]
async fn shutdown_delivers_messages_sent_just_before() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, _) = bind(tls(&ca, "a")).await;
    let (b, mut b_in, b_addr) = bind(tls(&ca, "b")).await;

    let big = vec![42u8; 2 * 1024 * 1024];
    a.send(b_addr, Some("b"), Channel::Stream, big.clone())
        .await
        .expect("big");
    for i in 0u32..100 {
        a.send(b_addr, Some("b"), Channel::Stream, i.to_be_bytes().to_vec())
            .await
            .expect("small");
    }
    a.shutdown().await;

    let first = recv(&mut b_in).await;
    let mut small = BTreeSet::new();
    let mut got_big = first.bytes == big;
    if !got_big {
        small.insert(first.bytes);
    }
    while small.len() < 100 || !got_big {
        let got = recv(&mut b_in).await;
        if got.bytes.len() == big.len() {
            assert!(got.bytes == big);
            got_big = true;
        } else {
            assert!(small.insert(got.bytes), "duplicate");
        }
    }
    b.shutdown().await;
}

/// A large message whose content depends on its index, to check it arrives intact.
fn numbered_message(index: u32, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len as u32)
        .map(|j| j.wrapping_mul(31).wrapping_add(index) as u8)
        .collect();
    bytes[..4].copy_from_slice(&index.to_be_bytes());
    bytes
}

/// A node that does not read its inbox holds at most `inbox_bytes` of messages: the senders
/// are slowed down, not dropped, and everything arrives intact once the inbox is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_holds_at_most_its_byte_budget_and_loses_nothing() {
    const MESSAGE: usize = 4 * 1024 * 1024;
    const COUNT: u32 = 48;
    const BUDGET: usize = 16 * 1024 * 1024;
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, _) = bind(tls(&ca, "a")).await;
    let budget = TransportConfig {
        max_message_bytes: 8 * 1024 * 1024,
        inbox_bytes: BUDGET,
        ..TransportConfig::default()
    };
    let (b, mut b_in, b_addr) = bind_with(tls(&ca, "b"), budget).await;

    let sends: Vec<_> = (0..COUNT)
        .map(|index| {
            let a = a.clone();
            tokio::spawn(async move {
                let message = numbered_message(index, MESSAGE);
                a.send(b_addr, Some("b"), Channel::Stream, message).await
            })
        })
        .collect();

    // Nobody reads b's inbox yet: it fills to its budget (four messages) and stays there
    // while the senders, with far more to send, wait.
    eventually("b's inbox fills to its budget", || {
        b.stats().inbox_bytes >= BUDGET as u64
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let stalled = b.stats();
    assert_eq!(stalled.inbox_bytes_max, BUDGET as u64, "{stalled:?}");
    assert_eq!(
        stalled.messages_received,
        (BUDGET / MESSAGE) as u64,
        "{stalled:?}"
    );

    let mut seen = BTreeSet::new();
    while seen.len() < COUNT as usize {
        let got = recv(&mut b_in).await;
        assert_eq!(got.bytes.len(), MESSAGE, "a message arrived cut");
        let index = u32::from_be_bytes(got.bytes[..4].try_into().expect("4 bytes"));
        assert!(
            got.bytes == numbered_message(index, MESSAGE),
            "message {index} corrupted"
        );
        assert!(seen.insert(index), "duplicate message {index}");
        assert!(b.stats().inbox_bytes <= BUDGET as u64, "{:?}", b.stats());
    }
    for send in sends {
        send.await.expect("send task").expect("send");
    }
    let stats = b.stats();
    assert!(stats.inbox_bytes_max <= BUDGET as u64, "{stats:?}");
    assert_eq!(stats.inbox_bytes_max, BUDGET as u64, "{stats:?}");
    assert_eq!(
        stats.inbox_bytes, 0,
        "handled messages give their bytes back"
    );
    assert_eq!(stats.messages_received, u64::from(COUNT));
    assert_eq!(stats.bytes_received, u64::from(COUNT) * MESSAGE as u64);
}

/// Datagrams that do not fit in the inbox's byte budget are dropped and counted; once the
/// node has handled what it held, they fit again.
#[tokio::test]
async fn datagrams_over_the_inbox_byte_budget_are_dropped_and_counted() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, _) = bind(tls(&ca, "a")).await;
    let tiny = TransportConfig {
        max_message_bytes: 4096,
        inbox_bytes: 4096,
        ..TransportConfig::default()
    };
    let (b, mut b_in, b_addr) = bind_with(tls(&ca, "b"), tiny).await;

    // One stream message takes the whole budget; nobody reads it yet.
    a.send(b_addr, Some("b"), Channel::Stream, vec![1u8; 4096])
        .await
        .expect("a -> b stream");
    eventually("b's inbox is full", || b.stats().inbox_bytes == 4096).await;

    // Datagrams are lossy on loopback too: send until b has counted one dropped.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while b.stats().datagrams_dropped == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no datagram dropped"
        );
        a.send(b_addr, Some("b"), Channel::Datagram, b"probe".to_vec())
            .await
            .expect("a -> b datagram");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.stats().messages_received, 1, "{:?}", b.stats());

    let held = recv(&mut b_in).await;
    assert_eq!(held.channel, Channel::Stream);
    drop(held);
    assert_eq!(b.stats().inbox_bytes, 0);
    let mut delivered = None;
    for _ in 0..50 {
        a.send(b_addr, Some("b"), Channel::Datagram, b"probe".to_vec())
            .await
            .expect("a -> b datagram");
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), b_in.recv()).await {
            delivered = Some(got);
            break;
        }
    }
    let got = delivered.expect("a datagram arrives once there is room");
    assert_eq!(
        (got.channel, got.bytes.as_slice()),
        (Channel::Datagram, &b"probe"[..])
    );
}

#[tokio::test]
async fn oversized_message_is_dropped_and_connection_survives() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, _) = bind(tls(&ca, "a")).await;
    let small_limit = TransportConfig {
        max_message_bytes: 1024,
        ..TransportConfig::default()
    };
    let (b, mut b_in, b_addr) = bind_with(tls(&ca, "b"), small_limit).await;

    // The sender's own limit is larger, so the message leaves and b drops it.
    let _ = a
        .send(b_addr, Some("b"), Channel::Stream, vec![1u8; 64 * 1024])
        .await;
    eventually("b counts the oversized message", || {
        b.stats().oversized_dropped == 1
    })
    .await;
    a.send(b_addr, Some("b"), Channel::Stream, b"small".to_vec())
        .await
        .expect("small after oversized");
    assert_eq!(recv(&mut b_in).await.bytes, b"small");
    assert_eq!(a.connection_count(), 1);

    // A message over the sender's own limit is refused locally.
    let err = b
        .send(b_addr, Some("a"), Channel::Stream, vec![0u8; 2048])
        .await
        .expect_err("over own limit");
    assert!(
        matches!(err, TransportError::MessageTooLarge { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn dialing_itself_is_an_error() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, _a_in, a_addr) = bind(tls(&ca, "a")).await;
    let err = a
        .send(a_addr, None, Channel::Stream, b"me".to_vec())
        .await
        .expect_err("self send");
    assert!(
        matches!(err, TransportError::SelfConnection { .. }),
        "{err}"
    );
}

#[test]
fn node_names_are_validated() {
    let ca = ClusterCa::generate("test").expect("ca");
    for bad in [
        "",
        "Upper",
        "-lead",
        "a..b",
        "trail-",
        "under_score",
        "1.2.3.4",
        &"x".repeat(64),
    ] {
        let err = ca.issue(bad, DAY).expect_err(bad);
        assert!(
            matches!(err, TlsError::InvalidNodeName { .. }),
            "{bad}: {err}"
        );
    }
    for good in ["a", "node-1", "rack1.node2", "0day", &"x".repeat(63)] {
        ca.issue(good, DAY).expect(good);
    }
}

#[test]
fn pem_errors_name_the_failing_input() {
    let ca = ClusterCa::generate("test").expect("ca");
    let creds = ca.issue("a", DAY).expect("issue");

    let err = TlsConfig::new("not pem", &creds).expect_err("bad CA");
    assert_eq!(err.to_string(), "CA certificate: no PEM certificate found");

    let no_key = NodeCredentials {
        key_pem: String::new(),
        ..creds.clone()
    };
    let err = TlsConfig::new(ca.cert_pem(), &no_key).expect_err("bad key");
    assert!(err.to_string().starts_with("node key: "), "{err}");

    let no_cert = NodeCredentials {
        cert_pem: creds.key_pem.clone(),
        ..creds.clone()
    };
    let err = TlsConfig::new(ca.cert_pem(), &no_cert).expect_err("bad cert");
    assert_eq!(
        err.to_string(),
        "node certificate: no PEM certificate found"
    );

    let config = TlsConfig::new(ca.cert_pem(), &creds).expect("good");
    assert_eq!(config.node_name(), "a");
    assert!(
        !format!("{creds:?}").contains(&creds.key_pem),
        "key leaked in Debug"
    );
}

#[tokio::test]
async fn ca_round_trips_through_pem() {
    let ca = ClusterCa::generate("test").expect("ca");
    let reloaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
    let other = ClusterCa::generate("other").expect("other");
    let err = ClusterCa::from_pem(ca.cert_pem(), other.key_pem()).expect_err("mismatch");
    assert!(matches!(err, TlsError::CaKeyMismatch), "{err}");

    // A certificate issued by the reloaded CA is trusted by nodes of the original one.
    let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;
    let (b, _b_in, _) = bind(tls(&reloaded, "b")).await;
    b.send(a_addr, Some("a"), Channel::Stream, b"same ca".to_vec())
        .await
        .expect("b -> a");
    assert_eq!(recv(&mut a_in).await.from, "b");
    a.shutdown().await;
}

#[test]
fn key_not_matching_certificate_is_rejected() {
    let ca = ClusterCa::generate("test").expect("ca");
    let a = ca.issue("a", DAY).expect("a");
    let b = ca.issue("b", DAY).expect("b");
    let mixed = NodeCredentials {
        cert_pem: a.cert_pem,
        key_pem: b.key_pem,
    };
    let err = TlsConfig::new(ca.cert_pem(), &mixed).expect_err("mismatched key accepted");
    assert_eq!(
        err.to_string(),
        "node key: does not match the node certificate"
    );
}

#[tokio::test]
async fn dropping_the_transport_closes_the_inbox() {
    let ca = ClusterCa::generate("test").expect("ca");
    let (a, mut a_in, a_addr) = bind(tls(&ca, "a")).await;
    let (b, _b_in, _) = bind(tls(&ca, "b")).await;
    b.send(a_addr, Some("a"), Channel::Stream, b"x".to_vec())
        .await
        .expect("b -> a");
    assert_eq!(recv(&mut a_in).await.bytes, b"x");
    drop(a);
    let end = tokio::time::timeout(PATIENCE, a_in.recv())
        .await
        .expect("inbox still open after the transport was dropped");
    assert!(end.is_none());
    b.shutdown().await;
}

/// A node killed without a goodbye and restarted at the same address with the same credentials
/// is reached again at once: the peer's packets on its connection to the dead process draw a
/// stateless reset from the new one (the reset key is derived from the private key), the peer
/// drops that connection and dials anew, instead of sending into it until the 30 s idle timeout.
#[test]
fn a_peer_restarted_without_closing_is_reached_again_at_once() {
    let ca = ClusterCa::generate("test").expect("ca");
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let a_runtime = runtime();
    let (a, _a_in, _) = a_runtime.block_on(bind(tls(&ca, "a")));
    // The same credentials across the restart, as a node's certificate and key files.
    let b_tls = tls(&ca, "b");
    let b_runtime = runtime();
    let (b, mut b_in, b_addr) = b_runtime.block_on(bind(b_tls.clone()));
    // `a` dials, so its connection is the one both keep.
    a_runtime
        .block_on(a.send(b_addr, Some("b"), Channel::Stream, b"before".to_vec()))
        .expect("a -> b");
    assert_eq!(b_runtime.block_on(recv(&mut b_in)).bytes, b"before");

    // A crash, as near as one process allows: b's tasks stop at once. Sometimes a
    // CONNECTION_CLOSE still leaves as b is dropped, and then this passes even without resets
    // (about half the runs did); the simulation and the agent end-to-end test are the strict
    // regressions.
    b_runtime.shutdown_background();
    drop((b, b_in));
    let b_runtime = runtime();
    let (b, mut b_in) = b_runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match Transport::bind(b_addr, b_tls.clone(), TransportConfig::default()).await {
                Ok(bound) => break bound,
                // The dead process's socket may take a moment to be released.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("cannot rebind {b_addr}: {error}"),
            }
        }
    });

    // Messages sent into the dead connection are lost: keep sending until one arrives.
    let started = std::time::Instant::now();
    let sender = a.clone();
    a_runtime.spawn(async move {
        for i in 0u32.. {
            let _ = sender
                .send(b_addr, Some("b"), Channel::Stream, i.to_be_bytes().to_vec())
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let got = b_runtime.block_on(recv(&mut b_in));
    let took = started.elapsed();
    assert_eq!(got.from, "a");
    // The idle timeout is 30 s; the slack is for a loaded machine.
    assert!(took < Duration::from_secs(5), "reached after {took:?}");
    println!("restarted peer reached after {took:?}");
    drop(b);
    a_runtime.shutdown_background();
    b_runtime.shutdown_background();
}
