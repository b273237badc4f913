"""Per-request edits of the next-token logits before sampling: `logit_bias`, `min_tokens` (EOS and
stop tokens held back) and a grammar's allowed-token bitmask. Only the rows that ask for one are
touched; the others keep the shared tensor untouched."""

from __future__ import annotations

import torch

from edgeacc_ray.engine.request import Sequence, apply_bitmasks


def apply_logit_controls(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits` [len(seqs), vocab]; a copy with the controls applied, or `logits` itself when no row has any."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_logit_controls]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        seq, row = seqs[i], logits[i]
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        if seq.num_output_tokens < p.min_tokens:
            held = sorted(seq.eos_token_ids | set(p.stop_token_ids))
            if held:
                row[torch.tensor(held, dtype=torch.long)] = float("-inf")
    masked = [i for i in rows if seqs[i].token_bitmask is not None]
    if masked:
        sub = logits[masked]
        apply_bitmasks(sub, torch.stack([seqs[i].token_bitmask for i in masked]))
        logits[masked] = sub
    return logits
