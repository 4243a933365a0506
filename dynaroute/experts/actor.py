"""The expert: holds extracted subnets and runs batches of them with batched early exit.

`ExpertWorker` is a plain class (unit-testable without Ray); `ExpertActor` is the same class
as a Ray actor. The worker loads the weights from the bundle path on its own node and runs
its subnets on a backend (dynaroute/experts/backends.py: torch eager, on CUDA when torch sees a
GPU; or ONNX Runtime graphs exported into the bundle); every backend offers the same staged
interface, so batched early exit is the same loop on each. It builds the supernet with
`Bundle.load`, which finds the family by the manifest's name (dynaroute.registry) exactly as the
gateway and `dynaroute eval` do: a user's family's package must be importable on every node that
runs an expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from dynaroute.bundle import Bundle
from dynaroute.experts.backends import make_backend
from dynaroute.experts.base import StagedModule, select_rows
from dynaroute.experts.spec import SubnetSpec

# One expert call's answer for one subnet: logits [N, C] float32, exit depth [N] int64
# (1-based), FLOPs [N] int64 (what each row cost, from the bundle's measured exit FLOPs).
ExpertOutput = tuple[np.ndarray, np.ndarray, np.ndarray]
# One group of a batched call: (subnet name, inputs, per-row exit bounds or None, first exit(s)).
Group = tuple[str, Any, Any, Any]


def _to_tensor(a: Any, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.to(device, non_blocking=True) if t.device != device else t


class ExpertWorker:
    """Runs the subnets it holds. `run` is one batch of one subnet, `run_groups` many at once."""

    def __init__(self, bundle_path: str, subnets: Sequence[str], torch_threads: int | None = 1,
                 backend: str | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        bundle = Bundle.load(bundle_path)
        self.backend = make_backend(backend or bundle.default_backend)
        self.device = self.backend.device
        supernet = bundle.supernet()
        self.modules: dict[str, StagedModule] = {}
        self.exit_flops: dict[str, np.ndarray] = {}
        self.flops: dict[str, int] = {}
        for name in subnets:
            info = bundle.subnet_info(name)
            graphs = bundle.backend_graphs(self.backend.name, name) if self.backend.exported else None
            module = supernet.extract(SubnetSpec.parse(name)).eval()
            self.modules[name] = self.backend.load(module, graphs, torch_threads or 1)
            self.exit_flops[name] = np.asarray(info["exit_flops"], dtype=np.int64)
            self.flops[name] = int(info["flops"])
        del supernet

    def ready(self) -> list[str]:
        """The subnets held; answering at all means the actor is up."""
        return list(self.modules)

    def _inputs(self, inputs: Any) -> Any:
        if isinstance(inputs, tuple | list):  # text models: (ids, mask)
            return tuple(_to_tensor(a, self.device) for a in inputs)
        return _to_tensor(inputs, self.device)

    @torch.inference_mode()
    def run(self, subnet: str, inputs: Any, exit_bound: float | np.ndarray | None = None,
            first_exit: int | np.ndarray = 1) -> ExpertOutput:
        """Run a batch through `subnet`, each row leaving at its first exit whose max softmax is
        >= its bound (`exit_bound`: one float, a float per row, or None for no early exit; a row
        with bound inf never leaves early), from exit `first_exit` on (1-based; one int or one
        per row; earlier exits are passed by). Rows that leave are dropped from the batch
        (compacted) so the rest run on fewer rows."""
        module = self.modules.get(subnet)
        if module is None:
            raise KeyError(f"this expert holds {sorted(self.modules)}, not subnet {subnet!r}")
        state = module.embed(self._inputs(inputs))
        n = state[0].shape[0]
        last = module.num_stages - 1
        bounds = None
        finite = None
        if exit_bound is not None:
            b = np.array(np.broadcast_to(np.asarray(exit_bound, dtype=np.float32), (n,)))  # writable copy
            finite = np.isfinite(b)
            if finite.any() and last > 0:
                bounds = torch.from_numpy(b).to(self.device)
                firsts_np = np.broadcast_to(np.asarray(first_exit, dtype=np.int64), (n,))
                firsts = torch.from_numpy(np.array(firsts_np)).to(self.device)
        if bounds is None:  # no early exit: the plain forward, and the subnet's full FLOPs
            for i in range(module.num_stages):
                state = module.stage(i, state)
            logits = module.exit_logits(last, state).float().cpu().numpy()
            return logits, np.full(n, last + 1, dtype=np.int64), np.full(n, self.flops[subnet], dtype=np.int64)
        if n == 1:  # one row (concurrency 1): the same rule with a Python comparison, no row bookkeeping
            bound, first = float(b[0]), int(firsts_np[0])
            for i in range(module.num_stages):
                state = module.stage(i, state)
                if i < first - 1 and i < last:  # an exit passed by: its head is not even run
                    continue
                logits = module.exit_logits(i, state)
                if i == last or torch.softmax(logits.float(), -1).amax().item() >= bound:
                    break
            return (logits.float().cpu().numpy(), np.array([i + 1], dtype=np.int64),
                    self.exit_flops[subnet][i : i + 1].astype(np.int64))

        out: torch.Tensor | None = None
        depth = torch.full((n,), last + 1, dtype=torch.int64, device=self.device)
        rows = torch.arange(n, device=self.device)  # original row index of each row still running
        skip_until = int(firsts.min()) - 1  # exits no row may leave at: their heads are not run
        for i in range(module.num_stages):
            state = module.stage(i, state)
            if i < skip_until and i < last:
                continue
            logits = module.exit_logits(i, state)
            if out is None:
                out = torch.empty((n, logits.shape[1]), dtype=logits.dtype, device=self.device)
            if i == last:
                out[rows] = logits
                break
            leave = (torch.softmax(logits.float(), -1).amax(-1) >= bounds) & (firsts <= i + 1)
            left = leave.nonzero().squeeze(1)
            if len(left):
                out[rows[left]] = logits[left]
                depth[rows[left]] = i + 1
                stay = (~leave).nonzero().squeeze(1)
                if not len(stay):
                    break
                state = select_rows(state, stay)
                rows, bounds, firsts = rows[stay], bounds[stay], firsts[stay]
        depth_np = depth.cpu().numpy()
        flops = self.exit_flops[subnet][depth_np - 1]
        # Rows that asked for no early exit (bound inf) are charged the plain forward's FLOPs.
        flops = np.where(finite, flops, self.flops[subnet])
        return out.float().cpu().numpy(), depth_np, flops.astype(np.int64)

    def run_groups(self, groups: Sequence[Group]) -> list[ExpertOutput]:
        """Several subnets' batches in one call: one Ray round trip per batch of the actor."""
        return [self.run(subnet, inputs, bound, first) for subnet, inputs, bound, first in groups]


# The Ray actor; resources (num_cpus, num_gpus, custom) are set per placement with .options().
ExpertActor = ray.remote(num_cpus=0.25)(ExpertWorker)
