//! qemu's image locking (`block/file-posix.c`, qemu 10.0), byte for byte, so qnbd and qemu
//! tools running beside it refuse each other exactly as two qemu processes would.
//!
//! Every permission bit `i` of a node maps to two bytes of the image file: byte `100 + i` is
//! locked while the holder *uses* the permission, byte `200 + i` while it does *not share* it.
//! Every lock is a 1-byte shared `F_RDLCK` set with `F_OFD_SETLK`; conflicts are found by an
//! `F_OFD_GETLK` probe of type `F_WRLCK`, which reports any read lock held by another open
//! file description. Opening is "set, then test": lock everything first, then test the bytes
//! that matter, so of two simultaneous openers at most one can win.
//!
//! This module only knows about one file descriptor and a (perm, shared) pair; which pair an
//! image needs is in [`perms_for`]. It prints nothing except qemu's warnings (the OFD probe, the
//! `locking=on` fallback to POSIX locks, a failed unlock), which qemu also prints directly.

use bitflags::bitflags;
use std::ffi::CStr;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

bitflags! {
    /// qemu's `BLK_PERM_*`: what a node uses (`perm`) or lets others do (`shared`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perm: u8 {
        const CONSISTENT_READ = 0x01;
        const WRITE = 0x02;
        const WRITE_UNCHANGED = 0x04;
        const RESIZE = 0x08;
    }
}

impl Perm {
    /// `BLK_PERM_ALL`.
    pub const ALL: Perm = Perm::all();

    /// qemu's name for one permission bit, as `bdrv_perm_names` writes it in lock messages.
    /// For several bits the names are joined with ", " (as `bdrv_perm_names` does).
    pub fn names(self) -> String {
        let mut out = Vec::new();
        for (bit, name) in [
            (Perm::CONSISTENT_READ, "consistent read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write unchanged"),
            (Perm::RESIZE, "resize"),
        ] {
            if self.contains(bit) {
                out.push(name);
            }
        }
        out.join(", ")
    }
}

/// `RAW_LOCK_PERM_BASE`: byte `100 + i` is held while permission bit `i` is used.
pub const LOCK_PERM_BASE: u32 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + i` is held while permission bit `i` is not shared.
pub const LOCK_SHARED_BASE: u32 = 200;

/// The bits of [`Perm::ALL`], ascending: qemu's `PERM_FOREACH`.
const BITS: [(u32, Perm); 4] = [
    (0, Perm::CONSISTENT_READ),
    (1, Perm::WRITE),
    (2, Perm::WRITE_UNCHANGED),
    (3, Perm::RESIZE),
];

/// qemu's `file.locking=auto|on|off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock when the kernel has OFD locks; otherwise silently do not lock (qemu's default).
    #[default]
    Auto,
    /// Always lock; without OFD locks fall back to POSIX locks after a warning.
    On,
    /// No lock system call at all, neither set nor test.
    Off,
}

/// A `locking=` value qemu does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidLocking(pub String);

impl fmt::Display for InvalidLocking {
    /// qemu: `invalid parameter value: maybe` (the value is matched case-sensitively, so
    /// `ON` is refused too, and an empty value prints nothing after the colon).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid parameter value: {}", self.0)
    }
}

impl std::error::Error for InvalidLocking {}

impl Locking {
    /// Parse the option value exactly as qemu's `qapi_enum_parse(&OnOffAuto_lookup, ...)`.
    pub fn from_name(name: &str) -> Result<Locking, InvalidLocking> {
        match name {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            other => Err(InvalidLocking(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Locking::Auto => "auto",
            Locking::On => "on",
            Locking::Off => "off",
        }
    }
}

impl std::str::FromStr for Locking {
    type Err = InvalidLocking;
    fn from_str(s: &str) -> Result<Locking, InvalidLocking> {
        Locking::from_name(s)
    }
}

/// What a locked file is to the image qnbd serves; selects qemu's (perm, shared) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The file holding a qcow2 image that is exported (qcow2's metadata child under an NBD
    /// export).
    Qcow2,
    /// A raw image that is exported (the raw format passes the export's permissions through).
    Raw,
    /// A backing file at any depth of a chain, and the original image under `-s`: always
    /// opened read-only, whatever the export is.
    Backing,
    /// The external data file of an exported qcow2.
    DataFile,
}

/// qemu 10.0's final (perm, shared) for a file in `role`, as observed in `/proc/locks` for
/// qemu-nbd (the spec's section 5 table):
///
/// | role | rw: P / U | `-r`: P / U |
/// |---|---|---|
/// | Qcow2 | 100 101 103 / 201 203 | 100 / 201 203 |
/// | Raw | 100 101 / 203 | 100 / 203 |
/// | Backing | 100 / 201 203 | 100 / 201 203 |
/// | DataFile | 100 101 103 / 203 | 100 / 203 |
pub fn perms_for(role: Role, read_only: bool) -> (Perm, Perm) {
    use Perm as P;
    let cr = P::CONSISTENT_READ;
    match (role, read_only) {
        // bdrv_default_perms_for_storage, METADATA role: a writable node adds WRITE|RESIZE
        // and never shares WRITE or RESIZE.
        (Role::Qcow2, false) => (cr | P::WRITE | P::RESIZE, cr | P::WRITE_UNCHANGED),
        (Role::Qcow2, true) => (cr, cr | P::WRITE_UNCHANGED),
        // raw passes the export's perm through; nbd_export_create unshares RESIZE.
        (Role::Raw, false) => (cr | P::WRITE, P::ALL - P::RESIZE),
        (Role::Raw, true) => (cr, P::ALL - P::RESIZE),
        // bdrv_default_perms_for_cow, then the read-only backing qcow2's METADATA child.
        (Role::Backing, _) => (cr, cr | P::WRITE_UNCHANGED),
        // DATA role: WRITE implies RESIZE; RESIZE is never shared.
        (Role::DataFile, false) => (cr | P::WRITE | P::RESIZE, P::ALL - P::RESIZE),
        (Role::DataFile, true) => (cr, P::ALL - P::RESIZE),
    }
}

/// The (perm, shared) qemu-nbd's `blk_new_open` gives the file of `role`, before the export
/// exists. Only a raw image differs from [`perms_for`]: the raw node shares everything until
/// `nbd_export_create` unshares RESIZE, so qemu-nbd takes 203 (and tests 103) in a second
/// step, and reports a refusal there without the `Failed to blk_new_open` prefix.
pub fn open_perms_for(role: Role, read_only: bool) -> (Perm, Perm) {
    let (perm, shared) = perms_for(role, read_only);
    match role {
        Role::Raw => (perm, Perm::ALL),
        Role::Qcow2 | Role::Backing | Role::DataFile => (perm, shared),
    }
}

/// Which qemu-nbd step refused the locks; it decides the prefix qemu-nbd prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `blk_new_open`: `qemu-nbd: Failed to blk_new_open 'IMG': <error>`.
    Open,
    /// `blk_exp_add` (the export unsharing RESIZE of a raw image): `qemu-nbd: <error>`.
    Export,
}

/// A refusal from [`ImageLock::acquire_role`]: the step, and qemu's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleLockError {
    pub stage: Stage,
    pub error: LockError,
}

impl fmt::Display for RoleLockError {
    /// The bare message (see [`LockError`]); the caller adds the prefix for `stage`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RoleLockError {}

/// Why locks could not be taken. `Display` is qemu's text, first line then (for conflicts)
/// the hint line, without a trailing newline and without the caller's prefix such as
/// `qemu-nbd: Failed to blk_new_open 'IMG': `.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockError {
    /// Setting the lock on `byte` failed: `Failed to lock byte N`, plus `: <strerror>` unless
    /// the errno is EAGAIN or EACCES (another description holds an `F_WRLCK` there). No hint.
    LockByte { byte: u32, errno: i32 },
    /// The test found another holder: `Failed to get "<name>" lock` (it uses what we do not
    /// share, byte 200+i) or, with `shared`, `Failed to get shared "<name>" lock` (it does not
    /// share what we use, byte 100+i). errno is EAGAIN for a conflict, or GETLK's own error
    /// (then appended as text). The hint `Is another process using the image [<file>]?`
    /// follows on its own line.
    Conflict {
        perm: Perm,
        shared: bool,
        errno: i32,
        filename: String,
    },
    /// The image fd could not be duplicated for the lock's own use (not a qemu message; qemu
    /// does not dup).
    Dup { errno: i32 },
}

impl LockError {
    /// The first line of qemu's message.
    pub fn message(&self) -> String {
        match self {
            LockError::LockByte { byte, errno } => {
                with_errno(format!("Failed to lock byte {byte}"), *errno)
            }
            LockError::Conflict {
                perm,
                shared,
                errno,
                ..
            } => {
                let what = if *shared { "shared " } else { "" };
                with_errno(
                    format!("Failed to get {what}\"{}\" lock", perm.names()),
                    *errno,
                )
            }
            LockError::Dup { errno } => {
                format!("Could not duplicate the image fd: {}", strerror(*errno))
            }
        }
    }

    /// qemu's hint line (without its newline), if qemu adds one.
    pub fn hint(&self) -> Option<String> {
        match self {
            LockError::Conflict { filename, .. } => {
                Some(format!("Is another process using the image [{filename}]?"))
            }
            _ => None,
        }
    }

    /// The errno behind the failure (EAGAIN for a lock held by someone else).
    pub fn errno(&self) -> i32 {
        match self {
            LockError::LockByte { errno, .. }
            | LockError::Conflict { errno, .. }
            | LockError::Dup { errno } => *errno,
        }
    }
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())?;
        if let Some(h) = self.hint() {
            write!(f, "\n{h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LockError {}

/// qemu's `raw_lock_error_setg_errno`: the errno text is left out for EAGAIN/EACCES.
fn with_errno(msg: String, errno: i32) -> String {
    if errno == libc::EAGAIN || errno == libc::EACCES {
        msg
    } else {
        format!("{msg}: {}", strerror(errno))
    }
}

/// `strerror(errno)` as qemu's `error_setg_errno` appends it (no " (os error N)" suffix).
fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for writes of buf.len() bytes for the duration of the call; libc
    // binds strerror_r to the XSI variant (__xpg_strerror_r) on glibc, which writes a
    // NUL-terminated string of at most buflen bytes into buf and returns 0 on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    match CStr::from_bytes_until_nul(&buf) {
        Ok(s) if rc == 0 => s.to_string_lossy().into_owned(),
        _ => format!("Unknown error {errno}"),
    }
}

/// qemu's program name for warnings: the basename of argv[0] (`error_get_progname`).
fn progname() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "qnbd".to_string())
}

/// qemu's `warn_report`: `<prog>: warning: <msg>` straight to stderr (not through tracing,
/// whose subscriber would print it a second time).
pub(crate) fn warn(msg: &str) {
    eprintln!("{}: warning: {msg}", progname());
}

/// qemu's `error_report`: `<prog>: <msg>` straight to stderr (a message printed while the
/// open goes on to fail with its own).
pub(crate) fn error_report(msg: &str) {
    eprintln!("{}: {msg}", progname());
}

/// Which fcntl commands lock: qemu's `fcntl_op_setlk` / `fcntl_op_getlk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ops {
    Ofd,
    Posix,
}

impl Ops {
    fn setlk(self) -> libc::c_int {
        match self {
            Ops::Ofd => libc::F_OFD_SETLK,
            Ops::Posix => libc::F_SETLK,
        }
    }
    fn getlk(self) -> libc::c_int {
        match self {
            Ops::Ofd => libc::F_OFD_GETLK,
            Ops::Posix => libc::F_GETLK,
        }
    }
}

/// `qemu_has_ofd_lock`: probed once per process (`qemu_probe_lock_ops`) by a whole-file
/// `F_OFD_GETLK` on `/dev/null` opened read-write.
pub fn has_ofd_locks() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let null = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            Ok(f) => f,
            Err(e) => {
                // qemu prints this with fprintf, without the program name.
                eprintln!(
                    "Failed to open /dev/null for OFD lock probing: {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                );
                return false;
            }
        };
        let mut fl = flock(libc::F_WRLCK, 0, 0);
        // SAFETY: the fd is open for the duration of the call (null lives until the end of
        // the closure) and fl is a valid, initialised struct flock that F_OFD_GETLK may write.
        let r = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        r == 0
    })
}

/// What `locking` means on this kernel: the lock commands to use (None: no locking) and
/// whether qemu's POSIX fallback warning is due (`raw_open_common`).
fn choose_ops(locking: Locking, has_ofd: impl FnOnce() -> bool) -> (Option<Ops>, bool) {
    match locking {
        Locking::Off => (None, false),
        Locking::Auto => (has_ofd().then_some(Ops::Ofd), false),
        Locking::On => {
            if has_ofd() {
                (Some(Ops::Ofd), false)
            } else {
                (Some(Ops::Posix), true)
            }
        }
    }
}

fn flock(l_type: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: struct flock is a plain C struct of integers (with arch-dependent padding or
    // extra fields); all-zero is a valid value, and l_pid must be 0 for the OFD commands.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // F_RDLCK/F_WRLCK/F_UNLCK are 0..=2 and fit l_type (a short).
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// Held locks on one image file, as qemu's file-posix node holds them.
///
/// It owns a `dup` of the image fd: OFD locks belong to the open file description, which the
/// dup shares, so the locks stay valid and can be released even if the caller's `File` is
/// closed first, and they go away when the last fd of that description is closed.
#[derive(Debug)]
pub struct ImageLock {
    /// None when not locking (`off`, or `auto` without OFD locks): no lock syscalls at all.
    fd: Option<OwnedFd>,
    ops: Option<Ops>,
    filename: String,
    /// The accepted permissions (`s->perm`, `s->shared_perm`).
    perm: Perm,
    shared: Perm,
    /// Bytes really held (`s->locked_perm`, `s->locked_shared_perm`): 100+i and 200+i.
    locked_perm: Perm,
    locked_unshared: Perm,
}

impl ImageLock {
    /// Take qemu's locks for (`perm`, `shared`) on `file`: set every needed byte, then test,
    /// as `raw_handle_perm_lock` does for the first permission update of a node. On failure
    /// nothing is left locked and the error is qemu's message (`filename` appears in the
    /// hint, as given).
    ///
    /// qemu-nbd on a raw image reaches its final set in two updates (open, then the export
    /// unsharing RESIZE) and prints the second step's refusals with another prefix; use
    /// [`ImageLock::acquire_role`] to get that order and the step.
    pub fn acquire(
        file: &impl AsFd,
        filename: &str,
        locking: Locking,
        perm: Perm,
        shared: Perm,
    ) -> Result<ImageLock, LockError> {
        let (ops, warn_posix) = choose_ops(locking, has_ofd_locks);
        Self::acquire_with(file, filename, ops, warn_posix, perm, shared)
    }

    /// Take the locks of a file in `role` as qemu-nbd does: [`open_perms_for`] at open, then
    /// [`perms_for`] when the export is added (a second set-then-test only where they differ,
    /// i.e. for raw). On failure nothing is left locked.
    pub fn acquire_role(
        file: &impl AsFd,
        filename: &str,
        locking: Locking,
        role: Role,
        read_only: bool,
    ) -> Result<ImageLock, RoleLockError> {
        let (perm, shared) = open_perms_for(role, read_only);
        let mut lock =
            ImageLock::acquire(file, filename, locking, perm, shared).map_err(|error| {
                RoleLockError {
                    stage: Stage::Open,
                    error,
                }
            })?;
        let (perm, shared) = perms_for(role, read_only);
        lock.update(perm, shared).map_err(|error| RoleLockError {
            stage: Stage::Export,
            error,
        })?;
        Ok(lock)
    }

    fn acquire_with(
        file: &impl AsFd,
        filename: &str,
        ops: Option<Ops>,
        warn_posix: bool,
        perm: Perm,
        shared: Perm,
    ) -> Result<ImageLock, LockError> {
        if warn_posix {
            // raw_open_common: warn_report, then error_printf (no prefix).
            warn(
                "File lock requested but OFD locking syscall is unavailable, \
                 falling back to POSIX file locks",
            );
            eprintln!("Due to the implementation, locks can be lost unexpectedly.");
        }
        let fd = match ops {
            Some(_) => Some(
                file.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| LockError::Dup {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                    })?,
            ),
            None => None,
        };
        let mut lock = ImageLock {
            fd,
            ops,
            filename: filename.to_string(),
            perm: Perm::empty(),
            shared: Perm::ALL,
            locked_perm: Perm::empty(),
            locked_unshared: Perm::empty(),
        };
        lock.update(perm, shared)?;
        Ok(lock)
    }

    /// Change the permissions: qemu's PREPARE then COMMIT (or ABORT). Tightening locks the
    /// union of the old and new sets, then tests all bytes of the new set; loosening never
    /// tests. On failure the old set is held again and qemu's message returned.
    pub fn update(&mut self, perm: Perm, shared: Perm) -> Result<(), LockError> {
        if self.ops.is_none() {
            self.perm = perm;
            self.shared = shared;
            return Ok(());
        }
        let loosening = (self.perm | perm) == self.perm && (self.shared & shared) == self.shared;
        if !loosening {
            // PREPARE never unlocks, so only a lock can fail in apply here.
            let prepared = self
                .apply(self.perm | perm, !self.shared | !shared, false)
                .map_err(LockError::from)
                .and_then(|()| self.check(perm, shared));
            if let Err(e) = prepared {
                // RAW_PL_ABORT: back to exactly the old set.
                let (p, s) = (self.perm, self.shared);
                if let Err(u) = self.apply(p, !s, true) {
                    warn(&u.to_string());
                }
                return Err(e);
            }
        }
        // RAW_PL_COMMIT: hold exactly the new set.
        if let Err(u) = self.apply(perm, !shared, true) {
            warn(&u.to_string());
        }
        self.perm = perm;
        self.shared = shared;
        Ok(())
    }

    /// Unlock every held byte with an explicit `F_UNLCK`, as qemu does before `close` on an
    /// orderly exit. Also done on drop. A later [`ImageLock::update`] may lock again.
    pub fn release(&mut self) {
        if self.ops.is_some() {
            if let Err(u) = self.apply(Perm::empty(), Perm::empty(), true) {
                warn(&u.to_string());
            }
        }
        self.perm = Perm::empty();
        self.shared = Perm::ALL;
    }

    /// The accepted (perm, shared).
    pub fn perms(&self) -> (Perm, Perm) {
        (self.perm, self.shared)
    }

    /// The bytes held: (bits i with 100+i locked, bits i with 200+i locked).
    pub fn held(&self) -> (Perm, Perm) {
        (self.locked_perm, self.locked_unshared)
    }

    /// Whether lock system calls are made at all (false for `off`, or `auto` without OFD).
    pub fn is_locking(&self) -> bool {
        self.ops.is_some()
    }

    /// The name used in the hint line.
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// qemu's `raw_apply_lock_bytes`: lock the bytes of `perm` (100+i) and `unshared` (200+i)
    /// not yet held, ascending; with `unlock`, unlock held bytes outside them. Stops at the
    /// first failure; the held sets always say what is really locked. A failed unlock comes
    /// back as the text qemu warns with.
    fn apply(&mut self, perm: Perm, unshared: Perm, unlock: bool) -> Result<(), ApplyError> {
        for (i, bit) in BITS {
            let off = LOCK_PERM_BASE + i;
            if perm.contains(bit) && !self.locked_perm.contains(bit) {
                self.fcntl_set(off, libc::F_RDLCK)
                    .map_err(|errno| ApplyError::Lock(off, errno))?;
                self.locked_perm |= bit;
            } else if unlock && self.locked_perm.contains(bit) && !perm.contains(bit) {
                self.fcntl_set(off, libc::F_UNLCK)
                    .map_err(|errno| ApplyError::Unlock(off, errno))?;
                self.locked_perm -= bit;
            }
        }
        for (i, bit) in BITS {
            let off = LOCK_SHARED_BASE + i;
            if unshared.contains(bit) && !self.locked_unshared.contains(bit) {
                self.fcntl_set(off, libc::F_RDLCK)
                    .map_err(|errno| ApplyError::Lock(off, errno))?;
                self.locked_unshared |= bit;
            } else if unlock && self.locked_unshared.contains(bit) && !unshared.contains(bit) {
                self.fcntl_set(off, libc::F_UNLCK)
                    .map_err(|errno| ApplyError::Unlock(off, errno))?;
                self.locked_unshared -= bit;
            }
        }
        Ok(())
    }

    /// qemu's `raw_check_lock_bytes`: for each bit we use, nobody may hold 200+i ("Failed to
    /// get"); for each bit we do not share, nobody may hold 100+i ("Failed to get shared").
    fn check(&self, perm: Perm, shared: Perm) -> Result<(), LockError> {
        let conflict = |bit: Perm, is_shared: bool, errno: i32| LockError::Conflict {
            perm: bit,
            shared: is_shared,
            errno,
            filename: self.filename.clone(),
        };
        for (i, bit) in BITS {
            if perm.contains(bit) {
                self.fcntl_test(LOCK_SHARED_BASE + i)
                    .map_err(|errno| conflict(bit, false, errno))?;
            }
        }
        for (i, bit) in BITS {
            if !shared.contains(bit) {
                self.fcntl_test(LOCK_PERM_BASE + i)
                    .map_err(|errno| conflict(bit, true, errno))?;
            }
        }
        Ok(())
    }

    /// `qemu_lock_fd` / `qemu_unlock_fd`: one byte, non-blocking, retried on EINTR.
    fn fcntl_set(&self, byte: u32, l_type: libc::c_int) -> Result<(), i32> {
        let (Some(fd), Some(ops)) = (&self.fd, self.ops) else {
            return Ok(());
        };
        let fl = flock(l_type, i64::from(byte), 1);
        tracing::trace!(byte, l_type, ?ops, "setlk");
        loop {
            // SAFETY: fd is an open descriptor owned by self; fl is a valid struct flock that
            // F_OFD_SETLK/F_SETLK only read.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), ops.setlk(), &fl) };
            if r == 0 {
                return Ok(());
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return Err(errno);
            }
        }
    }

    /// `qemu_lock_fd_test(fd, byte, 1, true)`: Err(EAGAIN) if another owner holds a lock
    /// that conflicts with `F_WRLCK` (any lock), Err(errno) if GETLK itself fails.
    fn fcntl_test(&self, byte: u32) -> Result<(), i32> {
        let (Some(fd), Some(ops)) = (&self.fd, self.ops) else {
            return Ok(());
        };
        tracing::trace!(byte, ?ops, "getlk");
        loop {
            let mut fl = flock(libc::F_WRLCK, i64::from(byte), 1);
            // SAFETY: fd is an open descriptor owned by self; fl is a valid, initialised
            // struct flock that F_OFD_GETLK/F_GETLK overwrite in place.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), ops.getlk(), &mut fl) };
            if r == 0 {
                return if fl.l_type == libc::F_UNLCK as libc::c_short {
                    Ok(())
                } else {
                    Err(libc::EAGAIN)
                };
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return Err(errno);
            }
        }
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        self.release();
    }
}

/// A failure inside `apply`: a lock is a [`LockError`], an unlock only a warning in qemu.
#[derive(Debug)]
enum ApplyError {
    Lock(u32, i32),
    Unlock(u32, i32),
}

impl From<ApplyError> for LockError {
    fn from(e: ApplyError) -> LockError {
        match e {
            ApplyError::Lock(byte, errno) | ApplyError::Unlock(byte, errno) => {
                LockError::LockByte { byte, errno }
            }
        }
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Lock(byte, errno) => {
                f.write_str(&with_errno(format!("Failed to lock byte {byte}"), *errno))
            }
            // error_setg_errno: the errno text is always appended for unlock failures.
            ApplyError::Unlock(byte, errno) => {
                write!(f, "Failed to unlock byte {byte}: {}", strerror(*errno))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = LockError::LockByte {
            byte: 100,
            errno: libc::EAGAIN,
        };
        assert_eq!(e.to_string(), "Failed to lock byte 100");
        let e = LockError::LockByte {
            byte: 201,
            errno: libc::EACCES,
        };
        assert_eq!(e.to_string(), "Failed to lock byte 201");
        let e = LockError::LockByte {
            byte: 103,
            errno: libc::ENOLCK,
        };
        assert_eq!(e.to_string(), "Failed to lock byte 103: No locks available");
        assert_eq!(e.hint(), None);
        let e = LockError::Conflict {
            perm: Perm::WRITE,
            shared: true,
            errno: libc::EAGAIN,
            filename: "a.qcow2".into(),
        };
        assert_eq!(
            e.to_string(),
            "Failed to get shared \"write\" lock\nIs another process using the image [a.qcow2]?"
        );
        let e = LockError::Conflict {
            perm: Perm::CONSISTENT_READ,
            shared: false,
            errno: libc::EBADF,
            filename: "/x/b.raw".into(),
        };
        assert_eq!(
            e.to_string(),
            "Failed to get \"consistent read\" lock: Bad file descriptor\n\
             Is another process using the image [/x/b.raw]?"
        );
        assert_eq!(
            ApplyError::Unlock(101, libc::EBADF).to_string(),
            "Failed to unlock byte 101: Bad file descriptor"
        );
        assert_eq!(Perm::RESIZE.names(), "resize");
        assert_eq!(Perm::WRITE_UNCHANGED.names(), "write unchanged");
        assert_eq!(Perm::ALL.bits(), 0x0f);
    }

    #[test]
    fn locking_names() {
        assert_eq!(Locking::from_name("auto"), Ok(Locking::Auto));
        assert_eq!(Locking::from_name("on"), Ok(Locking::On));
        assert_eq!(Locking::from_name("off"), Ok(Locking::Off));
        // Observed: qemu-nbd --image-opts ...,file.locking=maybe prints
        // "qemu-nbd: Failed to blk_new_open '...': invalid parameter value: maybe";
        // "ON" and "" are refused the same way.
        for bad in ["maybe", "ON", ""] {
            let e = Locking::from_name(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("invalid parameter value: {bad}"));
        }
        assert_eq!(Locking::default(), Locking::Auto);
    }

    #[test]
    fn ops_by_locking() {
        assert_eq!(
            choose_ops(Locking::Off, || panic!("no probe")),
            (None, false)
        );
        assert_eq!(choose_ops(Locking::Auto, || true), (Some(Ops::Ofd), false));
        assert_eq!(choose_ops(Locking::Auto, || false), (None, false));
        assert_eq!(choose_ops(Locking::On, || true), (Some(Ops::Ofd), false));
        assert_eq!(choose_ops(Locking::On, || false), (Some(Ops::Posix), true));
    }

    #[test]
    fn role_table() {
        let bytes = |(p, s): (Perm, Perm)| -> Vec<u32> {
            let mut v = Vec::new();
            for (i, bit) in BITS {
                if p.contains(bit) {
                    v.push(LOCK_PERM_BASE + i);
                }
            }
            for (i, bit) in BITS {
                if !s.contains(bit) {
                    v.push(LOCK_SHARED_BASE + i);
                }
            }
            v
        };
        assert_eq!(
            bytes(perms_for(Role::Qcow2, false)),
            [100, 101, 103, 201, 203]
        );
        assert_eq!(bytes(perms_for(Role::Qcow2, true)), [100, 201, 203]);
        assert_eq!(bytes(perms_for(Role::Raw, false)), [100, 101, 203]);
        assert_eq!(bytes(perms_for(Role::Raw, true)), [100, 203]);
        for ro in [false, true] {
            assert_eq!(bytes(perms_for(Role::Backing, ro)), [100, 201, 203]);
        }
        assert_eq!(
            bytes(perms_for(Role::DataFile, false)),
            [100, 101, 103, 203]
        );
        assert_eq!(bytes(perms_for(Role::DataFile, true)), [100, 203]);
        assert_eq!(bytes(open_perms_for(Role::Raw, false)), [100, 101]);
        assert_eq!(bytes(open_perms_for(Role::Raw, true)), [100]);
        for role in [Role::Qcow2, Role::Backing, Role::DataFile] {
            for ro in [false, true] {
                assert_eq!(open_perms_for(role, ro), perms_for(role, ro));
            }
        }
    }

    /// `locking=on` without OFD locks: POSIX locks owned by this process, same bytes.
    #[test]
    fn posix_fallback_locks_the_same_bytes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        // A read lock needs a readable fd: on a write-only one the set fails with EBADF, and
        // the errno text is appended as qemu's error_setg_errno does.
        let wo = std::fs::File::create(&path).expect("create");
        let (p, s) = perms_for(Role::Qcow2, false);
        let e = ImageLock::acquire(&wo, "img", Locking::On, p, s).expect_err("write-only fd");
        assert_eq!(
            e.to_string(),
            "Failed to lock byte 100: Bad file descriptor"
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let ino = f.metadata().expect("stat").ino();
        let mut l = ImageLock::acquire_with(&f, "img", Some(Ops::Posix), true, p, s).expect("lock");
        let pid = std::process::id().to_string();
        let mine = || -> Vec<(String, String)> {
            let text = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|w| w.len() == 8 && w[5].ends_with(&format!(":{ino}")))
                .map(|w| {
                    assert_eq!((w[1], w[3], w[4]), ("POSIX", "READ", pid.as_str()));
                    (w[6].to_string(), w[7].to_string())
                })
                .collect()
        };
        let mut got = mine();
        got.sort();
        let want: Vec<(String, String)> = [
            ("100", "101"),
            ("103", "103"),
            ("201", "201"),
            ("203", "203"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(got, want);
        l.release();
        assert!(mine().is_empty());
    }
}
