"""Seeds for fuzz/train_state_fuzz.cpp, from real `remat train` states.

    python3 tests/fuzz/make_train_state_seeds.py RUN/state.safetensors ...

For each state: its JSON document alone (first byte 1), and a small state
file (first byte 0) holding the same document with a few small tensors in
place of the model, checksummed as src/train/train_state.cpp does, so that
the fuzzer starts from files load_train_state accepts.
"""
import json
import os
import struct
import sys

MASK = (1 << 64) - 1


def fnv1a(h, data):
    i = 0
    while i + 8 <= len(data):
        (word,) = struct.unpack_from("<Q", data, i)
        h = ((h ^ word) * 0x100000001B3) & MASK
        i += 8
    for b in data[i:]:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def state_file(info_text, tensors):
    """tensors: name -> (dtype name in safetensors, c10 name, shape, bytes)."""
    h = fnv1a(0xCBF29CE484222325, info_text.encode() + b"\0")
    for name in sorted(tensors):
        st, c10, shape, data = tensors[name]
        h = fnv1a(h, name.encode() + b"\0")
        h = fnv1a(h, c10.encode() + b"\0")
        for d in shape:
            h = fnv1a(h, struct.pack("<q", d))
        h = fnv1a(h, data)
    head = {"__metadata__": {"remat.format": "remat-train-state-1",
                             "remat.state": info_text,
                             "remat.checksum": "%016x" % h}}
    offset, blob = 0, b""
    for name in sorted(tensors):
        st, _, shape, data = tensors[name]
        head[name] = {"dtype": st, "shape": shape,
                      "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blob += data
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + blob


out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_state")
for k, path in enumerate(sys.argv[1:]):
    info_text = header(path)["__metadata__"]["remat.state"]
    with open(os.path.join(out, "document_%d" % k), "wb") as f:
        f.write(b"\x01" + info_text.encode())
    tensors = {
        "model.w": ("F32", "Float", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
        "optimizer": ("U8", "Byte", [3], b"abc"),
        "rng.cpu": ("U8", "Byte", [0], b""),
    }
    with open(os.path.join(out, "state_%d.safetensors" % k), "wb") as f:
        f.write(b"\x00" + state_file(info_text, tensors))
