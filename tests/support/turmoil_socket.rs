//! A quinn [`AsyncUdpSocket`] over a turmoil simulated UDP socket, so real QUIC (and real TLS)
//! runs over turmoil's simulated network and in its simulated time.
//!
//! turmoil's UDP socket has no `connect`/`send` (tokio-rs/turmoil#220), so everything goes through
//! `try_send_to` and `try_recv_from`. Sends never fail towards quinn: a datagram turmoil refuses
//! is dropped, as a real network would, instead of failing quinn's endpoint driver.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A turmoil UDP socket that quinn can drive.
pub struct TurmoilUdpSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    local: SocketAddr,
    /// The pending "a datagram is queued" wait, kept between polls.
    readable: Mutex<Option<Readable>>,
}

impl TurmoilUdpSocket {
    /// Binds a simulated UDP socket on `addr`'s port; call from inside the turmoil host whose
    /// address is `addr`.
    ///
    /// turmoil only binds unspecified or loopback addresses, so the socket listens on `0.0.0.0`
    /// and reports `addr` as its local address, which is what peers must dial.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
        let inner = turmoil::net::UdpSocket::bind(any).await?;
        Ok(Arc::new(TurmoilUdpSocket {
            inner: Arc::new(inner),
            local: addr,
            readable: Mutex::new(None),
        }))
    }
}

impl fmt::Debug for TurmoilUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurmoilUdpSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// turmoil's UDP has no back-pressure: the socket is always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for TurmoilUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // `max_transmit_segments` is 1, so quinn never batches; split anyway if it ever does.
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(segment) {
            // An unreachable destination is a lost datagram, not a broken socket.
            let _ = self.inner.try_send_to(datagram, transmit.destination);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        loop {
            // While the readable future is pending it holds turmoil's receive lock, so this
            // returns `WouldBlock` until the future completes with a datagram buffered.
            match self.inner.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *slot = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        dst_ip: Some(self.local.ip()),
                        ..RecvMeta::default()
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
            let mut readable = self.readable.lock().unwrap_or_else(PoisonError::into_inner);
            let future = readable.get_or_insert_with(|| {
                let socket = self.inner.clone();
                Box::pin(async move { socket.readable().await })
            });
            let result = ready!(future.as_mut().poll(cx));
            *readable = None;
            result?;
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// quinn's endpoint settings for a simulated node: its stateless-reset key and connection-id
/// generator keyed by `host_key`, connection ids drawn from `cid_seed`, and every other random
/// choice of quinn from `rng_seed`.
///
/// The transport replaces this reset key with the one it derives from the node's private key
/// (`Transport::bind_with_socket`), so a restarted node resets its peers' connections to its dead
/// incarnation whatever `host_key` is; quinn only needs some key here to build the config.
pub fn endpoint_config(host_key: u64, cid_seed: u64, rng_seed: [u8; 32]) -> quinn::EndpointConfig {
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(ResetKey(host_key)));
    endpoint.cid_generator(move || Box::new(CidGenerator(cid_seed)));
    endpoint.rng_seed(Some(rng_seed));
    endpoint
}

/// A keyed hash standing in for HMAC: stateless-reset tokens only need to be unforgeable by
/// someone without the key, which no simulated peer tries.
struct ResetKey(u64);

impl ResetKey {
    fn digest(&self, data: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut hasher = DefaultHasher::new();
            (self.0, i, data).hash(&mut hasher);
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
        out
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        signature_out.copy_from_slice(&self.digest(data)[..signature_out.len()]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        if self.digest(data)[..] == *signature {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Seeded 8-byte connection ids (splitmix64). It accepts every id as possibly its own (quinn's
/// default `validate`), so packets for connections of a previous incarnation get a reset.
struct CidGenerator(u64);

impl quinn::ConnectionIdGenerator for CidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let id = crate::rng::splitmix64(&mut self.0);
        quinn::ConnectionId::new(&id.to_le_bytes())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}
