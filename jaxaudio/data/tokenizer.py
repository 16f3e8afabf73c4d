"""Text tokenizers for the audio-language models (BAT, SALMONN).

`TextTokenizer` wraps either a `tokenizers` file (`tokenizer.json`: one trained here on
generated text, or an LLM's own) or a Hugging Face tokenizer directory (e.g. Vicuna's,
which ships only a SentencePiece `tokenizer.model`; read through transformers'
`AutoTokenizer`, the slow LLaMA tokenizer as SALMONN uses). Either way `encode` adds no
special tokens: the models place BOS and EOS themselves.
"""
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
TOKENIZER_VERSION = 1  # bump when the recipe of `train_tokenizer` changes, so saved ones are retrained


class TextTokenizer:
    """`path`: a `tokenizer.json` or a Hugging Face tokenizer directory; `bos`/`eos`/`pad`
    name the special tokens (config.data.{bos,eos,pad}_token)."""

    def __init__(self, path: str, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}")
        self.path = path
        if os.path.isdir(path):
            from transformers import AutoTokenizer
            try:
                self.hf = AutoTokenizer.from_pretrained(path, use_fast=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a Hugging Face tokenizer directory ({str(e).splitlines()[0]})") from None
            self.tok = None
            lookup = self.hf.convert_tokens_to_ids
            unk = self.hf.unk_token_id
        else:
            from tokenizers import Tokenizer
            self.hf, self.tok = None, Tokenizer.from_file(path)
            lookup, unk = self.tok.token_to_id, None
        ids = {}
        for role, token in (("bos", bos), ("eos", eos), ("pad", pad)):
            ids[role] = lookup(token)
            if ids[role] is None or (ids[role] == unk and token != getattr(self.hf, "unk_token", None)):
                raise ValueError(f"tokenizer {path} has no {role} token {token!r} (config.data.{role}_token)")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @property
    def vocab_size(self) -> int:
        return len(self.hf) if self.hf is not None else self.tok.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.hf is not None:
            return [self.hf.encode(t, add_special_tokens=False) for t in texts]
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_padded(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """BERT/RoBERTa-style encoder input: `[BOS] text [EOS]` cut to `max_len` (EOS kept, as
        a truncating Hugging Face tokenizer call does), right-padded with the pad id.

        Returns `(ids [n, max_len] int32, mask [n, max_len] int32)`, mask 1 on real tokens.
        """
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: needs room for BOS and EOS")
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for row, tokens in enumerate(self.encode(texts)):
            seq = [self.bos_id, *tokens[:max_len - 2], self.eos_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text, up to the first EOS, special tokens dropped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True).strip()
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str) -> None:
    """A byte-level BPE over `texts` with `SPECIAL_TOKENS` (ids 0-3), written to `path`.

    Byte level: any text typed at inference time has an encoding and decodes back exactly,
    however far from the training text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer came out with {tok.get_vocab_size()} tokens > vocab_size={vocab_size}")
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)


def ensure_tokenizer(path: str, texts: Callable[[], Iterable[str]], vocab_size: int, data_params: dict) -> bool:
    """Train `path` on `texts()` unless a tokenizer trained with the same recipe, vocabulary
    size and data (`data_params`, e.g. the generator's parameters) is there; True if it
    trained one. The settings go to `<path without .json>.params.json`."""
    wanted = {"version": TOKENIZER_VERSION, "vocab_size": int(vocab_size), "data": data_params}
    params_path = os.path.splitext(path)[0] + ".params.json"
    try:
        with open(params_path) as f:
            if json.load(f) == wanted and os.path.exists(path):
                return False
    except (OSError, ValueError):
        pass
    train_tokenizer(texts(), int(vocab_size), path)
    with open(params_path, "w") as f:
        json.dump(wanted, f)
    return True
