#!/bin/sh
# The planner against the fixed policies at budgets of 25%, 50% and 75% of
# the peak without checkpointing (issue 4's measurement): profiles the model,
# plans each budget, then runs every plan and every fixed policy, each in a
# process of its own (`remat plan --measure`), and prints one table from the
# JSON report.
#
#   bench/plan_budgets.sh                      # the issue's Llama (minutes)
#   bench/plan_budgets.sh --layers 4 --seq 256 # any `remat plan` flag overrides
#   BUDGETS=40%,60% bench/plan_budgets.sh
#   REMAT=path/to/remat OUT=plan.json bench/plan_budgets.sh
#
# Percentages are of the predicted peak without checkpointing (within ~1% of
# the measured one; both are in the table). Timings need a quiet machine:
# the schedules run one after another, so load that comes and goes slows
# some more than others; `--rounds 2` (or more) runs every schedule's
# process again in reverse order and pools the samples, which cancels a
# steady drift.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
REMAT=${REMAT:-$here/build/remat}
OUT=${OUT:-plan_budgets.json}
BUDGETS=${BUDGETS:-25%,50%,75%}
[ -x "$REMAT" ] || { echo "plan_budgets.sh: expected the remat program at $REMAT (build it, or set REMAT)" >&2; exit 2; }

# The issue's configuration; a flag given on the command line replaces its
# default here (remat refuses a flag given twice).
defaults=""
for pair in --model=llama --layers=8 --hidden=512 --heads=8 --seq=1024 --batch=2 \
            --steps=3 --warmup=1 --budget=$BUDGETS; do
  flag=${pair%%=*}
  case " $* " in
    *" $flag "*|*" $flag="*) ;;
    *) defaults="$defaults $pair" ;;
  esac
done

status=0
# shellcheck disable=SC2086 # $defaults holds whole --flag=value words
"$REMAT" plan $defaults --measure --json "$OUT" "$@" || status=$?
# Exit code 1: a budget below the smallest feasible was refused; the others
# were still planned and measured, and the report says which.
[ "$status" -le 1 ] && [ -f "$OUT" ] || exit "$status"

python3 - "$OUT" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
mib = lambda b: "%.1f MiB" % (b / 2**20)
pol = {p["name"]: p for p in j["policies"]}
none = pol["none"]
t0 = none.get("measured_step_seconds") or 0
rel = lambda s: "%.2fx" % (s / t0) if t0 and s else "-"
c = j["config"]
print()
print("%s, %d layers, hidden %d, %d heads, seq %d, batch %d, %s, threads %d" % (
    c["model"], c["layers"], c["hidden"], c["heads"], c["seq"], c["batch"], c["dtype"], c["threads"]))
print("none: predicted peak %s, measured %s, step %.3f s; smallest feasible budget %s (%.0f%% of none's predicted peak)" % (
    mib(j["none_predicted_peak_bytes"]), mib(none.get("measured_peak_bytes", 0)), t0,
    mib(j["min_feasible_budget_bytes"]), 100.0 * j["min_feasible_budget_bytes"] / j["none_predicted_peak_bytes"]))
print()
print("| budget | plan | measured peak | step vs none | best fixed policy within budget | its peak | its step vs none | plan / best fixed |")
print("|---|---|---:|---:|---|---:|---:|---:|")
for b in j["budgets"]:
    head = "| %s = %s " % (b["budget"], mib(b["budget_bytes"]))
    if not b["feasible"]:
        print(head + "| infeasible: %s | - | - | - | - | - | - |" % b["error"])
        continue
    p = b["plan"]
    if not p.get("measured_ok"):
        print(head + "| %s | failed: %s | - | - | - | - | - |" % (p["schedule"], p.get("error", "")))
        continue
    row = head + "| %s | %s%s | %s " % (
        p["schedule"], mib(p["measured_peak_bytes"]),
        "" if p["measured_peak_bytes"] <= b["budget_bytes"] else " (ABOVE)",
        rel(p["measured_step_seconds"]))
    best = b.get("best_fixed_policy")
    if best:
        row += "| %s | %s | %s | %.2f |" % (best, mib(b["best_fixed_peak_bytes"]),
            rel(b["best_fixed_step_seconds"]), p["measured_step_seconds"] / b["best_fixed_step_seconds"])
    else:
        row += "| none fits | - | - | - |"
    print(row)
PY
exit "$status"
