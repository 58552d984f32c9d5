"""What the tools report: per module (its shape of factors, rank, the relative error ‖ΔW − ΔŴ‖ / ‖ΔW‖, the kept
parameters) and in total (the error over every module's ΔW at once), as a table, JSON and file metadata."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModuleReport:
    """One module: its LoKr split (out_l, out_k, in_m, in_n; () for a LoRA), the rank (0: full), Tucker, the
    relative error ‖ΔW − ΔŴ‖ / ‖ΔW‖, the kept parameters, ‖ΔW‖ and ‖ΔW‖ / ‖W_base‖ (None without a base)."""

    component: str
    path: str
    split: tuple[int, ...]
    rank: int
    tucker: bool
    error: float
    parameters: int
    delta_norm: float
    relative_change: float | None


@dataclass
class Report:
    """What a tool did (`tool`: "extract", "lora"): per module and in total (the error over all modules' ΔW
    together), what it skipped."""

    tool: str
    path: str
    family: str
    modules: list[ModuleReport] = field(default_factory=list)
    skipped_unchanged: int = 0
    skipped_budget: list[str] = field(default_factory=list)  # modules no split fits within their budget
    options: dict[str, object] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """‖ΔW − ΔŴ‖ / ‖ΔW‖ over every module at once."""
        num = sum((m.error * m.delta_norm) ** 2 for m in self.modules)
        den = sum(m.delta_norm ** 2 for m in self.modules)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def parameters(self) -> int:
        return sum(m.parameters for m in self.modules)

    def summary(self) -> dict[str, object]:
        return {"tool": self.tool, "family": self.family, "modules": len(self.modules), "parameters": self.parameters,
                "error": self.error, "skipped_unchanged": self.skipped_unchanged,
                "skipped_budget": self.skipped_budget, "options": self.options}

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "per_module": [asdict(m) for m in self.modules]}, indent=1)

    def table(self, top: int = 10) -> str:
        """A text summary: the total, then the `top` modules with the largest error."""
        budget = f", {len(self.skipped_budget)} left out: no split fits their budget" if self.skipped_budget else ""
        lines = [f"{len(self.modules)} modules, {self.parameters:,} parameters, total relative error "
                 f"{self.error:.4g} ({self.skipped_unchanged} unchanged modules skipped{budget})"]
        worst = sorted(self.modules, key=lambda m: -m.error)[:top]
        if worst:
            lines.append(f"{'module':60s} {'split':>17s} {'rank':>5s} {'params':>10s} {'error':>9s}")
        for m in worst:
            split = "x".join(map(str, m.split)) or "-"
            lines.append(f"{(m.component + '.' + m.path)[-60:]:60s} {split:>17s} {m.rank or 'full':>5} "
                         f"{m.parameters:>10,} {m.error:9.4g}")
        return "\n".join(lines)


def report_path(out: str) -> str:
    """The JSON report beside a written file (or folder): `<out without .safetensors>.json`."""
    stem = out.rstrip("/\\")
    return (stem[:-len(".safetensors")] if stem.endswith(".safetensors") else stem) + ".json"
