"""The real CLIP BPE tokenizer built offline from the vocabulary file that open_clip ships."""

import gzip
from functools import lru_cache
from importlib import resources


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table in CLIP's vocabulary order: printable bytes first (as
    themselves), then the remaining bytes mapped above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-token vocabulary and its 48,894 merges, as CLIPTokenizer expects them."""
    bpe_file = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe_file.open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length)
