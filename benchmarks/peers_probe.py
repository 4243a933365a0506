"""Idle memory of an in-process system of bench_peers.py; memory and CPU time of a process tree.

    .venv/bin/python benchmarks/peers_probe.py torch BUNDLE [--threads T]
    .venv/bin/python benchmarks/peers_probe.py onnx BUNDLE --model MODEL.onnx [--threads T]

An in-process model lives in its caller's process, so its memory is measured in a process of its
own that does only what a user's would: load the model (torch: the bundle's full subnet; onnx:
an ONNX Runtime session of the exported graph, fp32 or int8, with the tokenizer and nothing of
torch), answer one batch of 32 sentences, then print one JSON line `{"rss": B, "pss": B}`.
The imports are inside the functions for that reason: the onnx probe must not load torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import psutil

# A batch of sentences of varied length (the export's own set, repeated to 32).
SENTENCES = ("a gripping, beautifully acted film.", "dull.", "not bad at all",
             "the plot meanders for two hours and the jokes never land, though the lead does what she can with it.")


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS in bytes summed over a process and all its descendants (a server: its Ray
    processes too). RSS counts a shared page in every process that maps it; PSS splits it
    among them, so the PSS sum is what the tree holds of the machine's memory."""
    root = psutil.Process(pid)
    rss = pss = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended meanwhile, or not ours
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return {"rss": rss, "pss": pss}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds spent so far by a process and its living descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system
    return total


def probe_torch(bundle_path: str, threads: int) -> None:
    import torch

    from dynaroute.bundle import Bundle
    from dynaroute.text import TextEncoder

    torch.set_num_threads(threads)
    bundle = Bundle.load(bundle_path)
    model = bundle.extract(bundle.full_subnet).eval()
    with torch.no_grad():
        model(TextEncoder.from_bundle(bundle).encode([SENTENCES[i % len(SENTENCES)] for i in range(32)]))


def probe_onnx(bundle_path: str, model_path: str, threads: int) -> None:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.loads((Path(bundle_path) / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(Path(bundle_path) / manifest["input"]["tokenizer"]))
    tokenizer.enable_truncation(max_length=int(manifest["input"]["max_length"]))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
    encodings = tokenizer.encode_batch([SENTENCES[i % len(SENTENCES)] for i in range(32)])
    feed = {"in0": np.array([e.ids for e in encodings], dtype=np.int64),
            "in1": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
    session.run(None, feed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["torch", "onnx"])
    parser.add_argument("bundle")
    parser.add_argument("--model", default=None, help="onnx: the exported graph")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.system == "torch":
        probe_torch(args.bundle, args.threads)
    else:
        probe_onnx(args.bundle, args.model, args.threads)
    print(json.dumps(tree_memory(psutil.Process().pid)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
