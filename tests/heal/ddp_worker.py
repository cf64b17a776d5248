"""Retrofit a tiny model with a recipe, alone or under torchrun; rank 0 saves the final state dict.

    python tests/heal/ddp_worker.py MODEL_DIR RECIPE_JSON OUT.safetensors
    torchrun --nproc_per_node 2 tests/heal/ddp_worker.py MODEL_DIR RECIPE_JSON OUT.safetensors
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import adaflex.retrofit as af


def main(model_dir: str, recipe: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("ADAFLEX_PROGRESS", "0")
    model, tok = af.load(model_dir)
    report = af.run(json.loads(recipe), model, tok, model_name=model_dir, log=lambda m: None)
    if int(os.environ.get("RANK", "0")) == 0:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, out, metadata={"ranks": str(report["stages"][-1]["ranks"])})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
