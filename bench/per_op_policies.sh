#!/bin/sh
# Per-op policies and compression beside none, every-layer and
# selective-attention (issue 21's measurement): the two `remat bench` runs
# whose tables docs/per_op_policies.md quotes, each policy in a process of
# its own, rounds interleaved so that load which comes and goes lands on
# every policy alike.
#
#   bench/per_op_policies.sh              # both models (about 15 minutes on 2 cores)
#   MODELS=bert bench/per_op_policies.sh  # one of them
#   ROUNDS=5 REMAT=path/to/remat bench/per_op_policies.sh
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
REMAT=${REMAT:-$here/build/remat}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-bert,llama}
[ -x "$REMAT" ] || { echo "per_op_policies.sh: expected the remat program at $REMAT (build it, or set REMAT)" >&2; exit 2; }

run() {
  echo "\$ remat bench $*"
  "$REMAT" bench "$@" --rounds "$ROUNDS" --steps 3 --warmup 1 | grep -v '^\[[0-9]*/[0-9]*\]'
  echo
}
case ",$MODELS," in *,bert,*)
  run --layers 12 --hidden 256 --heads 4 --seq 256 --batch 8 \
      --policy none,every-layer,selective-attention,save-matmuls,save-projections,compress ;;
esac
case ",$MODELS," in *,llama,*)
  run --model llama --layers 8 --hidden 512 --heads 8 --seq 1024 --batch 2 \
      --policy none,every-layer,selective-attention,save-matmuls,save-projections,compress ;;
esac
