"""What every section shares: the quick flag, per-workload duration, the testbed (built
once, lazily), which agent modes exist on this build, and notes/caveats for the report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .workloads import Testbed


@dataclass
class Context:
    quick: bool = False
    default_sources: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    closing: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    attach: Dict[str, List[str]] = field(default_factory=dict)
    _testbed: Optional[Testbed] = None
    _plans: Dict[Tuple[int, bool], Dict[str, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> int:
        """Duration of one measured workload run (wrk takes whole seconds)."""
        return 2 if self.quick else 5

    @property
    def testbed(self) -> Testbed:
        if self._testbed is None:
            self._testbed = Testbed()
        return self._testbed

    @property
    def agent_modes(self) -> List[str]:
        """'l4' always; 'full' only when `meshlens run` starts more than the tcp source;
        'packets' (L7 from packets only) when it starts the http source."""
        if set(self.default_sources) <= {"tcp"}:
            return ["l4"]
        return ["l4", "full", "packets"] if "http" in self.default_sources else ["l4", "full"]

    @property
    def full_mode(self) -> str:
        return "full" if "full" in self.agent_modes else self.agent_modes[-1]

    @property
    def cost_modes(self) -> List[str]:
        """Modes whose kernel cost per request is measured (agent_cost)."""
        return [m for m in ("full", "packets") if m in self.agent_modes] or [self.full_mode]

    def mode_label(self, mode: str) -> str:
        if mode == "base":
            return "no agent"
        sources = sorted({a.split("/", 1)[0] for a in self.attach.get(mode, [])})
        what = "+".join(sources) if sources else ("tcp" if mode == "l4" else "+".join(self.default_sources))
        if mode == "l4" and self.agent_modes == ["l4"]:
            return f"agent L4 = full ({what})"
        return f"agent {mode} ({what})"

    def plan(self, rate: int, close: bool = False) -> Dict[str, int]:
        """A calibrated wrk plan for `rate` (keep-alive or connection-per-request), cached."""
        key = (rate, close)
        if key not in self._plans:
            self._plans[key] = self.testbed.calibrate(rate, close=close, tries=1 if self.quick else 2)
        return self._plans[key]

    def remember_attach(self, mode: str, attached: List[str]) -> None:
        self.attach.setdefault(mode, attached)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def close(self) -> None:
        if self._testbed is not None:
            self._testbed.close()
            self._testbed = None
