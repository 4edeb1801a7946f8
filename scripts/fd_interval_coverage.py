"""Does the quality figure's interval hold what it claims? Coverage of E[FD_N] by simulation.

    python scripts/fd_interval_coverage.py [--dim 64] [--counts 500,1000] [--trials 200] [--draws 2000]

Features are Gaussian in ``--dim`` dimensions; the reference statistics are fixed (a population,
as the training set's are for a run). For three models (the reference itself, a near one and a
far one) and each sample count N: E[FD_N] and the real sd(FD_N) from ``--draws`` independent
sample sets; then, over ``--trials`` further sample sets, how often each interval holds E[FD_N]
and its mean width against the real 2 z sd(FD_N): the split-sample interval of
``evaluation.bootstrap.frechet_interval`` (25 splits) and the percentile bootstrap it replaced
(200 resamples with replacement, percentile interval shifted by the bootstrap bias; written out
here for the comparison). A Markdown table on stdout; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from statistics import NormalDist

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.bootstrap import frechet_distance_batch, frechet_interval  # noqa: E402


def population(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference mean and covariance: a random rotation of a decaying spectrum (as image features)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    spectrum = 1.0 / (1.0 + torch.arange(dim, dtype=torch.float64) / 8)
    return torch.randn(dim, generator=gen, dtype=torch.float64) * 0.1, (q * spectrum) @ q.T


MODELS = {  # name -> (mean shift per dimension, covariance scale)
    "the reference itself": (0.0, 1.0),
    "near": (0.03, 1.1),
    "far": (0.1, 1.5),
}


def fd_of_samples(x: torch.Tensor, mu_r: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
    """FD of each of B sample sets x (B, N, F), ddof-1 covariances."""
    mean = x.mean(1)
    xc = x - mean[:, None]
    cov = xc.transpose(1, 2) @ xc / (x.shape[1] - 1)
    return frechet_distance_batch(mean, cov, mu_r, s_r)


def old_bootstrap(x: torch.Tensor, mu_r, s_r, resamples: int, level: float, seed: int) -> tuple[float, float]:
    """The former interval: percentile interval of FD over resamples with replacement, shifted by
    the bootstrap bias (mean of the resampled FDs minus the sample's), lo >= 0."""
    n, f = x.shape
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    resampled = fd_of_samples(x[idx], mu_r, s_r)
    own = float(fd_of_samples(x[None], mu_r, s_r)[0])
    bias = float(resampled.mean()) - own
    tail = (1 - level) / 2
    lo, hi = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return max(0.0, lo - bias), hi - bias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--counts", default="500,1000")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--level", type=float, default=0.95)
    args = ap.parse_args()
    torch.set_num_threads(1)
    z = NormalDist().inv_cdf(0.5 + args.level / 2)
    mu_r, s_r = population(args.dim)
    root = torch.linalg.cholesky(s_r)
    print(f"{args.dim}-d Gaussian features; {args.trials} trials per row; E[FD_N] and sd from {args.draws} draws\n")
    print(
        "| model | N | FD (population) | E[FD_N] | real sd(FD_N) | split-sample: held E[FD_N] | width / real |"
        " old bootstrap: held E[FD_N] | width / real |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for name, (shift, scale) in MODELS.items():
        mu_p, chol_p = mu_r + shift, root * math.sqrt(scale)
        pop = float(frechet_distance_batch(mu_p[None], (chol_p @ chol_p.T)[None], mu_r, s_r)[0])

        def draw(b: int, n: int, mu_p=mu_p, chol_p=chol_p) -> torch.Tensor:
            return mu_p + torch.randn(b, n, args.dim, generator=gen, dtype=torch.float64) @ chol_p.T

        for n in (int(c) for c in args.counts.split(",")):
            fds = torch.cat([fd_of_samples(draw(100, n), mu_r, s_r) for _ in range(args.draws // 100)])
            expected, sd = float(fds.mean()), float(fds.std())
            real = 2 * z * sd
            held, widths, old_held, old_widths = 0, [], 0, []
            for trial in range(args.trials):
                x = draw(1, n)[0]
                new = frechet_interval(x, mu_r, s_r, level=args.level, seed=trial)
                held += new.lo <= expected <= new.hi
                widths.append(new.width / real)
                lo, hi = old_bootstrap(x, mu_r, s_r, 200, args.level, trial)
                old_held += lo <= expected <= hi
                old_widths.append((hi - lo) / real)
            t = args.trials
            print(
                f"| {name} | {n} | {pop:.3f} | {expected:.3f} | {sd:.4f} | {held}/{t} | "
                f"{sum(widths) / t:.2f} | {old_held}/{t} | {sum(old_widths) / t:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
