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
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length
    )


def word_vocab_and_merges(words) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which each of ``words`` is one token (for small closed grammars).

    Every single character (as CLIP spells them, with and without the end-of-word mark) is in the
    vocabulary, so any text still tokenises; each word gets the chain of merges that joins it
    from the left. Longer words' chains come first, so no shorter word's merge fires inside them.
    """
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(tokens)
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for part in parts[1:]:
            merge = f"{left} {part}"
            left += part
            if merge not in merges:
                merges.append(merge)
            if left not in known:
                known.add(left)
                tokens.append(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_word_tokenizer(words, model_max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary makes each of ``words`` one token (see ``word_vocab_and_merges``)."""
    from transformers import CLIPTokenizer

    vocab, merges = word_vocab_and_merges(words)
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length
    )
