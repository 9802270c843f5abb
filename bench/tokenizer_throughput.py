"""Encode throughput, remat against Hugging Face `tokenizers`, one thread each.

    python bench/tokenizer_throughput.py BUILD_DIR [DOCUMENTS]

Trains the test tokenizers (tests/io/tokenizer_reference.py; nothing is
downloaded), makes a corpus of DOCUMENTS (default 20000) documents from the
same generator, and for each tokenizer.json times `Tokenizer.encode` on
every document and `encode_batch` on all of them (no special tokens, as
remat's tokenize; RAYON_NUM_THREADS=1 unless set) against
BUILD_DIR/tokenizer_throughput on the same corpus. Run it with the LibTorch
2.x leg's Python (scripts/setup 2), which has `tokenizers`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "io"))
os.environ.setdefault("RAYON_NUM_THREADS", "1")
import tokenizer_reference  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def main(build, n):
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, tokenizer_reference.__file__, out],
                       check=True, stdout=subprocess.DEVNULL)
        corpus = tokenizer_reference.corpus(3, n)
        path = os.path.join(out, "bench.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(corpus, f, ensure_ascii=False)
        size = sum(len(t.encode()) for t in corpus)
        print(f"{n} documents, {size / 1e6:.2f} MB")
        for name in ["gpt2", "llama3"]:
            file = os.path.join(out, name, "tokenizer.json")
            tok = Tokenizer.from_file(file)
            for t in corpus:  # warm-up, as the C++ side does
                tok.encode(t, add_special_tokens=False)
            passes = 5
            start = time.perf_counter()
            for _ in range(passes):
                for t in corpus:
                    tok.encode(t, add_special_tokens=False)
            seconds = time.perf_counter() - start
            print(f"{name}: tokenizers encode {size * passes / seconds / 1e6:.2f} MB/s")
            start = time.perf_counter()
            for _ in range(passes):
                tok.encode_batch(corpus, add_special_tokens=False)
            seconds = time.perf_counter() - start
            print(f"{name}: tokenizers encode_batch (RAYON_NUM_THREADS="
                  f"{os.environ['RAYON_NUM_THREADS']}) "
                  f"{size * passes / seconds / 1e6:.2f} MB/s")
            remat = subprocess.run(
                [os.path.join(build, "tokenizer_throughput"), file, path,
                 str(passes)], check=True, capture_output=True, text=True)
            print(f"{name}: {remat.stdout.strip()}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20000)
