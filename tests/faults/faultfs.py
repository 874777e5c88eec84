#!/usr/bin/python3
"""A FUSE passthrough file system that fails chosen byte ranges of its files, for I/O fault
tests (tests/faults.rs): the portable stand-in for device-mapper's error/flakey targets.

  faultfs.py SOURCE_DIR MOUNTPOINT CONTROL_FILE

Every file of SOURCE_DIR appears under MOUNTPOINT. CONTROL_FILE holds one fault per line,
re-read whenever it changes:

  OP FILE START LENGTH ERRNO     e.g.  read a.raw 1048576 4096 EIO
                                       write b.qcow2 0 0 ENOSPC     (LENGTH 0: to the end)
                                       fsync b.qcow2 0 0 EIO

OP is read, write or fsync (fsync faults ignore the range). A read or write that overlaps
a fault's range fails whole with ERRNO, and touches nothing. An empty file: no faults.
Mounted with direct_io, so every read reaches this process (no page cache in between).
Needs Debian's python3-fusepy (libfuse2) and /dev/fuse; mounting needs root.
"""
import errno
import os
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations


class FaultFS(Operations):
    def __init__(self, root, control):
        self.root = os.path.realpath(root)
        self.control = control
        self.faults = []
        self.stamp = None
        self.mutex = threading.Lock()
        self.hits = 0

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _load(self):
        try:
            st = os.stat(self.control)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self.mutex:
            if stamp == self.stamp:
                return self.faults
            faults = []
            if stamp is not None:
                with open(self.control) as f:
                    for line in f:
                        w = line.split()
                        if len(w) == 5:
                            op, name, start, length, err = w
                            faults.append((op, name, int(start), int(length), getattr(errno, err)))
            self.faults, self.stamp = faults, stamp
            return faults

    def _check(self, op, path, offset, size):
        name = path.lstrip("/")
        for f_op, f_name, start, length, err in self._load():
            if f_op != op or f_name != name:
                continue
            end = start + length if length else None
            if op == "fsync" or (offset + size > start and (end is None or offset < end)):
                self.hits += 1
                raise FuseOSError(err)

    # -- metadata --------------------------------------------------------------------
    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink",
                "st_size", "st_uid", "st_blocks")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    # -- data ------------------------------------------------------------------------
    def open(self, path, flags):
        return os.open(self._path(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        self._check("read", path, offset, size)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self._check("write", path, offset, len(data))
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._check("write", path, length, 0)
        with open(self._path(path), "r+b") as f:
            f.truncate(length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        self._check("fsync", path, 0, 0)
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, mnt, control = sys.argv[1:]
    FUSE(FaultFS(src, control), mnt, foreground=True, direct_io=True, nothreads=False,
         allow_other=False)
