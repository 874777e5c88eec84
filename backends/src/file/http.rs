//! Images on a web server: qemu's `curl` protocol driver for `http://` and `https://` URLs,
//! over ureq. Read-only, as qemu's: a HEAD for the size (the server must say
//! `Accept-Ranges: bytes` and give a length), then one `Range` GET per read that misses the
//! read-ahead buffers. Every format works over it (`qnbd -r -f qcow2 https://host/d.qcow2`).
//!
//! As qemu's driver, `readahead` bytes (256 KiB by default) are fetched past a read that
//! misses and kept in one of [`BUFFERS`] buffers, so a sequential reader asks the server once
//! per read-ahead; unlike qemu's, only past a read that continues an earlier one (it starts
//! where one of the last reads ended, or at 0): a random reader fetches what it asks for,
//! not 64 times as much for a 4 KiB read. `timeout` bounds a whole request (5 s by default, 0 for none); redirects
//! are followed (credentials only to the same host); `sslverify=off` skips the certificate
//! check; `cookie`, `username` / `password-secret` (Basic), `proxy-username` /
//! `proxy-password-secret`; proxies from the environment (`http_proxy`, `https_proxy`,
//! `NO_PROXY`, …). Where qemu would copy a wrong range (a server that answers a range with
//! other bytes, fewer bytes or the whole file), the read fails with EIO instead.

use super::remote::{unescape as percent_decode, Remote, RemoteOptions};
use crate::{Error, Result};
use parking_lot::Mutex;
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// qemu's CURL_NUM_STATES: read-ahead buffers kept.
pub const BUFFERS: usize = 8;
const READAHEAD_DEFAULT: u64 = 256 * 1024;
const TIMEOUT_DEFAULT: u64 = 5;
/// qemu's CURL_TIMEOUT_MAX.
const TIMEOUT_MAX: u64 = 10000;
/// The most read-ahead fetched past a read, whatever `readahead=` says: qemu allocates what
/// it is told (and fails the read when it cannot); here the buffers stay bounded
/// ([`BUFFERS`] × 2 × this at most: only reads shorter than the read-ahead get one).
const READAHEAD_MAX: u64 = 32 << 20;

/// The driver's options (`--image-opts driver=http,…`); secrets by object id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// `driver=http|https` (the URL must start with it); None for a plain file name.
    pub protocol: Option<String>,
    pub readahead: Option<u64>,
    /// Seconds (qemu takes any number and refuses what is above 10000).
    pub timeout: Option<u64>,
    pub sslverify: Option<bool>,
    pub cookie: Option<String>,
    pub cookie_secret: Option<String>,
    pub username: Option<String>,
    pub password_secret: Option<String>,
    pub proxy_username: Option<String>,
    pub proxy_password_secret: Option<String>,
}

/// Finds a `secret` object's text by id (qemu's message when there is none).
pub type SecretLookup<'a> = &'a dyn Fn(&str) -> std::result::Result<String, String>;

/// Is `name` one of this driver's URLs?
pub fn is_url(name: &str) -> bool {
    scheme(name).is_some()
}

fn scheme(name: &str) -> Option<&'static str> {
    ["http", "https"]
        .into_iter()
        .find(|s| name.strip_prefix(s).is_some_and(|r| r.starts_with("://")))
}

/// Open the web file `name` names; None when it is not an `http(s)://` URL.
pub fn open(
    name: &str,
    opts: &RemoteOptions,
    secret: SecretLookup,
) -> Option<Result<Arc<dyn Remote>>> {
    let protocol = opts.http.protocol.as_deref().or_else(|| scheme(name))?;
    Some(HttpFile::open(name, protocol, opts, secret).map(|f| Arc::new(f) as Arc<dyn Remote>))
}

/// A read-ahead buffer: `data` holds the file's bytes from `start`.
struct Buffer {
    start: u64,
    data: Arc<Vec<u8>>,
    used: u64,
}

/// The read-ahead buffers kept, and where recent reads ended. Behind one mutex that is
/// never held across a request to the server: a buffer is looked up (and copied out) or
/// kept under it, and fetched without it, so two readers may fetch the same bytes, never
/// wait on each other's network.
#[derive(Default)]
struct ReadAhead {
    buffers: Vec<Buffer>,
    clock: u64,
    /// A read that starts where one of these ended continues it: it gets read-ahead.
    ends: [u64; BUFFERS],
    next_end: usize,
}

impl ReadAhead {
    /// Copy `buf.len()` bytes at `offset` from a buffer if one holds them all (the first
    /// bool); the second says whether the read continues an earlier one.
    fn lookup(&mut self, offset: u64, buf: &mut [u8]) -> (bool, bool) {
        self.clock += 1;
        let end = offset + buf.len() as u64;
        let sequential = self.ends.contains(&offset);
        self.ends[self.next_end] = end;
        self.next_end = (self.next_end + 1) % BUFFERS;
        for b in self.buffers.iter_mut() {
            if offset >= b.start && end <= b.start + b.data.len() as u64 {
                let at = (offset - b.start) as usize;
                buf.copy_from_slice(&b.data[at..at + buf.len()]);
                b.used = self.clock;
                return (true, sequential);
            }
        }
        (false, sequential)
    }

    fn keep(&mut self, start: u64, data: Arc<Vec<u8>>) {
        self.clock += 1;
        let b = Buffer {
            start,
            data,
            used: self.clock,
        };
        if self.buffers.len() < BUFFERS {
            self.buffers.push(b);
        } else if let Some(oldest) = self.buffers.iter_mut().min_by_key(|b| b.used) {
            *oldest = b;
        }
    }
}

pub struct HttpFile {
    /// The name as given (qemu's file name for messages).
    name: String,
    /// The URL without user information.
    url: String,
    agent: ureq::Agent,
    /// `Authorization` and `Cookie` header values.
    auth: Option<String>,
    cookie: Option<String>,
    size: u64,
    readahead: u64,
    ahead: Mutex<ReadAhead>,
}

impl fmt::Debug for HttpFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFile")
            .field("url", &self.url)
            .field("size", &self.size)
            .finish()
    }
}

/// The settings qemu checks before it connects, in its order.
struct Checked {
    readahead: u64,
    timeout: u64,
    cookie: Option<String>,
    username: Option<String>,
    password: Option<String>,
    proxy_username: Option<String>,
    proxy_password: Option<String>,
}

fn check(name: &str, protocol: &str, o: &HttpOptions, secret: SecretLookup) -> Result<Checked> {
    let fail = |m: String| Err(Error::Open(m));
    let readahead = o.readahead.unwrap_or(READAHEAD_DEFAULT);
    if !readahead.is_multiple_of(512) {
        return fail(format!(
            "HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512"
        ));
    }
    let timeout = o.timeout.unwrap_or(TIMEOUT_DEFAULT);
    if timeout > TIMEOUT_MAX {
        return fail("timeout parameter is too large or negative".into());
    }
    if o.cookie.is_some() && o.cookie_secret.is_some() {
        return fail("curl driver cannot handle both cookie and cookie secret".into());
    }
    let lookup = |id: &Option<String>| id.as_deref().map(secret).transpose().map_err(Error::Open);
    let cookie = match &o.cookie_secret {
        Some(_) => lookup(&o.cookie_secret)?,
        None => o.cookie.clone(),
    };
    if name.is_empty() {
        return fail("curl block driver requires an 'url' option".into());
    }
    if !name
        .strip_prefix(protocol)
        .is_some_and(|r| r.starts_with("://"))
    {
        return fail(format!(
            "{protocol} curl driver cannot handle the URL '{name}' (does not start with '{protocol}://')"
        ));
    }
    Ok(Checked {
        readahead,
        timeout,
        cookie,
        username: o.username.clone(),
        password: lookup(&o.password_secret)?,
        proxy_username: o.proxy_username.clone(),
        proxy_password: lookup(&o.proxy_password_secret)?,
    })
}

impl HttpFile {
    fn open(
        name: &str,
        protocol: &str,
        opts: &RemoteOptions,
        secret: SecretLookup,
    ) -> Result<HttpFile> {
        if !opts.read_only {
            return Err(Error::Open("curl driver does not support writes".into()));
        }
        let c = check(name, protocol, &opts.http, secret)?;
        let (url, userinfo) = split_userinfo(name);
        let agent = agent(protocol, &c, opts.http.sslverify.unwrap_or(true))?;
        let (user, pass) = match userinfo {
            Some((u, p)) => (Some(u), p),
            None => (None, None),
        };
        let user = c.username.clone().or(user);
        let pass = c.password.clone().or(pass);
        let auth = (user.is_some() || pass.is_some()).then(|| {
            let pair = format!("{}:{}", user.unwrap_or_default(), pass.unwrap_or_default());
            format!("Basic {}", base64(pair.as_bytes()))
        });
        let mut f = HttpFile {
            name: name.to_string(),
            url,
            agent,
            auth,
            cookie: c.cookie,
            size: 0,
            readahead: c.readahead,
            ahead: Mutex::new(ReadAhead::default()),
        };
        f.size = f
            .head()
            .map_err(|m| Error::Open(format!("CURL: Error opening file: {m}")))?;
        tracing::debug!(url = %f.url, size = f.size, "opened a file on a web server");
        Ok(f)
    }

    /// A HEAD (`head`) or GET of the file, with its credentials and cookie.
    fn request(&self, head: bool) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let mut r = if head {
            self.agent.head(&self.url)
        } else {
            self.agent.get(&self.url)
        };
        if let Some(a) = &self.auth {
            r = r.header("Authorization", a);
        }
        if let Some(c) = &self.cookie {
            r = r.header("Cookie", c);
        }
        r
    }

    /// The file's size, from a HEAD (qemu's checks and words).
    fn head(&self) -> std::result::Result<u64, String> {
        let started = Instant::now();
        let resp = self
            .request(true)
            .call()
            .map_err(|e| self.describe(e, started))?;
        status_ok(resp.status().as_u16())?;
        let accepts = resp.headers().get_all("accept-ranges").iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("bytes"))
        });
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let Some(len) = len else {
            return Err("Server didn't report file size.".into());
        };
        if !accepts {
            return Err("Server does not support 'range' (byte ranges).".into());
        }
        // Offsets are signed in qemu and in NBD's arithmetic: refuse what cannot be one.
        if len > i64::MAX as u64 {
            return Err(format!("Server reported an impossible file size ({len})"));
        }
        Ok(len)
    }

    /// curl's words for a failed request where there are some, ureq's otherwise.
    fn describe(&self, e: ureq::Error, started: Instant) -> String {
        let (host, port) = host_port(&self.url);
        match e {
            ureq::Error::StatusCode(code) => format!("The requested URL returned error: {code}"),
            ureq::Error::HostNotFound => format!("Could not resolve host: {host}"),
            ureq::Error::Io(e) if e.to_string().starts_with("failed to lookup address") => {
                format!("Could not resolve host: {host}")
            }
            ureq::Error::Timeout(_) => format!(
                "Operation timed out after {} milliseconds with 0 bytes received",
                started.elapsed().as_millis()
            ),
            ureq::Error::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NetworkUnreachable
                ) || e.raw_os_error() == Some(libc::EHOSTUNREACH) =>
            {
                format!(
                    "Failed to connect to {host} port {port} after {} ms: Couldn't connect to server",
                    started.elapsed().as_millis()
                )
            }
            ureq::Error::Io(e) => crate::errno_text(&e),
            ureq::Error::TooManyRedirects => "Maximum (10) redirects followed".into(),
            e => e.to_string(),
        }
    }

    /// Fetch `out.len()` bytes from `start` with one range request.
    fn fetch(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let end = start + out.len() as u64 - 1;
        let started = Instant::now();
        let resp = self
            .request(false)
            .header("Range", &format!("bytes={start}-{end}"))
            .call()
            .map_err(|e| self.read_error(start, self.describe(e, started)))?;
        let code = resp.status().as_u16();
        match code {
            206 => {
                let range = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some(r) = range {
                    if parse_content_range(&r) != Some((start, end)) {
                        return Err(self.read_error(
                            start,
                            format!("asked for bytes {start}-{end}, the server sent {r}"),
                        ));
                    }
                }
            }
            // A server that ignores the range: its body starts at 0.
            200 if start == 0 => {}
            200 => return Err(self.read_error(start, "the server ignored the byte range".into())),
            c => {
                let m = status_ok(c)
                    .err()
                    .unwrap_or_else(|| format!("unexpected HTTP status {c}"));
                return Err(self.read_error(start, m));
            }
        }
        let mut body = resp.into_body().into_reader();
        body.read_exact(out).map_err(|e| {
            self.read_error(
                start,
                format!("the body ended early: {}", crate::errno_text(&e)),
            )
        })?;
        if code == 206 {
            // Read to the end so the connection goes back to the pool; more than asked is a
            // broken server.
            let mut extra = [0u8; 1];
            if matches!(body.read(&mut extra), Ok(n) if n > 0) {
                return Err(self.read_error(start, "the body is longer than the range".into()));
            }
        }
        Ok(())
    }

    fn read_error(&self, offset: u64, msg: String) -> io::Error {
        tracing::warn!(url = %self.url, offset, "reading a file on a web server: {msg}");
        io::Error::other(format!("offset {offset}: {msg}"))
    }
}

impl Remote for HttpFile {
    fn filename(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (hit, sequential) = self.ahead.lock().lookup(offset, buf);
        if hit {
            return Ok(());
        }
        let ahead = self.readahead.min(READAHEAD_MAX);
        // A read as long as the read-ahead gains nothing from it; and a client that reads in
        // order with such reads has the next ones in flight already (nbdcopy): fetching
        // ahead would fetch their bytes twice.
        if !sequential || len >= ahead {
            return self.fetch(offset, buf);
        }
        let want = (len + ahead).min(self.size - offset);
        let mut data = Vec::new();
        data.try_reserve_exact(want as usize)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        data.resize(want as usize, 0);
        self.fetch(offset, &mut data)?;
        buf.copy_from_slice(&data[..buf.len()]);
        self.ahead.lock().keep(offset, Arc::new(data));
        Ok(())
    }

    fn write(&self, _offset: u64, _buf: &[u8], _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _no_hole: bool, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool, bool)>> {
        Ok(vec![(
            len.min(self.size.saturating_sub(offset)),
            false,
            false,
        )])
    }
}

/// curl fails on an HTTP status of 400 or more (`CURLOPT_FAILONERROR`).
fn status_ok(code: u16) -> std::result::Result<(), String> {
    if code >= 400 {
        return Err(format!("The requested URL returned error: {code}"));
    }
    Ok(())
}

fn agent(scheme: &str, c: &Checked, sslverify: bool) -> Result<ureq::Agent> {
    use ureq::config::{Config, RedirectAuthHeaders};
    use ureq::tls::TlsConfig;
    let tls = TlsConfig::builder()
        .root_certs(system_roots())
        .disable_verification(!sslverify)
        .build();
    let timeout = (c.timeout > 0).then(|| Duration::from_secs(c.timeout));
    let proxy = proxy_from_env(scheme, c)?;
    let config = Config::builder()
        .tls_config(tls)
        .timeout_global(timeout)
        .http_status_as_error(false)
        .redirect_auth_headers(RedirectAuthHeaders::SameHost)
        // One connection per request in flight stays open (a frontend keeps 16 per client
        // connection in flight): reconnecting per request costs more than the request.
        .max_idle_connections(256)
        .max_idle_connections_per_host(256)
        .proxy(proxy)
        .accept_encoding("identity")
        .user_agent("qnbd")
        .build();
    Ok(ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CachingResolver::default(),
    ))
}

/// How long a host's addresses are kept (curl's DNS cache keeps them a minute).
const RESOLVED_FOR: Duration = Duration::from_secs(60);

/// ureq looks the host up before every request, and with a timeout set it does so on a new
/// thread: a thread and a lookup per read (measured: 2944 clones for 2944 reads, 5k reads a
/// second at QD 1 against nbdkit's 11k). This keeps each answer for [`RESOLVED_FOR`].
#[derive(Debug, Default)]
struct CachingResolver {
    inner: ureq::unversioned::resolver::DefaultResolver,
    cache: Mutex<
        Vec<(
            String,
            Instant,
            ureq::unversioned::resolver::ResolvedSocketAddrs,
        )>,
    >,
}

impl ureq::unversioned::resolver::Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> std::result::Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let key = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or(""),
            uri.authority().map_or("", |a| a.as_str())
        );
        if let Some((_, _, addrs)) = self
            .cache
            .lock()
            .iter()
            .find(|(k, at, _)| *k == key && at.elapsed() < RESOLVED_FOR)
        {
            return Ok(addrs.clone());
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut cache = self.cache.lock();
        cache.retain(|(k, at, _)| *k != key && at.elapsed() < RESOLVED_FOR);
        cache.push((key, Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

/// The system's trusted certificates, read once: what curl trusts (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` override the system's store). Unreadable ones are left out, with a note.
fn system_roots() -> ureq::tls::RootCerts {
    static ROOTS: std::sync::OnceLock<ureq::tls::RootCerts> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!("reading the system's certificates: {e}");
            }
            let certs: Vec<ureq::tls::Certificate<'static>> = found
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            ureq::tls::RootCerts::new_with_certs(&certs)
        })
        .clone()
}

/// The proxy curl would take for `scheme` from the environment (`http_proxy` for http,
/// `https_proxy` for https, then `all_proxy`; upper case but for `http_proxy`), with the
/// `proxy-username` / `proxy-password-secret` options and `NO_PROXY`.
fn proxy_from_env(scheme: &str, c: &Checked) -> Result<Option<ureq::Proxy>> {
    let names: &[&str] = if scheme == "https" {
        &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        &["http_proxy", "all_proxy", "ALL_PROXY"]
    };
    let Some(v) = names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    else {
        return Ok(None);
    };
    let bad = |e: ureq::Error| Error::Open(format!("CURL: Error opening file: proxy '{v}': {e}"));
    let p = ureq::Proxy::new(&v).map_err(bad)?;
    let mut b = ureq::Proxy::builder(p.protocol())
        .host(p.host())
        .port(p.port());
    if let Some(u) = c.proxy_username.as_deref().or(p.username()) {
        b = b.username(u);
    }
    if let Some(pw) = c.proxy_password.as_deref().or(p.password()) {
        b = b.password(pw);
    }
    let no_proxy = std::env::var("no_proxy")
        .or_else(|_| std::env::var("NO_PROXY"))
        .unwrap_or_default();
    for e in no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        b = b.no_proxy(e);
    }
    b.build().map(Some).map_err(bad)
}

/// `scheme://user:pass@host/…` → the URL without `user:pass@`, and the (decoded) pair.
fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let Some((info, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let (user, pass) = match info.split_once(':') {
        Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
        None => (percent_decode(info), None),
    };
    (format!("{scheme}://{host}{tail}"), Some((user, pass)))
}

/// The host and port of a URL, for messages (port from the scheme when absent).
fn host_port(url: &str) -> (String, u16) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').unwrap_or((v6, ""));
        let port = p.strip_prefix(':').and_then(|p| p.parse().ok());
        return (h.to_string(), port.unwrap_or(default));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(default)),
        None => (authority.to_string(), default),
    }
}

/// `bytes A-B/TOTAL` → (A, B).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let r = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, _) = r.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| acc << 8 | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_taken_out_of_the_url() {
        let (url, info) = split_userinfo("http://us%40er:p%3Ass@host:8080/a@b/disk.img");
        assert_eq!(url, "http://host:8080/a@b/disk.img");
        assert_eq!(info, Some(("us@er".into(), Some("p:ss".into()))));
        assert_eq!(split_userinfo("https://host/d").1, None);
        assert_eq!(
            split_userinfo("http://me@host/d"),
            ("http://host/d".into(), Some(("me".into(), None)))
        );
    }

    #[test]
    fn base64_as_rfc_4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("u:p", "dTpw"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn hosts_ports_and_ranges() {
        assert_eq!(host_port("http://127.0.0.1:1/x"), ("127.0.0.1".into(), 1));
        assert_eq!(host_port("https://h/x"), ("h".into(), 443));
        assert_eq!(host_port("http://[::1]:8/x"), ("::1".into(), 8));
        assert_eq!(parse_content_range("bytes 0-511/8192"), Some((0, 511)));
        assert_eq!(parse_content_range("bytes */8192"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
    }

    #[test]
    fn options_are_checked_in_qemus_order() {
        let none = |_: &str| -> std::result::Result<String, String> { Err("none".into()) };
        let err = |o: HttpOptions, name: &str, proto: &str| match check(name, proto, &o, &none) {
            Err(Error::Open(m)) => m,
            _ => String::new(),
        };
        let o = HttpOptions {
            readahead: Some(1000),
            timeout: Some(20000),
            ..Default::default()
        };
        assert_eq!(
            err(o, "http://h/", "http"),
            "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512"
        );
        let o = HttpOptions {
            cookie: Some("a".into()),
            cookie_secret: Some("s".into()),
            ..Default::default()
        };
        assert_eq!(
            err(o, "http://h/", "http"),
            "curl driver cannot handle both cookie and cookie secret"
        );
        assert_eq!(
            err(HttpOptions::default(), "http://h/", "https"),
            "https curl driver cannot handle the URL 'http://h/' (does not start with 'https://')"
        );
    }
}
