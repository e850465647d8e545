"""Run llama.cpp's convert_hf_to_gguf.py (from the sdist ``make install`` unpacks into .cache/) as the oracle.

Usage: python tests/gguf_convert.py LLAMA_CPP_DIR PRE MODEL_DIR [converter args...] [:: MODEL_DIR [args...]]...

Several conversions (separated by ``::``) run in one process, one after the other, to pay for
importing torch and transformers once.

Tiny test tokenizers match none of the converter's known BPE pre-tokenizer hashes, so its
``TextModel.get_vocab_base_pre`` is patched to return PRE (the name streammerge was told to write);
nothing else of the converter is changed.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    root, pre, *rest = sys.argv[1:]
    sys.path.insert(0, root)
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre  # type: ignore[method-assign]
    jobs: list[list[str]] = [[]]
    for arg in rest:
        if arg == "::":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    for args in jobs:
        sys.argv = [f"{root}/convert_hf_to_gguf.py", *args]
        runpy.run_path(f"{root}/convert_hf_to_gguf.py", run_name="__main__")


if __name__ == "__main__":
    main()
