"""Writes raq_state_v1_64835a4.{pt,json}: a checkpoint of state format version 1 (no queue.iid).

Run with the package at commit 64835a4 on the path (``git archive 64835a4 imbalanced_losses``
into a temp dir), from this folder: ``PYTHONPATH=/that/dir python make_raq_state_v1.py``.
"""

import json

import torch

from imbalanced_losses import RecallAtQuantileLoss

gen = torch.Generator().manual_seed(7)
loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=16, temperature=0.25, max_pool_size=12)
for _ in range(3):
    loss_fn(torch.randn(5, 3, generator=gen), torch.randint(0, 3, (5,), generator=gen))
state = loss_fn.state_dict()
assert state["_extra_state"]["version"] == 1 and "queue.iid" not in state
torch.save(state, "raq_state_v1_64835a4.pt")
probe = torch.Generator().manual_seed(123)
logits = torch.randn(6, 3, generator=probe, dtype=torch.float64).float()
loss = loss_fn.eval()(logits, torch.tensor([0, 1, 2, 0, 1, 2]))
record = {
    "written_by_commit": "64835a4",
    "options": "RecallAtQuantileLoss(3, quantile=0.3, queue_size=16, temperature=0.25, "
    "max_pool_size=12), 3 training steps of 5 rows (seed 7)",
    "probe": "as raq_state_v0's probe, eval mode",
    "loss": loss.item(),
    "subsample_step": state["_extra_state"]["subsample_step"],
}
with open("raq_state_v1_64835a4.json", "w") as f:
    json.dump(record, f, indent=1)
