#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Checks that built modules import and export exactly what Spindle's guest ABI allows.

Reactors must export memory, _initialize, spindle_alloc and spindle_handle with the ABI's
signatures, may export spindle_on_fork (the snapshot hook), and may import only spindle.{output,error,next} and wasi_snapshot_preview1.*.
Commands must export memory and _start and import only wasi_snapshot_preview1.*.

Reads the binary format directly so the check needs nothing but python3.

usage: check_abi.py --reactor A.wasm ... [--command B.wasm ...]
"""
import os
import sys

I32 = 0x7F
KIND_NAMES = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}

SPINDLE_IMPORTS = {
    "output": ((I32, I32), ()),
    "error": ((I32, I32), ()),
    "next": ((I32, I32), (I32,)),
}
REACTOR_EXPORTS = {
    "memory": ("memory", None),
    "_initialize": ("func", ((), ())),
    "spindle_alloc": ("func", ((I32,), (I32,))),
    "spindle_handle": ("func", ((I32, I32), (I32,))),
}
# Exports a reactor may have: the snapshot hook, called in each child after a fork.
OPTIONAL_REACTOR_EXPORTS = {
    "spindle_on_fork": ("func", ((), ())),
    # In-place calls on a mapped slot: (buf, len, cap) -> out_len.
    "spindle_handle_inplace": ("func", ((I32, I32, I32), (I32,))),
}
COMMAND_EXPORTS = {
    "memory": ("memory", None),
    "_start": ("func", ((), ())),
}
WASI = "wasi_snapshot_preview1"


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self):
        if self.pos >= self.end:
            raise ValueError("unexpected end of section")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self):
        n = self.uleb()
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s.decode("utf-8")

    def limits(self):
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def parse(path):
    """Returns (imports, exports): lists of (module, name, kind, signature) / (name, kind, sig)."""
    data = open(path, "rb").read()
    if data[:8] != b"\0asm\1\0\0\0":
        raise ValueError("not a Wasm module")
    types, func_types, imports, raw_exports = [], [], [], []
    r = Reader(data, 8)
    while r.pos < len(data):
        sid = r.byte()
        size = r.uleb()
        s = Reader(data, r.pos, r.pos + size)
        r.pos += size
        if sid == 1:  # type
            for _ in range(s.uleb()):
                if s.byte() != 0x60:
                    raise ValueError("unknown type form")
                params = tuple(s.byte() for _ in range(s.uleb()))
                results = tuple(s.byte() for _ in range(s.uleb()))
                types.append((params, results))
        elif sid == 2:  # import
            for _ in range(s.uleb()):
                module, name, kind = s.name(), s.name(), s.byte()
                sig = None
                if kind == 0:
                    sig = types[s.uleb()]
                    func_types.append(sig)
                elif kind == 1:
                    s.byte()
                    s.limits()
                elif kind == 2:
                    s.limits()
                elif kind == 3:
                    s.byte()
                    s.byte()
                else:
                    raise ValueError(f"unknown import kind {kind}")
                imports.append((module, name, KIND_NAMES[kind], sig))
        elif sid == 3:  # function
            func_types.extend(types[s.uleb()] for _ in range(s.uleb()))
        elif sid == 7:  # export
            for _ in range(s.uleb()):
                name, kind, index = s.name(), s.byte(), s.uleb()
                raw_exports.append((name, kind, index))
    exports = [(name, KIND_NAMES.get(kind, str(kind)), func_types[index] if kind == 0 else None)
               for name, kind, index in raw_exports]
    return imports, exports


def check(path, want_exports, spindle_allowed, optional_exports=None):
    optional_exports = optional_exports or {}
    problems = []
    imports, exports = parse(path)
    for module, name, kind, sig in imports:
        if module == WASI and kind == "func":
            continue
        if spindle_allowed and module == "spindle" and name in SPINDLE_IMPORTS:
            if kind != "func" or sig != SPINDLE_IMPORTS[name]:
                problems.append(f"import spindle.{name} has signature {sig}")
            continue
        problems.append(f"unexpected import {module}.{name} ({kind})")
    got = {name: (kind, sig) for name, kind, sig in exports}
    for name, (kind, sig) in want_exports.items():
        if name not in got:
            problems.append(f"missing export {name}")
        elif got[name][0] != kind or (sig is not None and got[name][1] != sig):
            problems.append(f"export {name} is {got[name]}, want {(kind, sig)}")
    for name, (kind, sig) in optional_exports.items():
        if name in got and (got[name][0] != kind or got[name][1] != sig):
            problems.append(f"export {name} is {got[name]}, want {(kind, sig)}")
    for name in got:
        if name not in want_exports and name not in optional_exports:
            problems.append(f"unexpected export {name}")
    summary = ", ".join(f"{m}.{n}" if m != WASI else n for m, n, _, _ in imports)
    return problems, summary


def main(argv):
    mode, failed = None, 0
    for arg in argv:
        if arg in ("--reactor", "--command"):
            mode = arg
            continue
        if mode is None:
            sys.exit(__doc__)
        reactor = mode == "--reactor"
        try:
            if reactor:
                problems, summary = check(arg, REACTOR_EXPORTS, True, OPTIONAL_REACTOR_EXPORTS)
            else:
                problems, summary = check(arg, COMMAND_EXPORTS, False)
        except (OSError, ValueError, IndexError) as e:
            problems, summary = [str(e)], ""
        status = "ok" if not problems else "FAIL"
        print(f"{status:4} {os.path.basename(arg):16} {os.path.getsize(arg):6} bytes  imports: {summary}")
        for p in problems:
            print(f"     {p}")
        failed += bool(problems)
    if failed:
        sys.exit(f"{failed} module(s) break the guest ABI")


if __name__ == "__main__":
    main(sys.argv[1:])
