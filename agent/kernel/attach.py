"""Attach strategy: per signal an ordered list of attach variants; the first that works wins.

Used by every Source. `plan()` orders variants by what the kernel offers (KernelFeatures);
`load_with_fallback()` opens the object with only the chosen variants' programs set to load,
loads and attaches them, and if the kernel still refuses a variant (load or attach), records
why and retries with that signal's next variant. The resulting AttachChoice list is what
`meshlens check` prints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple

from meshlens.agent.kernel.bpf import BpfError, BpfObject
from meshlens.agent.kernel.bpf_iter import attach_iter
from meshlens.agent.kernel.features import KernelFeatures

log = logging.getLogger("meshlens.attach")


@dataclass(frozen=True)
class AttachChoice:
    """Which attach point a signal ended up on, for `meshlens check` and the logs."""

    signal: str
    chosen: Optional[str]          # variant name, None if nothing could attach
    programs: List[str]
    tried: List[str] = field(default_factory=list)   # "variant: reason" for rejected ones
    required: bool = True


@dataclass(frozen=True)
class Variant:
    name: str                    # "fentry", "kprobe", "tracepoint", or a more specific name
    kind: str                    # one of: tracepoint, tp_btf, fentry, kprobe, iter
    programs: Tuple[str, ...]    # program names in the BPF object
    targets: Tuple[str, ...]     # "category/event" for tracepoints, the event for tp_btf; for iter, one per program:
                                 # the iterator ("tcp") or "run" (loaded, run on demand by the
                                 # source, not attached); function names otherwise


@dataclass(frozen=True)
class Signal:
    name: str
    variants: Tuple[Variant, ...]
    required: bool = True


def variant_available(v: Variant, kf: KernelFeatures) -> Tuple[bool, str]:
    """Whether the kernel offers what the variant needs, with a reason if not."""
    if v.kind == "tracepoint":
        missing = [t for t in v.targets if not kf.has_tracepoint(t)]
        if not kf.tracefs:
            return False, "tracefs not mounted"
        return (not missing, f"no tracepoint {', '.join(missing)}" if missing else "")
    if v.kind == "tp_btf":
        if not kf.btf:
            return False, "no kernel BTF"
        missing = [t for t in v.targets if not kf.btf_tracepoint(t)]
        return (not missing, f"no BTF tracepoint {', '.join(missing)}" if missing else "")
    if v.kind == "iter":
        return (kf.bpf_iter, "" if kf.bpf_iter else "BPF iterators unavailable (they need kernel BTF)")
    if v.kind == "fentry":
        if not kf.fentry:
            return False, "fentry programs refused by this kernel"
        missing = [t for t in v.targets if not kf.kernel_btf_function(t)]
        return (not missing, f"no kernel function {', '.join(missing)}" if missing else "")
    if v.kind == "kprobe":
        if not kf.kprobes:
            return False, "kprobes not available (CONFIG_KPROBES off)"
        missing = [t for t in v.targets if not kf.kernel_function(t)]
        return (not missing, f"no kernel function {', '.join(missing)}" if missing else "")
    return False, f"unknown kind {v.kind}"


@dataclass
class _SignalState:
    signal: Signal
    candidates: List[Variant]
    tried: List[str] = field(default_factory=list)

    @property
    def current(self) -> Optional[Variant]:
        return self.candidates[0] if self.candidates else None


SKIP_ENV = "MESHLENS_ATTACH_SKIP"


def skipped_variants(value: Optional[str] = None) -> Set[Tuple[str, str]]:
    """(signal, variant) pairs never to use, from $MESHLENS_ATTACH_SKIP ("tcp_state/tp_btf,...");
    a debugging and benchmarking knob: compare attach points on one kernel, or step around one
    that misbehaves. `meshlens check` shows each skip."""
    raw = os.environ.get(SKIP_ENV, "") if value is None else value
    out = set()
    for item in raw.split(","):
        sig, _, var = item.strip().partition("/")
        if sig and var:
            out.add((sig, var))
    return out


def plan(signals: Sequence[Signal], kf: KernelFeatures) -> List[_SignalState]:
    states = []
    skip = skipped_variants()
    for sig in signals:
        st = _SignalState(sig, [])
        for v in sig.variants:
            if (sig.name, v.name) in skip:
                st.tried.append(f"{v.name}: skipped (${SKIP_ENV})")
                continue
            ok, why = variant_available(v, kf)
            if ok:
                st.candidates.append(v)
            else:
                st.tried.append(f"{v.name}: {why}")
        states.append(st)
    return states


def load_with_fallback(
    path: Path,
    signals: Sequence[Signal],
    kf: KernelFeatures,
    configure: Callable[[BpfObject], None],
    max_rounds: int = 6,
) -> Tuple[BpfObject, List[AttachChoice]]:
    """Open, configure, load and attach `path`, falling back per signal on refusal.

    Raises RuntimeError naming the signal if a required one has no variant left.
    """
    states = plan(signals, kf)
    all_programs = {p for s in signals for v in s.variants for p in v.programs}
    last_error: Optional[BpfError] = None
    for _ in range(max_rounds):
        for st in states:
            if st.current is None and st.signal.required:
                raise RuntimeError(
                    f"signal {st.signal.name!r}: no attach point works ({'; '.join(st.tried)})"
                ) from last_error
        chosen = {st.signal.name: st.current for st in states}
        wanted = {p for v in chosen.values() if v for p in v.programs}
        obj = BpfObject(path)
        try:
            for name in all_programs:
                obj.program(name).autoload = name in wanted
            configure(obj)
            try:
                obj.load()
            except BpfError as exc:
                last_error = exc
                if not states:
                    obj.close()
                    raise
                culprit = _blame(states, exc)
                log.warning("load of %s failed (%s); dropping variant %s", path.name, exc.strerror, culprit)
                obj.close()
                continue
            failed = None
            for st in states:
                v = st.current
                if v is None:
                    continue
                try:
                    for i, prog in enumerate(v.programs):
                        if v.kind == "iter" and v.targets[i] == "run":
                            continue  # run on demand by the source (BPF_PROG_TEST_RUN), no link
                        if v.kind == "iter":
                            attach_iter(obj, prog)
                        else:
                            obj.attach(prog)
                except BpfError as exc:
                    last_error = exc
                    failed = st
                    st.tried.append(f"{v.name}: attach failed: {exc.strerror}")
                    st.candidates.pop(0)
                    break
            if failed is not None:
                obj.close()
                continue
        except Exception:
            obj.close()
            raise
        choices = [
            AttachChoice(
                signal=st.signal.name,
                chosen=st.current.name if st.current else None,
                programs=list(st.current.programs) if st.current else [],
                tried=list(st.tried),
                required=st.signal.required,
            )
            for st in states
        ]
        return obj, choices
    raise RuntimeError(f"could not load {path.name} after {max_rounds} attempts") from last_error


def _blame(states: List[_SignalState], exc: BpfError) -> str:
    """Drop the variant whose program the load log names (else the first non-tracepoint)."""
    for st in states:
        v = st.current
        if v and any(f"prog '{p}'" in exc.log for p in v.programs):
            st.tried.append(f"{v.name}: load refused: {exc.strerror}")
            st.candidates.pop(0)
            return f"{st.signal.name}/{v.name}"
    for st in states:
        v = st.current
        if v and v.kind != "tracepoint":
            st.tried.append(f"{v.name}: load refused: {exc.strerror}")
            st.candidates.pop(0)
            return f"{st.signal.name}/{v.name}"
    st = states[0]
    if st.current:
        st.tried.append(f"{st.current.name}: load refused: {exc.strerror}")
        st.candidates.pop(0)
    return st.signal.name
