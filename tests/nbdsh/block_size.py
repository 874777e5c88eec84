"""NBD_INFO_BLOCK_SIZE as qemu-nbd sends it (libnbd's interop-qemu-block-size).

Usage: block_size.py URI ALIGN
ALIGN is the export's real minimum block size (512 for a probed raw image, 1 for -f raw).
INFO and a GO that asked for block sizes get ALIGN; a GO that did not ask gets 1; an INFO
that did not ask is refused (NBD_REP_ERR_BLOCK_SIZE_REQD) when ALIGN > 1.
"""
import sys

import nbd

uri, align = sys.argv[1], int(sys.argv[2])
for asked in (True, False):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_request_block_size(asked)
    h.connect_uri(uri)
    try:
        h.opt_info()
        info = h.get_block_size(nbd.SIZE_MINIMUM)
    except nbd.Error as e:
        assert not asked and align > 1, (asked, e)
        info = None
    if asked or align == 1:
        assert info == align, (asked, info)
    h.opt_go()
    got = h.get_block_size(nbd.SIZE_MINIMUM)
    assert got == (align if asked else 1), (asked, got)
    if got == 1:
        # A client that was told 1 may write any bytes: they land where it said.
        h.pwrite(b"xyz", 4095)
        assert h.pread(5, 4094) == b"\0xyz\0"
    h.shutdown()
print("ok")
