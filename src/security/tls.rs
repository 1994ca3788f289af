//! TLS for the listeners: certificates from files, swapped on reload without a restart,
//! optional client-certificate verification (mutual TLS), and one accept loop that turns a
//! TCP listener into a stream of ready connections for tonic and axum alike.
//!
//! Handshakes run in their own tasks, each with a time limit, so a client that connects
//! and says nothing holds one task for ten seconds, never the accept loop. Each new
//! connection uses the configuration current when it arrived; connections already open
//! keep theirs.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections accepted and handshaken but not yet taken by the server.
const READY_QUEUE: usize = 128;

/// The ALPN protocols of the gRPC listener: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// The ALPN protocols of the HTTP listeners (metrics, Segment API): HTTP/1.1.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificate, key and client CA files into a rustls server configuration.
/// Errors name the file and what is wrong with it.
pub fn server_config(tls: &TlsConfig, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Err("cert_file and key_file must both be set".into());
    };
    let chain = certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("key_file {}: no private key read: {e}", key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca_file)? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "client_ca_file {}: a certificate is not usable as a CA: {e}",
                        ca_file.display()
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| format!("client_ca_file {}: {e}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "cert_file {} and key_file {}: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// One listener's TLS configuration, replaced whole on reload.
pub struct Tls {
    files: TlsConfig,
    alpn: &'static [&'static [u8]],
    current: ArcSwap<rustls::ServerConfig>,
}

impl Tls {
    pub fn new(files: &TlsConfig, alpn: &'static [&'static [u8]]) -> Result<Tls, String> {
        Ok(Tls {
            current: ArcSwap::from_pointee(server_config(files, alpn)?),
            files: files.clone(),
            alpn,
        })
    }

    /// Reads the files again. On a problem (a certificate written before its key, say) the
    /// configuration in force stays, and the problem is returned.
    pub fn reload(&self) -> Result<(), String> {
        let next = server_config(&self.files, self.alpn)?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// The files this configuration reads, to watch.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [
            &self.files.cert_file,
            &self.files.key_file,
            &self.files.client_ca_file,
        ]
        .into_iter()
        .flatten()
        .map(|p| p.as_path())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// A connection a listener accepted: plain TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

/// A listener's ready connections: accepted, set up, and handshaken when TLS is on.
pub struct Incoming {
    ready: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

/// What is counted about a listener's handshakes.
pub type OnHandshakeFailure = Arc<dyn Fn(&str) + Send + Sync>;

impl Incoming {
    /// Starts accepting on `listener`; with `tls`, each connection is handshaken first, and
    /// one that fails or takes too long is closed and reported to `failed`.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<Tls>>,
        keepalive: Option<Duration>,
        failed: OnHandshakeFailure,
    ) -> io::Result<Incoming> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept(listener, tls, keepalive, failed, tx));
        Ok(Incoming { ready, local })
    }

    /// As tonic takes its connections.
    pub fn into_stream(self) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
        tokio_stream::wrappers::ReceiverStream::new(self.ready).map(|(conn, _)| Ok(conn))
    }
}

use tokio_stream::StreamExt as _;

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    keepalive: Option<Duration>,
    failed: OnHandshakeFailure,
    ready: mpsc::Sender<(Conn, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = ready.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // the listener itself is fine, and the next accept may succeed.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small HTTP/2 frames (acknowledgements) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        if let Some(idle) = keepalive {
            let _ = socket2::SockRef::from(&stream)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
        }
        let Some(tls) = &tls else {
            if ready.send((Conn::Plain(stream), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let acceptor = tls.acceptor();
        let ready = ready.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(conn)) => {
                    let _ = ready.send((Conn::Tls(Box::new(conn)), peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    failed("refused");
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    failed("timeout");
                }
            }
        });
    }
}
