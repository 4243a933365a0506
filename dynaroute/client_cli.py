"""The command-line client: `dynaroute infer` (one input, or a file of many) and `dynaroute models`.

Both talk to a running `dynaroute serve` over the native API (dynaroute.client). Output is
for people by default and JSON with `--json`; errors go to stderr as one line each, exit 1 for
what the server refused, 2 for what was wrong here (a file, a flag).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from dynaroute import logs
from dynaroute._proto import dynaroute_pb2 as pb
from dynaroute.client import Client
from dynaroute.rowfiles import load_rows, load_tensor


def reply_as_json(message: Message) -> dict[str, Any]:
    """A reply as a JSON-ready dict, 64-bit integers as numbers. Proto3's JSON mapping writes
    int64 as strings (JavaScript's numbers are doubles); a script reading `infer --json`
    expects numbers, and Python's json reads any integer exactly."""
    out = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message.DESCRIPTOR, out)
    return out


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _int64_as_numbers(descriptor: Descriptor, d: dict[str, Any]) -> None:
    for f in descriptor.fields:
        if f.name not in d:
            continue
        repeated = isinstance(d[f.name], list)
        values = d[f.name] if repeated else [d[f.name]]
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for v in values:
                _int64_as_numbers(f.message_type, v)
        elif f.cpp_type in _INT64:
            d[f.name] = [int(v) for v in values] if repeated else int(values[0])


def format_reply(reply: pb.InferReply) -> str:
    o, r, c = reply.outputs, reply.route, reply.cost
    route = ", ".join(f"{s} (weight {w:.2f})" for s, w in zip(r.subnets, r.weights, strict=False))
    lines = [
        f"label: {o.label} ({o.label_name})  confidence {o.confidence:.3f}",
        f"route: {route}  policy={r.policy or '-'}  escalations={r.escalations}  "
        f"exit depths={list(r.exit_depths)}" + (f"  fallbacks={list(r.fallbacks)}" if r.fallbacks else ""),
        f"cost:  {c.total_flops:,} FLOPs = {c.flops_ratio:.1%} of the full model's {c.full_flops:,} "
        f"(router {c.router_flops:,} + experts {c.expert_flops:,})",
        f"time:  queue {c.queue_seconds * 1e3:.2f} ms  compute {c.compute_seconds * 1e3:.2f} ms  "
        f"total {c.total_seconds * 1e3:.2f} ms",
    ]
    if r.budget_lowered:
        a, g = r.budget_asked, r.budget_got
        lines.append(f"budget: lowered under load from {a.policy} {a.flops_ratio:.1%} (expected accuracy "
                     f"{a.expected_accuracy:.4f}) to {g.policy} {g.flops_ratio:.1%} ({g.expected_accuracy:.4f})")
    return "\n".join(lines)


def format_row(index: int, row: pb.InferBatchRow) -> str:
    """One line for one row of a batch: its answer, route and cost, or its error."""
    if row.WhichOneof("result") == "error":
        return f"row {index}: error {row.error.code_name}: {row.error.message}"
    r = row.reply
    o, c = r.outputs, r.cost
    return (f"row {index}: label {o.label} ({o.label_name})  confidence {o.confidence:.3f}  "
            f"route {'+'.join(r.route.subnets)}  FLOPs {c.total_flops:,} = {c.flops_ratio:.1%} of full  "
            f"total {c.total_seconds * 1e3:.2f} ms")


def row_as_json(index: int, row: pb.InferBatchRow) -> dict[str, Any]:
    """One row of a batch as JSON: {"row": i, "reply": {...}} or {"row": i, "error": {...}}."""
    which = row.WhichOneof("result")
    return {"row": index, which: reply_as_json(getattr(row, which))}


def _connect(args: argparse.Namespace, address: str) -> Client:
    return Client(address, timeout_s=args.timeout_s, ca=args.ca, cert=args.cert, key=args.key, token=args.token)


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model or "", "quality": args.quality, "max_flops": args.max_flops,
            "target_accuracy": args.target_accuracy, "subnet": args.subnet, "policy": args.policy,
            "min_quality": args.min_quality, "min_accuracy": args.min_accuracy}


def _infer_batch(args: argparse.Namespace, client: Client) -> int:
    """Send the file's rows in calls of --batch-size rows; print one line per row, in order."""
    spec = client.get_model(args.model or "").input
    rows = load_rows(args.batch, spec.kind, spec.dtype, tuple(spec.shape))
    failed: list[int] = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        inputs: dict[str, Any] = {"texts": chunk} if spec.kind == "text" else {"tensor": chunk}
        try:
            reply = client.infer_batch(**inputs, **_budget(args))
        except grpc.RpcError as e:
            end = start + len(chunk) - 1
            logs.error_line(__name__, f"dynaroute infer: rows {start} to {end}: {e.code().name}: {e.details()}")
            return 1
        for i, row in enumerate(reply.rows, start=start):
            print(json.dumps(row_as_json(i, row)) if args.json else format_row(i, row))
            if row.WhichOneof("result") == "error":
                failed.append(i)
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
        logs.error_line(__name__, f"dynaroute infer: {len(failed)} of {len(rows)} rows failed (rows {shown})",
                        failed_rows=failed)
        return 1
    return 0


def _reported(command: str, call: Callable[[], int]) -> int:
    """Run a command's work; the server's refusals exit 1, local problems (a file, a value) 2,
    each one line on stderr."""
    try:
        return call()
    except grpc.RpcError as e:
        logs.error_line(__name__, f"dynaroute {command}: {e.code().name}: {e.details()}")
        return 1
    except BrokenPipeError:  # the reader of stdout went away: cli.main ends quietly
        raise
    except (OSError, ValueError) as e:
        logs.error_line(__name__, f"dynaroute {command}: {e}")
        return 2


def _infer_one(args: argparse.Namespace, client: Client) -> int:
    if args.tensor:
        # JSON numbers carry no dtype: use the model's input dtype.
        dtype = client.get_model(args.model or "").input.dtype if args.tensor.endswith(".json") else None
        reply = client.infer(load_tensor(args.tensor, dtype), **_budget(args))
    else:
        text = args.text if args.text is not None else Path(args.text_file).read_text().strip()
        reply = client.infer(text=text, **_budget(args))
    print(json.dumps(reply_as_json(reply)) if args.json else format_reply(reply))
    return 0


def main_infer(args: argparse.Namespace) -> int:
    """`dynaroute infer`: send one input and print label, route and cost (or --json); or with
    --batch, a file of many inputs, one output line per row."""

    def work() -> int:
        with _connect(args, args.address) as client:
            return _infer_batch(args, client) if args.batch else _infer_one(args, client)

    return _reported("infer", work)


# -- dynaroute models ----------------------------------------------------------------------------


def _labels(labels: list[str], most: int = 20) -> str:
    more = f", ... ({len(labels)} labels)" if len(labels) > most else ""
    return ", ".join(labels[:most]) + more


REFERENCE_QUALITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def quality_point(points: list[pb.CalibrationPoint], quality: float) -> pb.CalibrationPoint | None:
    """The point a `quality` budget selects from one table: the first (tables run cheapest
    first) whose place on the quality scale reaches it, as the server's calibration solves it."""
    return next((p for p in points if p.quality >= quality - 1e-12), None)


def format_model(m: pb.ModelInfo) -> str:
    """A served model for people: input spec, labels, subnets and the calibrated budgets."""
    spec = m.input
    if spec.kind == "text":
        shape = f"text, at most {spec.max_length} tokens"
    else:
        shape = f"tensor {spec.dtype} [{', '.join(map(str, spec.shape))}] per example"
    full = m.full_flops or 1
    lines = [
        f"model {m.name}  ({m.task}; {'ready' if m.ready else 'not ready'})",
        f"  input:   {shape}",
        f"  labels:  {_labels(list(m.labels))}",
        f"  router:  {m.router_flops:,} FLOPs ({m.router_flops / full:.2%} of full); default policy "
        f"{m.default_policy or '-'}; full subnet {m.full_subnet} ({m.full_flops:,} FLOPs)",
        "",
        f"  {'subnet':<16}{'width':>7}{'depth':>7}{'path':>6}{'params':>11}{'FLOPs':>14}{'ratio':>8}{'val acc':>9}",
    ]
    for s in m.subnets:
        lines.append(f"  {s.name:<16}{s.width:>7g}{s.depth:>7}{s.path:>6}{s.params:>11,}{s.flops:>14,}"
                     f"{s.flops / full:>8.3f}{s.val_accuracy:>9.4f}")
    tables: dict[str, list[pb.CalibrationPoint]] = {}
    for p in m.calibration:
        tables.setdefault(p.policy, []).append(p)
    default = m.default_policy if m.default_policy in tables else next(iter(tables), "")
    lines += ["", f"  calibrated budgets (policy {default}, the default; {len(m.calibration)} operating points in "
                  f"{', '.join(f'{k} ({len(v)})' for k, v in tables.items())}; --json lists them all)",
              f"  {'quality':>9}{'threshold':>11}{'exp. acc':>10}{'mean FLOPs':>14}{'ratio':>8}"]
    for q in REFERENCE_QUALITIES:
        p = quality_point(tables.get(default, []), q)
        if p is not None:
            lines.append(f"  {q:>9g}{p.threshold:>11.4g}{p.expected_accuracy:>10.4f}{p.mean_flops:>14,.0f}"
                         f"{p.mean_flops / full:>8.3f}")
    return "\n".join(lines)


def main_models(args: argparse.Namespace) -> int:
    """`dynaroute models [ADDRESS]`: the served models (ListModels), a table each or --json."""

    def work() -> int:
        with _connect(args, args.address) as client:
            models = client.list_models()
        if args.json:
            print(json.dumps([reply_as_json(m) for m in models], indent=2))
        else:
            print("\n\n".join(format_model(m) for m in models))
        return 0

    return _reported("models", work)
