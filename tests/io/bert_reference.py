#!/usr/bin/python3
"""A reference BERT (Hugging Face BertModel's computation) in plain PyTorch,
for tests/io/hf_test.cpp. Neither transformers nor safetensors is needed: the
safetensors files are parsed and written here by hand.

    bert_reference.py DIR

reads DIR/config.json, DIR/model.safetensors and DIR/inputs.safetensors
(input_ids, attention_mask: I64 [B, S]) and writes DIR/outputs.safetensors
(last_hidden_state [B, S, H], pooler_output [B, H]: F32). It fails when the
weights' names differ from BertModel's state_dict names.
"""
import json
import math
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    assert (8 + n) % 8 == 0, "header not padded to 8 bytes"
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = bytearray(data[base + begin:base + end])
        dtype = DTYPES[info["dtype"]]
        if len(raw) == 0:
            t = torch.empty(info["shape"], dtype=dtype)
        else:
            t = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"])
        out[name] = t
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        blob = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def expected_names(layers):
    names = ["embeddings.word_embeddings.weight",
             "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
             "pooler.dense.weight", "pooler.dense.bias"]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ["attention.self.query", "attention.self.key",
                  "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense",
                  "output.dense", "output.LayerNorm"]:
            names += [p + m + ".weight", p + m + ".bias"]
    return set(names)


def bert(w, cfg, ids, mask):
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    d = hidden // heads
    eps = cfg["layer_norm_eps"]
    b, s = ids.shape

    def ln(x, prefix):
        return F.layer_norm(x, (hidden,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

    def lin(x, prefix):
        return F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])

    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][torch.arange(s)][None]
         + w["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    x = ln(x, "embeddings.LayerNorm")
    # BertModel's extended mask: (1 - mask) * finfo.min, added to the scores.
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split(t):
            return t.view(b, s, heads, d).transpose(1, 2)

        q = split(lin(x, p + "attention.self.query"))
        k = split(lin(x, p + "attention.self.key"))
        v = split(lin(x, p + "attention.self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + ext
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, hidden)
        a = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inter = F.gelu(lin(a, p + "intermediate.dense"))
        x = ln(lin(inter, p + "output.dense") + a, p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "pooler.dense"))
    return x, pooled


def main():
    folder = sys.argv[1]
    with open(folder + "/config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "bert" and cfg["hidden_act"] == "gelu", cfg
    w = read_safetensors(folder + "/model.safetensors")
    want = expected_names(cfg["num_hidden_layers"])
    if set(w) != want:
        sys.exit(f"names differ from BertModel's: missing {sorted(want - set(w))}, "
                 f"unexpected {sorted(set(w) - want)}")
    assert w["encoder.layer.0.intermediate.dense.weight"].shape == (
        cfg["intermediate_size"], cfg["hidden_size"])
    inputs = read_safetensors(folder + "/inputs.safetensors")
    with torch.no_grad():
        last, pooled = bert(w, cfg, inputs["input_ids"], inputs["attention_mask"])
    write_safetensors(folder + "/outputs.safetensors",
                      {"last_hidden_state": last, "pooler_output": pooled})


if __name__ == "__main__":
    main()
