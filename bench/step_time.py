"""Time `cpu`-preset training steps on 2 CPU threads: the engine's correlation terms against the plain formulas.

    python bench/step_time.py [--steps 12] [--rounds 3]

Random backbone features of EfficientNet-Lite0's shapes (batch 8; 40 x 32 x 32 and 112 x 16 x 16), the `cpu`
preset's model. Each round times ``--steps`` steps with the engine's ``correlation_terms`` (logarithms kept for
backward, gradients built in place) and as many with ``PlainTerms`` (the textbook autograd function that recomputes
the logarithms in backward, out of place — what the engine had before), alternating, each on a fresh model from the
same seed; prints the per-step median of each and whether the trained parameters are bit-identical. Time it on an
idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fod_app import losses  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.model import create_model  # noqa: E402
from fod_app.training import _train_step  # noqa: E402


class PlainTerms(torch.autograd.Function):
    """Symmetric KL and entropy with scaled gradients, written out plainly (the reference)."""

    @staticmethod
    def forward(ctx, corr, target, eps, scale_corr, scale_target, scale_entropy):  # type: ignore[override]
        log_corr, log_target = torch.log(corr + eps), torch.log(target + eps)
        ctx.save_for_backward(corr, target)
        ctx.constants = (eps, scale_corr, scale_target, scale_entropy)
        return ((corr - target) * (log_corr - log_target)).sum(-1), -(corr * log_corr).sum(-1)

    @staticmethod
    def backward(ctx, grad_div, grad_ent):  # type: ignore[override]
        corr, target = ctx.saved_tensors
        eps, scale_corr, scale_target, scale_entropy = ctx.constants
        log_corr = torch.log(corr + eps)
        log_ratio, difference = log_corr - torch.log(target + eps), corr - target
        grad_corr = (scale_corr * grad_div).unsqueeze(-1) * (log_ratio + difference / (corr + eps))
        grad_corr = grad_corr - (scale_entropy * grad_ent).unsqueeze(-1) * (log_corr + corr / (corr + eps))
        grad_target = (scale_target * grad_div).unsqueeze(-1) * (-log_ratio - difference / (target + eps))
        return grad_corr, grad_target, None, None, None, None


def plain_terms(corr, target, eps=1e-4, scale_corr=1.0, scale_target=1.0, scale_entropy=1.0):
    return PlainTerms.apply(corr, target, eps, scale_corr, scale_target, scale_entropy)


def time_steps(terms, steps: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds per step (after one warm-up step) and the parameters after training."""
    losses.correlation_terms = terms
    config = create_config("cpu")
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(8, 40, 32, 32, generator=generator), torch.randn(8, 112, 16, 16, generator=generator)]
    model = create_model(config, [40, 112], [8, 16]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    torch.manual_seed(1)  # the correlation rows sampled each step
    _train_step(model, features, config, optimizer, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(model, features, config, optimizer, torch.device("cpu"))
    return (time.perf_counter() - start) / steps, [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = losses.correlation_terms
    times: dict[str, list[float]] = {"engine": [], "plain": []}
    params: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.rounds):
        for name, terms in (("engine", engine), ("plain", plain_terms)):
            seconds, params[name] = time_steps(terms, args.steps)
            times[name].append(seconds)
    losses.correlation_terms = engine
    for name, values in times.items():
        print(f"{name}: {1000 * statistics.median(values):.0f} ms per step (rounds: "
              + ", ".join(f"{1000 * v:.0f}" for v in values) + ")")
    print(f"engine / plain: {statistics.median(times['engine']) / statistics.median(times['plain']):.2f}")
    same = all(torch.equal(a, b) for a, b in zip(params["engine"], params["plain"]))
    print(f"parameters after {args.steps + 1} steps bit-identical: {same}")


if __name__ == "__main__":
    main()
