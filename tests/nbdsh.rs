//! Protocol-level checks through Python libnbd (nbdsh's library): structured replies,
//! sparse reads, block status, FUA, fast zero, errors, meta contexts, `-e`.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    make_raw(dir, "img.raw", 16 * MIB, &[(MIB, &[b'A'; 65536])])
}

/// qnbd with `args` on a Unix socket or on TCP.
fn serve_on(transport: &str, args: &[&str]) -> Server {
    match transport {
        "unix" => Server::unix(QNBD, args),
        // Reads spliced as to a client across a network (see `splice_reads_pay`).
        "tcp-spliced" => Server::tcp_env(QNBD, args, &[("QNBD_SPLICE_READS", "on")]),
        // Reads copied, as to a client on this host while other connections transmit.
        "tcp-copied" => Server::tcp_env(QNBD, args, &[("QNBD_SPLICE_READS", "off")]),
        _ => Server::tcp(QNBD, args),
    }
}

#[test]
fn structured_replies_block_status_fua_zero_and_range_errors() {
    if !have_nbdsh() {
        return;
    }
    for transport in ["unix", "tcp"] {
        let dir = tmpdir();
        let img = image(dir.path());
        let args = ["-f", "raw", "-t", img.to_str().unwrap()];
        let s = serve_on(transport, &args);
        assert_eq!(nbdsh_script("structured.py", &s.uri(), &[]).trim(), "ok");
    }
}

#[test]
fn large_reads_return_the_file_bytes_whatever_path_they_take() {
    if !have_nbdsh() {
        return;
    }
    // Raw over Unix (spliced from the page cache) and TCP (copied, as to a client on this
    // host while other connections transmit; spliced, as to a lone one or a client across a
    // network), probed raw (a filter that lets splicing through), a slice (offsets
    // shifted), and O_DIRECT (never spliced).
    let cases: [(&str, &[&str]); 7] = [
        ("unix", &["-f", "raw"]),
        ("tcp-copied", &["-f", "raw"]),
        ("tcp-spliced", &["-f", "raw"]),
        ("unix", &[]),
        ("unix", &["-f", "raw", "--cache=none"]),
        ("tcp-copied", &["--image-opts"]),
        ("tcp-spliced", &["--image-opts"]),
    ];
    for (transport, opts) in cases {
        let dir = tmpdir();
        let len = 8 * MIB as usize + 300;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let img = dir.path().join("big.raw");
        std::fs::write(&img, &bytes).unwrap();
        let spec;
        let mut args: Vec<&str> = opts.to_vec();
        args.push("-t");
        if opts.contains(&"--image-opts") {
            // A slice of a larger file: the export is the file's last 8 MiB + 300 bytes.
            let outer = dir.path().join("outer.raw");
            let mut o = vec![0xeeu8; 3 * 4096];
            o.extend_from_slice(&bytes);
            std::fs::write(&outer, &o).unwrap();
            spec = format!(
                "driver=raw,offset=12288,file.driver=file,file.filename={}",
                outer.display()
            );
            args.push(&spec);
        } else {
            args.push(img.to_str().unwrap());
        }
        let s = serve_on(transport, &args);
        let file = if opts.contains(&"--image-opts") {
            dir.path().join("outer.raw")
        } else {
            img.clone()
        };
        let out = if opts.contains(&"--image-opts") {
            // The script takes the export's bytes from `img`, and shrinks the outer file.
            nbdsh_script(
                "large_reads.py",
                &s.uri(),
                &[img.to_str().unwrap(), file.to_str().unwrap(), "12288"],
            )
        } else {
            nbdsh_script("large_reads.py", &s.uri(), &[img.to_str().unwrap()])
        };
        assert_eq!(out.trim(), "ok", "{transport} {opts:?}");
    }
}

#[test]
fn large_reads_of_a_read_only_qcow2_return_its_bytes() {
    if !have_nbdsh() {
        return;
    }
    // Read-only qcow2 reads of contiguous data clusters are spliced: clusters written out of
    // order (so the file holds them out of order), a zeroed and an unallocated run, a
    // subcluster-sized piece of an extended-L2 image, compressed clusters.
    let dir = tmpdir();
    let d = dir.path();
    let writes = [
        "write -P 1 0 3M",
        "write -P 2 5M 1M",
        "write -P 3 4M 512k",
        "write -P 4 3M 1M",
        "write -P 5 1M 64k",
        "write -z 2M 192k",
        "write -P 6 6M 1M",
        "write -P 7 6400k 4k",
    ];
    make_qcow2(d, "plain.qcow2", "cluster_size=65536", "8M");
    qemu_io(d, "qcow2", "plain.qcow2", &writes);
    make_qcow2(d, "ext.qcow2", "cluster_size=65536,extended_l2=on", "8M");
    qemu_io(d, "qcow2", "ext.qcow2", &writes);
    qemu_io(d, "qcow2", "ext.qcow2", &["write -P 8 7M 2k"]);
    qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "plain.qcow2", "comp.qcow2"],
    );
    qemu_io(d, "qcow2", "comp.qcow2", &["write -P 9 1M 2M"]);
    for name in ["plain", "ext", "comp"] {
        let img = d.join(format!("{name}.qcow2"));
        let want = d.join(format!("{name}.raw"));
        qemu_img(
            d,
            &[
                "convert",
                "-O",
                "raw",
                &format!("{name}.qcow2"),
                &format!("{name}.raw"),
            ],
        );
        // Writable images splice too (see `contiguous_span`); nothing writes here.
        for (transport, mode) in [
            ("unix", "-r"),
            ("tcp-copied", "-r"),
            ("tcp-spliced", "-r"),
            ("unix", "--cache=writeback"),
            ("tcp-spliced", "--cache=writeback"),
        ] {
            let s = serve_on(
                transport,
                &[mode, "-f", "qcow2", "-t", img.to_str().unwrap()],
            );
            let out = nbdsh_script(
                "large_reads.py",
                &s.uri(),
                &[want.to_str().unwrap(), "-", "0"],
            );
            assert_eq!(out.trim(), "ok", "{name} over {transport} {mode}");
        }
    }
}

#[test]
fn large_reads_of_a_qcow2_being_written_return_the_latest_bytes() {
    if !have_nbdsh() {
        return;
    }
    // Writable qcow2 reads are spliced too: between batches of writes, zeroings and trims
    // (ignored without --discard=unmap), reads must show the latest bytes of their own
    // range. Plain, extended-L2, small-cluster and v2 images (v2 and --discard=unmap copy).
    let dir = tmpdir();
    let d = dir.path();
    let images = [
        ("plain", "cluster_size=65536", "--cache=writeback"),
        (
            "ext",
            "cluster_size=65536,extended_l2=on",
            "--cache=writeback",
        ),
        ("small", "cluster_size=4096", "--cache=writeback"),
        ("v2", "compat=0.10", "--cache=writeback"),
        ("trimmed", "cluster_size=65536", "--discard=unmap"),
    ];
    for (seed, (name, opts, mode)) in images.into_iter().enumerate() {
        let file = format!("{name}.qcow2");
        make_qcow2(d, &file, opts, "16M");
        for transport in ["unix", "tcp-spliced"] {
            let img = d.join(&file);
            let mut s = serve_on(
                transport,
                &[mode, "-f", "qcow2", "-t", img.to_str().unwrap()],
            );
            let out = nbdsh_script("rewritten_reads.py", &s.uri(), &[&seed.to_string()]);
            assert_eq!(out.trim(), "ok", "{name} over {transport}");
            // Closed as qemu-nbd closes it: the image is left without leaks.
            s.terminate();
        }
        check_clean(&d.join(&file));
    }
}

#[test]
fn large_writes_land_byte_for_byte_whatever_path_they_take() {
    if !have_nbdsh() {
        return;
    }
    // Raw over Unix and TCP (payloads spliced into the page cache: forced, since a lone
    // connection's payloads are copied by default), probed raw (whose first sector is
    // checked the usual way), a slice (offsets shifted), detect-zeroes (which must see the
    // data), write-through and O_DIRECT (never spliced).
    let cases: [(&str, &[&str]); 7] = [
        ("unix", &["-f", "raw"]),
        ("tcp", &["-f", "raw"]),
        ("unix", &[]),
        ("tcp", &["--image-opts"]),
        ("unix", &["-f", "raw", "--detect-zeroes=on"]),
        ("unix", &["-f", "raw", "--cache=writethrough"]),
        ("unix", &["-f", "raw", "--cache=none"]),
    ];
    for (transport, opts) in cases {
        let dir = tmpdir();
        let len = 8 * MIB as usize + 300;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 5 + i / 4096) as u8).collect();
        let img = dir.path().join("big.raw");
        let mut file_bytes = Vec::new();
        let slice = opts.contains(&"--image-opts");
        if slice {
            // The export is the file's last 8 MiB + 300 bytes.
            file_bytes.extend_from_slice(&[0xeeu8; 3 * 4096]);
        }
        file_bytes.extend_from_slice(&bytes);
        std::fs::write(&img, &file_bytes).unwrap();
        let spec = format!(
            "driver=raw,offset=12288,file.driver=file,file.filename={}",
            img.display()
        );
        let mut args: Vec<&str> = opts.to_vec();
        args.push("-t");
        args.push(if slice { &spec } else { img.to_str().unwrap() });
        let forced = [("QNBD_SPLICE_WRITES", "on")];
        let s = match transport {
            "unix" => Server::unix_env(QNBD, &args, &forced),
            _ => Server::tcp_env(QNBD, &args, &forced),
        };
        let base = if slice { "12288" } else { "0" };
        let out = nbdsh_script("large_writes.py", &s.uri(), &[img.to_str().unwrap(), base]);
        assert_eq!(out.trim(), "ok", "{transport} {opts:?}");
        if slice {
            let now = std::fs::read(&img).unwrap();
            assert!(
                now[..12288].iter().all(|&b| b == 0xee),
                "a slice's writes went before its start"
            );
        }
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    let s = Server::unix(QNBD, &["-f", "raw", "-r", "-t", img.to_str().unwrap()]);
    assert_eq!(nbdsh_script("readonly.py", &s.uri(), &[]).trim(), "ok");
}

#[test]
fn meta_context_lists_match_qemu_rules() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    assert_eq!(
        nbdsh_script("meta.py", &s.uri(), &["base:allocation"]).trim(),
        "ok"
    );
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-A", img.to_str().unwrap()]);
    assert_eq!(
        nbdsh_script(
            "meta.py",
            &s.uri(),
            &["base:allocation,qemu:allocation-depth"]
        )
        .trim(),
        "ok"
    );
    // The same script passes against qemu-nbd: the rules are qemu's.
    if have("qemu-nbd") {
        let s = Server::unix(
            "qemu-nbd",
            &["-f", "raw", "-t", "-A", img.to_str().unwrap()],
        );
        assert_eq!(
            nbdsh_script(
                "meta.py",
                &s.uri(),
                &["base:allocation,qemu:allocation-depth"]
            )
            .trim(),
            "ok"
        );
    }
}

#[test]
fn shared_limits_clients_like_qemu_nbd() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    for n in ["1", "4"] {
        let s = Server::unix(QNBD, &["-f", "raw", "-t", "-e", n, img.to_str().unwrap()]);
        assert_eq!(
            nbdsh_script("shared.py", &s.uri(), &[n]).trim(),
            "ok",
            "-e {n}"
        );
    }
}

#[test]
fn an_idle_connection_after_a_burst_of_single_requests_costs_no_cpu() {
    if !have_nbdsh() {
        return;
    }
    for transport in ["unix", "tcp"] {
        let dir = tmpdir();
        let img = make_raw(dir.path(), "img.raw", 16 * MIB, &[]);
        let args = ["-f", "raw", "-t", img.to_str().unwrap()];
        let s = serve_on(transport, &args);
        let pid = s.child.id().to_string();
        assert_eq!(nbdsh_script("idle_cpu.py", &s.uri(), &[&pid]).trim(), "ok");
    }
}

#[test]
fn reads_of_any_size_send_holes_as_qemu_nbd_does() {
    if !have_nbdsh() {
        return;
    }
    // Raw, whose holes the server finds with lseek (and remembers a data region of).
    for transport in ["unix", "tcp"] {
        let dir = tmpdir();
        let img = make_raw(dir.path(), "img.raw", MIB, &[(65536, &[b'A'; 65536])]);
        let args = ["-f", "raw", "-t", "--discard=unmap", img.to_str().unwrap()];
        let s = serve_on(transport, &args);
        assert_eq!(nbdsh_script("holes.py", &s.uri(), &["raw"]).trim(), "ok");
    }
    let dir = tmpdir();
    // qcow2 with 512-byte clusters and a zero cluster (libnbd's interop structured-read).
    let q = make_qcow2(dir.path(), "sr.qcow2", "cluster_size=512,compat=v3", "3k");
    qemu_io(
        dir.path(),
        "qcow2",
        "sr.qcow2",
        &["w -P 1 0 3k", "w -zu 2k 512"],
    );
    let s = Server::unix(QNBD, &["-f", "qcow2", "-t", q.to_str().unwrap()]);
    assert_eq!(nbdsh_script("holes.py", &s.uri(), &["qcow2"]).trim(), "ok");
}

#[test]
fn block_sizes_follow_what_the_client_asked_for() {
    if !have_nbdsh() {
        return;
    }
    // Probed raw: qemu-nbd keeps sector granularity (the block-0 write guard); -f raw has
    // byte granularity (libnbd's interop-qemu-block-size).
    for (opts, align) in [(&[][..], "512"), (&["-f", "raw"][..], "1")] {
        let dir = tmpdir();
        let img = make_raw(dir.path(), "img.raw", MIB, &[]);
        let mut args = opts.to_vec();
        args.extend(["-t", img.to_str().unwrap()]);
        let s = Server::unix(QNBD, &args);
        assert_eq!(
            nbdsh_script("block_size.py", &s.uri(), &[align]).trim(),
            "ok",
            "{opts:?}"
        );
    }
}
