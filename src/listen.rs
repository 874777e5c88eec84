//! Listening sockets from `-b`/`-p`/`-k`, with qemu-nbd's backlog and error wording.

use frontends::nbd::server::Listener;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::Path;

pub fn backlog(shared: u32, persistent: bool) -> i32 {
    let somaxconn = libc::SOMAXCONN;
    if persistent || shared == 0 {
        somaxconn
    } else {
        (shared as i32).min(somaxconn)
    }
}

/// `--selinux-label`: the label new sockets of this thread get (libselinux's
/// setsockcreatecon writes it here); None resets it.
fn set_socket_label(label: Option<&str>) -> std::io::Result<()> {
    // As libselinux's setsockcreatecon_raw: the label with its NUL, or nothing to reset.
    match label {
        Some(l) => std::fs::write("/proc/thread-self/attr/sockcreate", format!("{l}\0")),
        None => std::fs::write("/proc/thread-self/attr/sockcreate", ""),
    }
}

/// A Unix listener at `path`, labelled `selinux_label` when given.
pub fn unix(path: &Path, backlog: i32, selinux_label: Option<&str>) -> Result<Listener, String> {
    if let Some(label) = selinux_label {
        set_socket_label(Some(label)).map_err(|e| {
            format!(
                "Cannot set SELinux socket create context to {label}: {}",
                backends::errno_text(&e)
            )
        })?;
    }
    let r = unix_listener(path, backlog);
    if selinux_label.is_some() {
        let _ = set_socket_label(None);
    }
    r
}

fn unix_listener(path: &Path, backlog: i32) -> Result<Listener, String> {
    // A stale socket from an earlier run would make bind fail; qemu unlinks it too.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let sock =
        Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(|e| e.to_string())?;
    let addr = socket2::SockAddr::unix(path).map_err(|e| e.to_string())?;
    sock.bind(&addr).map_err(|e| {
        format!(
            "Failed to bind socket to {}: {}",
            path.display(),
            backends::errno_text(&e)
        )
    })?;
    sock.listen(backlog)
        .map_err(|e| format!("Failed to listen on socket: {}", backends::errno_text(&e)))?;
    Ok(Listener::Unix(UnixListener::from(
        std::os::fd::OwnedFd::from(sock),
    )))
}

/// getaddrinfo as qemu calls it to listen (`passive`: AI_PASSIVE) or to connect
/// (AI_ADDRCONFIG), any family, stream sockets: `port` may be a number (truncated to 16
/// bits, as glibc does), a service name from /etc/services or empty (port 0); an empty host
/// is every local address. The error is qemu's message.
pub fn resolve(host: &str, port: &str, passive: bool) -> Result<Vec<SocketAddr>, String> {
    use std::ffi::{CStr, CString};
    let failed = |why: &str| format!("address resolution failed for {host}:{port}: {why}");
    let c_host = CString::new(host).map_err(|_| failed("Name or service not known"))?;
    let c_port =
        CString::new(port).map_err(|_| failed("Servname not supported for ai_socktype"))?;
    // SAFETY: an all-zero addrinfo is the documented "no hints" value; fields are set below.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = if passive {
        libc::AI_PASSIVE
    } else {
        libc::AI_ADDRCONFIG
    };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated strings (or NULL for an empty host), valid hints, and
    // `res` receives a list freed below with freeaddrinfo.
    let rc = unsafe {
        libc::getaddrinfo(
            // qemu listens on every address for an empty host, and connects to none.
            if host.is_empty() && passive {
                std::ptr::null()
            } else {
                c_host.as_ptr()
            },
            c_port.as_ptr(),
            &hints,
            &mut res,
        )
    };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string for any code.
        let why = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) };
        return Err(failed(&why.to_string_lossy()));
    }
    let mut out = Vec::new();
    let mut ai = res;
    while !ai.is_null() {
        // SAFETY: `ai` walks the list getaddrinfo returned; each ai_addr holds ai_addrlen
        // bytes of a socket address, copied out before the list is freed.
        unsafe {
            let a = &*ai;
            if !a.ai_addr.is_null() {
                let (_, addr) = socket2::SockAddr::try_init(|storage, len| {
                    let n =
                        (a.ai_addrlen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
                    std::ptr::copy_nonoverlapping(a.ai_addr as *const u8, storage as *mut u8, n);
                    *len = n as libc::socklen_t;
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
                if let Some(sa) = addr.as_socket() {
                    out.push(sa);
                }
            }
            ai = a.ai_next;
        }
    }
    // SAFETY: `res` came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(out)
}

/// Listeners on every address `host` resolves to.
pub fn tcp(host: &str, port: &str, backlog: i32) -> Result<Vec<Listener>, String> {
    let addrs = resolve(host, port, true)?;
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        let sock = Socket::new(Domain::for_address(a), Type::STREAM.cloexec(), None)
            .map_err(|e| e.to_string())?;
        let _ = sock.set_reuse_address(true);
        if a.is_ipv6() {
            let _ = sock.set_only_v6(true);
        }
        match sock.bind(&a.into()).and_then(|_| sock.listen(backlog)) {
            Ok(()) => out.push(Listener::Tcp(std::net::TcpListener::from(
                std::os::fd::OwnedFd::from(sock),
            ))),
            Err(e) => last_err = Some(e),
        }
    }
    if out.is_empty() {
        let e = last_err.map(|e| backends::errno_text(&e));
        return Err(format!(
            "Failed to find an available port: {}",
            e.unwrap_or_else(|| "no address".into())
        ));
    }
    Ok(out)
}

/// The first socket systemd passes (LISTEN_FDS starts at fd 3).
const FIRST_ACTIVATION_FD: i32 = 3;

/// systemd socket activation, as qemu's check_socket_activation: how many sockets were
/// passed to this process (0 when LISTEN_PID is not ours). Marks them close-on-exec; an
/// invalid one is qemu's fatal error.
pub fn activation_fds() -> Result<usize, String> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !ours {
        return Ok(0);
    }
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    for fd in FIRST_ACTIVATION_FD..FIRST_ACTIVATION_FD.saturating_add(n.min(1024) as i32) {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; an invalid one only fails.
        let ok = unsafe {
            let f = libc::fcntl(fd, libc::F_GETFD);
            f != -1 && libc::fcntl(fd, libc::F_SETFD, f | libc::FD_CLOEXEC) != -1
        };
        if !ok {
            let e = std::io::Error::last_os_error();
            return Err(format!(
                "Socket activation failed: invalid file descriptor fd = {fd}: {}",
                backends::errno_text(&e)
            ));
        }
    }
    Ok(n)
}

/// The socket systemd passed at fd 3, whatever its family.
pub fn activated() -> Result<Listener, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: fd 3 was handed to this process by systemd (activation_fds() said so) and
    // nothing else in the process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST_ACTIVATION_FD) };
    let sock = Socket::from(fd);
    let family = sock
        .local_addr()
        .map_err(|e| {
            format!(
                "Failed to use socket activation: {}",
                backends::errno_text(&e)
            )
        })?
        .family();
    let fd = OwnedFd::from(sock);
    Ok(if family == libc::AF_UNIX as libc::sa_family_t {
        Listener::Unix(UnixListener::from(fd))
    } else {
        Listener::Tcp(std::net::TcpListener::from(fd))
    })
}
