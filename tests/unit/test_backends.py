"""Expert backends (dynaroute/experts/backends.py) and `dynaroute export`: ONNX Runtime graphs
answer as torch does (fp32 within 1e-4, int8 at its recorded accuracy), early exit and batch
compaction work the same on them, and a bundle whose graphs are missing or changed is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaroute.bundle import Bundle
from dynaroute.errors import BundleError
from dynaroute.experts.actor import ExpertWorker
from dynaroute.experts.backends import export_model, make_backend, quantize_int8
from dynaroute.export import accuracy, eval_data, export_bundle, made_inputs, rows_of
from dynaroute.training.report import build_report, format_table

DEEP = "w0.5-d3-p0"
SST2_SUBNETS = ["w0.25-d3-p0", "w0.5-d4-p0", "w1-d6-p0"]  # what conftest's sst2_exported_dir exports


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def digits_exported(digits_exported_dir: Path) -> Path:
    return digits_exported_dir


@pytest.fixture(scope="module")
def sst2_exported(sst2_exported_dir: Path) -> Path:
    return sst2_exported_dir


def _modules(bundle: Bundle, backend: str, subnet: str):
    reference = bundle.extract(subnet)
    module = make_backend(backend).load(reference, bundle.backend_graphs(backend, subnet))
    return reference, module


@pytest.mark.parametrize("which", ["digits", "sst2"])
def test_onnx_subnets_equal_torch_at_every_exit(which, digits_exported, sst2_exported):
    bundle = Bundle.load(digits_exported if which == "digits" else sst2_exported)
    x, _ = eval_data(bundle, None)["test"]
    names = [s["name"] for s in bundle.subnet_infos] if which == "digits" else SST2_SUBNETS
    for name in names:
        reference, module = _modules(bundle, "onnx", name)
        for batch in (torch.arange(1), torch.arange(5, 37)):  # one row, and 32 of various lengths
            xb = rows_of(x, batch)
            with torch.no_grad():
                for a, b in zip(reference.forward_exits(xb), module.forward_exits(xb), strict=True):
                    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4, rtol=0)
        assert bundle.manifest["backends"]["onnx"]["subnets"][name]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("which", ["digits", "sst2"])
def test_int8_subnets_answer_at_their_recorded_accuracy(which, digits_exported, sst2_exported):
    bundle = Bundle.load(digits_exported if which == "digits" else sst2_exported)
    data = eval_data(bundle, None)
    rows = bundle.manifest["backends"]["int8"]["subnets"]
    assert set(rows) == ({s["name"] for s in bundle.subnet_infos} if which == "digits" else set(SST2_SUBNETS))
    for name, row in rows.items():
        _, module = _modules(bundle, "int8", name)
        measured = accuracy(module, *data["test"])
        assert measured == pytest.approx(row["test_accuracy"], abs=1.0 / len(data["test"][1]))
        # the same rows through torch give the bundle's own recorded accuracy
        assert row["torch_test_accuracy"] == pytest.approx(bundle.subnet_info(name)["test_accuracy"], abs=1e-9)
        assert set(row["latency_ms"]) == {"1", "32"} and all(v > 0 for v in row["latency_ms"].values())
    if which == "digits":  # a trained model loses little to int8 weights
        full = bundle.full_subnet
        assert rows[full]["test_accuracy"] >= bundle.subnet_info(full)["test_accuracy"] - 0.03


def _stage_batch_sizes(worker: ExpertWorker, subnet: str) -> list[int]:
    """Record the batch size each stage runs at (compaction shows as a shrinking batch)."""
    module = worker.modules[subnet]
    seen: list[int] = []
    original = module.stage

    def stage(i, state):
        seen.append(int(state[0].shape[0]))
        return original(i, state)

    module.stage = stage
    return seen


@pytest.mark.parametrize("which", ["digits", "sst2"])
def test_whole_model_graph_answers_as_torch_at_any_batch_and_length(which, digits_bundle_dir, sst2_tiny_bundle_dir):
    """`export_model`: the static full model as one graph (what a user would export), fp32
    within 1e-4 of torch and int8 on the same predictions as often as a trained model keeps
    them, at batch sizes and lengths other than those it was exported with."""
    import onnxruntime as ort

    bundle = Bundle.load(digits_bundle_dir if which == "digits" else sst2_tiny_bundle_dir)
    x, _ = eval_data(bundle, None)["test"]
    reference = bundle.extract(bundle.full_subnet).eval()
    blob = export_model(reference, made_inputs(bundle, 1), made_inputs(bundle, 3, seed=1))  # lengths differ
    fp32 = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(quantize_int8(blob), providers=["CPUExecutionProvider"])
    names = [i.name for i in fp32.get_inputs()]
    for batch in (torch.arange(1), torch.arange(5, 37)):
        xb = rows_of(x, batch)
        feed = dict(zip(names, (t.numpy() for t in (xb if isinstance(xb, tuple) else (xb,))), strict=True))
        with torch.no_grad():
            expected = reference(xb).numpy()
        (got,) = fp32.run(None, feed)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        (quantized,) = int8.run(None, feed)
        assert quantized.shape == expected.shape
        if which == "digits":  # trained: int8 weights change few of its answers
            assert (quantized.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("backend", ["onnx", "int8"])
def test_early_exit_and_compaction_on_onnx_backends(backend, digits_exported):
    torch_worker = ExpertWorker(str(digits_exported), [DEEP], backend="torch")
    worker = ExpertWorker(str(digits_exported), [DEEP], backend=backend)
    x = eval_data(Bundle.load(digits_exported), None)["test"][0][:64].numpy()
    with torch.no_grad():
        conf = np.stack([torch.softmax(e, -1).amax(-1).numpy()
                         for e in torch_worker.modules[DEEP].forward_exits(torch.from_numpy(x))], 1)
    bound = float(np.median(conf[:, 0]))  # about half leave at the first exit
    sizes = _stage_batch_sizes(worker, DEEP)
    logits, depth, flops = worker.run(DEEP, x, bound)
    t_logits, t_depth, t_flops = torch_worker.run(DEEP, x, bound)
    assert 0 < (depth == 1).sum() < len(x)  # some left early, some went on
    if backend == "onnx":
        np.testing.assert_array_equal(depth, t_depth)
        np.testing.assert_array_equal(flops, t_flops)
        np.testing.assert_allclose(logits, t_logits, atol=1e-4, rtol=0)
    else:  # int8 moves confidences a little: nearly every row leaves where torch's does
        assert (depth == t_depth).mean() >= 0.9
    # each stage ran only on the rows that had not left yet
    assert sizes == [n for n in (len(x), int((depth > 1).sum()), int((depth > 2).sum())) if n]


def test_sst2_early_exit_depths_match_torch(sst2_exported):
    subnet = "w1-d6-p0"
    torch_worker = ExpertWorker(str(sst2_exported), [subnet], backend="torch")
    worker = ExpertWorker(str(sst2_exported), [subnet], backend="onnx")
    ids, mask = rows_of(eval_data(Bundle.load(sst2_exported), None)["test"][0], torch.arange(32))
    for bound in (0.5, 0.51, 0.55):  # tiny training: confidences sit just above one half
        logits, depth, _ = worker.run(subnet, (ids.numpy(), mask.numpy()), bound, first_exit=2)
        t_logits, t_depth, _ = torch_worker.run(subnet, (ids.numpy(), mask.numpy()), bound, first_exit=2)
        np.testing.assert_array_equal(depth, t_depth)
        np.testing.assert_allclose(logits, t_logits, atol=1e-4, rtol=0)


def test_manifest_records_files_latency_and_default(digits_exported):
    bundle = Bundle.load(digits_exported)
    assert bundle.default_backend == "int8" and bundle.backends == ["torch", "onnx", "int8"]
    for backend in ("onnx", "int8"):
        entry = bundle.manifest["backends"][backend]
        assert all((digits_exported / rel).is_file() and len(digest) == 64 for rel, digest in entry["files"].items())
        for name in (s["name"] for s in bundle.subnet_infos):
            for b in (1, 32):
                assert bundle.latency_ms(name, backend, b) > 0
                assert bundle.latency_ms(name, "torch", b) > 0
    table = format_table(build_report(bundle))
    assert "onnx ms b1/b32" in table and "int8 ms b1/b32" in table and "torch ms b1/b32" in table


def test_sst2_embedding_graph_is_stored_once(sst2_exported):
    entry = Bundle.load(sst2_exported).manifest["backends"]["onnx"]
    embeds = {row["graphs"]["embed"] for row in entry["subnets"].values()}
    assert len(embeds) == 1  # identical in every subnet: one file, named by each


def test_missing_graph_is_refused_naming_the_file(digits_exported, tmp_path):
    root = _copy(digits_exported, tmp_path / "b")
    rel = Bundle.load(root).manifest["backends"]["onnx"]["subnets"][DEEP]["graphs"]["stage1"]
    (root / rel).unlink()
    with pytest.raises(BundleError, match=f"missing file {rel!r}"):
        Bundle.load(root)


def test_changed_graph_is_refused_by_the_expert_and_by_serve(digits_exported, tmp_path):
    root = _copy(digits_exported, tmp_path / "b")
    rel = Bundle.load(root).manifest["backends"]["onnx"]["subnets"][DEEP]["graphs"]["exit2"]
    data = bytearray((root / rel).read_bytes())
    data[-1] ^= 0xFF
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{rel}: sha256 .* does not match"):
        ExpertWorker(str(root), [DEEP], backend="onnx")
    ExpertWorker(str(root), [DEEP], backend="torch")  # torch does not read the graphs
    with pytest.raises(BundleError, match=rel):
        Bundle.load(root).check_backend("onnx")
    done = subprocess.run([sys.executable, "-m", "dynaroute", "serve", str(root), "--backend", "onnx", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and rel in done.stderr


def test_unexported_backend_and_subnet_are_refused(digits_bundle_dir, sst2_exported):
    with pytest.raises(BundleError, match="no graphs for backend 'onnx'.*dynaroute export"):
        ExpertWorker(str(digits_bundle_dir), [DEEP], backend="onnx")
    with pytest.raises(BundleError, match="subnet 'w0.75-d6-p0' was not exported for backend 'onnx'"):
        ExpertWorker(str(sst2_exported), ["w0.75-d6-p0"], backend="onnx")


def test_export_refuses_outputs_beyond_tolerance_and_writes_nothing(digits_bundle_dir, tmp_path, monkeypatch):
    import dynaroute.export

    root = _copy(digits_bundle_dir, tmp_path / "b")
    before = (root / "manifest.json").read_text()
    monkeypatch.setattr(dynaroute.export, "FP32_TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(BundleError, match="differ from torch's by up to .* nothing was written"):
        export_bundle(root, "onnx", subnets=[DEEP], latency_repeats=1)
    assert (root / "manifest.json").read_text() == before
    assert not (root / "backends").exists() or not any((root / "backends").iterdir())


def test_int8_export_without_data_is_refused(sst2_tiny_bundle_dir, tmp_path):
    root = _copy(sst2_tiny_bundle_dir, tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["data"]["path"] = str(tmp_path / "nowhere")
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="needs .* evaluation data; pass --data"):
        export_bundle(root, "int8", subnets=SST2_SUBNETS[:1])


def test_int8_calibration_is_redone_and_the_router_resolves_budgets_through_it(digits_exported):
    from dynaroute.router.budget import Budget
    from dynaroute.router.runtime import RouterRuntime

    bundle = Bundle.load(digits_exported)
    table = bundle.manifest["backends"]["int8"]["calibration"]
    val_x, val_y = eval_data(bundle, None)["val"]
    assert table["rows"] == len(val_y)
    # the full model's point is the int8 full subnet's validation accuracy
    _, full = _modules(bundle, "int8", bundle.full_subnet)
    static = table["tables"]["static"][0]
    assert static["accuracy"] == pytest.approx(accuracy(full, val_x, val_y), abs=1.0 / len(val_y))
    assert table["full_accuracy"] == pytest.approx(static["accuracy"], abs=1e-12)
    int8 = RouterRuntime.from_bundle(bundle)  # the bundle's default backend is int8
    assert int8.calibration.to_dict()["tables"] == table["tables"]
    on_torch = RouterRuntime.from_bundle(bundle, backend="torch")
    assert on_torch.calibration.to_dict()["tables"] == bundle.manifest["calibration"]["tables"]
    # quality 1: at least the int8 full model's accuracy, as calibrated on int8 outputs
    assert int8.resolve(Budget(quality=1.0)).point.assured >= static["accuracy"] - 1e-12


def test_int8_calibration_not_redone_says_why(sst2_exported):
    entry = Bundle.load(sst2_exported).manifest["backends"]["int8"]
    assert "calibration" not in entry and "only some subnets" in entry["calibration_note"]


def test_int8_recalibration_finds_the_sentence_like_rows_an_sst2_table_was_measured_on():
    from dynaroute.export import calibration_rows
    from dynaroute.training.text import SENTENCE_TOKENS, sentence_like_rows

    lengths = np.array([5, SENTENCE_TOKENS, 30, 8] * 60)
    mask = (np.arange(40)[None, :] < lengths[:, None]).astype(np.int64)
    val_x = (np.ones_like(mask), mask)
    rows, note = sentence_like_rows(lengths.tolist())
    recorded = {"rows": len(rows), "rows_note": note}
    assert calibration_rows(recorded, val_x, len(lengths)).tolist() == rows.tolist() == [
        i for i, n in enumerate(lengths) if n >= SENTENCE_TOKENS]
    # more rows than the validation split holds: the table also used rows only training knows
    assert calibration_rows({**recorded, "rows": len(rows) + 7}, val_x, len(lengths)) is None
    assert calibration_rows({"rows": len(lengths)}, val_x, len(lengths)).tolist() == list(range(len(lengths)))
