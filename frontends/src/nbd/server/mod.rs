//! The NBD server: accept connections on the listeners it is given, run the handshake and
//! the transmission phase on each, and decide when the process is done (qemu-nbd's rules).

mod export;
mod handshake;
mod meta;
mod transmission;
mod validate;

pub use export::Export;
pub use handshake::Negotiated;

use crate::tls::ServerTls;
use crate::transport::Stream;
use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// How the server runs; the export itself is in [`Export`].
#[derive(Clone)]
pub struct ServerOptions {
    /// `-e`: most clients at once; 0 is unlimited.
    pub shared: u32,
    /// `-t`: keep running when the last client leaves.
    pub persistent: bool,
    /// `--handshake-limit`: None is no limit.
    pub handshake_limit: Option<Duration>,
    /// Worker threads per connection.
    pub threads_per_connection: usize,
    /// `--tls-creds`: every client must STARTTLS first (FORCEDTLS).
    pub tls: Option<Arc<ServerTls>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            shared: 1,
            persistent: false,
            handshake_limit: Some(Duration::from_secs(10)),
            threads_per_connection: default_threads_per_connection(),
            tls: None,
        }
    }
}

/// Enough workers per connection to overlap I/O, few enough that on a small machine they do
/// not spend their time handing the socket locks to each other (measured: on 2 cores, 16
/// workers served 4 KiB reads 10-15 % slower than 4).
pub fn default_threads_per_connection() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (2 * cpus).clamp(4, 16)
}

#[derive(Default)]
struct State {
    /// Connections accepted and not yet closed (slots in use for `-e`).
    connections: u32,
    /// Connections that reached the transmission phase and are still open.
    serving: u32,
    done: bool,
}

pub struct Server {
    export: Arc<Export>,
    opts: ServerOptions,
    state: Arc<(Mutex<State>, Condvar)>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Server {
    pub fn new(export: Export, opts: ServerOptions) -> Server {
        Server {
            export: Arc::new(export),
            opts,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        }
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// Serve until the last client that reached transmission leaves (unless persistent).
    pub fn run(&self, listeners: Vec<Listener>) -> io::Result<()> {
        for l in listeners {
            let export = self.export.clone();
            let opts = self.opts.clone();
            let state = self.state.clone();
            std::thread::Builder::new()
                .name("accept".into())
                .spawn(move || accept_loop(l, export, opts, state))?;
        }
        let (m, cv) = &*self.state;
        let mut st = lock(m);
        while !st.done {
            st = match cv.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        Ok(())
    }

    /// Serve one already connected client on the calling thread (the kernel binder's
    /// private socket); returns when it disconnects.
    pub fn serve_one(&self, stream: Stream) {
        handle_connection(stream, &self.export, &self.opts, None);
    }
}

fn accept_loop(
    l: Listener,
    export: Arc<Export>,
    opts: ServerOptions,
    state: Arc<(Mutex<State>, Condvar)>,
) {
    let (m, cv) = &*state;
    loop {
        {
            // Like qemu-nbd, stop accepting while `-e` clients are connected: the next one
            // waits in the listen backlog.
            let mut st = lock(m);
            while opts.shared != 0 && st.connections >= opts.shared {
                st = match cv.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
            st.connections += 1;
        }
        let stream = match l.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                lock(m).connections -= 1;
                cv.notify_all();
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let export = export.clone();
        let opts = opts.clone();
        let state = state.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let (m, cv) = &*state;
                let peer = stream.peer();
                tracing::debug!("client connected: {peer}");
                let served = handle_connection(stream, &export, &opts, Some(&state));
                let mut st = lock(m);
                st.connections -= 1;
                if served {
                    st.serving -= 1;
                    if st.serving == 0 && !opts.persistent {
                        st.done = true;
                    }
                }
                tracing::debug!("client disconnected: {peer}");
                cv.notify_all();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
            lock(m).connections -= 1;
        }
    }
}

/// Every log line of a connection names its peer and export (worker threads enter it too).
fn connection_span(stream: &Stream, export: &Export) -> tracing::Span {
    tracing::info_span!("conn", peer = %stream.peer(), export = %export.name)
}

/// Run one connection; returns whether it reached the transmission phase. `state` (the
/// accept loops') counts it among the serving ones while it is.
fn handle_connection(
    mut stream: Stream,
    export: &Export,
    opts: &ServerOptions,
    state: Option<&(Mutex<State>, Condvar)>,
) -> bool {
    let _span = connection_span(&stream, export).entered();
    let _counted = export.stats.as_ref().map(|s| s.connection());
    let deadline = opts.handshake_limit.map(|d| Instant::now() + d);
    // From the start: the handshake (a TLS one above all) sends small messages back to
    // back, and Nagle's algorithm would hold the second until the client's delayed ACK
    // (40 ms a connection, measured on x509).
    stream.set_nodelay();
    match handshake::negotiate(&mut stream, export, deadline, opts.tls.as_deref()) {
        Ok(handshake::Outcome::Transmission(neg)) => {
            count_negotiated(export);
            if let Some((m, _)) = state {
                lock(m).serving += 1;
            }
            if let Err(e) = transmission::serve(stream, export, neg, opts.threads_per_connection) {
                tracing::info!("connection ended: {e}");
            }
            true
        }
        Ok(handshake::Outcome::Closed) => false,
        Err(e) => {
            // qemu reports every failed negotiation on stderr.
            tracing::error!("option negotiation failed: {e}");
            count_failed(export);
            stream.abort();
            false
        }
    }
}

fn count_negotiated(export: &Export) {
    if let Some(s) = &export.stats {
        s.negotiated();
    }
}

fn count_failed(export: &Export) {
    if let Some(s) = &export.stats {
        s.negotiation_failed();
    }
}
