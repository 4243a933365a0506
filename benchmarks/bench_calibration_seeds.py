"""The digits must-show across training seeds (standing in for other machines, whose BLAS
kernels and thread counts round differently and so train a slightly different model).

    .venv/bin/python benchmarks/bench_calibration_seeds.py [--seeds 0 1 2 3 4 5] [--out runs/seeds]

Per seed: the full model's test accuracy, each reference budget's test accuracy and FLOPs ratio
(router included), whether some budget is within 0.3 points of the full model at <= 40% of its
FLOPs (the must-show of tests/e2e/test_train_eval.py), and the report's frontier check.
About 40 s per seed on one core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynaroute.bundle import Bundle
from dynaroute.training.digits import train_digits
from dynaroute.training.report import build_report
from dynaroute.training.supernet import SupernetTrainConfig

GAP, MAX_RATIO = 0.003, 0.40  # as tests/e2e/test_train_eval.py


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--out", default="runs/seeds", help="one bundle per seed is written under it")
    args = parser.parse_args()
    passed = 0
    for seed in args.seeds:
        path = Path(args.out) / f"seed{seed}"
        if not (path / "manifest.json").is_file():
            train_digits(path, train_config=SupernetTrainConfig(seed=seed), progress=False)
        r = build_report(Bundle.load(path))
        full = next(s for s in r["subnets"] if s["name"] == r["full_subnet"])["test_accuracy"]
        near = [d for d in r["dynamic"] if d["accuracy"] >= full - GAP - 1e-12 and d["flops_ratio"] <= MAX_RATIO]
        ok = bool(near) and r["frontier_check"]["ok"]
        passed += ok
        budgets = "  ".join(f"q{d['budget']:g} {d['policy']} {d['accuracy']:.4f}@{d['flops_ratio']:.1%}"
                            for d in r["dynamic"])
        print(f"seed {seed}: full {full:.4f}  {budgets}  near-full at <=40%: {'yes' if near else 'NO'}, "
              f"frontier: {'yes' if r['frontier_check']['ok'] else 'NO'}")
    print(f"{passed} of {len(args.seeds)} seeds pass the must-show and the frontier check")
    return 0 if passed == len(args.seeds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
