//! qcow2 images with an external data file (`data_file=`, `data_file_raw=on`) against
//! qemu-img and qemu-io: where the data lands, what qemu-img check says, and the errors qemu
//! gives for a bad mapping or a missing data file.

mod common;
use backends::{Error, IoFlags};
use common::{open_qcow2, run};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A 4 MiB image in `dir` whose data file is `dir/d.raw` (named absolutely: qemu opens a
/// relative name from the current directory).
fn create(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("d.raw");
    let opts = format!("data_file={}{extra}", data.display());
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opts, "e.qcow2", "4M"],
    );
    (dir.join("e.qcow2"), data)
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// The first L2 table's offset (the image's one L1 entry).
fn l2_offset(img: &Path) -> u64 {
    let h = read_at(img, 40, 8);
    let l1 = u64::from_be_bytes(h.try_into().unwrap());
    let e = read_at(img, l1, 8);
    u64::from_be_bytes(e.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
}

#[test]
fn data_lands_at_guest_offsets_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = create(dir.path(), "");
    {
        let q = open_qcow2(&img, false).unwrap();
        // Guest cluster 0 lives at host offset 0 (COPIED, offset 0).
        q.write(0, &[0x11; 4096], IoFlags::empty()).unwrap();
        q.write(200 << 10, &[0x22; 8192], IoFlags::FUA).unwrap();
        q.write_zeroes(1 << 20, 64 << 10, IoFlags::empty()).unwrap();
        let mut buf = vec![0u8; 8192];
        q.read(200 << 10, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x22));
        q.flush().unwrap();
    }
    assert!(read_at(&data, 0, 4096).iter().all(|&b| b == 0x11));
    assert!(read_at(&data, 4096, 4096).iter().all(|&b| b == 0));
    assert!(read_at(&data, 200 << 10, 8192).iter().all(|&b| b == 0x22));
    let check = run(dir.path(), "qemu-img", &["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    let io = run(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 4k",
            "-c",
            "read -P 0x22 200k 8k",
            "-c",
            "read -P 0 1M 64k",
            img.to_str().unwrap(),
        ],
    );
    assert!(!io.contains("fail"), "{io}");
}

#[test]
fn a_raw_data_file_stays_the_guest_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = create(dir.path(), ",data_file_raw=on");
    {
        let q = open_qcow2(&img, false).unwrap();
        q.write(0, &vec![0x33; 1 << 20], IoFlags::empty()).unwrap();
        // Zeroing keeps the L2 entries (preallocated) and must zero the data file too.
        q.write_zeroes(64 << 10, 128 << 10, IoFlags::empty())
            .unwrap();
        q.write_zeroes(512 << 10, 4096, IoFlags::empty()).unwrap();
        q.flush().unwrap();
    }
    let view = dir.path().join("view.raw");
    run(
        dir.path(),
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            view.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&view).unwrap() == std::fs::read(&data).unwrap());
    let info = run(dir.path(), "qemu-img", &["info", img.to_str().unwrap()]);
    assert!(info.contains("data file raw: true"), "{info}");
}

#[test]
fn a_mapping_off_its_guest_offset_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = create(dir.path(), "");
    run(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 64k 64k",
            img.to_str().unwrap(),
        ],
    );
    let entry = l2_offset(&img) + 8;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&(0x8000_0000_0002_0000u64).to_be_bytes(), entry)
        .unwrap();
    // A zero flag with COPIED and no offset maps nothing (qemu's ZERO_PLAIN): no check.
    let zero_plain = l2_offset(&img) + 16;
    f.write_all_at(&(0x8000_0000_0000_0001u64).to_be_bytes(), zero_plain)
        .unwrap();
    let q = open_qcow2(&img, true).unwrap();
    let mut buf = [1u8; 512];
    q.read(128 << 10, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 512]);
    let e = q.read(64 << 10, &mut [0u8; 512]).unwrap_err();
    assert!(
        e.to_string().contains(
            "External data file host cluster offset 0x20000 does not match guest cluster offset: 0x10000"
        ),
        "{e}"
    );
}

#[test]
fn open_errors_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = create(dir.path(), "");
    std::fs::rename(&data, dir.path().join("gone.raw")).unwrap();
    let e = open_qcow2(&img, true).unwrap_err().to_string();
    assert!(
        e.contains(&format!("Could not open '{}'", data.display())),
        "{e}"
    );
    std::fs::rename(dir.path().join("gone.raw"), &data).unwrap();

    // The name dropped from the header: the file must be given.
    run(
        dir.path(),
        "qemu-img",
        &["amend", "-o", "data_file=", img.to_str().unwrap()],
    );
    let e = open_qcow2(&img, true).unwrap_err().to_string();
    assert_eq!(e, "'data-file' is required for this image");

    // The raw bit without a data file.
    let plain = dir.path().join("p.qcow2");
    run(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "p.qcow2", "1M"],
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&plain)
        .unwrap();
    f.write_all_at(&2u64.to_be_bytes(), 88).unwrap();
    let e = open_qcow2(&plain, true).unwrap_err();
    assert!(matches!(e, Error::Open(_)), "{e}");
    assert_eq!(e.to_string(), "data-file-raw requires a data file");
}
