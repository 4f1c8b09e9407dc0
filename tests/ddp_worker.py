"""Run under torchrun by test_train.py: a few DDP steps, then each rank dumps its weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.train import Trainer, get_args_parser

data, out = sys.argv[1], Path(sys.argv[2])
args = get_args_parser().parse_args(
    ["--data", data, "--arch", "yolov1-tiny", "--img-size", "128", "--epochs", "1",
     "--batch-size", "2", "--max-steps", "2", "--workers", "0", "--no-progress",
     "--optimizer", "sgd", "--lr", "1e-2", "--out", str(out / "w.safetensors")]
)  # fmt: skip
trainer = Trainer(args)
rank = dist.get_rank()
if rank == 0:
    torch.save(trainer.model.state_dict(), out / "rank0-initial.pt")
trainer.run()
torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
dist.destroy_process_group()
