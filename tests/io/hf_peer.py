"""Hugging Face transformers as the peer of remat's models, for
tests/io/hf_peer_test.cpp. Needs torch, transformers and safetensors (the
torch 2.x virtual environment); without transformers it prints a line
starting with "SKIP:" and exits with status 77, so that the C++ test can skip
with the reason.

    hf_peer.py step bert|llama DIR
        Builds a small random model from a config (seeded, dropout 0, eager
        attention), saves it with save_pretrained into DIR (config.json,
        model.safetensors), writes DIR/inputs.safetensors, and runs one
        training step (forward + backward, train mode) twice: without
        checkpointing, then with activation checkpointing enabled as a user
        would (use_reentrant=False, transformers' default). Each run writes
        DIR/hf_<policy>.safetensors (policy: none, every-layer) with the
        outputs, the loss ([1]), "grad.<name>" for every parameter, and
        "layer0_calls" ([1]): how many times layer 0's attention ran, 1
        without checkpointing and 2 when the backward recomputed it. The
        script fails when it was not recomputed.

    hf_peer.py load DIR CLASS [DIR CLASS ...]
        from_pretrained(DIR, output_loading_info=True) for each folder (CLASS:
        BertForSequenceClassification, BertModel, LlamaForCausalLM) and checks
        that nothing is missing, unexpected or of another shape, and that
        every tensor of DIR/model.safetensors arrived unchanged. Prints one
        line per folder; exits 1 on the first problem.

    hf_peer.py save DIR
        save_pretrained of a random BertModel into DIR/bert and a random
        LlamaForCausalLM into DIR/llama (vocabulary 320: the default data of
        `remat train` has a 318-token vocabulary), for `remat train --init`.
"""
import sys
import warnings

try:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
except ImportError as e:
    print(f"SKIP: needs transformers and safetensors: {sys.executable} has "
          f"none ({e}; make test TORCH=2 runs it)")
    sys.exit(77)

# The peer's own progress bars and deprecation notes are noise in a test log.
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 320  # at least remat train's default tokenizer (318 ids)
BATCH, SEQ = 2, 16
POLICIES = ["none", "every-layer"]


def bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")


def llama_config():
    # rope_theta other than the default: transformers 5 writes it inside
    # "rope_parameters", and a reader that misses it runs the default 10000.
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_dropout=0.0,
        attn_implementation="eager")


def randomize(model):
    """Weights far from the initialisation (LayerNorm/RMSNorm weights 1,
    biases 0), so that a swapped or misread tensor changes the result."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)


def enable_checkpointing(model):
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated
    # alias) to activation_checkpointing_enable; both default to
    # use_reentrant=False.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ - 5:] = 0  # row 0 is padded at the end
    ids[0, SEQ - 5:] = 0
    return ids, mask, g


def step(family, folder):
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertModel(bert_config())
        attention = model.encoder.layer[0].attention
    else:
        model = transformers.LlamaForCausalLM(llama_config())
        attention = model.model.layers[0].self_attn
    randomize(model)
    model.save_pretrained(folder)

    ids, mask, g = inputs()
    extra = {}
    if family == "bert":
        # The loss: fixed random projections of both outputs, so that every
        # position and the pooler get a gradient of their own.
        extra["proj_last"] = torch.randn(BATCH, SEQ, 64, generator=g)
        extra["proj_pooled"] = torch.randn(BATCH, 64, generator=g)
    else:
        extra["labels"] = ids.masked_fill(mask == 0, -100)
    save_file({"input_ids": ids, "attention_mask": mask, **extra},
              folder + "/inputs.safetensors")

    calls = [0]
    # A pre-hook on a module inside the checkpointed layer: it runs again
    # when the backward recomputes the layer.
    attention.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.train()
    for policy in POLICIES:
        if policy == "every-layer":
            enable_checkpointing(model)
        model.zero_grad(set_to_none=True)
        calls[0] = 0
        if family == "bert":
            out = model(input_ids=ids, attention_mask=mask)
            loss = ((out.last_hidden_state * extra["proj_last"]).sum()
                    + (out.pooler_output * extra["proj_pooled"]).sum())
            result = {"last_hidden_state": out.last_hidden_state,
                      "pooler_output": out.pooler_output}
        else:
            out = model(input_ids=ids, attention_mask=mask,
                        labels=extra["labels"], use_cache=False)
            loss = out.loss
            result = {"logits": out.logits}
        loss.backward()
        want = 1 if policy == "none" else 2
        if calls[0] != want:
            sys.exit(f"{family} {policy}: layer 0's attention ran {calls[0]} "
                     f"times in the step, expected {want}")
        result = {k: v.detach().contiguous() for k, v in result.items()}
        result["loss"] = loss.detach().reshape(1)
        result["layer0_calls"] = torch.tensor([calls[0]])
        for name, p in model.named_parameters():
            if p.grad is not None:
                result["grad." + name] = p.grad.contiguous()
        save_file(result, f"{folder}/hf_{policy}.safetensors")


def load(pairs):
    for folder, cls_name in pairs:
        cls = getattr(transformers, cls_name)
        model, info = cls.from_pretrained(folder, output_loading_info=True)
        problems = {k: sorted(map(str, v)) for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    and v}
        if problems:
            sys.exit(f"{folder} as {cls_name}: {problems}")
        file = load_file(folder + "/model.safetensors")
        state = model.state_dict()
        for name, t in file.items():
            if name not in state or not torch.equal(state[name], t):
                sys.exit(f"{folder} as {cls_name}: '{name}' did not load as written")
        print(f"loaded {folder} as {cls_name}: {len(file)} tensors, "
              f"no missing, unexpected or mismatched keys")


def save(folder):
    torch.manual_seed(0)
    for name, model in [("bert", transformers.BertModel(bert_config())),
                        ("llama", transformers.LlamaForCausalLM(llama_config()))]:
        model.save_pretrained(f"{folder}/{name}")


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "step" and len(sys.argv) == 4 and sys.argv[2] in ("bert", "llama"):
        step(sys.argv[2], sys.argv[3])
    elif command == "load" and len(sys.argv) >= 4 and len(sys.argv) % 2 == 0:
        load(list(zip(sys.argv[2::2], sys.argv[3::2])))
    elif command == "save" and len(sys.argv) == 3:
        save(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
