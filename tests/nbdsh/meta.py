"""LIST_META_CONTEXT and SET_META_CONTEXT answers in option mode.

Usage: meta.py URI EXPECTED_ALL  (comma-separated contexts the export offers)
"""
import sys

import nbd

uri, expected = sys.argv[1], sys.argv[2].split(",")

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)


def listed(queries):
    names = []
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    h.opt_list_meta_context(lambda name: names.append(name))
    return names


assert listed([]) == expected, listed([])
assert listed(["base:"]) == ["base:allocation"]
assert listed(["base:allocation"]) == ["base:allocation"]
assert listed(["foo:bar", "nocolon"]) == []
qemu = [c for c in expected if c.startswith("qemu:")]
assert listed(["qemu:"]) == qemu, listed(["qemu:"])
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")
h.shutdown()
print("ok")
