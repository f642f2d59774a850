"""CPU threading defaults shared by the commands that train or roll out.

Sleeping (not spinning) OpenMP threads: on a CPU shared with other jobs or other processes of the
same command (evaluation workers, study arms), spinning torch threads slowed training ~6-10x in
our runs. Spinning helps only latency-critical single processes (`serve` keeps the default).
It must be set before torch is imported; an explicit OMP_WAIT_POLICY wins.
"""
import os


def prefer_passive_openmp() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
