"""In-process throughput of each expert backend, per subnet and batch size, in one run.

    .venv/bin/python benchmarks/bench_backends.py BUNDLE [--subnets ...] [--batches 1 32] [--threads 1]

The bundle must have been exported (`dynaroute export BUNDLE --backend onnx` and `--backend
int8`). Per subnet and batch size, the systems are alternated round by round (the machine is
shared and noisy) and the median of the rounds is reported as rows/s: torch eager, ONNX Runtime
fp32 ("onnx"), ONNX Runtime dynamic int8 ("int8", the int8 backend), and torch's own dynamic
int8 quantisation (`torch.ao.quantization.quantize_dynamic`, "torch-int8"), which is measured
only to justify the int8 backend's choice. Text inputs are sentences of the export's fixed set,
padded to the batch's longest (dynamic padding).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dynaroute.bundle import Bundle
from dynaroute.experts.backends import make_backend
from dynaroute.experts.spec import SubnetSpec
from dynaroute.export import made_inputs

SYSTEMS = ("torch", "onnx", "int8", "torch-int8")


def rows_per_s(module: torch.nn.Module, x, batch: int, seconds: float) -> float:
    with torch.no_grad():
        module(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            module(x)
            n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--subnets", nargs="+", default=None, help="default: every subnet exported for both")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="per system, per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    exported = bundle.manifest.get("backends", {})
    names = args.subnets or [s["name"] for s in bundle.subnet_infos
                             if all(s["name"] in exported.get(b, {}).get("subnets", {}) for b in ("onnx", "int8"))]
    supernet = bundle.supernet()
    print(f"{'subnet':<14}{'batch':>6}" + "".join(f"{s + ' rows/s':>18}" for s in SYSTEMS)
          + f"{'onnx/torch':>12}{'int8/torch':>12}{'t-int8/torch':>14}")
    for name in names:
        reference = supernet.extract(SubnetSpec.parse(name)).eval()
        modules = {
            "torch": reference,
            "onnx": make_backend("onnx").load(reference, bundle.backend_graphs("onnx", name), args.threads),
            "int8": make_backend("int8").load(reference, bundle.backend_graphs("int8", name), args.threads),
            "torch-int8": torch.ao.quantization.quantize_dynamic(reference, {torch.nn.Linear}, dtype=torch.qint8),
        }
        for batch in args.batches:
            x = made_inputs(bundle, batch, seed=batch)
            rounds = {s: [] for s in SYSTEMS}
            for _ in range(args.rounds):
                for s in SYSTEMS:
                    rounds[s].append(rows_per_s(modules[s], x, batch, args.seconds))
            med = {s: float(np.median(v)) for s, v in rounds.items()}
            print(f"{name:<14}{batch:>6}" + "".join(f"{med[s]:>18.1f}" for s in SYSTEMS)
                  + f"{med['onnx'] / med['torch']:>12.2f}{med['int8'] / med['torch']:>12.2f}"
                  + f"{med['torch-int8'] / med['torch']:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
