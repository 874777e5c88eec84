//! `--fork` as qemu-nbd does it: the parent relays the child's stderr until the child is ready,
//! then exits 0 if the child printed nothing and 1 if it did (or died first). Once serving,
//! the daemon's stderr is /dev/null, or with `-v` the caller's stderr (qemu-nbd's
//! `old_stderr`), where it goes on reporting failed negotiations and the like.

use nix::unistd::{dup, dup2, fork, pipe, setsid, ForkResult};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::io::RawFd;

/// Held by the child until it is serving.
pub struct Readiness {
    old_stderr: RawFd,
    /// The caller's stdout, for what the parent would print (`-c auto`'s device).
    old_stdout: RawFd,
}

/// Fork. Returns in the child only; the parent exits once the child is ready.
pub fn fork_and_wait(keep_stderr: bool) -> std::io::Result<Readiness> {
    let (rd, wr): (OwnedFd, OwnedFd) = pipe()?;
    // SAFETY: called before any thread is started, so the child owns a consistent copy.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(wr);
            let mut relay = File::from(rd);
            let mut buf = [0u8; 4096];
            let mut printed = false;
            let mut stderr = std::io::stderr();
            loop {
                match relay.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        printed = true;
                        let _ = stderr.write_all(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let died = matches!(
                nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
                Ok(nix::sys::wait::WaitStatus::Exited(..))
                    | Ok(nix::sys::wait::WaitStatus::Signaled(..))
            );
            std::process::exit(if printed || died { 1 } else { 0 });
        }
        ForkResult::Child => {
            drop(rd);
            setsid()?;
            // A daemon keeps none of the caller's terminal or pipes: once ready, stderr is
            // /dev/null (unless `-v`), so `$(qnbd --fork …)` returns as soon as the parent
            // exits.
            let null = File::options().read(true).write(true).open("/dev/null")?;
            let old_stdout = dup(1)?;
            let old_stderr = dup(if keep_stderr { 2 } else { null.as_raw_fd() })?;
            dup2(null.as_raw_fd(), 0)?;
            dup2(null.as_raw_fd(), 1)?;
            let wr = wr.into_raw_fd();
            dup2(wr, 2)?;
            nix::unistd::close(wr)?;
            Ok(Readiness {
                old_stderr,
                old_stdout,
            })
        }
    }
}

impl Readiness {
    /// Print a line on the caller's stdout (the daemon's own stdout is /dev/null).
    pub fn println(&self, line: &str) {
        let _ = nix::unistd::write(
            // SAFETY: old_stdout is a descriptor this struct owns until `ready` closes it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.old_stdout) },
            format!("{line}\n").as_bytes(),
        );
    }

    /// Serving: point stderr at /dev/null (or the caller's, with `-v`), which closes the
    /// pipe and lets the parent exit.
    pub fn ready(self) {
        let _ = nix::unistd::close(self.old_stdout);
        let _ = dup2(self.old_stderr, 2);
        let _ = nix::unistd::close(self.old_stderr);
    }
}

/// Fork when `fork` (`--fork`, or `-c` without `-v`), before anything is opened.
pub fn fork_if(fork: bool, keep_stderr: bool) -> Option<Readiness> {
    if !fork {
        return None;
    }
    match fork_and_wait(keep_stderr) {
        Ok(r) => Some(r),
        Err(e) => crate::die(format!("Failed to fork: {e}")),
    }
}

/// `--pid-file`: written once the server is about to serve, and left behind at exit as
/// qemu-nbd leaves it (qemu's iotests remove it themselves, and fail if it is gone). As qemu's
/// qemu_write_pidfile: the file stays open with a write lock held, so a second server
/// given the same file fails ("Cannot lock pid file") instead of taking it over.
pub fn write_pid_file(path: Option<&std::path::Path>) {
    if let Some(p) = path {
        if let Err(e) = lock_and_write_pid(p) {
            crate::die(e);
        }
    }
}

fn lock_and_write_pid(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let errno = |what: &str, e: std::io::Error| format!("{what}: {}", backends::errno_text(&e));
    let mut f = loop {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| errno(&format!("Could not create '{}'", path.display()), e))?;
        let ino = f
            .metadata()
            .map_err(|e| errno("Cannot stat file", e))?
            .ino();
        // SAFETY: an all-zero flock is valid; the fields that matter are set below.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_SETLK on an open descriptor with a valid flock.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lock) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(errno("Cannot lock pid file", e));
        }
        // The path locked must still be the file: another server may have raced us.
        if std::fs::metadata(path).is_ok_and(|m| m.ino() == ino) {
            break f;
        }
    };
    let written = f
        .set_len(0)
        .map_err(|e| errno("Failed to truncate pid file", e))
        .and_then(|()| {
            f.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(|_| "Failed to write pid file".to_string())
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // The lock lasts as long as the descriptor: to the end of the process.
    std::mem::forget(f);
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP: flush, remove what we created, exit 0 (as qemu-nbd).
/// With `--stats`, SIGUSR1 prints a report and the server goes on.
pub fn install_signal_handlers(stats: Option<crate::stats::Reporter>) {
    install_exit_handlers();
    if let Some(r) = stats {
        install_report_handler(r);
    }
}

/// SIGTERM, SIGINT and SIGHUP: flush, remove what we created, exit 0. Installed before the
/// image opens, as qemu-nbd installs its handler first thing: a signal during the open then
/// waits for it (`cleanup::run` waits for the record the open holds) and closes the image,
/// instead of killing the process half way through a repair or with the image marked in use.
pub fn install_exit_handlers() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    spawn_signal_thread(&[SIGTERM, SIGINT, SIGHUP], |sig| {
        tracing::info!("signal {sig}: shutting down");
        crate::cleanup::run();
        std::process::exit(0);
    });
}

/// `--stats`: SIGUSR1 prints a report and the server goes on.
pub fn install_report_handler(r: crate::stats::Reporter) {
    spawn_signal_thread(&[signal_hook::consts::SIGUSR1], move |_| {
        r.report("SIGUSR1")
    });
}

fn spawn_signal_thread(wanted: &[i32], on: impl Fn(i32) + Send + 'static) {
    let mut signals = match signal_hook::iterator::Signals::new(wanted) {
        Ok(s) => s,
        Err(e) => crate::die(format!("cannot install signal handlers: {e}")),
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                on(sig);
            }
        });
    if let Err(e) = spawned {
        crate::die(format!("cannot start the signal thread: {e}"));
    }
}

/// Print a line for the caller: through `r` in a forked daemon, else on stdout.
pub fn println(r: Option<&Readiness>, line: &str) {
    match r {
        Some(r) => r.println(line),
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}
