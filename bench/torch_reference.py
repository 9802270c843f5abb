#!/usr/bin/python3
"""What a Python user gets: the `remat bench` BERT step in plain PyTorch, with
torch.utils.checkpoint around every layer, timed side by side in one process.

    /usr/bin/python3 bench/torch_reference.py [--layers 12 --hidden 256 --heads 4
        --seq 256 --batch 8 --dropout 0.1 --steps 5 --warmup 1 --threads 0]

Same model and step as `remat bench --model bert` (Hugging Face BertModel's
layers, MSE loss of the last hidden state against a random target). It prints
the median step time of no checkpointing and of torch.utils.checkpoint per
layer (use_reentrant=False and True), and each one's ratio to none, so the
overhead of remat's checkpoint can be compared with PyTorch's own on the same
machine. Memory is not compared here: PyTorch 1.13 has no exact CPU byte
counter (remat's allocator is one).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Layer(nn.Module):
    def __init__(self, h, heads, inter, p):
        super().__init__()
        self.heads, self.p = heads, p
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out, self.ln1 = nn.Linear(h, h), nn.LayerNorm(h, eps=1e-12)
        self.inter, self.out = nn.Linear(h, inter), nn.Linear(inter, h)
        self.ln2 = nn.LayerNorm(h, eps=1e-12)

    def forward(self, x, mask):
        b, s, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (d ** 0.5) + mask
        probs = F.dropout(torch.softmax(scores, -1), self.p, self.training)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        a = self.ln1(F.dropout(self.attn_out(ctx), self.p, self.training) + x)
        return self.ln2(F.dropout(self.out(F.gelu(self.inter(a))), self.p, self.training) + a)


class Bert(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.word = nn.Embedding(a.vocab, a.hidden)
        self.pos = nn.Embedding(max(512, a.seq), a.hidden)
        self.token_type = nn.Embedding(2, a.hidden)
        self.ln = nn.LayerNorm(a.hidden, eps=1e-12)
        self.p = a.dropout
        self.layers = nn.ModuleList(
            Layer(a.hidden, a.heads, 4 * a.hidden, a.dropout) for _ in range(a.layers))

    def forward(self, ids, mask, mode):
        pos = torch.arange(ids.shape[1])
        x = self.word(ids) + self.pos(pos)[None] + self.token_type(torch.zeros_like(ids))
        x = F.dropout(self.ln(x), self.p, self.training)
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            if mode == "none":
                x = layer(x, bias)
            else:
                x = checkpoint(layer, x, bias, use_reentrant=(mode == "reentrant"))
        return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("layers", 12), ("hidden", 256), ("heads", 4), ("seq", 256),
                          ("batch", 8), ("vocab", 30522), ("steps", 5), ("warmup", 1),
                          ("threads", 0)]:
        ap.add_argument("--" + name, type=int, default=default)
    ap.add_argument("--dropout", type=float, default=0.1)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Bert(a).train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    mask = torch.ones(a.batch, a.seq, dtype=torch.long)
    target = torch.randn(a.batch, a.seq, a.hidden)
    modes = ["none", "non-reentrant", "reentrant"]
    times = {m: [] for m in modes}
    # Interleaved, so that a noisy neighbour hits every mode alike.
    for step in range(a.warmup + a.steps):
        for m in modes:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.mse_loss(model(ids, mask, m), target)
            loss.backward()
            if step >= a.warmup:
                times[m].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{a.layers} layers, hidden {a.hidden}, seq {a.seq}, batch {a.batch}")
    base = statistics.median(times["none"])
    for m in modes:
        med = statistics.median(times[m])
        label = "none" if m == "none" else f"checkpoint per layer ({m})"
        print(f"{label:42s} {med:8.3f} s  {med / base:5.2f}x")


if __name__ == "__main__":
    main()
