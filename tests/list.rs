//! `qemu-nbd -L` (qemu's NBD client) prints the same listing for qnbd as for qemu-nbd.

mod common;
use common::*;
use std::process::Command;

#[test]
fn qemu_nbd_list_sees_qnbd_as_it_sees_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "l.raw", 64 << 20, &[]);
    let img = img.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-x", "exp2", "-D", "desc two", "-A", "-e", "3"],
        vec!["-x", "exp1", "-D", "my description", "-r"],
        vec![],
    ];
    for args in cases {
        let mut all = vec!["-f", "raw", "-t"];
        all.extend(args.iter());
        all.push(img);
        let mut outs = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let s = Server::unix(bin, &all);
            outs.push(ok(Command::new("qemu-nbd")
                .arg("-L")
                .arg("-k")
                .arg(s.socket.as_ref().unwrap())));
        }
        assert_eq!(outs[0], outs[1], "qemu-nbd -L output for {args:?}");
    }
}
