"""`dynaroute train sst2` end to end in a tiny configuration, then the bundle loads and serves text.

Uses ../shared/data/sst2 when it exists beside the repository, else a small generated sample,
so that the test never depends on that folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.experts.spec import SubnetSpec
from dynaroute.text import TextEncoder
from tests.sst2_sample import sst2_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_train_sst2_tiny_writes_a_servable_text_bundle(tmp_path: Path) -> None:
    data = sst2_data(tmp_path / "data")
    out = tmp_path / "sst2"
    cmd = [
        sys.executable, "-m", "dynaroute", "train", "sst2", "--data", str(data), "--out", str(out),
        "--max-examples", "200", "--steps", "2", "--max-length", "24", "--val-examples", "48",
        "--router-examples", "48", "--test-examples", "48", "--batch-size", "16", "--threads", "1",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote bundle 'sst2'" in done.stdout

    bundle = Bundle.load(out)
    m = bundle.manifest
    assert m["input"] == {"kind": "text", "tokenizer": "tokenizer.json", "max_length": 24}
    assert (out / "tokenizer.json").is_file()
    assert m["supernet"]["family"] == "dynaroute.experts.bert:DynaBert"  # by import path
    names = [s["name"] for s in bundle.subnet_infos]
    assert len(names) == 12 and bundle.full_subnet == "w1-d6-p0"
    flops = {s["name"]: s["flops"] for s in bundle.subnet_infos}
    assert flops["w0.25-d3-p0"] < flops["w0.5-d4-p0"] < flops["w1-d6-p0"]
    for s in bundle.subnet_infos:
        assert 0.0 <= s["test_accuracy"] <= 1.0 and 0.0 <= s["val_accuracy"] <= 1.0
        assert len(s["exit_flops"]) == s["depth"]
    assert (out / m["router"]["weights"]).is_file()
    assert m["router"]["flops"] <= 0.02 * bundle.full_flops  # the router costs at most 2% of the full model
    assert m["calibration"]["tables"]

    # every training stage was checkpointed in the run folder beside the bundle, not in it: a rerun
    # trains nothing again and writes the same model
    run = tmp_path / "sst2.run"
    assert not (out / "checkpoints").exists() and not list(out.glob("*.partial.*"))
    state = json.loads((run / "state.json").read_text())
    assert state["done"][:4] == ["teacher", "rewire", "width", "depth"]
    weights = (out / "supernet.safetensors").read_bytes()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["info"] == state["info"]
    assert (out / "supernet.safetensors").read_bytes() == weights

    # the bundle serves text: tokenise with its tokenizer, run an extracted subnet
    encoder = TextEncoder.from_bundle(bundle)
    x = encoder.encode(["a wonderful film", "the script is dull and lifeless"])
    supernet = bundle.supernet()
    sub = supernet.extract(SubnetSpec.parse("w0.5-d3-p0"))
    logits = sub(x)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, supernet(x, SubnetSpec(0.5, 3)), atol=1e-5, rtol=0)

    # `dynaroute eval` reads the data where the manifest says it came from, or from --data
    assert m["data"]["path"] == str(data.resolve())
    ev = subprocess.run([sys.executable, "-m", "dynaroute", "eval", str(out), "--json", "--out", str(tmp_path / "ev")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout)
    assert len(report["subnets"]) == 12 and len(report["dynamic"]) == 5
    assert {d["budget"] for d in report["dynamic"]} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert 0.0 < report["oracle"]["accuracy"] <= 1.0
    assert (tmp_path / "ev" / "pareto.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "dynaroute", "eval", str(out), "--data", str(tmp_path / "none")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert missing.returncode == 2
    assert "needs the SST-2 folder" in missing.stderr and "--data" in missing.stderr
