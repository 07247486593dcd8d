"""fill-mask: the most likely tokens for each [MASK] of a text, from a run or an HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bertforge.errors import BertforgeError


def fill_mask(model_path: Path, text: str, top_k: int = 5) -> list[dict[str, Any]]:
    """One {"position", "predictions": [{"token", "score"}, ...]} per [MASK] of `text`,
    in fp32 on the CPU; position counts tokens from [CLS] (position 0)."""
    from bertforge.data.tokenizer import load_tokenizer
    from bertforge.rundir import load_any_model

    model, tok_dir = load_any_model(Path(model_path))
    tok = load_tokenizer(tok_dir)
    enc = tok.encode(text)
    ids = torch.tensor([enc.ids])  # (1, T)
    positions = (ids[0] == tok.token_to_id("[MASK]")).nonzero().flatten()
    if len(positions) == 0:
        raise BertforgeError("the text has no [MASK] token to fill")
    with torch.no_grad():
        logits, _ = model(ids, token_type_ids=torch.tensor([enc.type_ids]),
                          masked_positions=positions)  # (M, V)
    probs = logits.float().softmax(-1)
    results = []
    for pos, p in zip(positions.tolist(), probs):
        top = p.topk(min(top_k, p.numel()))
        results.append({"position": pos, "predictions": [
            {"token": tok.id_to_token(i), "score": round(s, 4)}
            for s, i in zip(top.values.tolist(), top.indices.tolist())]})
    return results
