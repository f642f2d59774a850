"""Training infrastructure: one Trainer for single process / torchrun DDP / FSDP2,
pickle-free checkpoints with exact resume, metrics JSONL + wandb logging."""
from .checkpoint import latest_checkpoint, load_model_weights, read_checkpoint_config
from .distributed import init_distributed
from .ema import ema_update, make_ema
from .flops import measure_matmul_peak
from .loader import ResumableSampler, make_loader
from .trainer import NonFiniteError, Trainer, move_to_device, seed_everything

__all__ = ["Trainer", "load_model_weights", "read_checkpoint_config", "latest_checkpoint", "make_loader",
           "ResumableSampler", "init_distributed", "make_ema", "ema_update", "measure_matmul_peak",
           "NonFiniteError", "move_to_device", "seed_everything"]
