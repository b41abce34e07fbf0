"""``python -m curvopt_tests.cli.torchrun_weights train --config FILE --out DIR`` under ``torchrun``: the command
line, with each rank also writing the weights it ends with to ``DIR/weights_rank{r}.pt`` (before the command's
own replica check, which tolerates a relative drift of 1e-6), so that a test can compare the ranks bit for bit."""

import sys
from pathlib import Path

import torch

import curvopt.cli.training as training
from curvopt.cli import main


def _run(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1])
    check = training.check_replicas

    def save_then_check(model, launch, name):
        torch.save(model.state_dict(), out / f"weights_rank{launch.rank}.pt")
        check(model, launch, name)

    training.check_replicas = save_then_check
    out.mkdir(parents=True, exist_ok=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
