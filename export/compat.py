"""Can this draft work with this target?  They must tokenize identically.

Speculative decoding compares token *ids*: a draft whose vocabulary maps a
string to a different id than the target's proposes garbage (or, worse, gets
lucky on some tokens and looks merely bad).  So before any export work we
require the same id for every token string, and the same special/EOS tokens.
A larger embedding matrix (padding rows without a token) is fine: that is a
model property, not a tokenizer one.
"""
from __future__ import annotations

import re
from pathlib import Path

from specrt.runtime.errors import CompatibilityError

_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def require_local_checkpoint(path: str | Path, role: str) -> Path:
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_dir():
        raise CompatibilityError(f"--{role} {str(p)!r} has no config.json; pass a HuggingFace checkpoint directory "
                                 "(the output of `save_pretrained`).")
    if _HUB_ID.match(str(path)):
        raise CompatibilityError(
            f"--{role} {str(path)!r} looks like a HuggingFace Hub id, but specrt export works offline: "
            "download the checkpoint on a machine with access (`huggingface-cli download ID --local-dir DIR`) "
            "and pass the local directory."
        )
    raise CompatibilityError(f"--{role} {str(path)!r} does not exist; pass a local HuggingFace checkpoint directory.")


def check_tokenizers(target_tok, draft_tok) -> None:
    """Raise CompatibilityError naming the first differing tokens if the two tokenizers disagree."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    diffs = []
    for token in sorted(set(tv) | set(dv), key=lambda t: (tv.get(t, dv.get(t)), t)):
        if tv.get(token) != dv.get(token):
            diffs.append(f"{token!r}: target id {tv.get(token)}, draft id {dv.get(token)}")
            if len(diffs) == 5:
                break
    if diffs:
        raise CompatibilityError(
            f"draft and target tokenizers differ ({len(tv)} vs {len(dv)} tokens); first differences: "
            + "; ".join(diffs)
            + ". Speculative decoding needs the same token ids in both models: use a draft trained with the "
            "target's tokenizer (same family), or distil one (see scripts/distill_draft.py)."
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        t, d = getattr(target_tok, attr, None), getattr(draft_tok, attr, None)
        if attr == "pad_token_id" and (t is None or d is None):
            continue
        if t != d:
            raise CompatibilityError(f"draft and target disagree on {attr}: target {t}, draft {d}. Save the draft's "
                                     "tokenizer with the target's special tokens (copy the target's tokenizer files).")
    if set(target_tok.all_special_tokens) != set(draft_tok.all_special_tokens):
        only_t = sorted(set(target_tok.all_special_tokens) - set(draft_tok.all_special_tokens))
        only_d = sorted(set(draft_tok.all_special_tokens) - set(target_tok.all_special_tokens))
        raise CompatibilityError(f"special tokens differ: only in target {only_t}, only in draft {only_d}. "
                                 "Copy the target's tokenizer files into the draft checkpoint.")
