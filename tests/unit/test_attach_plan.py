"""Attach planning with a fake view of the kernel: variant order, reasons for rejection."""
from __future__ import annotations

from pathlib import Path

from meshlens.agent.kernel.attach import Signal, Variant, plan, variant_available
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.tcp.source import SIGNALS


class FakeKernel(KernelFeatures):
    def __init__(self, tracepoints=(), fentry=False, kprobes=False, functions=()) -> None:
        super().__init__(release="6.18.0", btf=True, tracefs=Path("/nonexistent"), bpffs=True, is_root=True,
                         memlock_bytes=-1)
        self._tps, self._functions = set(tracepoints), set(functions)
        self.__dict__["fentry"] = fentry
        self.__dict__["kprobes"] = kprobes

    def has_tracepoint(self, category_event: str) -> bool:
        return category_event in self._tps

    def kernel_function(self, name: str) -> bool:
        return name in self._functions


BYTES = next(s for s in SIGNALS if s.name == "tcp_bytes")


def test_fentry_preferred_when_the_kernel_allows_it() -> None:
    kf = FakeKernel(tracepoints={"sock/sock_send_length", "sock/sock_recv_length"}, fentry=True)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["fentry", "tracepoint"]


def test_tracepoint_fallback_with_the_reason_recorded() -> None:
    kf = FakeKernel(tracepoints={"sock/sock_send_length", "sock/sock_recv_length"}, fentry=False)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["tracepoint"]
    assert st.tried == ["fentry: fentry programs refused by this kernel"]


def test_old_kernel_without_the_length_tracepoints_uses_fentry() -> None:
    kf = FakeKernel(tracepoints=set(), fentry=True)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["fentry"]
    assert "no tracepoint sock/sock_send_length, sock/sock_recv_length" in st.tried[0]


def test_kprobe_variant_needs_kprobes_and_the_function() -> None:
    v = Variant("kprobe", "kprobe", ("p",), ("tcp_set_state",))
    assert variant_available(v, FakeKernel(kprobes=False)) == (False, "kprobes not available (CONFIG_KPROBES off)")
    assert variant_available(v, FakeKernel(kprobes=True)) == (False, "no kernel function tcp_set_state")
    assert variant_available(v, FakeKernel(kprobes=True, functions={"tcp_set_state"})) == (True, "")


def test_no_variant_left_is_visible() -> None:
    sig = Signal("x", (Variant("tracepoint", "tracepoint", ("p",), ("a/b",)),))
    (st,) = plan([sig], FakeKernel())
    assert st.current is None and st.tried == ["tracepoint: no tracepoint a/b"]
