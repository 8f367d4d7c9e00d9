"""An ensemble of ProtoPNets: summed logits, i.e. one scoring sheet with more prototypes."""

from __future__ import annotations

import torch
from torch import nn

from protopnet.model import ProtoPNet


class ProtoPNetEnsemble(nn.Module):
    """Each member sees the same images (preprocessed its own way by the caller when
    their preprocessing differs); logits add up."""

    def __init__(self, members: list[ProtoPNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        ks = {m.num_classes for m in members}
        if len(ks) != 1:
            raise ValueError(f"members disagree on the number of classes: {sorted(ks)}")
        self.members = nn.ModuleList(members)

    @property
    def models(self) -> list[ProtoPNet]:
        """The members, typed (an nn.ModuleList only knows it holds modules)."""
        return [m for m in self.members if isinstance(m, ProtoPNet)]

    def _batches(self, inputs: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        if not isinstance(inputs, list):
            return [inputs] * len(self.members)
        if len(inputs) != len(self.members):
            raise ValueError(
                f"{len(inputs)} input batches for {len(self.members)} members; "
                "pass one batch for all or one per member"
            )
        return inputs

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """inputs: one (B, 3, S, S) batch for all, or one batch per member -> (B, K)."""
        batches = self._batches(inputs)
        return torch.stack([m(x)[0] for m, x in zip(self.models, batches, strict=True)]).sum(0)

    @torch.inference_mode()
    def scoring_sheet(self, inputs: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """Per member (B, K, P_m) points = similarity x weight; summed over members and
        prototypes they give the ensemble's logits."""
        batches = self._batches(inputs)
        sheets = []
        for m, x in zip(self.models, batches, strict=True):
            _, min_d = m(x)
            sims = m.similarity(min_d)  # (B, P_m)
            sheets.append(sims.unsqueeze(1) * m.last_layer.weight.unsqueeze(0))
        return sheets
