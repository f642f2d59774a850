"""`python -m selfflow_robot.finetune`: video-action fine-tuning (the embedded default is Meta-World)."""
from omegaconf import DictConfig

from . import cli
from .jobs import run_training


def main(cfg: DictConfig) -> dict:
    return run_training(cfg, "finetune")


def cli_main() -> None:
    cli.run("finetune", main)


if __name__ == "__main__":
    cli_main()
