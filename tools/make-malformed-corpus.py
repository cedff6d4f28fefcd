#!/usr/bin/env python3
"""Writes the malformed-GGUF corpus into tests/fixtures/malformed/.

Each file breaks exactly one rule of the GGUF format (FORMATS.md §1-2); expected.tsv names the
error code bitnetc's parser must report for it (`ParseErrorKind::code`). The output is
deterministic: run `python3 tools/make-malformed-corpus.py` and commit the result.
"""

import os
import struct

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "malformed")

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def kv_str(key, value):
    return kv(key, STR, s(value))


def kv_u32(key, value):
    return kv(key, U32, struct.pack("<I", value))


def tinfo(name, dims, type_id, offset):
    return (s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", type_id, offset))


def gguf(kvs, infos, data=b"", version=3, magic=b"GGUF", n_tensors=None, n_kv=None,
         align=32, pad=True):
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors,
                        len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    if pad:
        head += b"\0" * ((-len(head)) % align)
    return head + data


ARCH = kv_str("general.architecture", "llama")
F32_8 = struct.pack("<8f", *range(8))  # one F32 tensor of 8 elements, 32 bytes


def valid(**kw):
    """Two F32 tensors of 8 elements, back to back."""
    return gguf([ARCH], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], F32_8 * 2, **kw)


CASES = []


def case(name, code, data):
    CASES.append((name, code, data))


case("empty.gguf", "too_small", b"")
case("short-header.gguf", "too_small", b"GGUF\x03\x00\x00\x00\x00\x00")
case("bad-magic.gguf", "bad_magic", valid(magic=b"GGML"))
case("version-1.gguf", "unsupported_version", valid(version=1))
case("version-4.gguf", "unsupported_version", valid(version=4))
case("big-endian.gguf", "big_endian",
     b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + s(b"k"))
case("big-endian-magic.gguf", "big_endian",
     struct.pack(">IIQQ", 0x46554747, 3, 0, 1) + struct.pack(">Q", 20) + b"general.architecture"
     + struct.pack(">IQ", 8, 5) + b"llama")
case("kv-count-too-large.gguf", "count_too_large", gguf([ARCH], [], n_kv=1 << 40))
case("tensor-count-too-large.gguf", "count_too_large", gguf([ARCH], [], n_tensors=1 << 50))
case("key-length-past-end.gguf", "string_too_long",
     gguf([struct.pack("<Q", 1 << 33) + b"general"], [], pad=False))
case("key-not-utf8.gguf", "invalid_utf8", gguf([s(b"bad\xff") + struct.pack("<II", U32, 1)], []))
case("unknown-value-type.gguf", "unknown_value_type", gguf([kv("general.x", 13, b"\0" * 8)], []))
case("nested-array.gguf", "nested_array",
     gguf([kv("general.x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 0))], []))
case("array-count-past-end.gguf", "count_too_large",
     gguf([kv("general.x", ARR, struct.pack("<IQ", U32, 1 << 40))], []))
case("string-value-past-end.gguf", "string_too_long",
     gguf([kv("general.name", STR, struct.pack("<Q", 1000) + b"abc")], [], pad=False))
case("bool-not-0-or-1.gguf", "invalid_bool", gguf([kv("general.flag", BOOL, b"\x02")], []))
case("duplicate-key.gguf", "duplicate_key", gguf([ARCH, ARCH], []))
case("alignment-not-power-of-two.gguf", "bad_alignment",
     gguf([kv_u32("general.alignment", 48)], []))
case("alignment-wrong-type.gguf", "bad_alignment",
     gguf([kv("general.alignment", U64, struct.pack("<Q", 32))], []))
case("too-many-dims.gguf", "too_many_dims",
     gguf([ARCH], [tinfo("a", [1, 1, 1, 1, 8], 0, 0)], F32_8))
case("dims-overflow.gguf", "dims_overflow",
     gguf([ARCH], [tinfo("a", [1 << 32, 1 << 32], 0, 0)], F32_8))
case("name-too-long.gguf", "name_too_long", gguf([ARCH], [tinfo("n" * 64, [8], 0, 0)], F32_8))
case("duplicate-tensor.gguf", "duplicate_tensor",
     gguf([ARCH], [tinfo("a", [8], 0, 0), tinfo("a", [8], 0, 32)], F32_8 * 2))
case("unknown-type-id.gguf", "bad_type", gguf([ARCH], [tinfo("a", [8], 77, 0)], F32_8))
case("retired-type-id.gguf", "bad_type", gguf([ARCH], [tinfo("a", [32], 4, 0)], F32_8 * 4))
case("i8s-stored.gguf", "no_type_table",
     gguf([kv_str("general.architecture", "bitnet-b1.58")], [tinfo("a", [32], 37, 0)], F32_8))
case("row-not-whole-blocks.gguf", "bad_size",
     gguf([ARCH], [tinfo("a", [48, 2], 8, 0)], b"\0" * 128))
case("i2s-not-128-elements.gguf", "no_type_table",
     gguf([kv_str("general.architecture", "bitnet-b1.58")], [tinfo("a", [64], 36, 0)], b"\0" * 64))
case("size-overflows.gguf", "bad_size",
     gguf([ARCH], [tinfo("a", [1 << 62, 1], 0, 0)], F32_8))
case("misaligned-offset.gguf", "misaligned",
     gguf([ARCH], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 36)], F32_8 * 3))
case("tensor-past-end.gguf", "out_of_bounds",
     gguf([ARCH], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], F32_8 + b"\0" * 16))
case("overlapping-tensors.gguf", "overlap",
     gguf([ARCH], [tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], F32_8 * 3))
case("size-does-not-match-type.gguf", "size_mismatch",
     gguf([ARCH], [tinfo("a", [8], 1, 0), tinfo("b", [8], 0, 64)], F32_8 * 3))
case("truncated-tensor-info.gguf", "truncated",
     gguf([ARCH], [tinfo("a", [8], 0, 0)[:-6]], pad=False))
# The tensor infos end off the alignment and the file ends with them: no room for padding.
DATA_PAST_END = gguf([ARCH], [tinfo("a", [0], 0, 0)], pad=False)
assert len(DATA_PAST_END) % 32 != 0
case("data-past-end.gguf", "data_past_end", DATA_PAST_END)


def main():
    os.makedirs(OUT, exist_ok=True)
    codes = set()
    with open(os.path.join(OUT, "expected.tsv"), "w") as f:
        f.write("# file\terror code (ParseErrorKind::code); written by tools/make-malformed-corpus.py\n")
        for name, code, data in CASES:
            with open(os.path.join(OUT, name), "wb") as g:
                g.write(data)
            f.write(f"{name}\t{code}\n")
            codes.add(code)
    print(f"wrote {len(CASES)} files, {len(codes)} distinct error codes, into {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
