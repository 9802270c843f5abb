"""Reference token ids for tests/io/hf_tokenizer_test.cpp.

    tokenizer_reference.py OUT_DIR

writes into OUT_DIR a test corpus (corpus.json, a list of documents), small
tokenizers trained here on a corpus from the same generator (nothing is
downloaded) and the ids that Hugging Face `tokenizers` and `sentencepiece`
give for every document (expected.json):

    gpt2/tokenizer.json     byte-level BPE, GPT-2 style: ByteLevel
                            pre-tokenizer (its regex), ByteLevel
                            post-processor, added tokens with lstrip and
                            single_word
    llama3/tokenizer.json   Llama 3 style: Split(Regex, Isolated) +
                            ByteLevel(use_regex=false), ignore_merges,
                            TemplateProcessing that adds <|begin_of_text|>
    roberta/tokenizer.json  Digits + ByteLevel(add_prefix_space), merges in
                            the legacy "a b" form, RobertaProcessing
    sp-bpe/tokenizer.model  SentencePiece BPE with byte fallback (Llama 1/2)
    sp-unigram/tokenizer.model  SentencePiece unigram, NFKC, pad id 3

Exits 77 after a "SKIP: " line when this Python lacks `tokenizers` or
`sentencepiece` (the LibTorch 1.13 leg's python3).
"""

import json
import os
import random
import sys

try:
    import sentencepiece as spm
    import tokenizers
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,
                            pre_tokenizers, processors, trainers)
except ImportError as e:
    print(f"SKIP: {sys.executable} has no {e.name} (the LibTorch 2.x leg's "
          "virtual environment has it: scripts/setup 2)")
    sys.exit(77)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = {
    "latin": "the quick brown fox jumps over lazy dog hello world don't it's "
             "we'll they've I'm you'd café naïve résumé façade Ærøskøbing "
             "Ångström señor niño Łódź Straße Œuvre déjà HELLO Hello CAFÉ "
             "SHE'S WE'LL".split(),
    "cyrillic": "Москва Ёлка привет мир съешь же ещё этих мягких булок "
                "Україна їжак ґанок".split(),
    "greek": "Αθήνα καλημέρα κόσμε ΆΈΉ ϊΰ Ἀθῆναι λόγος".split(),
    "cjk": "中文字符 日本語の かなカナ 한국어 漢字 東京 北京市 你好世界".split(),
    "arabic": "مرحبا بالعالم العربية اللغة كتاب".split(),
    "devanagari": "नमस्ते दुनिया हिन्दी भाषा संस्कृतम्".split(),
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "❤️", "🧑🏿‍💻",
              "✨", "🙂🙃"],
    "digits": ["0", "42", "1234567", "3.14159", "2024-01-31", "1,000,000",
               "٣٤٥", "१२३", "½", "x²"],
    "punct": [".", ",", "!", "?", "...", "—", "«", "»", "¿", "¡", "(", ")",
              "\"", "'", "#", "$%", "&&", "::", "->", "@user", "C++",
              "a_b", "e\u0301", "o\u0308"],
    "space": [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n",
              "\u00a0", "\u3000", "\u2009", "\u200b", "\u0085", "\t\t "],
}

SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|eot_id|>", "[MASK]", "<s>", "</s>", "<mask>", "<pad>"]


def document(rng):
    """One document: words of several scripts, odd whitespace, specials."""
    parts = []
    for _ in range(rng.randint(1, 24)):
        kind = rng.choice(list(WORDS))
        parts.append(rng.choice(WORDS[kind]))
        r = rng.random()
        if r < 0.6:
            parts.append(" ")
        elif r < 0.75:
            parts.append(rng.choice(WORDS["space"]))
        elif r < 0.8:
            parts.append(rng.choice(SPECIALS))
        elif r < 0.85:
            parts.append(" " + rng.choice(SPECIALS) + " ")
    text = "".join(parts)
    if rng.random() < 0.1:
        text = rng.choice(WORDS["space"]) + text
    return text


def corpus(seed, n):
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


def byte_level_bpe(train, pre_tokenizer, post_processor, specials, **model):
    tok = Tokenizer(models.BPE(**model))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = post_processor(tok, specials) if post_processor else None
    trainer = trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, show_progress=False,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train, trainer)
    if post_processor:  # the special tokens' ids are known after training
        tok.post_processor = post_processor(tok, specials)
    return tok


def llama3_post(tok, specials):
    bos = specials[0]
    return processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos) or 0)])])


def roberta_post(tok, specials):
    return processors.RobertaProcessing(("</s>", tok.token_to_id("</s>") or 0),
                                        ("<s>", tok.token_to_id("<s>") or 0))


def write_tokenizer(tok, folder, legacy_merges=False):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    if legacy_merges:  # the "a b" string form older files have
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False)
    return Tokenizer.from_file(path)  # what remat reads, read back


def sentencepiece_model(train, folder, **options):
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=prefix, vocab_size=500,
        minloglevel=2, **options)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def main(out):
    os.makedirs(out, exist_ok=True)
    train = corpus(1, 3000)
    test = corpus(2, 1200)
    with open(os.path.join(out, "corpus.json"), "w", encoding="utf-8") as f:
        json.dump(test, f, ensure_ascii=False)

    gpt2 = byte_level_bpe(
        train, pre_tokenizers.ByteLevel(add_prefix_space=False),
        lambda tok, s: processors.ByteLevel(trim_offsets=False),
        ["<|endoftext|>"])
    gpt2.add_tokens([
        AddedToken("[MASK]", lstrip=True, normalized=False),
        AddedToken("hello", single_word=True),
    ])
    llama3 = byte_level_bpe(
        train,
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated",
                                 invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        llama3_post, ["<|begin_of_text|>", "<|end_of_text|>"],
        ignore_merges=True)
    llama3.add_special_tokens([AddedToken("<|eot_id|>", rstrip=True,
                                          lstrip=True, special=True)])
    roberta = byte_level_bpe(
        train,
        pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=True),
        ]),
        roberta_post, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])

    expected = {}
    for name, tok, legacy in [("gpt2", gpt2, False), ("llama3", llama3, False),
                              ("roberta", roberta, True)]:
        tok = write_tokenizer(tok, os.path.join(out, name), legacy)
        encodings = tok.encode_batch(test)
        ids = [e.ids for e in encodings]
        expected[name] = {
            "ids": ids,
            "decoded": tok.decode_batch(ids, skip_special_tokens=True),
            "vocab_size": max(tok.get_vocab(with_added_tokens=True).values()) + 1,
        }

    sp_bpe = sentencepiece_model(
        train, os.path.join(out, "sp-bpe"), model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995)
    sp_unigram = sentencepiece_model(
        train, os.path.join(out, "sp-unigram"), model_type="unigram",
        pad_id=3, unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False)
    for name, sp in [("sp-bpe", sp_bpe), ("sp-unigram", sp_unigram)]:
        ids = [sp.encode(t) for t in test]
        expected[name] = {
            "ids": ids,
            "decoded": [sp.decode(i) for i in ids],
            "vocab_size": sp.get_piece_size(),
            "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
            "unk": sp.unk_id(),
        }
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
    print(f"tokenizers {tokenizers.__version__}, sentencepiece "
          f"{spm.__version__}: {len(test)} documents")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
