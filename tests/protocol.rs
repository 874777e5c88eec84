//! Raw-socket checks of the transmission phase: what happens to the connection after a bad
//! request, exactly as the protocol (and qemu-nbd) says.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const REQUEST_MAGIC: u32 = 0x2560_9513;

/// Connect and negotiate with NBD_OPT_EXPORT_NAME "" (simple replies only).
fn connect(s: &Server) -> UnixStream {
    let mut c = UnixStream::connect(s.socket.as_ref().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    let mut m = 3u32.to_be_bytes().to_vec(); // fixed newstyle + no zeroes
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&m).unwrap();
    let mut info = [0u8; 10];
    c.read_exact(&mut info).unwrap();
    c
}

fn request(
    c: &mut UnixStream,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    let _ = c.write_all(&m);
}

/// Read a simple reply: (error, cookie).
fn reply(c: &mut UnixStream) -> Option<(u32, u64)> {
    let mut r = [0u8; 16];
    c.read_exact(&mut r).ok()?;
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
    Some((
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..].try_into().unwrap()),
    ))
}

fn is_closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "p.raw", 1 << 20, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    let mut c = connect(&s);
    request(&mut c, 0, 99, 1, 0, 0, &[]);
    assert_eq!(reply(&mut c), Some((22, 1)), "unknown command: EINVAL");
    request(&mut c, 0, 0, 2, 1 << 20, 512, &[]);
    assert_eq!(reply(&mut c), Some((22, 2)), "read past the end: EINVAL");
    request(&mut c, 0, 1, 3, (1 << 20) - 256, 512, &[7u8; 512]);
    assert_eq!(
        reply(&mut c),
        Some((22, 3)),
        "write past the end: EINVAL, payload drained"
    );
    request(&mut c, 0x8000, 0, 4, 0, 512, &[]);
    assert_eq!(reply(&mut c), Some((22, 4)), "unknown flag: EINVAL");
    request(&mut c, 0x04, 0, 5, 0, 512, &[]);
    assert_eq!(
        reply(&mut c),
        Some((22, 5)),
        "DF without structured replies: EINVAL"
    );
    request(&mut c, 0, 7, 6, 0, 512, &[]);
    assert_eq!(
        reply(&mut c),
        Some((22, 6)),
        "block status not negotiated: EINVAL"
    );
    request(&mut c, 0, 0, 7, 0, 33554944, &[]);
    assert_eq!(
        reply(&mut c),
        Some((22, 7)),
        "oversized read: EINVAL, connection stays"
    );
    // Still in step: a real write and read.
    request(&mut c, 1, 1, 8, 4096, 4, b"abcd");
    assert_eq!(reply(&mut c), Some((0, 8)));
    request(&mut c, 0, 0, 9, 4096, 4, &[]);
    assert_eq!(reply(&mut c), Some((0, 9)));
    let mut d = [0u8; 4];
    c.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"abcd");
    request(&mut c, 0, 2, 10, 0, 0, &[]);
    assert!(is_closed(&mut c), "NBD_CMD_DISC closes");
}

#[test]
fn read_only_write_is_refused_and_its_payload_skipped() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "r.raw", 1 << 20, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-r", img.to_str().unwrap()]);
    let mut c = connect(&s);
    request(&mut c, 0, 1, 1, 0, 4096, &[0x55; 4096]);
    assert_eq!(reply(&mut c), Some((1, 1)), "EPERM");
    request(&mut c, 0, 3, 2, 0, 0, &[]);
    assert_eq!(
        reply(&mut c),
        Some((0, 2)),
        "flush after the refused write is parsed in step"
    );
}

#[test]
fn fatal_requests_drop_only_that_client() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "f.raw", 1 << 20, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-e", "0", img.to_str().unwrap()]);
    // A write larger than 32 MiB: qemu-nbd drops the client without reading the payload.
    let mut c = connect(&s);
    request(&mut c, 0, 1, 1, 0, 33554944, &[]);
    assert!(is_closed(&mut c));
    // A bad magic.
    let mut c = connect(&s);
    c.write_all(&[0xab; 28]).unwrap();
    assert!(is_closed(&mut c));
    // The server is still there for others.
    let mut c = connect(&s);
    request(&mut c, 0, 3, 9, 0, 0, &[]);
    assert_eq!(reply(&mut c), Some((0, 9)));
}

#[test]
fn requests_in_flight_are_answered_out_of_order_with_their_cookies() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "o.raw", 8 << 20, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    let mut c = connect(&s);
    for i in 0..64u64 {
        request(
            &mut c,
            0,
            1,
            1000 + i,
            i * 65536,
            65536,
            &vec![i as u8; 65536],
        );
    }
    let mut seen: Vec<u64> = (0..64)
        .map(|_| reply(&mut c).unwrap())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1000..1064).collect::<Vec<_>>());
    drop(c);
    let data = std::fs::read(&img).unwrap();
    for i in 0..64usize {
        assert!(data[i * 65536..(i + 1) * 65536]
            .iter()
            .all(|&b| b == i as u8));
    }
}

/// Send option `code` with `data`.
fn send_opt(c: &mut UnixStream, code: u32, data: &[u8]) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// Negotiate (optionally) EXTENDED_HEADERS or STRUCTURED_REPLY, then GO; return the
/// transmission flags from NBD_INFO_EXPORT.
fn go_flags(s: &Server, ext: bool, sr: bool) -> u16 {
    let mut c = UnixStream::connect(s.socket.as_ref().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let opt = send_opt;
    // Read option replies until ACK or error; return the INFO_EXPORT flags if seen.
    let replies = |c: &mut UnixStream| -> Option<u16> {
        let mut flags = None;
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).unwrap();
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            c.read_exact(&mut d).unwrap();
            if typ == 3 && d[..2] == [0, 0] {
                flags = Some(u16::from_be_bytes([d[10], d[11]]));
            }
            if typ != 3 {
                return flags;
            }
        }
    };
    if ext {
        opt(&mut c, 11, &[]);
        replies(&mut c);
    }
    if sr {
        opt(&mut c, 8, &[]);
        replies(&mut c);
    }
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut c, 7, &go);
    replies(&mut c).expect("INFO_EXPORT")
}

#[test]
fn transmission_flags_equal_qemu_nbds() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "fl.raw", 1 << 20, &[]);
    let img = img.to_str().unwrap();
    for args in [
        vec!["-r"],
        vec![],
        vec!["-e", "2"],
        vec!["-r", "-e", "0"],
        vec!["-e", "3", "-A"],
    ] {
        let mut all = vec!["-f", "raw", "-t"];
        all.extend(args.iter());
        all.push(img);
        let ours = Server::unix(QNBD, &all);
        let theirs = Server::unix("qemu-nbd", &all);
        for (ext, sr) in [(false, false), (false, true), (true, false)] {
            assert_eq!(
                format!("{:#x}", go_flags(&ours, ext, sr)),
                format!("{:#x}", go_flags(&theirs, ext, sr)),
                "flags for {args:?} ext={ext} sr={sr}"
            );
        }
    }
}

#[test]
fn random_bytes_after_the_handshake_never_take_the_server_down() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "z.raw", 1 << 20, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-e", "0", img.to_str().unwrap()]);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200u64 {
        let mut c = connect(&s);
        let mut junk = Vec::new();
        // Half the rounds start with a valid request magic so the fields behind it get fuzzed.
        if round % 2 == 0 {
            junk.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        for _ in 0..(next() % 120) {
            junk.push(next() as u8);
        }
        let _ = c.write_all(&junk);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    }
    let mut c = connect(&s);
    request(&mut c, 0, 3, 1, 0, 0, &[]);
    assert_eq!(
        reply(&mut c),
        Some((0, 1)),
        "the server still serves after 200 hostile clients"
    );
}

/// A client that floods options and never reads the replies blocks the server's writes; the
/// handshake limit must end it (qemu-nbd's limit covers the whole handshake), so with one
/// slot (`-e 1`) the next client is served.
#[test]
fn handshake_limit_drops_a_client_that_never_reads() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "a.img", 1 << 20, &[]);
    let s = Server::unix(
        QNBD,
        &[
            "-t",
            "-e",
            "1",
            "--handshake-limit",
            "2",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    let mut c = UnixStream::connect(s.socket.as_ref().unwrap()).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    // NBD_OPT_LIST over and over: each asks for a reply we never read.
    let mut list = b"IHAVEOPT".to_vec();
    list.extend_from_slice(&3u32.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    let flood = list.repeat(4096);
    while c.write_all(&flood).is_ok() {}
    std::thread::sleep(Duration::from_secs(3));
    let start = std::time::Instant::now();
    let out = run(std::process::Command::new("timeout")
        .args(["20", "qemu-img", "info", "--output=json"])
        .arg(s.uri()));
    assert!(
        out.status.success(),
        "the next client was not served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(c);
}

/// Extended headers with `base:allocation` selected, then BLOCK_STATUS with a payload that
/// selects contexts by id: one naming none, one naming an id twice, one naming an unknown
/// id each get EINVAL (as qemu-nbd; a request naming none once got no reply at all), and
/// the connection goes on: a good one gets its extents.
#[test]
fn block_status_payloads_naming_no_known_context_get_einval() {
    block_status_payloads(QNBD);
    if have("qemu-nbd") {
        block_status_payloads("qemu-nbd");
    }
}

fn block_status_payloads(bin: &str) {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "bs.raw", 1 << 20, &[]);
    let s = Server::unix(bin, &["-f", "raw", "-t", img.to_str().unwrap()]);
    let mut c = UnixStream::connect(s.socket.as_ref().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let opt = |c: &mut UnixStream, code: u32, data: &[u8]| {
        send_opt(c, code, data);
        // Replies up to the last one; the id of a REP_META_CONTEXT, if any.
        let mut id = None;
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).unwrap();
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            c.read_exact(&mut d).unwrap();
            match typ {
                1 => return id,
                4 => id = Some(u32::from_be_bytes(d[..4].try_into().unwrap())),
                3 => {}
                t => panic!("option {code}: reply type {t:#x}"),
            }
        }
    };
    opt(&mut c, 11, &[]);
    let q = b"base:allocation";
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
    meta.extend_from_slice(q);
    let id = opt(&mut c, 10, &meta).expect("a context id");
    opt(&mut c, 7, &[0, 0, 0, 0, 0, 0]);
    let block_status = |c: &mut UnixStream, cookie: u64, ids: &[u32]| -> (u16, u32) {
        let mut payload = 4096u64.to_be_bytes().to_vec();
        for i in ids {
            payload.extend_from_slice(&i.to_be_bytes());
        }
        let mut m = 0x21e4_1c71u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0x20u16.to_be_bytes()); // PAYLOAD_LEN
        m.extend_from_slice(&7u16.to_be_bytes()); // BLOCK_STATUS
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        m.extend_from_slice(&payload);
        c.write_all(&m).unwrap();
        // Chunks up to DONE: (last chunk type, error number of an error chunk).
        loop {
            let mut h = [0u8; 32];
            c.read_exact(&mut h).expect("a reply, not silence");
            assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6e8a_278c);
            let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
            let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
            assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
            let mut d = vec![0u8; u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize];
            c.read_exact(&mut d).unwrap();
            let err = if typ & 0x8000 != 0 {
                u32::from_be_bytes(d[..4].try_into().unwrap())
            } else {
                0
            };
            if flags & 1 != 0 {
                return (typ, err);
            }
        }
    };
    assert_eq!(block_status(&mut c, 1, &[]), (0x8001, 22));
    assert_eq!(block_status(&mut c, 2, &[id, id]), (0x8001, 22));
    assert_eq!(block_status(&mut c, 3, &[id + 100]), (0x8001, 22));
    assert_eq!(block_status(&mut c, 4, &[id]).1, 0);
}
