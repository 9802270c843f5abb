"""remat against Hugging Face transformers, side by side: the same training
step, configuration and thread count, under `none` and `every-layer`
checkpointing, with step time and peak memory of each.

    /root/.cache/remat/torch2-venv/bin/python bench/hf_compare.py \\
        --remat build-torch2/remat [--model bert|llama] [--layers 12 --hidden 256
        --heads 4 --seq 256 --batch 8] [--policy none,every-layer]
        [--device cpu|cuda] [--dtype fp32|bf16] [--steps 5 --warmup 1]
        [--threads 2] [--rounds 1]

The step on both sides is `remat bench`'s: zero the gradients (set to None),
forward, loss, backward. BERT (BertModel): MSE of the last hidden state
against a fixed random target, all-ones attention mask, dropout 0.1 unless
--dropout says otherwise. Llama (LlamaForCausalLM): next-token loss of the
input ids (transformers computes full logits; remat's forward_loss does not).
Both sides use the same attention kind (--attention eager|sdpa) and the same
sizes (remat bench's family defaults for vocab and MLP width). Weights and
inputs are random; their values do not matter for time or memory.

How each side is run and measured:

  * Every (side, policy) pair runs in a process of its own, so that no run
    inherits another's allocator state, and the runs alternate: remat none,
    HF none, remat every-layer, HF every-layer, ..., then the same list
    reversed (the VM's speed drifts; each side sees early and late slots).
    --rounds N repeats the pair of passes; step times are pooled per cell.
  * remat: `remat bench --policy P --isolation in-process --json FILE`, one
    policy per process. Step time: its median step_seconds. Peak: its
    peak_bytes, the exact bytes of live tensors counted by remat's allocator
    (weights, inputs and gradients included).
  * transformers: this script with --child. HF's checkpointing is
    activation_checkpointing_enable() (gradient_checkpointing_enable() before
    transformers 5), with its default use_reentrant=False. Step time: median
    over --steps timed steps after --warmup steps, wall clock of forward + loss
    + backward, as remat times it. Peak on CPU: one extra step (not timed) run
    under torch.profiler with profile_memory=True; its raw allocation events
    (kineto "[memory]" events: +bytes at allocation, -bytes at free, the
    sizes the CPU allocator was asked for) are summed in time order, and the
    peak of that running sum is added to the bytes already live when the step
    starts (the unique storages of parameters, buffers and inputs; gradients
    are None then). That is the same quantity remat counts. The check that the
    running sum is exact: at the end of the step it must equal the bytes of
    the gradients, which the script prints as "end - grads" (0 when exact).
    Peak on CUDA: torch.cuda.max_memory_allocated() over the measured step,
    after reset_peak_memory_stats() (also tensor bytes, weights included).
  * Peak RSS of both sides' processes (os.wait4's ru_maxrss) is reported as a
    cross-check; it includes the interpreter, the libraries and allocator
    caches, so it is larger than the tensor peaks, and more so for Python.

Policies other than none and every-layer (selective-attention, every-K, ...)
run on remat only; transformers' row prints "—".
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HF_POLICIES = ("none", "every-layer")


def family_defaults(a):
    """remat bench's apply_family_defaults, so both sides build one model."""
    llama = a.model == "llama"
    if a.vocab == 0:
        a.vocab = 32000 if llama else 30522
    if a.dropout < 0:
        a.dropout = 0.0 if llama else 0.1
    if a.intermediate == 0:
        a.intermediate = ((8 * a.hidden // 3 + 255) // 256 * 256) if llama else 4 * a.hidden
    if a.kv_heads == 0:
        a.kv_heads = a.heads


# ------------------------------------------------------------ the HF child


def hf_child(a):
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if a.model == "llama":
        config = transformers.LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads, max_position_embeddings=max(4096, a.seq),
            attention_dropout=a.dropout, attn_implementation=a.attention)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, intermediate_size=a.intermediate,
            max_position_embeddings=max(512, a.seq), hidden_dropout_prob=a.dropout,
            attention_probs_dropout_prob=a.dropout, attn_implementation=a.attention)
        model = transformers.BertModel(config)
    model.to(device).train()
    if a.policy == "every-layer":
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(a.vocab, (a.batch, a.seq), device=device)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device=device)
    target = torch.randn(a.batch, a.seq, a.hidden, device=device)
    autocast_dtype = torch.bfloat16 if a.dtype == "bf16" else None

    def step():
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=autocast_dtype is not None):
            if a.model == "llama":
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                out = model(input_ids=ids, attention_mask=mask)
                loss = torch.nn.functional.mse_loss(out.last_hidden_state.float(), target)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()

    def storage_bytes(tensors):
        seen = {}
        for t in tensors:
            if t is not None:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    check = None
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
        live_before = None
    else:
        from torch.profiler import ProfilerActivity, profile

        model.zero_grad(set_to_none=True)
        live = list(model.parameters()) + list(model.buffers()) + [ids, mask, target]
        live_before = storage_bytes(live)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"]
        events.sort(key=lambda e: e.start_ns())
        running = high = 0
        for e in events:
            running += e.nbytes()
            high = max(high, running)
        peak = live_before + high
        grads = storage_bytes([p.grad for p in model.parameters()])
        check = running - grads
    times = [step() for _ in range(a.steps)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"step_seconds": statistics.median(times), "step_seconds_all": times,
               "peak_bytes": peak, "held_before_forward_bytes": live_before,
               "end_minus_grads_bytes": check, "maxrss_kib": usage.ru_maxrss,
               "threads": torch.get_num_threads(),
               "transformers": transformers.__version__, "torch": torch.__version__},
              sys.stdout)


# ------------------------------------------------------------ the parent


def run_measured(cmd):
    """Runs cmd in its own process; returns (stdout, stderr, peak RSS bytes)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return stdout, stderr, usage.ru_maxrss * 1024


def remat_cmd(a, policy, json_path):
    cmd = [a.remat, "bench", "--model", a.model, "--layers", a.layers, "--hidden", a.hidden,
           "--heads", a.heads, "--intermediate", a.intermediate, "--seq", a.seq,
           "--batch", a.batch, "--vocab", a.vocab, "--dropout", a.dropout,
           "--dtype", a.dtype, "--attention", a.attention, "--policy", policy,
           "--steps", a.steps, "--warmup", a.warmup, "--threads", a.threads,
           "--seed", a.seed, "--isolation", "in-process", "--json", json_path]
    if a.model == "llama":
        cmd += ["--kv-heads", a.kv_heads]
    if a.device != "cpu":
        # `remat bench --device` (CUDA) is passed through as asked.
        cmd += ["--device", a.device]
    return [str(c) for c in cmd]


def hf_cmd(a, policy):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--policy", policy]
    for k in ("model", "layers", "hidden", "heads", "kv_heads", "intermediate", "seq",
              "batch", "vocab", "dropout", "dtype", "attention", "steps", "warmup",
              "threads", "seed", "device"):
        cmd += ["--" + k.replace("_", "-"), getattr(a, k)]
    return [str(c) for c in cmd]


def run_cell(a, side, policy, tmp):
    if side == "remat":
        path = os.path.join(tmp, f"remat_{policy}.json")
        _, _, rss = run_measured(remat_cmd(a, policy, path))
        with open(path) as f:
            j = json.load(f)
        r = j["runs"][0]
        if not r.get("ok", False):
            sys.exit(f"remat bench {policy}: {r.get('error')}")
        cfg = j["config"]
        for k in ("intermediate", "vocab", "layers", "hidden", "seq", "batch"):
            if cfg.get(k) != getattr(a, k):
                sys.exit(f"remat bench ran {k}={cfg.get(k)}, this script {getattr(a, k)}")
        return {"step": r["step_seconds"], "steps": r["step_seconds_all"],
                "peak": r["peak_bytes"], "held": r["held_before_forward_bytes"],
                "rss": rss, "threads": cfg["threads"]}
    out, _, rss = run_measured(hf_cmd(a, policy))
    j = json.loads(out)
    return {"step": j["step_seconds"], "steps": j["step_seconds_all"],
            "peak": j["peak_bytes"], "held": j["held_before_forward_bytes"],
            "check": j["end_minus_grads_bytes"], "rss": rss, "threads": j["threads"],
            "versions": f"transformers {j['transformers']}, torch {j['torch']}"}


def mib(n):
    return f"{n / 2**20:,.1f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--remat", default="build-torch2/remat", help="the remat program")
    p.add_argument("--model", choices=["bert", "llama"], default="bert")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0, help="llama (0: --heads)")
    p.add_argument("--intermediate", type=int, default=0, help="0: remat bench's default")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=0, help="0: BERT 30522, Llama 32000")
    p.add_argument("--dropout", type=float, default=-1, help="default: BERT 0.1, Llama 0")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention", choices=["eager", "sdpa"], default="eager")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--policy", default="none,every-layer",
                   help="comma-separated remat policies; HF runs none and every-layer")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, both sides")
    p.add_argument("--rounds", type=int, default=1, help="pairs of passes (forward, reversed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    family_defaults(a)
    if a.child:
        hf_child(a)
        return

    policies = a.policy.split(",")
    if "none" not in policies:
        policies.insert(0, "none")  # the "step vs none" column needs it
    cells = [(side, pol) for pol in policies for side in ("remat", "hf")
             if side == "remat" or pol in HF_POLICIES]
    order = []
    for _ in range(a.rounds):
        order += cells + cells[::-1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (side, pol) in enumerate(order):
            print(f"[{i + 1}/{len(order)}] {side} {pol}", file=sys.stderr, flush=True)
            r = run_cell(a, side, pol, tmp)
            results.setdefault((side, pol), []).append(r)

    def cell(side, pol):
        rs = results[(side, pol)]
        steps = [s for r in rs for s in r["steps"]]
        return {"step": statistics.median(steps), "peak": max(r["peak"] for r in rs),
                "rss": max(r["rss"] for r in rs), "runs": rs}

    print(f"\n{a.model}: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, "
          f"intermediate {a.intermediate}, seq {a.seq}, batch {a.batch}, vocab {a.vocab}, "
          f"dropout {a.dropout}, {a.dtype}, attention {a.attention}, device {a.device}, "
          f"threads {a.threads}, {a.steps} timed steps after {a.warmup} warm-up per run, "
          f"{len(order)} runs alternating\n")
    print("| side | policy | peak (tensor bytes) | step (median) | step vs none | peak RSS |")
    print("|---|---|---|---|---|---|")
    for pol in policies:
        for side in ("remat", "hf"):
            name = "remat" if side == "remat" else "transformers"
            if (side, pol) not in results:
                print(f"| {name} | {pol} | — | — | — | — |")
                continue
            c, none = cell(side, pol), cell(side, "none")
            print(f"| {name} | {pol} | {mib(c['peak'])} | {c['step'] * 1000:,.0f} ms | "
                  f"{c['step'] / none['step']:.2f}x | {mib(c['rss'])} |")
    hf_runs = [r for (side, _), rs in results.items() if side == "hf" for r in rs]
    remat_runs = [r for (side, _), rs in results.items() if side == "remat" for r in rs]
    print(f"\nlive at step start: remat {mib(remat_runs[0]['held'])}"
          + (f", transformers {mib(hf_runs[0]['held'])}" if hf_runs[0]["held"] else ""))
    if a.device == "cpu":
        print("transformers' byte count, end - grads (0 when exact): "
              + ", ".join(str(r["check"]) for r in hf_runs))
    print(f"threads: remat {remat_runs[0]['threads']}, transformers {hf_runs[0]['threads']}; "
          f"{hf_runs[0]['versions']}")


if __name__ == "__main__":
    main()
