"""`python -m selfflow_robot.pretrain`: Self-Flow pretraining of the backbone on frames and clips."""
from omegaconf import DictConfig

from . import cli
from .jobs import run_training


def main(cfg: DictConfig) -> dict:
    return run_training(cfg, "pretrain")


def cli_main() -> None:
    cli.run("pretrain", main)


if __name__ == "__main__":
    cli_main()
