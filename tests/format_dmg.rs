//! Apple disk images (dmg) against qemu-nbd: images built by tests/tools/make_dmg.py (XML
//! and resource-fork tables, several partitions, raw, zlib, zero, ignore, comment and
//! terminator chunks, a data fork that does not start the file, an odd file size) read
//! request for request as qemu-nbd reads them, map as it maps them, refuse writes and
//! writable opens as it does; damaged trailers and tables get qemu-nbd's words; hostile
//! chunks fail their reads while the server goes on serving.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The chunks of the first partition most images here use: a size that is not a multiple
/// of any chunk, every chunk type qemu's Debian build knows and the two it skips.
const MIXED: &str = r#"{"type":"raw","sectors":8},{"type":"zlib","sectors":16},
    {"type":"zero","sectors":2048},{"type":"ignore","sectors":8},{"type":"comment"},
    {"type":"zlib","sectors":3},{"type":"raw","sectors":5},{"type":"term"}"#;

fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tools")
        .join(name)
}

/// `d/name` built from `spec`, and the guest bytes it stands for (`name.raw`).
fn make(d: &Path, name: &str, spec: &str) -> (PathBuf, PathBuf) {
    let img = d.join(name);
    let raw = d.join(format!("{name}.raw"));
    ok(Command::new(PYTHON)
        .arg(tool("make_dmg.py"))
        .arg(&img)
        .arg(spec)
        .arg(&raw));
    (img, raw)
}

fn two_partitions(form: &str) -> String {
    format!(
        r#"{{"form":"{form}","partitions":[{{"chunks":[{MIXED}]}},
        {{"chunks":[{{"type":"zlib","sectors":100}},{{"type":"raw","sectors":1}}]}}]}}"#
    )
}

/// Every 4 KiB request's result (a digest or ERR), and the answer to a write.
fn blocks(uri: &str) -> String {
    nbdsh_script("dmg_blocks.py", uri, &[])
}

fn map(uri: &str) -> String {
    ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]))
}

/// Serve `img` (probed; `-r` unless `extra` has `-s`) with qnbd and qemu-nbd: the
/// requests' results and the maps.
fn both(img: &Path, extra: &[&str]) -> [(String, String); 2] {
    let img = img.to_str().unwrap();
    let mut args = vec!["-t"];
    if !extra.contains(&"-s") {
        args.push("-r");
    }
    args.extend(extra);
    args.push(img);
    [QNBD, "qemu-nbd"].map(|bin| {
        let s = Server::unix(bin, &args);
        (blocks(&s.uri()), map(&s.uri()))
    })
}

fn same_as_qemu_nbd(img: &Path, extra: &[&str]) -> String {
    let [ours, theirs] = both(img, extra);
    assert_eq!(
        ours.0,
        theirs.0,
        "{}: reads differ from qemu-nbd's",
        img.display()
    );
    assert_eq!(
        ours.1,
        theirs.1,
        "{}: map differs from qemu-nbd's",
        img.display()
    );
    ours.0
}

/// qnbd (probing, `-r`) reads `img` as the raw file `raw`.
fn reads_as(img: &Path, raw: &Path) {
    let s = Server::unix(QNBD, &["-r", "-t", img.to_str().unwrap()]);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(s.uri()));
    assert!(
        out.contains("Images are identical"),
        "{}: {out}",
        img.display()
    );
}

fn tools() -> bool {
    have("qemu-img") && have("qemu-nbd") && have_nbdsh()
}

#[test]
fn images_read_and_map_as_qemu_nbd_serves_them() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let p = d.path();
    let mut images = vec![
        make(p, "xml.dmg", &two_partitions("xml")),
        make(p, "rsrc.dmg", &two_partitions("rsrc")),
        // The data fork after a kilobyte, a mish block with its own data offset, a
        // partition that starts past the previous one's end (the gap reads fail, in qemu
        // as here) and a trailer that claims more sectors than any chunk holds.
        make(
            p,
            "offsets.dmg",
            &format!(
                r#"{{"data_fork_offset":1024,"sectors":2200,"partitions":[{{"chunks":[{MIXED}]}},
                {{"first":2110,"data_offset":0,"chunks":[{{"type":"raw","sectors":9}}]}}]}}"#
            ),
        ),
    ];
    // An odd file size: the trailer is not the last 512 bytes (qemu looks for it in a window
    // of the size rounded up to a sector).
    let (odd, odd_raw) = make(p, "odd.dmg", &two_partitions("xml"));
    let mut bytes = std::fs::read(&odd).unwrap();
    bytes.extend_from_slice(&[0u8; 200]);
    std::fs::write(&odd, bytes).unwrap();
    images.push((odd, odd_raw));
    for (img, raw) in &images {
        let out = same_as_qemu_nbd(img, &[]);
        assert!(out.ends_with("write EPERM\n"), "{}: {out}", img.display());
        if img.ends_with("offsets.dmg") {
            assert!(out.contains(" ERR\n"), "the gap reads fail: {out}");
        } else {
            assert!(!out.contains("ERR"), "{}: {out}", img.display());
            reads_as(img, raw);
        }
    }
    // Named: the same with -f dmg, and a name without the suffix probes as raw in both.
    same_as_qemu_nbd(&images[0].0, &["-f", "dmg"]);
    // (Only the reads: the map of a raw file whose size is not a multiple of a sector
    // differs in its last sector, a raw matter.)
    let plain = p.join("xml.img");
    std::fs::copy(&images[0].0, &plain).unwrap();
    let [ours, theirs] = both(&plain, &[]);
    assert_eq!(ours.0, theirs.0);
    assert!(ours.0.starts_with("size 10752\n"), "{}", ours.0);
    // -s: the image is the read-only backing file of a temporary overlay, which takes
    // the write.
    let out = same_as_qemu_nbd(&images[0].0, &["-s"]);
    assert!(out.ends_with("write ok\n"), "{out}");
}

#[test]
fn bzip2_chunks_are_read_although_debians_qemu_drops_them() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let (img, raw) = make(
        d.path(),
        "bz.dmg",
        r#"{"partitions":[{"chunks":[{"type":"raw","sectors":8},{"type":"bz2","sectors":24},
            {"type":"zlib","sectors":8}]}]}"#,
    );
    reads_as(&img, &raw);
    // qemu 10.0.2 without its dmg-bz2 module drops the chunk: its sectors fail there.
    let [ours, theirs] = both(&img, &[]);
    assert!(!ours.0.contains("ERR"), "{}", ours.0);
    assert_eq!(theirs.0.matches(" ERR\n").count(), 3, "{}", theirs.0);
    assert_eq!(ours.1, theirs.1);
}

#[test]
fn lzfse_chunks_are_read() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let p = d.path();
    let plain: Vec<u8> = (0..16 * 512u32)
        .map(|i| {
            if i % 3000 < 700 {
                0
            } else {
                (i * 31 % 253) as u8
            }
        })
        .collect();
    let mut stored = Vec::new();
    lzfse_rust::encode_bytes(&plain, &mut stored).unwrap();
    std::fs::write(p.join("plain"), &plain).unwrap();
    std::fs::write(p.join("stored"), &stored).unwrap();
    let spec = format!(
        r#"{{"partitions":[{{"chunks":[{{"type":"raw","sectors":8}},
        {{"type":"lzfse","sectors":16,"plain":"{0}/plain","stored":"{0}/stored"}},
        {{"type":"zlib","sectors":8}}]}}]}}"#,
        p.display()
    );
    let (img, raw) = make(p, "lz.dmg", &spec);
    reads_as(&img, &raw);
}

/// Exit status 1 and stderr of `bin` refusing `img`, with the program's name made common.
fn refusal(bin: &str, img: &Path, extra: &[&str]) -> String {
    let sock = img.with_extension("sock");
    let out = run(Command::new("timeout")
        .args(["20", bin, "-k", sock.to_str().unwrap()])
        .args(extra)
        .arg(img));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{bin} served {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr)
        .replace("qemu-nbd:", "PROG:")
        .replace("qnbd:", "PROG:")
}

fn refused_alike(img: &Path, extra: &[&str]) -> String {
    let ours = refusal(QNBD, img, extra);
    assert_eq!(ours, refusal("qemu-nbd", img, extra), "{}", img.display());
    ours
}

#[test]
fn writable_opens_are_refused_as_qemu_nbd_refuses_them() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let (img, _) = make(d.path(), "a.dmg", &two_partitions("xml"));
    let msg = refused_alike(&img, &[]);
    assert!(msg.ends_with("a.dmg': Image is read-only\n"), "{msg}");
    refused_alike(&img, &["-f", "dmg"]);
}

/// `src` with `bytes` written at `at` (from the trailer's start when `from_koly`).
fn patched(src: &Path, dst: &Path, at: usize, from_koly: bool, bytes: &[u8]) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    let base = if from_koly {
        b.windows(4).rposition(|w| w == b"koly").unwrap()
    } else {
        0
    };
    b[base + at..base + at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dst, b).unwrap();
    dst.to_path_buf()
}

fn koly_u64(img: &Path, field: usize) -> u64 {
    let b = std::fs::read(img).unwrap();
    let k = b.windows(4).rposition(|w| w == b"koly").unwrap();
    u64::from_be_bytes(b[k + field..k + field + 8].try_into().unwrap())
}

#[test]
fn damaged_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let p = d.path();
    let (xml, _) = make(p, "xml.dmg", &two_partitions("xml"));
    let (rsrc, _) = make(p, "rsrc.dmg", &two_partitions("rsrc"));
    let far = 0x10_0000u64.to_be_bytes();
    let rsrc_at = koly_u64(&rsrc, 0x28) as usize;
    // The last `</data>`: its `<data>` is then never closed.
    let xml_data = std::fs::read(&xml)
        .unwrap()
        .windows(7)
        .rposition(|w| w == b"</data>")
        .unwrap();
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (
            patched(&xml, &p.join("fork.dmg"), 0x18, true, &far),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("xmlat.dmg"), 0xd8, true, &far),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("xmllen.dmg"), 0xe0, true, &far),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("none.dmg"), 0xe0, true, &[0; 8]),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("rsrcat.dmg"), 0x28, true, &far),
            "Invalid",
        ),
        (
            patched(&rsrc, &p.join("rsrclen.dmg"), 0x30, true, &far),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("open.dmg"), xml_data, false, b"</dat_>"),
            "Invalid",
        ),
        (
            patched(&xml, &p.join("neg.dmg"), 0x1ec, true, &[0x80; 8]),
            "Invalid",
        ),
        (
            patched(
                &xml,
                &p.join("huge.dmg"),
                0x1ec,
                true,
                &(1u64 << 54).to_be_bytes(),
            ),
            "Could not refresh total sector count: File too large",
        ),
        (
            patched(
                &xml,
                &p.join("wraps.dmg"),
                0x1ec,
                true,
                &(1u64 << 62).to_be_bytes(),
            ),
            "Failed to determine the NBD export's length: File too large",
        ),
        (
            patched(&xml, &p.join("magic.dmg"), 0, true, b"kolx"),
            "trailer",
        ),
        (
            patched(
                &rsrc,
                &p.join("rdata.dmg"),
                rsrc_at,
                false,
                &[0x7f, 0, 0, 0],
            ),
            "Invalid",
        ),
        (
            patched(&rsrc, &p.join("rcount.dmg"), rsrc_at + 8, false, &[0; 4]),
            "Invalid",
        ),
        (
            patched(
                &rsrc,
                &p.join("rwrap.dmg"),
                rsrc_at + 8,
                false,
                &[0xff, 0xff, 0xff, 0xf8],
            ),
            "Invalid",
        ),
        (
            patched(
                &rsrc,
                &p.join("rlong.dmg"),
                rsrc_at + 16,
                false,
                &[0x7f, 0, 0, 0],
            ),
            "Invalid",
        ),
        (
            make(
                p,
                "count.dmg",
                r#"{"partitions":[{"chunks":[{"type":"raw","sectors":8},{"type":"comment"},
                    {"type":"zlib","sectors":16,"count":131073}]}]}"#,
            )
            .0,
            "sector count 131073 for chunk 1 is larger than max (131072)",
        ),
        (
            make(
                p,
                "length.dmg",
                r#"{"form":"rsrc","partitions":[{"chunks":[{"type":"raw","sectors":8},
                    {"type":"zero","sectors":8,"length":67108865}]}]}"#,
            )
            .0,
            "length 67108865 for chunk 1 is larger than max (67108864)",
        ),
    ];
    // Too short for a trailer (qemu rounds the size up to a sector first), and empty.
    std::fs::write(p.join("short.dmg"), [0u8; 100]).unwrap();
    cases.push((
        p.join("short.dmg"),
        "Could not locate UDIF trailer in dmg file",
    ));
    std::fs::write(p.join("empty.dmg"), []).unwrap();
    for (img, words) in &cases {
        let msg = refused_alike(img, &["-r"]);
        assert!(msg.contains(words), "{}: {msg}", img.display());
    }
    let msg = refused_alike(&p.join("empty.dmg"), &["-r", "-f", "dmg"]);
    assert!(
        msg.contains("dmg file must be at least 512 bytes long"),
        "{msg}"
    );
}

#[test]
fn hostile_chunks_fail_their_reads_and_the_server_goes_on() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let p = d.path();
    // Each image: 8 good raw sectors, then hostile chunks.
    let specs = [
        // Compressed bytes past the file's end, a lying sector count either way, cut data,
        // and a chunk table out of order: reads fail as in qemu.
        r#"{"type":"zlib","sectors":8,"offset":99999999}"#,
        r#"{"type":"zlib","sectors":8,"count":9},{"type":"zlib","sectors":8,"count":7,"sector":17}"#,
        r#"{"type":"zlib","sectors":8,"length":20}"#,
        r#"{"type":"raw","sectors":8,"sector":24},{"type":"raw","sectors":8,"sector":8},
           {"type":"raw","sectors":8,"sector":16}"#,
        // Raw bytes past the file's end read as zeroes (qemu's block layer's rule).
        r#"{"type":"raw","sectors":8,"offset":99999999}"#,
        // An offset qemu cannot read at (past its largest): EIO.
        r#"{"type":"zlib","sectors":8,"offset":9223372036854775000}"#,
    ];
    for (i, chunks) in specs.iter().enumerate() {
        let spec =
            format!(r#"{{"partitions":[{{"chunks":[{{"type":"raw","sectors":8}},{chunks}]}}]}}"#);
        let (img, _) = make(p, &format!("h{i}.dmg"), &spec);
        same_as_qemu_nbd(&img, &[]);
    }
    // Where qemu returns whatever its buffer held (a raw chunk shorter than its sectors),
    // and where Debian's qemu has no decoder (LZFSE garbage): EIO here, and the good
    // sectors after them still read.
    for (i, chunk) in [
        r#"{"type":"raw","sectors":8,"length":1000}"#,
        r#"{"type":"lzfse","sectors":8,"length":100,"offset":0}"#,
    ]
    .iter()
    .enumerate()
    {
        let spec = format!(
            r#"{{"partitions":[{{"chunks":[{{"type":"raw","sectors":8}},{chunk},{{"type":"raw","sectors":8}}]}}]}}"#
        );
        let (img, _) = make(p, &format!("e{i}.dmg"), &spec);
        let s = Server::unix(QNBD, &["-r", "-t", img.to_str().unwrap()]);
        let out = nbdsh_script("dmg_blocks.py", &s.uri(), &[]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[1].starts_with("0 ") && !lines[1].ends_with("ERR"),
            "{out}"
        );
        assert_eq!(lines[2], "4096 ERR", "{out}");
        assert!(!lines[3].ends_with("ERR"), "{out}");
        // The server is still there for a new client.
        assert_eq!(nbdsh_script("dmg_blocks.py", &s.uri(), &[]), out);
    }
}
