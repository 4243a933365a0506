"""Expert backends: what runs an extracted subnet's stages (torch eager, ONNX Runtime, int8).

Every backend turns an extracted `StagedModule` (or the graphs exported from one) into an object
with the same `embed` / `stage(i)` / `exit_logits(i)` interface, so the expert's batched early
exit (`ExpertWorker.run`) is the same loop on every backend: rows leave at a confident exit and
the batch compacts between stages, because each stage is its own graph with a dynamic batch
axis (and sequence axis, for text).

Graphs are exported once, at bundle time (`dynaroute export`, see dynaroute/export.py), with the
TorchScript-based exporter by default (`torch.onnx.export(dynamo=False)`): both exporters
export both families within 1e-6 of torch, but the torch.export-based one (`dynamo=True`) takes
2-6 s per graph against 0.2 s on this machine, and a DynaBERT bundle is ~120 graphs (embed,
every block and every exit of every subnet). `exporter="dynamo"` selects the other one for the
day the legacy exporter is removed; the graphs it writes run the same way.

ONNX Runtime and its quantisation tools are an optional extra (`.[onnx]`), imported only when
an ONNX backend is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynaroute.config import BACKENDS
from dynaroute.experts.base import StagedModule, State

# The backends an expert can run; "torch" needs no exported graphs.
DEFAULT_BACKEND = "torch"
OPSET = 17
EXPORTERS = ("torchscript", "dynamo")


def graph_names(num_stages: int) -> list[str]:
    """The graphs of a subnet: its embedding, each block and each block's exit head."""
    return ["embed", *(f"stage{i}" for i in range(num_stages)), *(f"exit{i}" for i in range(num_stages))]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- exporting a StagedModule as graphs ----------------------------------------------------------

class _Part(nn.Module):
    """One graph of a staged subnet: its embed, one stage, or one exit head, as a plain forward
    over tensors (the state tuple flattened into arguments and outputs)."""

    def __init__(self, module: StagedModule, part: str):
        super().__init__()
        self.module, self.part = module, part

    def forward(self, *tensors: torch.Tensor) -> Any:
        if self.part == "embed":
            return tuple(self.module.embed(tensors if len(tensors) > 1 else tensors[0]))
        kind, index = self.part[:4], int(self.part[4:].removeprefix("e"))  # "stage3" / "exit3"
        if kind == "stag":
            return tuple(self.module.stage(index, tuple(tensors)))
        return self.module.exit_logits(index, tuple(tensors))


def _dynamic_axes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], prefix: str) -> dict[str, dict[int, str]]:
    """Axes whose size differs between two runs of different batch size and length: those are
    the graph's dynamic axes (batch; sequence for text), whatever the family's tensor layout."""
    out = {}
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        axes = {d: f"{prefix}{k}_dim{d}" for d in range(x.dim()) if x.shape[d] != y.shape[d]}
        out[f"{prefix}{k}"] = {d: ("batch" if d == 0 else name) for d, name in axes.items()}
    return out


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


@torch.no_grad()
def export_graphs(module: StagedModule, example: Any, other: Any, exporter: str = "torchscript") -> dict[str, bytes]:
    """Each graph of `module` as serialised ONNX: name (see `graph_names`) -> bytes.

    `example` and `other` are two model inputs that differ in batch size (and, for text, in
    length): the axes that differ between them are exported as dynamic."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    module.eval()
    states: list[list[tuple[torch.Tensor, ...]]] = []  # per input: embed input, then the state after each stage
    for x in (example, other):
        seq = [_as_tuple(x)]
        state = module.embed(x)
        seq.append(tuple(state))
        for i in range(module.num_stages):
            state = module.stage(i, state)
            seq.append(tuple(state))
        states.append(seq)
    graphs: dict[str, bytes] = {}
    for name in graph_names(module.num_stages):
        if name == "embed":
            pos = 0
        elif name.startswith("stage"):
            pos = 1 + int(name[5:])
        else:
            pos = 2 + int(name[4:])
        args, other_args = states[0][pos], states[1][pos]
        part = _Part(module, name).eval()
        outs = _as_tuple(part(*args))
        other_outs = _as_tuple(part(*other_args))
        axes = {**_dynamic_axes(args, other_args, "in"), **_dynamic_axes(outs, other_outs, "out")}
        inputs = [f"in{k}" for k in range(len(args))]
        outputs = [f"out{k}" for k in range(len(outs))]
        graphs[name] = _export_one(part, args, inputs, outputs, axes, exporter)
    return graphs


class _Whole(nn.Module):
    """A subnet's whole forward (input -> last exit's logits) over plain tensors."""

    def __init__(self, module: StagedModule):
        super().__init__()
        self.module = module

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(tensors if len(tensors) > 1 else tensors[0])


@torch.no_grad()
def export_model(module: StagedModule, example: Any, other: Any, exporter: str = "torchscript") -> bytes:
    """`module`'s whole forward as one serialised ONNX graph (inputs `in0`, ... as the model
    input's tensors; output `out0`, the last exit's logits): the static model as a user would
    export it, without the per-stage graphs that early exit needs (`export_graphs`).
    `example` and `other` differ in batch size (and length, for text), as for `export_graphs`."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    whole = _Whole(module.eval()).eval()
    args, other_args = _as_tuple(example), _as_tuple(other)
    axes = {**_dynamic_axes(args, other_args, "in"),
            **_dynamic_axes((whole(*args),), (whole(*other_args),), "out")}
    return _export_one(whole, args, [f"in{k}" for k in range(len(args))], ["out0"], axes, exporter)


def _export_one(part: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
                axes: dict[str, dict[int, str]], exporter: str) -> bytes:
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated on every call (see the module docstring),
        # and the tracer that `torch.as_tensor` of an input is a constant: it is the input itself
        # (already int64), which the check against torch on other inputs confirms.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(part, args, buf, dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
            return canonical(buf.getvalue())
        dims = {}
        shapes = []
        for name in inputs:
            spec = {}
            for d, label in axes.get(name, {}).items():
                spec[d] = dims.setdefault(label, torch.export.Dim(label.replace("-", "_")))
            shapes.append(spec or None)
        program = torch.onnx.export(part, args, None, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=tuple(shapes), opset_version=max(OPSET, 18), verbose=False)
        return program.model_proto.SerializeToString()


def canonical(blob: bytes) -> bytes:
    """The graph with its internal names (tensors, nodes) renumbered in order of appearance.
    The exporter numbers constants by their place in the whole module (`onnx::Add_85`), so the
    same embedding exported from two subnets of different depth differs only by names; renamed,
    equal graphs are equal bytes and are stored once."""
    import onnx

    model = onnx.load_from_string(blob)
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in g.initializer:
        t.name = rename(t.name)
    for k, node in enumerate(g.node):
        node.name = f"n{k}"
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    for v in g.value_info:
        v.name = rename(v.name)
    return model.SerializeToString()


def quantize_int8(fp32: bytes) -> bytes:
    """ONNX Runtime dynamic quantisation of one graph: int8 weights of every MatMul / Gemm,
    activations quantised per batch at run time. Embedding lookups (Gather) stay fp32: they
    cost no arithmetic and their rounding would change every token's vector."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        # It logs a suggestion to pre-process the graph on the root logger, for every graph.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return dst.read_bytes()


# --- running graphs ------------------------------------------------------------------------------

class OrtStagedModule(StagedModule):
    """A subnet whose embed, stages and exits are ONNX Runtime sessions, one per graph.

    Tensors stay torch tensors on the way in and out (zero-copy through numpy on CPU), so that
    the expert's early-exit bookkeeping is the same as with torch modules."""

    def __init__(self, sessions: dict[str, Any], num_stages: int):
        super().__init__()
        self.num_stages = num_stages
        self.sessions = sessions
        self._inputs = {k: [i.name for i in s.get_inputs()] for k, s in sessions.items()}

    def _run(self, name: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feed = {k: t.detach().cpu().contiguous().numpy() for k, t in zip(self._inputs[name], tensors, strict=True)}
        return [torch.from_numpy(a) for a in self.sessions[name].run(None, feed)]

    def embed(self, x: Any) -> State:
        return tuple(self._run("embed", [torch.as_tensor(t) for t in _as_tuple(x)]))

    def stage(self, index: int, state: State) -> State:
        return tuple(self._run(f"stage{index}", state))

    def exit_logits(self, index: int, state: State) -> torch.Tensor:
        return self._run(f"exit{index}", state)[0]


# --- the backends ---------------------------------------------------------------------------------

class Backend(ABC):
    """Runs extracted subnets. `exported`: whether it needs graphs exported into the bundle."""

    name: str
    exported: bool = False
    device: torch.device = torch.device("cpu")  # where the expert puts its input tensors

    @abstractmethod
    def load(self, module: StagedModule, graphs: dict[str, Path] | None, threads: int = 1) -> StagedModule:
        """A module with the staged interface for this subnet (`graphs`: name -> file, when exported)."""

    def export(self, module: StagedModule, example: Any, other: Any, exporter: str = "torchscript") -> dict[str, bytes]:
        """This backend's graphs of `module` (see `export_graphs`)."""
        raise NotImplementedError(f"the {self.name} backend runs the torch module; it exports nothing")


class TorchBackend(Backend):
    """Torch eager: the extracted module as it is (on CUDA where torch sees a GPU)."""

    name = "torch"

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def load(self, module: StagedModule, graphs: dict[str, Path] | None, threads: int = 1) -> StagedModule:
        return module.to(self.device).eval()


class OnnxBackend(Backend):
    """ONNX Runtime, fp32. `providers`: ONNX Runtime execution providers in order of preference
    (CPU by default; CUDAExecutionProvider / TensorrtExecutionProvider where installed)."""

    name = "onnx"
    exported = True

    def __init__(self, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.providers = list(providers)

    def session(self, path: Path, threads: int) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One expert actor holds a CPU share; its graphs run one after another, never in parallel.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)

    def load(self, module: StagedModule, graphs: dict[str, Path] | None, threads: int = 1) -> StagedModule:
        if not graphs:
            raise ValueError(f"the {self.name} backend needs the subnet's exported graphs; run `dynaroute export`")
        # One session per distinct file: subnets that share a graph (DynaBERT's embedding) share it.
        by_file: dict[Path, Any] = {}
        for path in graphs.values():
            if path not in by_file:
                by_file[path] = self.session(path, threads)
        return OrtStagedModule({k: by_file[p] for k, p in graphs.items()}, module.num_stages)

    def export(self, module: StagedModule, example: Any, other: Any, exporter: str = "torchscript") -> dict[str, bytes]:
        return export_graphs(module, example, other, exporter)


class Int8Backend(OnnxBackend):
    """ONNX Runtime with dynamically quantised int8 weights (see `quantize_int8`). Chosen over
    torch's `quantize_dynamic` because it measured faster here (README, bench_backends.py)."""

    name = "int8"

    def export(self, module: StagedModule, example: Any, other: Any, exporter: str = "torchscript") -> dict[str, bytes]:
        graphs = export_graphs(module, example, other, exporter)
        return {k: (v if k == "embed" else quantize_int8(v)) for k, v in graphs.items()}


def make_backend(name: str) -> Backend:
    """The backend called `name` (one of BACKENDS)."""
    if name == "torch":
        return TorchBackend()
    if name == "onnx":
        return OnnxBackend()
    if name == "int8":
        return Int8Backend()
    raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
