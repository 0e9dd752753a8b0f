"""Tokenization of samples for teacher-forced scoring.

Prompt and target are tokenized separately and concatenated, so the prompt/target boundary is exact:
``input_ids[:prompt_len]`` is the prompt (with the tokenizer's BOS if it adds one), ``input_ids[prompt_len:]`` is
exactly ``tokenizer.encode(target, add_special_tokens=False)``. Special tokens are never added to the target and any
special token a tokenizer would append after the prompt text (an EOS) is dropped.

With ``chat=True`` the prompt becomes the user turn of the tokenizer's chat template followed by the generation prompt
(tokenized without extra special tokens: the template already has them), and the target loses its one leading space.

Note: tokenizing the target alone can differ from how the same text tokenizes inside the full string (e.g.
SentencePiece tokenizers that add a prefix space); caploc scores the target tokens as defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from caploc.errors import DataError

from .core import Dataset, Sample


@dataclass
class Encoded:
    input_ids: list[int]  # prompt tokens + target tokens
    prompt_len: int  # number of prompt tokens (target tokens are input_ids[prompt_len:])
    id: str = ""  # the sample id (for messages)

    @property
    def target_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special_tokens)]


def chat_prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt wrapped as a user turn of the tokenizer's chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; drop --chat or use a chat/instruct model's tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    if not isinstance(text, str):  # pragma: no cover - older/newer API variants
        raise DataError("tokenizer.apply_chat_template(tokenize=False) did not return text; update transformers")
    return text


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt: BOS (if the tokenizer adds one) + text, or the chat-formatted prompt when ``chat``."""
    if chat:
        return _ids(tokenizer, chat_prompt_text(tokenizer, prompt), False)
    plain = _ids(tokenizer, prompt, False)
    if not add_special_tokens:
        return plain
    full = _ids(tokenizer, prompt, True)
    if not plain:
        bos = getattr(tokenizer, "bos_token_id", None)
        return [full[0]] if full and bos is not None and full[0] == bos else []
    # keep the special tokens the tokenizer puts before the text (BOS); drop those it appends after it (EOS)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start + len(plain)]
    return full


def encode(tokenizer: Any, sample: Sample, *, chat: bool = False, max_length: int | None = None,
           add_special_tokens: bool = True) -> Encoded:
    """Tokenize ``sample`` as prompt + target (see module docstring). Raises DataError for an empty target or a
    sequence longer than ``max_length``."""
    prompt_ids = encode_prompt(tokenizer, sample.prompt, chat=chat, add_special_tokens=add_special_tokens)
    target = sample.target
    if chat and target.startswith(" "):
        target = target[1:]
    target_ids = _ids(tokenizer, target, False)
    sid = sample.id or "?"
    if not prompt_ids:
        raise DataError(f"sample '{sid}' has a prompt of 0 tokens; give it a non-empty prompt")
    if not target_ids:
        raise DataError(f"sample '{sid}' has a target of 0 tokens ({sample.target!r}); give it a non-empty target")
    ids = prompt_ids + target_ids
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"sample '{sid}' is {len(ids)} tokens long, over the limit of {max_length}; "
                        f"raise --max-length or drop long samples")
    return Encoded(input_ids=ids, prompt_len=len(prompt_ids), id=sample.id)


def encode_dataset(tokenizer: Any, ds: Dataset, **kw) -> list[Encoded]:
    """:func:`encode` every sample of ``ds`` (same keyword arguments)."""
    return [encode(tokenizer, s, **kw) for s in ds]


# ---------------------------------------------------------------------------------------------------------------------
# padding and collation (the one home of both)
# ---------------------------------------------------------------------------------------------------------------------
def pad_id(tokenizer: Any = None, config: Any = None) -> int:
    """The token id used for padding: the tokenizer's pad, else its eos, else the model config's pad / eos, else 0.

    Padded positions are always masked out (right padding + attention mask), so the choice never changes a score; it
    only has to be a valid id of the vocabulary."""
    for obj, name in ((tokenizer, "pad_token_id"), (tokenizer, "eos_token_id"), (config, "pad_token_id"),
                      (config, "eos_token_id")):
        v = getattr(obj, name, None) if obj is not None else None
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def collate(seqs: Sequence[Sequence[int]], pad: int, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> ``ids [B, T]`` (long) and ``attention_mask [B, T]`` (long, 1 on real tokens).

    ``T`` is the longest sequence (or ``width`` when given, which must fit every sequence)."""
    T = max((len(s) for s in seqs), default=0) if width is None else int(width)
    ids = torch.full((len(seqs), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s) > T:
            raise ValueError(f"sequence of {len(s)} tokens does not fit width {T}")
        ids[r, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask
