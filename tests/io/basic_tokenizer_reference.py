#!/usr/bin/python3
"""BERT's BasicTokenizer (uncased) written from its description, using
Python's unicodedata, for tests/io/tokenizer_test.cpp.

    basic_tokenizer_reference.py IN.json OUT.json

IN holds a JSON list of strings; OUT gets, for each, the list of words.
"""
import json
import sys
import unicodedata


def is_control(c):
    if c in "\t\n\r":
        return False
    return unicodedata.category(c).startswith("C")


def is_whitespace(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def is_punctuation(c):
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text):
    cleaned = []
    for c in text:
        if ord(c) == 0 or ord(c) == 0xFFFD or is_control(c):
            continue
        cleaned.append(" " if is_whitespace(c) else c)
    spaced = []
    for c in "".join(cleaned):
        spaced.append(f" {c} " if is_cjk(ord(c)) else c)
    words = []
    for token in "".join(spaced).split():
        token = unicodedata.normalize("NFD", token.lower())
        token = "".join(c for c in token if unicodedata.category(c) != "Mn")
        current = ""
        for c in token:
            if is_punctuation(c):
                if current:
                    words.append(current)
                words.append(c)
                current = ""
            else:
                current += c
        if current:
            words.append(current)
    return words


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        texts = json.load(f)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump([basic_tokenize(t) for t in texts], f, ensure_ascii=False)


if __name__ == "__main__":
    main()
