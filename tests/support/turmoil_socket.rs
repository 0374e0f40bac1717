//! A quinn [`AsyncUdpSocket`] over a turmoil simulated UDP socket, so real QUIC (and real TLS)
//! runs over turmoil's simulated network and in its simulated time.
//!
//! turmoil's UDP socket has no `connect`/`send` (tokio-rs/turmoil#220), so everything goes through
//! `try_send_to` and `try_recv_from`. Sends never fail towards quinn: a datagram turmoil refuses
//! is dropped, as a real network would, instead of failing quinn's endpoint driver.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

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
