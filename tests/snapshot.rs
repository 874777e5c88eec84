//! `-s`: writes go to a throw-away overlay; the image file never changes and nothing is left
//! behind, whether qnbd exits by itself or by SIGTERM.

mod common;
use common::*;
use std::process::{Command, Stdio};

#[test]
fn snapshot_writes_never_reach_the_file() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let tmp = dir.path().join("tmpdir");
    std::fs::create_dir(&tmp).unwrap();
    let img = make_raw(dir.path(), "s.raw", 4 << 20, &[(0, &[0x5a; 100_000])]);
    let before = std::fs::read(&img).unwrap();
    for how in ["exit", "sigterm"] {
        let sock = dir.path().join(format!("{how}.sock"));
        let mut child = Command::new(QNBD)
            .args(["-f", "raw", "-s", "-k"])
            .arg(&sock)
            .args(if how == "sigterm" { vec!["-t"] } else { vec![] })
            .arg(&img)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let out = ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x11 1000 70000",
            "-c",
            "write -z 1M 1M",
            "-c",
            "read -P 0x11 1000 70000",
            "-c",
            "read -P 0x5a 0 1000",
            "-c",
            "read -P 0 1M 1M",
            &uri,
        ]));
        assert!(!out.contains("verification failed"), "{out}");
        if how == "sigterm" {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        let st = child.wait().unwrap();
        assert!(st.success(), "{how}: {st}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{how}: the image file changed"
        );
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "{how}: a temporary file is left"
        );
    }
}
