#!/usr/bin/env python3
"""Training on length-skewed documents under a memory budget: (a) padding to
--seq with one plan, (b) per-batch padding with one worst-case plan, per-batch
padding with per-shape plans, (c) token-budget batches with per-shape plans,
and (d) packing, side by side in one run, each also without checkpointing.

Writes a corpus whose document lengths are drawn log-normally between 16 and
2,048 bytes (the byte tokenizer: one token per byte), then runs `remat train
--task lm` on it once per configuration, one after another, and prints real
(unpadded) tokens per second, steps, and the largest step peak against the
budget, the seconds spent planning and the plan shapes, from each run's
--metrics. "real tokens/s" leaves planning out (step_seconds does); "with
planning" counts it, and the planning column gives its share of the run
(planning + steps). Per-shape rows plan with the default --plan-share (0.1:
past it a new shape runs under a larger shape's plan, counted in "under a
larger plan"); the "every shape planned" rows use --plan-share 1.

    bench/real_data.py --remat build/remat
    bench/real_data.py --remat build/remat --steps 30 --budget 100MiB

Timings need a quiet machine; the configurations run one after another, so
compare them within one run of this script.
"""

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

MIB = 1024.0 * 1024.0


def corpus(path, n, seed):
    rng = random.Random(seed)
    words = "the a model memory tensor layer checkpoint gradient batch token sequence".split()
    lengths = []
    with open(path, "w") as f:
        for _ in range(n):
            target = int(min(2048, max(16, math.exp(rng.gauss(math.log(150), 1.0)))))
            text = ""
            while len(text) < target:
                text += rng.choice(words) + " "
            text = text[:target]
            lengths.append(len(text))
            f.write(json.dumps({"text": text}) + "\n")
    return lengths


def run(remat, args, metrics):
    cmd = [remat, "train", "--task", "lm", "--metrics", metrics] + args
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit("real_data: %s failed: %s" % (" ".join(cmd[1:]), p.stderr.strip()[-300:]))
    steps = []
    with open(metrics) as f:
        for line in f:
            j = json.loads(line)
            if j["type"] == "step":
                steps.append(j)
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remat", default="build/remat")
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "docs.jsonl")
        lengths = corpus(data, args.docs, 1)
        print("corpus: %d documents, bytes (= tokens) min %d, median %d, max %d" % (
            len(lengths), min(lengths), statistics.median(lengths), max(lengths)))
        model = ["--train", data, "--valid-fraction", "0", "--layers", str(args.layers),
                 "--hidden", str(args.hidden), "--heads", "2", "--seq", str(args.seq),
                 "--max-steps", str(args.steps), "--threads", str(args.threads), "--seed", "1"]
        tokens = args.seq * args.batch
        configs = [
            ("(a) pad to --seq, one plan",
             ["--pad-to-seq", "--batch", str(args.batch), "--budget-plans", "worst-case"]),
            ("(b) per-batch padding, one worst-case plan",
             ["--batch", str(args.batch), "--budget-plans", "worst-case"]),
            ("per-batch padding, per-shape plans", ["--batch", str(args.batch)]),
            ("per-batch padding, every shape planned",
             ["--batch", str(args.batch), "--plan-share", "1"]),
            ("(c) --max-tokens %d, per-shape plans" % tokens,
             ["--max-tokens", str(tokens), "--batch", str(4 * args.batch)]),
            ("(c) --max-tokens %d, every shape planned" % tokens,
             ["--max-tokens", str(tokens), "--batch", str(4 * args.batch), "--plan-share", "1"]),
            ("(d) --pack, per-shape plans", ["--pack", "--batch", str(args.batch)]),
        ]
        budget_bytes = float(args.budget[:-3]) * (MIB if args.budget.endswith("MiB") else
                                                  1024 * MIB)
        print("\nllama %d x %d, seq %d, batch %d, %d steps each (largest peak / budget: "
              "budget:%s; threads %d; load average %.1f)\n" % (
                  args.layers, args.hidden, args.seq, args.batch, args.steps, args.budget,
                  args.threads, os.getloadavg()[0]))
        print("| batches | policy | real tokens/s | with planning | largest peak | peak / budget "
              "| largest predicted | planning (share of run) | plan shapes | under a larger plan |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, extra in configs:
            for policy in ["budget:" + args.budget, "none"]:
                if policy == "none" and ("--budget-plans" in extra or "--plan-share" in extra):
                    continue  # the same batches as the per-shape row's none
                try:
                    steps = run(args.remat, model + extra + ["--policy", policy],
                                os.path.join(d, "m.jsonl"))
                except SystemExit as e:
                    need = re.search(r"at least [0-9]+ bytes \(([^)]*)\)", str(e))
                    why = "refused: needs %s" % need.group(1) if need else str(e)[-120:]
                    print("| %s | %s | %s |  |  |  |  |  |  |  |" % (name, policy, why))
                    continue
                # The first step warms up: left out of the rate.
                timed = steps[1:] or steps
                rate = sum(s["tokens"] for s in timed) / sum(s["step_seconds"] for s in timed)
                peak = max(s["peak_bytes"] for s in steps)
                planned = policy != "none"
                ratio = ("%.2f" % (peak / budget_bytes)) if planned else "-"
                predicted = max(s.get("predicted_peak_bytes", 0) for s in steps)
                plan_s = sum(s.get("plan_seconds", 0) for s in steps)
                step_s = sum(s["step_seconds"] for s in steps)
                # A step's micro-batches may run under several plans, joined by " | ".
                shapes = len({p for s in steps for p in s.get("planned", "").split(" | ")})
                covered = sum(1 for s in steps if s.get("covered", 0) > 0)
                overall = sum(s["tokens"] for s in steps) / (step_s + plan_s)
                print("| %s | %s | %.0f | %.0f | %.1f MiB | %s | %s | %s | %s | %s |" % (
                    name, policy, rate, overall, peak / MIB, ratio,
                    ("%.1f MiB" % (predicted / MIB)) if planned else "-",
                    ("%.2f s (%.0f%%)" % (plan_s, 100 * plan_s / (plan_s + step_s)))
                    if planned else "-",
                    shapes if planned else "-",
                    ("%d of %d steps" % (covered, len(steps))) if planned else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
