#!/usr/bin/env python3
"""Regenerates every measured figure block in README.md and docs/*.md.

A figure block in a Markdown file is the text between

    <!-- figure: NAME -->
    <!-- /figure -->

and NAME is one of FIGURES below: the commands that measure it and how its
text is made from their JSON. Nothing between the markers is typed by hand,
so no figure drifts silently from what the program measures.

    scripts/figures.py --remat build/remat            # every block, rewritten
    scripts/figures.py --remat build/remat --only headline-bench
    scripts/figures.py --remat build/remat --check --cheap
        # the deterministic blocks (analytic estimates) only, compared with
        # the files: exit 1 naming the block that differs (a ctest does this)
    scripts/figures.py --list

Measured timings move from run to run (a shared machine); byte counts and
estimates do not. `make figures` runs every block (several minutes on 2
cores).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024.0 * 1024.0


def mib(n):
    return "%.1f MiB" % (n / MIB)


def run(remat, args, cwd=None, exit_codes=(0,)):
    """Runs remat with `args`, returns stdout; raises naming the command when
    it exits with a code not in `exit_codes`."""
    cmd = [remat] + args
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode not in exit_codes:
        raise RuntimeError("figures: '%s' exited %d: %s" % (" ".join(args), p.returncode,
                                                           p.stderr.strip().splitlines()[-1:]))
    return p.stdout


def run_json(remat, args):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        run(remat, args + ["--json", path])
        with open(path) as f:
            return json.load(f)


def command_line(args):
    return "`remat " + " ".join(args) + "`"


def load_note():
    """The machine's load when a timing was taken: timings on a shared
    machine are only comparable side by side, and a reader should see it."""
    return "load average %.1f on %d cores when measured" % (os.getloadavg()[0], os.cpu_count())


# ---------------------------------------------------------------- figures

WORKED = ["estimate", "--preset", "llama-13b-lora-8k"]


def worked_example(remat):
    """The worked 13B fine-tune against the estimate (analytic)."""
    out = run(remat, WORKED)
    lines = [l for l in out.splitlines() if l.startswith("|")]
    if not lines:
        raise RuntimeError("figures: %s printed no table" % command_line(WORKED))
    return "\n".join(lines)


HEADLINE = ["bench", "--layers", "12", "--hidden", "256", "--heads", "4", "--seq", "256",
            "--batch", "8", "--policy", "none,every-layer", "--steps", "5"]


def headline_bench(remat):
    """README's headline: BERT 12x256 with and without checkpointing."""
    j = run_json(remat, HEADLINE)
    runs = {r["policy"]: r for r in j["runs"]}
    none = runs["none"]
    rows = [
        "%s (BERT, dropout %g, weights %s, %d threads; step times are medians of %d, %s):" % (
            command_line(HEADLINE), j["config"]["dropout"], mib(j["config"]["weight_bytes"]),
            j["config"]["threads"] or os.cpu_count(), j["config"]["steps"], load_note()),
        "",
        "| policy | held before backward | peak | activations | step | vs none | max abs grad diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ["none", "every-layer"]:
        r = runs[name]
        act = mib(r["activation_bytes"])
        if name != "none":
            act += " (%.3fx)" % (r["activation_bytes"] / none["activation_bytes"])
        diff = r.get("max_abs_grad_diff") or 0
        rows.append("| %s | %s | %s | %s | %.3f s | %.2fx | %g |" % (
            name, mib(r["held_before_backward_bytes"]), mib(r["peak_bytes"]), act,
            r["step_seconds"], r["step_seconds"] / none["step_seconds"], diff))
    return "\n".join(rows)


BUDGETS = ["bench", "--model", "llama", "--layers", "8", "--hidden", "256", "--heads", "4",
           "--seq", "512", "--batch", "2", "--policy",
           "none,every-layer,budget:200MiB,budget:260MiB,budget:320MiB", "--steps", "2",
           "--warmup", "1"]


def budget_peaks(remat):
    """A budget's predicted peak against the measured one, in bench."""
    j = run_json(remat, BUDGETS)
    rows = [
        command_line(BUDGETS) + ":",
        "",
        "| policy | schedule the plan chose | predicted peak | measured peak |",
        "|---|---|---:|---:|",
    ]
    for r in j["runs"]:
        if "predicted_peak_bytes" in r:
            rows.append("| %s | %s | %s | %s |" % (r["policy"], r["schedule"],
                                                 mib(r["predicted_peak_bytes"]),
                                                 mib(r["peak_bytes"])))
        else:
            rows.append("| %s | (fixed) | | %s |" % (r["policy"], mib(r["peak_bytes"])))
    return "\n".join(rows)


def train_default(remat):
    """`remat train`'s defaults on the bundled data, with and without checkpointing."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "ckpt.jsonl")
        none = os.path.join(d, "none.jsonl")
        a = ["train", "--threads", "1", "--compare-policy", "none", "--metrics", ckpt]
        b = ["train", "--threads", "1", "--policy", "none", "--metrics", none]
        err_a = subprocess.run([remat] + a, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, check=True).stderr
        run(remat, b, cwd=ROOT)

        def read(path):
            out = {"step": [], "eval": [], "compare_step": []}
            with open(path) as f:
                for line in f:
                    j = json.loads(line)
                    out.setdefault(j["type"], []).append(j)
            return out

        ra, rb = read(ckpt), read(none)
    params = re.search(r"([0-9]+) parameters", err_a).group(1)
    fa, fb = ra["eval"][-1], rb["eval"][-1]
    peak = lambda steps: max(s["peak_bytes"] for s in steps)
    med = lambda steps: statistics.median(s["step_seconds"] for s in steps)
    equal = sum(1 for x, y in zip(ra["step"], rb["step"]) if x["loss"] == y["loss"])
    cmp_a = [s for s in ra["step"][: len(ra["compare_step"])]]
    diff = max(abs(s["loss"] - s["compare_loss"]) for s in cmp_a if "compare_loss" in s)
    rows = [
        "The default model has %s parameters. %d steps of %d rows, `--threads 1` (%s):" % (
            "{:,}".format(int(params)), len(ra["step"]), 16, load_note()),
        "",
        "| | every-layer (default) | none |",
        "|---|---|---|",
        "| command | %s | %s |" % (command_line(a[:-2] + ["--metrics", "ckpt.jsonl"]),
                                   command_line(b[:-2] + ["--metrics", "none.jsonl"])),
        "| validation macro-F1 | %.4f | %.4f |" % (fa["macro_f1"], fb["macro_f1"]),
        "| peak memory (largest step) | %s | %s |" % (mib(peak(ra["step"])), mib(peak(rb["step"]))),
        "| median step time (whole run) | %.4f s | %.4f s (checkpointing %+.0f%%) |" % (
            med(ra["step"]), med(rb["step"]), 100 * (med(ra["step"]) / med(rb["step"]) - 1)),
        "| over the %d compared steps (`--compare-policy none`) | peak %s, median %.4f s | peak %s, median %.4f s |" % (
            len(ra["compare_step"]), mib(peak(cmp_a)), med(cmp_a),
            mib(peak(ra["compare_step"])), med(ra["compare_step"])),
        "| largest \\|loss difference\\| per compared step | %g | |" % diff,
        "| step losses equal to the bit, whole runs | %d of %d | |" % (equal, len(ra["step"])),
    ]
    return "\n".join(rows)


REAL_DATA = ["--docs", "300", "--steps", "40", "--layers", "2", "--hidden", "64", "--seq", "1024",
             "--batch", "4", "--threads", "1"]


def real_data(remat):
    """bench/real_data.py: length-skewed documents under a budget, batched four ways."""
    out = []
    # A budget all four fit, then the issue's: one that only per-shape plans fit.
    for budget in ["128MiB", "64MiB"]:
        args = REAL_DATA + ["--budget", budget]
        cmd = [sys.executable, os.path.join(ROOT, "bench", "real_data.py"), "--remat", remat] + args
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError("figures: bench/real_data.py exited %d: %s" % (
                p.returncode, p.stderr.strip().splitlines()[-1:]))
        out.append("`python3 bench/real_data.py %s`:\n\n%s" % (" ".join(args), p.stdout.strip()))
    return "\n\n".join(out)


CHECKS = [
    ["estimate", "--model", "bert", "--layers", "4", "--hidden", "64", "--heads", "4",
     "--vocab", "100", "--seq", "64", "--batch", "2"],
    ["estimate", "--model", "llama", "--layers", "4", "--hidden", "64", "--heads", "4",
     "--kv-heads", "2", "--intermediate", "172", "--vocab", "128", "--seq", "64", "--batch", "2",
     "--head", "lm"],
]
CHECK_POLICIES = ["--policy", "none,every-layer,selective-attention,save-matmuls,"
                  "save-projections,compress", "--check", "--threads", "2"]


def estimate_check(remat):
    """The estimator against measured steps, per-op and compressed policies included."""
    out = []
    for args in CHECKS:
        # Exit 1 means a peak is off by more than 10%: the table says which.
        out_text = run(remat, args + CHECK_POLICIES, exit_codes=(0, 1))
        check = out_text[out_text.index("\nCheck:"):].strip().splitlines()[1:]
        table = "\n".join(l for l in check if l.strip())
        out.append("%s:\n\n```\n%s\n```" % (command_line(args + CHECK_POLICIES), table))
    return "\n\n".join(out)


# name -> (function, cheap: deterministic and fast enough for a test)
FIGURES = {
    "worked-example": (worked_example, True),
    "headline-bench": (headline_bench, False),
    "budget-peaks": (budget_peaks, False),
    "train-default": (train_default, False),
    "real-data": (real_data, False),
    "estimate-check": (estimate_check, False),
}

BLOCK = re.compile(r"(<!-- figure: ([a-z0-9-]+) -->\n)(.*?)(<!-- /figure -->)", re.S)


def markdown_files():
    out = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    out += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remat", default=os.path.join(ROOT, "build", "remat"))
    ap.add_argument("--only", action="append", default=[], help="a block name (repeatable)")
    ap.add_argument("--cheap", action="store_true", help="only the deterministic blocks")
    ap.add_argument("--check", action="store_true",
                    help="compare with the files instead of writing them")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, (fn, cheap) in FIGURES.items():
            print("%-16s %s%s" % (name, fn.__doc__.split("\n")[0], " (cheap)" if cheap else ""))
        return 0
    for name in args.only:
        if name not in FIGURES:
            print("figures: --only: expected one of %s, but got '%s'" % (", ".join(FIGURES), name),
                  file=sys.stderr)
            return 2
    if not os.access(args.remat, os.X_OK):
        print("figures: expected the remat program at %s (build it, or pass --remat)" % args.remat,
              file=sys.stderr)
        return 2
    wanted = lambda name: (not args.only or name in args.only) and (
        not args.cheap or FIGURES[name][1])
    cache = {}
    seen = set()
    stale = []
    for path in markdown_files():
        with open(path) as f:
            text = f.read()

        def replace(m):
            name = m.group(2)
            if name not in FIGURES:
                raise SystemExit("figures: %s: unknown block '%s' (expected one of %s)" % (
                    os.path.relpath(path, ROOT), name, ", ".join(FIGURES)))
            seen.add(name)
            if not wanted(name):
                return m.group(0)
            if name not in cache:
                print("figures: %s ..." % name, file=sys.stderr, flush=True)
                cache[name] = FIGURES[name][0](args.remat).rstrip("\n") + "\n"
            if cache[name] != m.group(3):
                stale.append("%s (%s)" % (name, os.path.relpath(path, ROOT)))
            return m.group(1) + cache[name] + m.group(4)

        new = BLOCK.sub(replace, text)
        if not args.check and new != text:
            tmp = path + ".tmp.%d" % os.getpid()
            with open(tmp, "w") as f:
                f.write(new)
            os.replace(tmp, path)
    missing = [n for n in FIGURES if n not in seen]
    if missing:
        print("figures: no block in the docs for %s" % ", ".join(missing), file=sys.stderr)
        return 1
    if args.check and stale:
        print("figures: out of date: %s; run scripts/figures.py --remat %s" % (
            ", ".join(stale), args.remat), file=sys.stderr)
        return 1
    print("figures: %s %s" % ("checked" if args.check else "regenerated",
                             ", ".join(sorted(cache)) or "nothing"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
