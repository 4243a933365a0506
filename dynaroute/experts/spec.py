"""SubnetSpec: one static configuration of a supernet, as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class SubnetSpec:
    """width: fraction of neurons / heads kept; depth: blocks run; path: branch index."""

    width: float
    depth: int
    path: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ValueError(f"width must be in (0, 1], got {self.width}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.path < 0:
            raise ValueError(f"path must be >= 0, got {self.path}")

    @property
    def name(self) -> str:
        """A stable identifier used in manifests, metrics labels and replies: w0.5-d2-p0."""
        return f"w{self.width:g}-d{self.depth}-p{self.path}"

    @classmethod
    def parse(cls, name: str) -> SubnetSpec:
        """Inverse of `name`."""
        try:
            w, d, p = name.split("-")
            if not (w[0] == "w" and d[0] == "d" and p[0] == "p"):
                raise ValueError
            return cls(float(w[1:]), int(d[1:]), int(p[1:]))
        except (ValueError, IndexError):
            raise ValueError(f"subnet name must look like 'w0.5-d2-p0', got {name!r}") from None

    def to_dict(self) -> dict:
        return {"width": self.width, "depth": self.depth, "path": self.path}
