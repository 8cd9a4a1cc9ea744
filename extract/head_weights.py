"""Export a torchvision detector's classification head in the store's neutral naming."""

from __future__ import annotations

import numpy as np
import torch

from cache_schema.head_init import write_head_weights  # noqa: F401  (re-exported for the writer)


def detector_head_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``fc6``/``fc7``/``cls`` weights of a torchvision Mask R-CNN box head, float32.

    torchvision puts background at classifier row 0; the store puts it last (mmdet convention),
    so the rows are rotated: ``[1..C, 0]``.
    """
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    cls_w = predictor.cls_score.weight.detach().cpu()
    cls_b = predictor.cls_score.bias.detach().cpu()
    order = torch.cat([torch.arange(1, cls_w.shape[0]), torch.zeros(1, dtype=torch.int64)])
    state = {
        "fc6.weight": head.fc6.weight, "fc6.bias": head.fc6.bias,
        "fc7.weight": head.fc7.weight, "fc7.bias": head.fc7.bias,
        "cls.weight": cls_w[order], "cls.bias": cls_b[order],
    }
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}
