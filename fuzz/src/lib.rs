//! qnbd's fuzz targets, one function per target taking arbitrary bytes. The same functions
//! run under AFL (`fuzz/afl`, long runs, `scripts/fuzz.sh`) and as property tests in
//! `cargo test` (`tests/props.rs`, short runs mutating the seed corpora, plus every input
//! kept in `fuzz/regressions/`).
//!
//! A target fails by panicking, by hanging (AFL's `-t 1000`), or by asking for more than
//! [`MAX_ALLOCATION`] bytes at once ([`LimitAlloc`] aborts then). Errors the code reports as
//! errors are the expected outcome for most inputs.
//!
//! | target | input |
//! | --- | --- |
//! | [`handshake`] | byte 0 picks the export and TLS; the rest is what a client sends after the greeting |
//! | [`transmission`] | byte 0 picks the export and how the handshake goes; the rest is requests |
//! | [`parsers`] | byte 0 picks `--object` / `--image-opts` / `-l` / `--object help`; the rest is the text |
//! | [`qcow2`] | bytes 0-3 pick the open mode and I/O offsets; the rest is the image file |
//! | [`client`] | byte 0 picks `-L` or a GO; the rest is what a server sends |
//! | [`formats`] | byte 0 picks the format (vmdk, vdi, vpc, vhdx, qed) and open mode, bytes 1-3 the I/O offsets; the rest is the image file |

use backends::file::{FileOptions, HostFile};
use backends::open::{open_image, Format, ImageOptions};
use backends::qcow2::{Qcow2, Qcow2Options};
use backends::raw::{RawFile, RawOptions};
use backends::{BlockBackend, Device, Extents, IoFlags};
use frontends::nbd::client::{self, Client};
use frontends::nbd::proto::*;
use frontends::nbd::server::{Export, Server, ServerOptions};
use frontends::tls::anon::AnonCreds;
use frontends::tls::{Creds, Endpoint, ServerTls};
use frontends::transport::Stream;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The largest single allocation an input may cause.
pub const MAX_ALLOCATION: usize = 64 << 20;
/// The most heap all threads together may hold: a 32 MiB request buffer per worker and the
/// 32 MiB L2 cache are by design; much more than that for one input is a leak or a blow-up.
pub const MAX_LIVE: usize = 512 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that aborts (AFL reports a crash) when one allocation is larger than
/// [`MAX_ALLOCATION`] or the heap grows past [`MAX_LIVE`]. Harness binaries install it with
/// `#[global_allocator]`.
pub struct LimitAlloc;

fn too_big(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if size > MAX_ALLOCATION || live > MAX_LIVE {
        let msg: &[u8] = if size > MAX_ALLOCATION {
            b"qnbd-fuzz: one allocation larger than 64 MiB\n"
        } else {
            b"qnbd-fuzz: more than 512 MiB of heap in use\n"
        };
        // SAFETY: write(2) of a static buffer to stderr; it allocates nothing.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, whose contract the
// caller meets; the bookkeeping around it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        too_big(layout.size());
        // SAFETY: the caller's layout is passed on as it came.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        too_big(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (so from System) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        too_big(new_size);
        // SAFETY: `ptr` came from System with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Exports served by the fixture: raw or qcow2 (over a raw backing file), writable or not.
const EXPORTS: [(&str, bool); 4] = [
    ("raw", false),
    ("raw", true),
    ("qcow2", false),
    ("qcow2", true),
];
/// Size of every export.
const EXPORT_SIZE: u64 = 1 << 20;

/// Files the fixture keeps for the life of the process.
struct Fixture {
    dir: tempfile::TempDir,
    /// A read-only raw backend standing in for every backing file an image names.
    backing: Arc<dyn BlockBackend>,
    backing_path: PathBuf,
    tls: Arc<ServerTls>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("qnbd-fuzz")
            .tempdir()
            .expect("a temporary directory");
        let backing_path = dir.path().join("backing.raw");
        let pattern: Vec<u8> = (0..EXPORT_SIZE).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        std::fs::write(&backing_path, &pattern).expect("the backing file");
        let raw = RawFile::open(
            &backing_path,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("the backing file opens");
        let creds = AnonCreds::load(None, Endpoint::Server).expect("anonymous TLS credentials");
        Fixture {
            dir,
            backing: Arc::new(raw),
            backing_path,
            tls: Arc::new(ServerTls {
                creds: Creds::Anon(creds),
                authz: None,
            }),
        }
    })
}

/// Export `i` of [`EXPORTS`] in a file of its own (`tag` keeps servers apart).
fn open_export(i: usize, tag: &str) -> Export {
    let fx = fixture();
    let (format, read_only) = EXPORTS[i % EXPORTS.len()];
    let path = fx.dir.path().join(format!("export-{tag}-{i}.{format}"));
    let backend: Arc<dyn BlockBackend> = if format == "raw" {
        let f = std::fs::File::create(&path).expect("the raw export");
        f.set_len(EXPORT_SIZE).expect("the raw export's size");
        Arc::new(
            RawFile::open(
                &path,
                RawOptions {
                    read_only,
                    discard: true,
                    ..Default::default()
                },
            )
            .expect("the raw export opens"),
        )
    } else {
        let backing = fx.backing_path.to_string_lossy();
        let img = backends::qcow2::create::overlay_image(EXPORT_SIZE, &backing, "raw")
            .expect("an overlay image");
        std::fs::write(&path, img).expect("the qcow2 export");
        let opts = ImageOptions {
            path: path.clone(),
            format: Format::from_name("qcow2"),
            read_only,
            discard: true,
            locking: backends::file::lock::Locking::Off,
            ..Default::default()
        };
        open_image(&opts).expect("the qcow2 export opens").backend
    };
    Export::new(
        String::new(),
        "fuzz".into(),
        Device::new(backend),
        true,
        true,
    )
}

/// The server for export `i`, with `tls` required or not; one per process, kept.
fn server(i: usize, tls: bool) -> &'static Server {
    static S: [OnceLock<Server>; 8] = [const { OnceLock::new() }; 8];
    let i = i % EXPORTS.len();
    let slot = i + if tls { EXPORTS.len() } else { 0 };
    S[slot].get_or_init(|| {
        let opts = ServerOptions {
            shared: 0,
            persistent: true,
            handshake_limit: Some(Duration::from_secs(5)),
            threads_per_connection: 2,
            tls: tls.then(|| fixture().tls.clone()),
        };
        Server::new(open_export(i, if tls { "tls" } else { "plain" }), opts)
    })
}

/// Run `peer` on one end of a socket pair: it gets `input` written to it (then the end of
/// the stream), and whatever it writes is read and dropped, so it never blocks on a full
/// socket buffer. Returns when `peer` returns and the writer and reader are done.
fn converse(input: &[u8], peer: impl FnOnce(Stream)) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let Ok(reader) = theirs.try_clone() else {
        return;
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut w = theirs;
            let _ = w.write_all(input);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        s.spawn(move || {
            let mut r = reader;
            let _ = io::copy(&mut r, &mut io::sink());
        });
        peer(Stream::Unix(ours));
    });
}

/// One option as a client sends it.
pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The handshake target: byte 0 bits 0-1 pick the export (raw, raw read-only, qcow2,
/// qcow2 read-only), bit 2 requires TLS (anonymous credentials, so STARTTLS and the TLS
/// handshake's first records are reachable); the rest is what the client sends after the
/// greeting, from its flags on. A GO leads into transmission as on a real connection.
pub fn handshake(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let server = server(usize::from(mode & 3), mode & 4 != 0);
    converse(rest, |s| server.serve_one(s));
}

/// The handshake a transmission input starts with: byte 0 bits 2-3 choose it.
/// 0: EXPORT_NAME (simple replies); 1: structured replies, both meta contexts, GO;
/// 2: extended headers, both meta contexts, GO; 3: structured replies, GO, no contexts.
pub fn transmission_prefix(mode: u8) -> Vec<u8> {
    let mut v = (ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES)
        .bits()
        .to_be_bytes()
        .to_vec();
    let mut meta = Vec::new();
    frontends::nbd::wire::encode_meta_request(
        &mut meta,
        "",
        &["base:allocation", "qemu:allocation-depth"],
    );
    let mut go = Vec::new();
    frontends::nbd::wire::encode_info_request(&mut go, "", &[INFO_BLOCK_SIZE]);
    match (mode >> 2) & 3 {
        0 => v.extend(option(OPT_EXPORT_NAME, b"")),
        1 => {
            v.extend(option(OPT_STRUCTURED_REPLY, &[]));
            v.extend(option(OPT_SET_META_CONTEXT, &meta));
            v.extend(option(OPT_GO, &go));
        }
        2 => {
            v.extend(option(OPT_EXTENDED_HEADERS, &[]));
            v.extend(option(OPT_SET_META_CONTEXT, &meta));
            v.extend(option(OPT_GO, &go));
        }
        _ => {
            v.extend(option(OPT_STRUCTURED_REPLY, &[]));
            v.extend(option(OPT_GO, &go));
        }
    }
    v
}

/// The transmission target, as nbdkit fuzzes `nbdkit -s`: a whole connection whose
/// handshake is a fixed valid one (byte 0 bits 2-3, see [`transmission_prefix`]) on export
/// byte 0 bits 0-1; the rest of the input is the request stream (headers and payloads).
pub fn transmission(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = transmission_prefix(mode);
    input.extend_from_slice(rest);
    let server = server(usize::from(mode & 3), false);
    converse(&input, |s| server.serve_one(s));
}

/// Object ids the parsers target looks up after creating objects (the seeds use them).
const IDS: [&str; 5] = ["a", "id0", "sec0", "tls0", "authz0"];

/// The command-line parsers: byte 0 (mod 4) picks `--object` (one argument per line, all
/// created in order, then looked up as credentials and authorizers), `--image-opts`
/// (bit 2: `-r`), `-l`, or `--object ...,help`. Arguments naming a device or kernel file
/// (`/dev`, `/proc`, `/sys`) are skipped: a user's command line may read those, forever.
pub fn parsers(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    match mode % 4 {
        0 => {
            let args: Vec<String> = text.split('\n').map(str::to_string).collect();
            if let Ok(objects) = qnbd::object::Objects::create(&args) {
                for id in IDS {
                    let _ = objects.tls_creds(id, Endpoint::Server);
                    let _ = objects.tls_creds(id, Endpoint::Client);
                    if let Some(a) = objects.authz(id) {
                        let _ = a.is_allowed("CN=client.example.com,O=qnbd,C=GB");
                        let _ = a.is_allowed(&text);
                    }
                }
            }
        }
        1 => {
            let _ = qnbd::image_opts::parse(&text, mode & 4 != 0);
        }
        2 => {
            let _ = qnbd::snapshot_param(&text);
        }
        _ => {
            let _ = qnbd::object::help(&text);
        }
    }
}

/// The qcow2 target: an image file of arbitrary bytes opened and used. Byte 0: bit 0
/// read-only, bit 1 `--discard=unmap`, bit 2 `-l 1` (read-only); bytes 1-3 place the I/O
/// (as fractions of the image size). The image's backing file, whatever it names, is a
/// fixed raw file: the target never opens a path the image chooses.
pub fn qcow2(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (ctl, img) = data.split_at(4);
    let fx = fixture();
    let Ok(mut file) = tempfile::NamedTempFile::new_in(fx.dir.path()) else {
        return;
    };
    if file.write_all(img).is_err() {
        return;
    }
    let snapshot = ctl[0] & 4 != 0;
    let read_only = ctl[0] & 1 != 0 || snapshot;
    let Ok(host) = HostFile::open(
        file.path(),
        &FileOptions {
            read_only,
            ..Default::default()
        },
    ) else {
        return;
    };
    // An image with an external data file gets a scratch one of ours: the name in its header
    // could be any file the fuzzer can reach, which it would write into.
    let external = img.get(72..80).is_some_and(|b| b[7] & 4 != 0);
    let data_file = external.then(|| file.path().with_extension("data"));
    if let Some(d) = &data_file {
        if std::fs::write(d, []).is_err() {
            return;
        }
    }
    let opts = Qcow2Options {
        read_only,
        discard: ctl[0] & 2 != 0,
        load_snapshot: snapshot.then(|| "1".to_string()),
        data_file: data_file.clone(),
        ..Default::default()
    };
    let backing = |_: &Path, _: Option<&str>| Ok(fx.backing.clone());
    let Ok(q) = Qcow2::open_file(host, opts, &backing) else {
        return;
    };
    exercise(Device::new(Arc::new(q)), &ctl[1..]);
    if let Some(d) = data_file {
        let _ = std::fs::remove_file(d);
    }
}

/// A few reads, look-ups of where a read would splice from, block-status queries and (when
/// writable) writes, zeroes, trims and a flush at offsets chosen by `at`, then the close.
fn exercise(dev: Device, at: &[u8]) {
    let size = dev.size();
    let place = |b: u8| (((u128::from(size) * u128::from(b)) >> 8) as u64) & !511;
    let mut buf = vec![0u8; 128 << 10];
    let mut ext = Extents::default();
    for &b in at {
        let off = place(b);
        let len = (size - off).min(buf.len() as u64) as usize;
        let _ = dev.read(off, &mut buf[..len]);
        let _ = dev.read_source(off, len as u64);
        ext.clear();
        let _ = dev.block_status(off, (size - off).min(1 << 32), &mut ext);
    }
    if dev.caps().writable {
        let writes = [
            (place(at[0]), 4096u64),
            (place(at[1]), 512),
            (place(at[2]), 65536 + 512),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let len = (size - off).min(len) as usize;
            if len == 0 {
                continue;
            }
            buf[..len].fill(0xa5 ^ i as u8);
            let _ = dev.write(off, &buf[..len], IoFlags::empty());
            let _ = dev.read(off, &mut buf[..len]);
        }
        let (off, len) = (place(at[1]), (size - place(at[1])).min(1 << 20));
        if dev.caps().zero.available() {
            let _ = dev.write_zeroes(off, len, IoFlags::MAY_TRIM);
        }
        let _ = dev.trim(
            place(at[2]),
            (size - place(at[2])).min(1 << 17),
            IoFlags::empty(),
        );
        let _ = dev.flush();
        ext.clear();
        let _ = dev.block_status(0, size.min(1 << 32), &mut ext);
    }
    let _ = dev.close();
}

/// The formats [`formats`] picks from (qcow2 has a target of its own; luks is left out: its
/// key derivation runs as many rounds as the image asks, by design).
pub const FORMATS: [&str; 10] = [
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "qed",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "qcow",
];

/// The other formats' target: an image file of arbitrary bytes opened by one driver and
/// used as [`qcow2`]'s images are. Byte 0: bits 0-2 and 5-6 the format ([`FORMATS`] index
/// `bits 5-6 << 3 | bits 0-2`, modulo), bit 3 read-only, bit 4 `--discard=unmap`; bytes 1-3
/// place the I/O. Every input gets a directory
/// of its own, and a vmdk whose bytes hold a `/` is skipped: a descriptor's extent names
/// are opened as files (read-write when the image is), so one must not reach out of it.
/// Backing files the image names are the fixed raw file, as in [`qcow2`].
pub fn formats(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (ctl, img) = data.split_at(4);
    let index = usize::from(ctl[0] & 7 | (ctl[0] >> 2) & 0x18);
    let name = FORMATS[index % FORMATS.len()];
    if name == "vmdk" && img.contains(&b'/') {
        return;
    }
    let fx = fixture();
    let Ok(dir) = tempfile::tempdir_in(fx.dir.path()) else {
        return;
    };
    let path = dir.path().join("image");
    if std::fs::write(&path, img).is_err() {
        return;
    }
    let Some(format) = Format::from_name(name) else {
        return;
    };
    let opts = ImageOptions {
        path: path.clone(),
        format: Some(format),
        read_only: ctl[0] & 8 != 0,
        discard: ctl[0] & 16 != 0,
        ..Default::default()
    };
    let Ok(host) = HostFile::open(
        &path,
        &FileOptions {
            read_only: opts.read_only,
            ..Default::default()
        },
    ) else {
        return;
    };
    let backing = |_: &Path, _: Option<&str>| Ok(fx.backing.clone());
    let Ok(b) = (format.driver().open)(host, &opts, &backing) else {
        return;
    };
    exercise(Device::new(b), &ctl[1..]);
}

/// The `-L` client against a hostile server: byte 0 bit 0 picks the listing (`-L`) or a
/// client that negotiates replies, asks for the meta contexts and GOes (what a connect
/// does); the rest is everything the server sends, greeting included.
pub fn client(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    converse(rest, |s| {
        if mode & 1 == 0 {
            if let Ok((exports, extended)) = client::list_exports(s, None) {
                let _ = client::format_list(&exports, extended);
            }
        } else if let Ok(mut c) = Client::start(s) {
            if c.negotiate_replies().is_ok() && c.list_meta_contexts("").is_ok() {
                let _ = c.info_or_go(OPT_GO, "", true);
            }
        }
    });
}

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target by name, for the regression runner and the AFL harnesses.
pub const TARGETS: [(&str, Target); 6] = [
    ("handshake", handshake),
    ("transmission", transmission),
    ("parsers", parsers),
    ("qcow2", qcow2),
    ("client", client),
    ("formats", formats),
];
