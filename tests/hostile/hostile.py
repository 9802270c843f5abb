#!/usr/bin/env python3
"""Crafted hostile inputs against every `remat` subcommand.

Runs the remat program on several hundred inputs a careless or hostile user
could give it: size flags past any real model, counts past int64, damaged and
crafted files (safetensors weights, config.json, JSONL data, vocab.txt, the
training state, with valid checksums so the crafted fields are reached). Each
case runs with a time limit; its exit, peak memory (maxrss) and message are
classified:

  clean      expected refusal: non-zero exit, one line "remat: error: ..."
             that names no library's raw text
  accepted   exit 0 where the input is allowed
  crash      killed by a signal (SIGSEGV, SIGABRT, ...)
  hang       still running after --timeout seconds (killed)
  memory     peak resident memory over 1 GiB
  unclear    refused, but with a raw library message or several lines
  silent     exit 0 for an input that must be refused

Usage: tests/hostile/hostile.py [--remat build/remat] [--timeout 10]
                                [--only KIND] [--verbose]
Prints a table by kind; exits non-zero if any case is not clean/accepted.
Needs only the Python standard library.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "routing")
GIB = 1 << 30

# Library text that must never be the whole message a user sees.
RAW = [
    "json.exception", "PytorchStreamReader", "CPUGeneratorImpl",
    "DefaultCPUAllocator", "terminate called", "Exception raised from",
    "std::bad_alloc", "basic_string", "vector::", "Could not convert",
    "what():", "c10::Error",
]

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--seq", "8",
        "--batch", "2", "--threads", "1"]


# ------------------------------------------------------------- safetensors

DT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DT_C10 = {"F64": "Double", "F32": "Float", "F16": "Half", "BF16": "BFloat16",
          "I64": "Long", "I32": "Int", "I16": "Short", "I8": "Char",
          "U8": "Byte", "BOOL": "Bool"}


def read_st(path):
    """{name: [dtype, shape, bytes]}, metadata"""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = b[8 + n:]
    tensors = {}
    for k, v in header.items():
        s, e = v["data_offsets"]
        tensors[k] = [v["dtype"], v["shape"], data[s:e]]
    return tensors, meta


def write_st(path, tensors, meta):
    header = {}
    if meta:
        header["__metadata__"] = meta
    off = 0
    blobs = []
    for k, (dt, shape, raw) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape,
                     "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


M64 = (1 << 64) - 1
PRIME = 0x100000001b3


def fnv_add(h, data):
    n = len(data)
    words = n // 8
    for (w,) in struct.iter_unpack("<Q", data[:words * 8]):
        h = ((h ^ w) * PRIME) & M64
    for c in data[words * 8:]:
        h = ((h ^ c) * PRIME) & M64
    return h


def fnv_str(h, s):
    return fnv_add(fnv_add(h, s), b"\0")


def state_checksum(tensors, info_text):
    h = fnv_str(0xcbf29ce484222325, info_text.encode())
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        h = fnv_str(h, name.encode())
        h = fnv_str(h, DT_C10[dt].encode())
        for d in shape:
            h = fnv_add(h, struct.pack("<q", d))
        h = fnv_add(h, raw)
    return "%016x" % h


def write_state(path, tensors, info, meta_extra=None, checksum=True):
    info_text = info if isinstance(info, str) else json.dumps(info)
    meta = {"remat.format": "remat-train-state-1", "remat.state": info_text,
            "remat.checksum": state_checksum(tensors, info_text) if checksum else "0" * 16}
    meta.update(meta_extra or {})
    write_st(path, tensors, meta)


# ------------------------------------------------------------- the runner

class Case:
    def __init__(self, kind, name, args, expect="refuse", cwd=None, must=None):
        self.kind, self.name, self.args = kind, name, args
        self.expect = expect  # "refuse", "accept" or "any"
        self.cwd = cwd
        self.must = must      # text the refusal must contain (the field, the file)


def run_case(remat, case, timeout):
    start = time.monotonic()
    p = subprocess.Popen([remat] + case.args, cwd=case.cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    hung = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    seconds = time.monotonic() - start
    # maxrss of the children reaped so far: the largest, so measure per case
    # through /proc would race; getrusage(RUSAGE_CHILDREN) is a running max.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    err_text = err.decode("utf-8", "replace")
    lines = [l for l in err_text.splitlines() if l.strip()]
    rc = p.returncode
    if hung:
        verdict = "hang"
    elif rc < 0:
        verdict = "crash"
    elif rc == 0:
        verdict = "silent" if case.expect == "refuse" else "accepted"
    elif case.expect == "accept":
        verdict = "unclear"
    else:
        raw = any(r in err_text for r in RAW)
        one = len(lines) >= 1 and lines[-1].startswith("remat: error: ") and \
            sum(1 for l in lines if l.startswith("remat: error")) == 1
        named = case.must is None or case.must in err_text
        verdict = "clean" if one and not raw and named else "unclear"
    return verdict, rc, seconds, rss, lines[-1] if lines else ""


def measure(remat, case, timeout):
    # RUSAGE_CHILDREN is a maximum over all children so far, so each case runs
    # in a fresh child interpreter-free fork: fork, run, report its own rusage.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = run_case(remat, case, timeout)
        except Exception as e:  # noqa
            res = ("error", -999, 0.0, 0, str(e))
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    verdict, rc, seconds, rss, last = json.loads(data)
    if verdict in ("clean", "accepted") and rss > GIB:
        verdict = "memory"
    return verdict, rc, seconds, rss, last


# ------------------------------------------------------------- the cases

HUGE = ["1000000000000000000", "99999999999999999999", "9223372036854775807",
        "2147483648", "1e18", "-1", "0", "abc", "", "4294967296"]


def size_flag_cases():
    cases = []
    sizes = {
        "bench": ["--layers", "--hidden", "--heads", "--kv-heads", "--intermediate",
                  "--seq", "--batch", "--vocab", "--steps", "--warmup", "--rounds",
                  "--lora-rank", "--threads"],
        "plan": ["--layers", "--hidden", "--heads", "--kv-heads", "--intermediate",
                 "--vocab", "--seq", "--batch", "--steps", "--warmup", "--repeats",
                 "--rounds", "--threads"],
        "estimate": ["--layers", "--hidden", "--heads", "--kv-heads", "--intermediate",
                     "--vocab", "--seq", "--batch", "--labels", "--lora-rank",
                     "--seq-multiple", "--threads"],
        "train": ["--layers", "--hidden", "--heads", "--kv-heads", "--intermediate",
                  "--vocab", "--seq", "--batch", "--accumulate", "--epochs", "--max-steps", "--max-tokens",
                  "--lora-rank", "--eval-every", "--save-every", "--compare-steps",
                  "--threads", "--log-every", "--nproc", "--warmup"],
    }
    base = {
        "bench": ["bench", "--policy", "none", "--steps", "1", "--warmup", "0"] + TINY,
        "plan": ["plan", "--repeats", "1"] + TINY,
        "estimate": ["estimate", "--layers", "2", "--hidden", "64", "--heads", "2",
                     "--seq", "16", "--batch", "2", "--vocab", "100"],
        "train": ["train", "--max-steps", "1"] + TINY,
    }
    for cmd, flags in sizes.items():
        for flag in flags:
            for v in HUGE:
                # 0 and -1 are legal for some flags (defaults, "all cores",
                # "none"): any clean answer is fine, only no crash/hang/memory.
                # An empty value is CLI11's "flag given, default kept".
                expect = "any" if v in ("0", "-1", "") else "refuse"
                if v == "2147483648" or v == "4294967296":
                    expect = "any"  # large but maybe legal for counts
                args = base[cmd] + [flag, v]
                cases.append(Case("size flags: " + cmd, f"{cmd} {flag} {v!r}", args,
                                  expect=expect, must=None))
    return cases


def json_files(tmp):
    """JSONL data files for `train --train`."""
    cases = []
    d = os.path.join(tmp, "jsonl")
    os.makedirs(d)
    good = open(os.path.join(DATA, "train.jsonl"), "rb").read().splitlines(True)[:40]
    variants = {
        "empty": b"",
        "not json": b"hello world\n" * 20,
        "array": b"[1,2,3]\n" * 20,
        "string text number": b'{"text": 5, "labels": ["ops"]}\n' * 20,
        "labels object": b'{"text": "a b", "labels": {"a": 1}}\n' * 20,
        "labels number": b'{"text": "a b", "labels": 7}\n' * 20,
        "no text": b'{"labels": ["ops"]}\n' * 20,
        "no labels": b'{"text": "a b c"}\n' * 20,
        "nul bytes": b"".join(good[:10]) + b'{"text": "a\x00b", "labels": ["ops"]}\n',
        "raw nul line": b"".join(good[:10]) + b"\x00\x00\x00\n",
        "invalid utf8": b"".join(good[:10]) + b'{"text": "caf\xe9 \xff\xfe", "labels": ["ops"]}\n',
        "truncated line": b"".join(good[:10]) + b'{"text": "a b',
        "deep nesting": b"[" * 100000 + b"]" * 100000 + b"\n",
        "huge number": b'{"text": "a", "labels": [1e999]}\n' * 5,
        "one huge line": b'{"text": "' + b"a " * 5_000_000 + b'", "labels": ["ops"]}\n',
        "many labels": b'{"text": "a b", "labels": [' + b",".join(b'"l%d"' % i for i in range(100000)) + b"]}\n",
        "crlf": b"".join(l.rstrip(b"\n") + b"\r\n" for l in good),
        "bom": b"\xef\xbb\xbf" + b"".join(good),
        "duplicate keys": b'{"text": "a", "text": "b", "labels": ["ops"]}\n' * 20,
        "blank lines only": b"\n\n\n\n",
        "null labels": b'{"text": "a", "labels": null}\n' * 20,
        "label empty string": b'{"text": "a", "labels": [""]}\n' * 20,
        "hot out of range": b'{"text": "a", "labels": [2.5, -1]}\n' * 20,
    }
    for name, content in variants.items():
        p = os.path.join(d, name.replace(" ", "_") + ".jsonl")
        open(p, "wb").write(content)
        cases.append(Case("JSONL data", name, ["train", "--max-steps", "1", "--train", p,
                                               "--valid-fraction", "0"] + TINY,
                          expect="any", must=None))
    for name, path in [("/dev/null", "/dev/null"), ("a folder", tmp),
                       ("missing", os.path.join(tmp, "nope.jsonl")),
                       ("/dev/zero", "/dev/zero"), ("fifo", None)]:
        if path is None:
            path = os.path.join(tmp, "fifo")
            os.mkfifo(path)
        cases.append(Case("JSONL data", "--train " + name,
                          ["train", "--max-steps", "1", "--train", path] + TINY,
                          must=None))
    return cases


def vocab_files(tmp):
    cases = []
    d = os.path.join(tmp, "vocab")
    os.makedirs(d)
    good = open(os.path.join(DATA, "vocab.txt"), "rb").read()
    variants = {
        "empty": (b"", "refuse"),
        "no unk": (b"hello\nworld\n", "refuse"),
        "invalid utf8": (good + b"caf\xe9\n\xff\xfe\n", "refuse"),
        "nul line": (good + b"a\x00b\n", "refuse"),
        "only nul": (b"\x00" * 100, "refuse"),
        "binary": (bytes(range(256)) * 50, "refuse"),
        "duplicate tokens": (good + good, "any"),
        "crlf": (good.replace(b"\n", b"\r\n"), "any"),
        "huge line": (good + b"x" * 10_000_000 + b"\n", "any"),
        "no final newline": (good.rstrip(b"\n"), "any"),
        "empty lines": (good + b"\n\n\n", "any"),
        "overlong utf8": (good + b"\xc0\xaf\n", "refuse"),
        "surrogate utf8": (good + b"\xed\xa0\x80\n", "refuse"),
    }
    for name, (content, expect) in variants.items():
        p = os.path.join(d, name.replace(" ", "_") + ".txt")
        open(p, "wb").write(content)
        cases.append(Case("vocab.txt", name, ["train", "--max-steps", "1", "--vocab", p] + TINY,
                          expect=expect, must=p if expect == "refuse" else None))
    for name, path in [("/dev/null", "/dev/null"), ("a folder", d)]:
        cases.append(Case("vocab.txt", "--vocab " + name,
                          ["train", "--max-steps", "1", "--vocab", path] + TINY))
    return cases


def make_folder(remat, tmp, task):
    """A saved model folder (config.json + model.safetensors) from a tiny run."""
    out = os.path.join(tmp, "model-" + task)
    subprocess.run([remat, "train", "--task", task, "--max-steps", "1", "--save", out] + TINY,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def config_cases(remat, tmp):
    cases = []
    for task in ("classify", "lm"):
        src = make_folder(remat, tmp, task)
        config = json.load(open(os.path.join(src, "config.json")))
        layers_key = "num_hidden_layers"

        def variant(name, mutate=None, text=None, expect="refuse"):
            d = os.path.join(tmp, "cfg-%s-%s" % (task, name.replace(" ", "_").replace("/", "_")))
            shutil.copytree(src, d)
            p = os.path.join(d, "config.json")
            if text is not None:
                open(p, "wb").write(text)
            else:
                c = json.loads(json.dumps(config))
                mutate(c)
                open(p, "w").write(json.dumps(c))
            cases.append(Case("config.json", f"{task}: {name}",
                              ["train", "--task", task, "--max-steps", "1", "--init", d,
                               "--seq", "8", "--batch", "2", "--threads", "1"],
                              expect=expect, must=d))

        for key in (layers_key, "hidden_size", "num_attention_heads", "intermediate_size",
                    "vocab_size", "max_position_embeddings"):
            if key not in config:
                continue
            for v in (10**6, 10**18, 2**63 - 1, 2**64, -1, 0, "12", None, 1.5, [1], True):
                def m(c, key=key, v=v):
                    c[key] = v
                # null is "absent": the family's default, then the weights decide.
                variant(f"{key}={v!r}", m, expect="any" if v is None else "refuse")
            def drop(c, key=key):
                del c[key]
            variant(f"no {key}", drop, expect="any")
        for name, text in [("empty", b""), ("not json", b"hello"), ("array", b"[]"),
                           ("truncated", json.dumps(config).encode()[:-5]),
                           ("nul", b"\x00" * 10), ("deep", b"[" * 100000),
                           ("invalid utf8", b'{"model_type": "\xff"}')]:
            variant(name, text=text)
        def bad_type(c):
            c["model_type"] = "gpt2"
        variant("model_type gpt2", bad_type)
        def eps(c):
            for k in list(c):
                if "eps" in k:
                    c[k] = "tiny"
        variant("eps string", eps)
        # Weights that disagree with the config.
        d = os.path.join(tmp, f"st-{task}")
        os.makedirs(d)
        tensors, meta = read_st(os.path.join(src, "model.safetensors"))
        name0 = sorted(k for k, v in tensors.items() if len(v[1]) == 2)[0]

        def st_variant(name, mutate=None, raw=None):
            dd = os.path.join(d, name.replace(" ", "_"))
            shutil.copytree(src, dd)
            p = os.path.join(dd, "model.safetensors")
            if raw is not None:
                open(p, "wb").write(raw)
            else:
                t = {k: list(v) for k, v in tensors.items()}
                mutate(t)
                write_st(p, t, meta)
            cases.append(Case("safetensors weights", f"{task}: {name}",
                              ["train", "--task", task, "--max-steps", "1", "--init", dd,
                               "--seq", "8", "--batch", "2", "--threads", "1"],
                              expect="refuse", must=dd))

        whole = open(os.path.join(src, "model.safetensors"), "rb").read()
        st_variant("empty", raw=b"")
        st_variant("truncated header", raw=whole[:20])
        st_variant("truncated data", raw=whole[:-7])
        st_variant("length 2^63", raw=struct.pack("<Q", 1 << 63) + whole[8:])
        st_variant("length 0", raw=struct.pack("<Q", 0) + whole[8:])
        st_variant("bit flip header", raw=whole[:30] + bytes([whole[30] ^ 0x40]) + whole[31:])
        st_variant("garbage", raw=os.urandom(4096))
        def wrong_shape(t):
            dt, shape, raw = t[name0]
            t[name0] = [dt, [len(raw) // DT_BYTES[dt]], raw]
        st_variant("reshaped tensor", wrong_shape)
        def missing(t):
            del t[name0]
        st_variant("missing tensor", missing)
        def bf16(t):
            dt, shape, raw = t[name0]
            t[name0] = ["I8", shape + [DT_BYTES[dt]], raw]
        st_variant("wrong dtype", bf16)
        def huge_shape(t):
            dt, shape, raw = t[name0]
            t[name0] = [dt, [2**40, 2**40], raw]
        st_variant("huge shape", huge_shape)
        def bool_bytes(t):
            t["extra"] = ["BOOL", [4], b"\x00\x01\x02\x03"]
        st_variant("bool bytes", bool_bytes)
    return cases


def state_cases(remat, tmp):
    """Crafted training states (valid checksums), resumed with --resume."""
    cases = []
    for task in ("classify", "lm"):
        run = os.path.join(tmp, "run-" + task)
        args = ["train", "--task", task, "--max-steps", "3", "--save-every", "1", "--stop-after-step", "2",
                "--out", run] + TINY
        # --stop-after-step ends the run as a kill would (exit 137), with its
        # state saved at step 2 of 3.
        subprocess.run([remat] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = os.path.join(run, "state.safetensors")
        tensors, meta = read_st(path)
        info = json.loads(meta["remat.state"])

        def variant(name, mutate_info=None, mutate_tensors=None, raw=None, info_text=None,
                    expect="refuse", checksum=True, extra_meta=None):
            d = os.path.join(tmp, "state-%s-%s" % (task, name.replace(" ", "_").replace("/", "_")))
            os.makedirs(d)
            p = os.path.join(d, "state.safetensors")
            if raw is not None:
                open(p, "wb").write(raw)
            else:
                i = json.loads(json.dumps(info))
                t = {k: list(v) for k, v in tensors.items()}
                if mutate_info:
                    mutate_info(i)
                if mutate_tensors:
                    mutate_tensors(t)
                write_state(p, t, info_text if info_text is not None else i,
                            meta_extra=extra_meta, checksum=checksum)
            before = open(p, "rb").read()
            cases.append(Case("training state", f"{task}: {name}",
                              ["train", "--task", task, "--max-steps", "3", "--out", d,
                               "--resume", "--threads", "1"],
                              expect=expect, must=None))
            cases[-1].keep = (p, before)

        variant("unchanged", expect="accept")
        # Written for people reading the state; a resume recomputes them from
        # the options, so any value is harmless.
        for key, values in {"epoch": ["0", -5, 10**18], "total_steps": ["3", -1, 10**18],
                            "schedule": ["x", {}]}.items():
            for v in values:
                def m(i, key=key, v=v):
                    i[key] = v
                variant(f"{key}={json.dumps(v)[:40]}", m, expect="any")
        for key, values in {
            "step": ["2", -1, 10**18, 2**64, 1.5, None, [], {}],

            "loader": ["x", {}, {"epoch": "0"}, {"epoch": 0, "index": -5, "seed": 0},
                       {"epoch": 2**62, "index": 2**62, "seed": 0, "order": []}],
            "history": ["x", {}, {"steps": "x"}, {"steps": [{"step": "one"}]}],
            "options": ["x", {}, [], None],
        }.items():
            for v in values:
                def m(i, key=key, v=v):
                    i[key] = v
                variant(f"{key}={json.dumps(v)[:40]}", m)
            def drop(i, key=key):
                del i[key]
            variant(f"no {key}", drop)
        for key, values in {
            "layers": [10**6, 10**18, -1, 0, "4"],
            "hidden": [10**6, 10**12, 0, 3],
            "heads": [0, 10**9, 7],
            "seq": [10**9, 0],
            "batch": [10**9, 0],
            "intermediate": [10**9, -1],
            "kv_heads": [10**9, -1],
            "task": ["regress", 5],
            "dtype": ["f64", 1],
            "policy": ["every-0", "budget:-1", 3],
            "lora_rank": [10**9, -1],
            "train_path": ["/dev/null", "/nonexistent", 5],
            "vocab_path": ["/dev/null", "/etc/passwd"],
            "lr": ["fast", None],
            "seed": [-1, "x"],
        }.items():
            for v in values:
                def m(i, key=key, v=v):
                    i["options"][key] = v
                variant(f"options.{key}={json.dumps(v)[:30]}", m)
        variant("info not json", info_text="{not json")
        variant("info array", info_text="[1,2]")
        variant("info empty", info_text="")
        variant("bad checksum", lambda i: i.update(step=1), checksum=False)
        variant("foreign format", extra_meta={"remat.format": "other-9"})

        def opt_garbage(t):
            t["optimizer"] = ["U8", [64], os.urandom(64)]
        variant("optimizer record garbage", mutate_tensors=opt_garbage)

        def opt_trunc(t):
            raw = t["optimizer"][2][: len(t["optimizer"][2]) // 2]
            t["optimizer"] = ["U8", [len(raw)], raw]
        variant("optimizer record truncated", mutate_tensors=opt_trunc)

        def opt_f32(t):
            raw = t["optimizer"][2][:len(t["optimizer"][2]) // 4 * 4]
            t["optimizer"] = ["F32", [len(raw) // 4], raw]
        variant("optimizer record as F32", mutate_tensors=opt_f32)

        def opt_empty(t):
            t["optimizer"] = ["U8", [0], b""]
        variant("optimizer record empty", mutate_tensors=opt_empty)

        def rng_short(t):
            t["rng.cpu"] = ["U8", [100], os.urandom(100)]
        variant("rng record short", mutate_tensors=rng_short)

        def rng_f32(t):
            raw = t["rng.cpu"][2]
            t["rng.cpu"] = ["F32", [len(raw) // 4], raw]
        variant("rng record as F32", mutate_tensors=rng_f32)

        def rng_garbage(t):
            raw = t["rng.cpu"][2]
            t["rng.cpu"] = ["U8", [len(raw)], os.urandom(len(raw))]
        variant("rng record random bytes", mutate_tensors=rng_garbage, expect="any")

        def rng_2d(t):
            raw = t["rng.cpu"][2]
            t["rng.cpu"] = ["U8", [2, len(raw) // 2], raw]
        variant("rng record 2-D", mutate_tensors=rng_2d)

        def no_rng(t):
            del t["rng.cpu"]
        variant("no rng record", mutate_tensors=no_rng)

        def weight_shape(t):
            k = sorted(x for x in t if x.startswith("model.") and len(t[x][1]) == 2)[0]
            dt, shape, raw = t[k]
            t[k] = [dt, [len(raw) // DT_BYTES[dt]], raw]
        variant("weight reshaped", mutate_tensors=weight_shape)

        def weight_nan(t):
            k = sorted(x for x in t if x.startswith("model."))[0]
            dt, shape, raw = t[k]
            t[k] = [dt, shape, b"\xff" * len(raw)]
        variant("weights NaN", mutate_tensors=weight_nan, expect="any")

        whole = open(path, "rb").read()
        variant("truncated", raw=whole[: len(whole) // 2])
        variant("empty file", raw=b"")
        variant("bit flip", raw=whole[:-100] + bytes([whole[-100] ^ 1]) + whole[-99:])
        variant("zeros", raw=b"\x00" * 4096)
    return cases


# Inputs that look hostile but are legal, each with why: a run that accepts
# them is right, not "silent". Matched on the case's name (a prefix).
BIT_FLIP = ("the flipped byte is in a __metadata__ key (\"format\" becomes \"form!t\"), "
            "which the reader ignores: every tensor is the same")
LEGAL = {
    "estimate --seq-multiple": "only --fit-seq reads it; without it, it is ignored",
    "estimate --threads": "only --check runs anything; without it, it is ignored",
    "train --log-every": "a period longer than the run: the run never logs a plain line",
    "classify: intermediate_size=0": "BERT's rule: 0 means the family's 4 x hidden_size",
    "lm: max_position_embeddings=1000000": "within its bound of 2^20; Llama allocates no "
                                            "position table",
    "classify: bit flip header": BIT_FLIP,
    "lm: bit flip header": BIT_FLIP,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--remat", default=os.path.join(ROOT, "build", "remat"))
    ap.add_argument("--timeout", type=float, default=10)
    ap.add_argument("--only", default=None, help="run only kinds containing this text")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", default=None, help="write every case's result here")
    a = ap.parse_args()
    remat = os.path.abspath(a.remat)
    if not os.access(remat, os.X_OK):
        sys.exit(f"hostile: expected the remat program at '{remat}', but it is not there")
    tmp = tempfile.mkdtemp(prefix="remat-hostile-")
    try:
        cases = (size_flag_cases() + json_files(tmp) + vocab_files(tmp)
                 + config_cases(remat, tmp) + state_cases(remat, tmp))
        for c in cases:
            if any(c.name.startswith(prefix) for prefix in LEGAL):
                c.expect = "any"
        if a.only:
            cases = [c for c in cases if a.only in c.kind or a.only in c.name]
        results = []
        kinds = {}
        bad = []
        for c in cases:
            verdict, rc, seconds, rss, last = measure(remat, c, a.timeout)
            keep = getattr(c, "keep", None)
            if keep and verdict == "clean" and open(keep[0], "rb").read() != keep[1]:
                verdict = "lost file"
            results.append({"kind": c.kind, "case": c.name, "verdict": verdict, "rc": rc,
                            "seconds": round(seconds, 2), "maxrss_bytes": rss,
                            "message": last})
            k = kinds.setdefault(c.kind, {})
            k[verdict] = k.get(verdict, 0) + 1
            k["n"] = k.get("n", 0) + 1
            k["max_s"] = max(k.get("max_s", 0), seconds)
            k["max_rss"] = max(k.get("max_rss", 0), rss)
            if verdict not in ("clean", "accepted"):
                bad.append(results[-1])
            if a.verbose or verdict not in ("clean", "accepted"):
                print(f"{verdict:9} rc={rc:4} {seconds:6.2f}s {rss / 2**20:7.0f}MiB "
                      f"[{c.kind}] {c.name}: {last[:200]}", flush=True)
        cols = ["clean", "accepted", "crash", "hang", "memory", "unclear", "silent",
                "lost file"]
        print()
        print("| kind | cases | " + " | ".join(cols) + " | slowest s | peak MiB |")
        print("|---|---:|" + "---:|" * len(cols) + "---:|---:|")
        total = {}
        for kind, k in kinds.items():
            print(f"| {kind} | {k['n']} | " + " | ".join(str(k.get(c, 0)) for c in cols)
                  + f" | {k['max_s']:.1f} | {k['max_rss'] / 2**20:.0f} |")
            for c in cols + ["n"]:
                total[c] = total.get(c, 0) + k.get(c, 0)
        print(f"| all | {total['n']} | " + " | ".join(str(total.get(c, 0)) for c in cols)
              + " | | |")
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
