"""Attach planning with a fake view of the kernel: variant order, reasons for rejection."""
from __future__ import annotations

from pathlib import Path

from meshlens.agent.kernel.attach import Signal, Variant, plan, variant_available
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.tcp.source import RESET_NOSOCK, SIGNALS, signals_for


# Functions in the BTF of a 6.5+ kernel and of Debian's 6.1 (tcp_sendpage went away in 6.5).
FUNCS_6_18 = {"tcp_sendmsg", "tcp_recvmsg", "tcp_v4_send_reset", "tcp_v6_send_reset"}
FUNCS_6_1 = FUNCS_6_18 | {"tcp_sendpage"}


class FakeKernel(KernelFeatures):
    def __init__(self, tracepoints=(), fentry=False, kprobes=False, functions=(), btf_functions=FUNCS_6_18,
                 btf_structs=("trace_event_raw_tcp_send_reset",), bpf_iter=True, btf_tracepoints=()) -> None:
        super().__init__(release="6.18.0", btf=True, tracefs=Path("/nonexistent"), bpffs=True, is_root=True,
                         memlock_bytes=-1)
        self._tps, self._functions = set(tracepoints), set(functions)
        self._btf_functions, self._btf_structs = set(btf_functions), set(btf_structs)
        self._btf_tps = set(btf_tracepoints)
        self.__dict__["fentry"] = fentry
        self.__dict__["kprobes"] = kprobes
        self.__dict__["bpf_iter"] = bpf_iter

    def has_tracepoint(self, category_event: str) -> bool:
        return category_event in self._tps

    def kernel_function(self, name: str) -> bool:
        return name in self._functions

    def kernel_btf_function(self, name: str) -> bool:
        return name in self._btf_functions

    def kernel_btf_struct(self, name: str) -> bool:
        return name in self._btf_structs

    def btf_tracepoint(self, event: str) -> bool:
        return event in self._btf_tps


BYTES = next(s for s in SIGNALS if s.name == "tcp_bytes")
LENGTH_TPS = {"sock/sock_send_length", "sock/sock_recv_length"}


def test_iterator_preferred_over_per_call_programs() -> None:
    kf = FakeKernel(tracepoints=LENGTH_TPS, fentry=True)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["iter", "fentry", "per-call"]


def test_fentry_preferred_over_tracepoints_without_iterators() -> None:
    kf = FakeKernel(tracepoints=LENGTH_TPS, fentry=True, bpf_iter=False)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["fentry", "per-call"]
    assert st.tried == ["iter: BPF iterators unavailable (they need kernel BTF)",
                        "fentry+sendpage: no kernel function tcp_sendpage"]


def test_per_call_tracepoint_fallback_with_the_reasons_recorded() -> None:
    kf = FakeKernel(tracepoints=LENGTH_TPS, fentry=False, bpf_iter=False)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["per-call"]
    assert st.tried == ["iter: BPF iterators unavailable (they need kernel BTF)",
                        "fentry+sendpage: fentry programs refused by this kernel",
                        "fentry: fentry programs refused by this kernel"]


def test_old_kernel_without_the_length_tracepoints_uses_fentry_with_sendpage() -> None:
    kf = FakeKernel(tracepoints=set(), fentry=True, btf_functions=FUNCS_6_1, btf_structs=(), bpf_iter=False)
    (st,) = plan([BYTES], kf)
    assert [v.name for v in st.candidates] == ["fentry+sendpage", "fentry"]
    assert "no tracepoint sock/sock_send_length, sock/sock_recv_length" in st.tried[1]


def test_no_byte_counting_at_all_is_visible() -> None:
    kf = FakeKernel(tracepoints=set(), bpf_iter=False)
    (st,) = plan([BYTES], kf)
    assert st.current is None
    assert "no tracepoint sock/sock_send_length, sock/sock_recv_length" in st.tried[-1]


def test_socket_less_resets_hooked_only_where_the_tracepoint_misses_them() -> None:
    old = FakeKernel(fentry=True, btf_functions=FUNCS_6_1, btf_structs=())
    new = FakeKernel(fentry=True)
    assert [s.name for s in signals_for(old)] == [s.name for s in SIGNALS] + ["tcp_reset_nosock"]
    assert signals_for(new) == SIGNALS
    (st,) = plan([RESET_NOSOCK], old)
    assert [v.name for v in st.candidates] == ["fentry"] and not RESET_NOSOCK.required


def test_kprobe_variant_needs_kprobes_and_the_function() -> None:
    v = Variant("kprobe", "kprobe", ("p",), ("tcp_set_state",))
    assert variant_available(v, FakeKernel(kprobes=False)) == (False, "kprobes not available (CONFIG_KPROBES off)")
    assert variant_available(v, FakeKernel(kprobes=True)) == (False, "no kernel function tcp_set_state")
    assert variant_available(v, FakeKernel(kprobes=True, functions={"tcp_set_state"})) == (True, "")


def test_no_variant_left_is_visible() -> None:
    sig = Signal("x", (Variant("tracepoint", "tracepoint", ("p",), ("a/b",)),))
    (st,) = plan([sig], FakeKernel())
    assert st.current is None and st.tried == ["tracepoint: no tracepoint a/b"]


STATE = next(s for s in SIGNALS if s.name == "tcp_state")


def test_state_changes_on_the_btf_tracepoint_where_the_kernel_has_it() -> None:
    (st,) = plan([STATE], FakeKernel(tracepoints={"sock/inet_sock_set_state"}, btf_tracepoints={"inet_sock_set_state"}))
    assert [v.name for v in st.candidates] == ["tp_btf", "tracepoint"]
    (st,) = plan([STATE], FakeKernel(tracepoints={"sock/inet_sock_set_state"}))
    assert [v.name for v in st.candidates] == ["tracepoint"]
    assert st.tried == ["tp_btf: no BTF tracepoint inet_sock_set_state"]


def test_a_variant_skipped_by_the_environment_is_not_planned_and_says_why(monkeypatch) -> None:
    monkeypatch.setenv("MESHLENS_ATTACH_SKIP", " tcp_state/tp_btf , bogus ,tcp_bytes/nope")
    (st,) = plan([STATE], FakeKernel(tracepoints={"sock/inet_sock_set_state"}, btf_tracepoints={"inet_sock_set_state"}))
    assert [v.name for v in st.candidates] == ["tracepoint"]
    assert st.tried == ["tp_btf: skipped ($MESHLENS_ATTACH_SKIP)"]
