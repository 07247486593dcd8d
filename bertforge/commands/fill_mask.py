"""fill-mask: the most likely tokens for each [MASK] of a text, from a run or an HF directory.

Each prediction names its mask twice: `mask_index`, which [MASK] of the text it is (0 for
the first), and `position`, its token position in the model's input ([CLS] is 0).
`numbered` writes the text with its masks numbered from 1, as the CLI echoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bertforge.errors import BertforgeError

MASK = "[MASK]"


def fill_mask(model_path: Path, text: str, top_k: int = 5) -> list[dict[str, Any]]:
    """One {"mask_index", "position", "predictions": [{"token", "score"}, ...]} per [MASK]
    of `text`, in order, in fp32 on the CPU; mask_index counts the masks from 0, position
    the tokens from [CLS] (position 0)."""
    from bertforge.commands.loading import load_any_model
    from bertforge.data.tokenizer import load_tokenizer

    if top_k < 1:
        raise BertforgeError(f"--top-k {top_k}: must be >= 1")
    model, tok_dir = load_any_model(Path(model_path))
    tok = load_tokenizer(tok_dir)
    enc = tok.encode(text)
    ids = torch.tensor([enc.ids])  # (1, T)
    mask_id = tok.token_to_id(MASK)
    if mask_id is None:
        raise BertforgeError(f"{tok_dir}: the tokenizer has no {MASK} token")
    positions = (ids[0] == mask_id).nonzero().flatten()  # (M,)
    if len(positions) == 0:
        raise BertforgeError("the text has no [MASK] token to fill")
    with torch.no_grad():
        logits, _ = model(
            ids, token_type_ids=torch.tensor([enc.type_ids]), masked_positions=positions
        )  # (M, V)
    probs = logits.float().softmax(-1)
    results = []
    for index, (pos, p) in enumerate(zip(positions.tolist(), probs)):
        # At most the whole vocabulary; rows past the tokenizer's (a model's padded
        # vocabulary) are no token, and never a prediction.
        known = min(p.numel(), tok.get_vocab_size(with_added_tokens=True))
        top = p[:known].topk(min(top_k, known))
        results.append(
            {
                "mask_index": index,
                "position": pos,
                "predictions": [
                    {"token": tok.id_to_token(i), "score": round(s, 4)}
                    for s, i in zip(top.values.tolist(), top.indices.tolist())
                ],
            }
        )
    return results


def numbered(text: str, masks: int) -> str:
    """`text` with its [MASK]s written [MASK 1], [MASK 2], ... when it holds more than one
    (and the `masks` the tokenizer found are those; otherwise `text` as it is)."""
    if masks < 2 or text.count(MASK) != masks:
        return text
    pieces = text.split(MASK)
    return pieces[0] + "".join(f"[MASK {i}]{rest}" for i, rest in enumerate(pieces[1:], 1))
