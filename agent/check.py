"""`meshlens check`: like `linkerd check`, one line per requirement, √ or × with a hint,
then the attach point each signal would use on this kernel (found by really loading and
attaching every source, then detaching). Exit status 0 only if the agent can run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, TextIO, Tuple

from meshlens.agent.kernel import bpf, capabilities
from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.base import Source

OK, FAIL, WARN = "√", "×", "‼"


@dataclass
class Result:
    ok: bool
    text: str
    hint: str = ""
    fatal: bool = True


def capability_checks(features: Tuple[str, ...], cap_eff: Optional[int] = None,
                      host_pid: Optional[bool] = None) -> List[Result]:
    """One line per capability the configured features need, naming it; and whether /proc
    shows the node's processes."""
    cap_eff = capabilities.effective() if cap_eff is None else cap_eff
    absent = {n.cap for n in capabilities.missing(features, cap_eff)}
    out = [Result(n.cap not in absent, f"CAP_{n.cap} held ({n.why})",
                  f"CAP_{n.cap} is missing: run as root, or add {n.cap} to the container's capabilities")
           for n in capabilities.needed(features)]
    host_pid = capabilities.in_host_pid_namespace() if host_pid is None else host_pid
    out.append(Result(host_pid, "the node's processes are visible in /proc (host pid namespace)",
                      "in a container set hostPID: true: without it pods are named by cgroup only and "
                      "a crashed agent's tc filters are left in place", fatal=False))
    return out


def requirement_checks(kf: KernelFeatures, features: Tuple[str, ...] = ("l4", "l7", "tc", "sat"),
                       cap_eff: Optional[int] = None) -> List[Result]:
    results = [
        *capability_checks(features, cap_eff),
        Result(kf.btf, "kernel BTF available at /sys/kernel/btf/vmlinux",
               "CO-RE needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distributions since 2020)"),
        Result(bool(kf.tracefs), f"tracefs mounted at {kf.tracefs or '/sys/kernel/tracing'}",
               "mount -t tracefs nodev /sys/kernel/tracing (the Makefile does this)"),
        Result(kf.bpffs, "bpffs mounted at /sys/fs/bpf", "mount -t bpf bpf /sys/fs/bpf (the Makefile does this)", fatal=False),
        Result(kf.memlock_bytes == -1 or kf.memlock_bytes >= 64 << 20 or _memcg_accounting(kf),
               f"locked-memory limit sufficient ({'unlimited' if kf.memlock_bytes == -1 else f'{kf.memlock_bytes >> 20} MiB'})",
               "ulimit -l unlimited (kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK)", fatal=False),
    ]
    missing = [n for n in ("tcpconn", "probe") if not (bpf.OBJ_DIR / f"{n}.bpf.o").exists()]
    results.append(Result(not missing, "BPF objects shipped with the agent",
                          f"missing {', '.join(missing)}: run `make bpf` or reinstall meshlens"))
    results.append(Result(kf.fentry, "fentry/fexit programs allowed",
                          "not required: tracepoint variants are used instead", fatal=False))
    results.append(Result(kf.kprobes, "kprobes available", "not required: tracepoint variants are used instead", fatal=False))
    results.append(Result(kf.bpf_iter, "BPF iterators available (L4 bytes without per-call programs)",
                          "not required: per-call tracepoints count bytes instead, at a cost per send/receive",
                          fatal=False))
    return results


def _memcg_accounting(kf: KernelFeatures) -> bool:
    major, minor = (int(x) for x in kf.release.split(".")[:2])
    return (major, minor) >= (5, 11)


def attach_results(sources: List[Source]) -> List[Result]:
    """Start the sources in order, as the agent does (a later source may build on an earlier
    one's kernel objects), report every attach choice, then stop them in reverse."""
    out: List[Result] = []
    started: List[Source] = []
    try:
        for s in sources:
            try:
                s.start()
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                out.append(Result(False, f"{s.name}: cannot load", str(exc).splitlines()[0]))
                continue
            started.append(s)
            for ch in s.attach_report():
                rejected = f" (not {'; '.join(ch.tried)})" if ch.tried else ""
                if ch.chosen:
                    out.append(Result(True, f"{s.name}/{ch.signal}: {ch.chosen} [{', '.join(ch.programs)}]{rejected}"))
                else:
                    out.append(Result(False, f"{s.name}/{ch.signal}: no attach point", "; ".join(ch.tried),
                                      fatal=ch.required))
    finally:
        for s in reversed(started):
            s.stop()
    return out


def print_section(title: str, results: List[Result], out: TextIO) -> None:
    print(title, file=out)
    print("-" * len(title), file=out)
    for r in results:
        mark = OK if r.ok else (FAIL if r.fatal else WARN)
        print(f"{mark} {r.text}", file=out)
        if not r.ok and r.hint:
            print(f"    hint: {r.hint}", file=out)
    print(file=out)


def run_check(out: TextIO, make_sources: Callable[[KernelFeatures], List[Source]],
              kf: Optional[KernelFeatures] = None, features: Tuple[str, ...] = ("l4", "l7", "tc", "sat")) -> int:
    kf = kf or KernelFeatures.probe()
    req = requirement_checks(kf, features)
    print(f"kernel {kf.release}\n", file=out)
    print_section("requirements", req, out)
    fatal = [r for r in req if not r.ok and r.fatal]
    att: List[Result] = []
    if not fatal:
        att = attach_results(make_sources(kf))
        print_section("attach points", att, out)
    failed = fatal + [r for r in att if not r.ok and r.fatal]
    print(f"Status check results are {FAIL if failed else OK}", file=out)
    return 1 if failed else 0

