"""Tokenisation for text models, with the `tokenizers` library and the checkpoint's tokenizer.json.

The gateway tokenises requests with the bundle's tokenizer; training uses the same class, so
that a served sentence becomes exactly the ids the model was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from dynaroute.errors import BundleError

if TYPE_CHECKING:
    from dynaroute.bundle import Bundle


class TextEncoder:
    """Sentences -> (ids int64 [N, L], mask int64 [N, L]), padded to the batch's longest
    (dynamic padding: short sentences cost little) and truncated at `max_length` tokens."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=self._pad_id(), pad_token=self._pad_token())

    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_length)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TextEncoder:
        spec = bundle.manifest["input"]
        if spec.get("kind") != "text":
            raise BundleError(f"bundle {bundle.name!r} takes {spec.get('kind')!r} input, not text")
        return cls.from_file(bundle.root / spec["tokenizer"], int(spec["max_length"]))

    @property
    def pad_id(self) -> int:
        """The id that pads a batch's shorter sentences."""
        return self._pad_id()

    def _pad_token(self) -> str:
        pad = self.tokenizer.padding
        return pad["pad_token"] if pad else "[PAD]"

    def _pad_id(self) -> int:
        pad = self.tokenizer.padding
        if pad:
            return int(pad["pad_id"])
        token_id = self.tokenizer.token_to_id("[PAD]")
        return 0 if token_id is None else token_id

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not texts:
            raise ValueError("encode needs at least one sentence")
        encodings = self.tokenizer.encode_batch(list(texts))
        # Lists to numpy, then shared with torch: half the cost of torch.tensor on nested lists.
        ids = torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))
        mask = torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.int64))
        return ids, mask

    def lengths(self, texts: list[str]) -> list[int]:
        """Token count of each sentence after truncation (for bucketing by length)."""
        return [sum(e.attention_mask) for e in self.tokenizer.encode_batch(list(texts))]
