"""A simulated Kubernetes node for integration tests.

A `Node` is a Linux bridge in the root network namespace with its own IPv4 /24 and IPv6 /64.
Each `Pod` is a network namespace joined to the bridge by a veth pair (host side `mlv<hex6>`,
pod side `eth0`) plus a kubelet-style cgroup v2 directory, so processes started through
`Pod.popen` look to the kernel (and to the agent) exactly like a container's processes:
same netns inode, same cgroup id, same addresses.

Everything created here is recorded in a module-level registry before it is created, so
`leftovers()` can tell what this process failed to clean up and `cleanup_leftovers()` can
remove it. Cleanup never raises: it logs.

Processes enter a pod through a `preexec_fn` that joins the pod's cgroup and calls
setns(CLONE_NEWNET) on /var/run/netns/<name>; `ip netns exec` is avoided on purpose because
it remounts /sys (see DESIGN.md, "Measured facts"). In-process work inside a pod's netns
(netlink configuration, sysctls, /proc/net counters) runs in a short-lived thread that has
called setns: network namespaces are per thread, so the rest of the process is untouched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

log = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_DIR = "/var/run/netns"
CGROUP2_FALLBACK = "/sys/fs/cgroup"
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02
NETNS_PREFIX = "ml-"
BRIDGE_PREFIX = "mlb"
VETH_PREFIX = "mlv"
IPV4_SECOND_OCTETS = range(200, 251)
IPV6_BASE = "fd00:6d6c"
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
CGROUP_DRIVERS = ("systemd", "cgroupfs")
RUNTIME_SCOPE_PREFIX = {"containerd": "cri-containerd", "cri-o": "crio", "crio": "crio", "docker": "docker"}
KILL_WAIT_S = 5.0
TEST_MARK_XATTR = "user.meshlens.test"


# --------------------------------------------------------------------------- registry


class _Registry:
    """What this process created, recorded before creation, for `leftovers()`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.netns: set[str] = set()
        self.links: set[str] = set()
        self.cgroups: set[str] = set()
        self.processes: list[subprocess.Popen] = []
        self.subnets: set[str] = set()
        self.live_cgroups: set[str] = set()
        self.pod_cgroups: set[str] = set()
        self.nodes: list["Node"] = []

    def in_use(self, path: str) -> bool:
        """True if path is, or is a parent of, the cgroup of a pod that is still open."""
        with self.lock:
            return any(live == path or live.startswith(path + "/") for live in self.live_cgroups)

    def add(self, kind: str, value: Any) -> None:
        with self.lock:
            target = getattr(self, kind)
            if kind == "processes":  # forget reaped ones, so long runs do not accumulate
                target[:] = [proc for proc in target if proc.returncode is None]
            if isinstance(target, list):
                target.append(value)
            else:
                target.add(value)


_REGISTRY = _Registry()


def register_process(proc: subprocess.Popen) -> None:
    """Record a process started outside a pod (e.g. in the root netns) for leftovers()."""
    _REGISTRY.add("processes", proc)


# --------------------------------------------------------------------------- low level helpers


def _hex6() -> str:
    return secrets.token_hex(3)


_LIBC: Optional[ctypes.CDLL] = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace behind `fd`."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def netns_path(name: str) -> str:
    """Path of the bind-mounted namespace file of the named netns."""
    return os.path.join(NETNS_DIR, name)


def run_in_netns(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a fresh thread that has joined the named netns; return its result.

    Sockets created by `fn` belong to that netns; /proc/thread-self/net shows its counters.
    Exceptions raised by `fn` are re-raised in the caller.
    """
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_net(fd)
            finally:
                os.close(fd)
            result["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def cgroup2_mount() -> str:
    """Mount point of the cgroup v2 hierarchy, from /proc/mounts (fallback /sys/fs/cgroup)."""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError as exc:
        log.warning("cannot read /proc/mounts: %s", exc)
    return CGROUP2_FALLBACK


def kubelet_cgroup_relpath(
    uid: str,
    container_id: str,
    qos: str = "besteffort",
    cgroup_driver: str = "systemd",
    runtime: str = "containerd",
) -> str:
    """The container cgroup path kubelet + a CRI runtime would create, relative to the mount."""
    if qos not in QOS_CLASSES:
        raise ValueError(f"qos must be one of {QOS_CLASSES}, not {qos!r}")
    if cgroup_driver == "systemd":
        if runtime not in RUNTIME_SCOPE_PREFIX:
            raise ValueError(f"runtime must be one of {sorted(RUNTIME_SCOPE_PREFIX)}, not {runtime!r}")
        pod_unit = "pod" + uid.replace("-", "_")
        parts = ["kubepods.slice"]
        if qos == "guaranteed":
            parts.append(f"kubepods-{pod_unit}.slice")
        else:
            parts += [f"kubepods-{qos}.slice", f"kubepods-{qos}-{pod_unit}.slice"]
        parts.append(f"{RUNTIME_SCOPE_PREFIX[runtime]}-{container_id}.scope")
        return "/".join(parts)
    if cgroup_driver == "cgroupfs":
        parts = ["kubepods"] + ([] if qos == "guaranteed" else [qos])
        return "/".join(parts + [f"pod{uid}", container_id])
    raise ValueError(f"cgroup_driver must be one of {CGROUP_DRIVERS}, not {cgroup_driver!r}")


def _make_cgroup_dirs(root: str, relpath: str, attempts: int = 5) -> list[str]:
    """Create each missing component of root/relpath, marked as test-made; return those created.

    Retries when a concurrent test run removes an empty kubepods parent between two mkdirs.
    """
    created: list[str] = []
    for attempt in range(attempts):
        try:
            path = root
            for part in relpath.split("/"):
                path = os.path.join(path, part)
                if os.path.isdir(path):
                    continue
                _REGISTRY.add("cgroups", path)
                try:
                    os.mkdir(path)
                except FileExistsError:
                    continue  # created concurrently by another node
                _mark_test_made(path)
                created.append(path)
            return created
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    return created


def _mark_test_made(path: str) -> None:
    try:
        os.setxattr(path, TEST_MARK_XATTR, str(os.getpid()).encode())
    except OSError as exc:
        log.debug("cannot mark %s: %s", path, exc)


def _is_test_made(path: str) -> bool:
    """Created by this process, or by any meshlens test run (xattr mark)."""
    with _REGISTRY.lock:
        if path in _REGISTRY.cgroups:
            return True
    try:
        os.getxattr(path, TEST_MARK_XATTR)
        return True
    except OSError:
        return False


def _ancestors(path: str, root: str) -> list[str]:
    """The directories between root (excluded) and path (excluded), deepest first."""
    out: list[str] = []
    parent = os.path.dirname(path)
    while parent.startswith(root + "/"):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def _remove_empty_test_dirs(paths: Iterable[str]) -> None:
    """rmdir, deepest first, each dir that is test-made, empty, and not used by an open pod here.

    Shared kubepods parents are removed by whichever test run leaves them empty, so
    concurrent runs (which share kubepods.slice) leave nothing behind.
    """
    for path in sorted(set(paths), key=lambda p: p.count("/"), reverse=True):
        if (os.path.isdir(path) and _is_test_made(path) and not _REGISTRY.in_use(path)
                and not _has_subdirs(path) and not _cgroup_procs(path)):
            _rmdir_quiet(path)


def _has_subdirs(path: str) -> bool:
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(path))
    except OSError:
        return False


def _rmdir_quiet(path: str) -> bool:
    """rmdir a cgroup directory; True if gone. A busy/non-empty shared parent is not an error."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            log.warning("cannot remove cgroup %s: %s", path, exc)
        return False


def _cgroup_procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as procs:
            return [int(line) for line in procs if line.strip()]
    except OSError:
        return []


def _kill_cgroup(path: str, timeout: float = KILL_WAIT_S) -> None:
    """SIGKILL every process in the cgroup (cgroup.kill, else one by one) and wait until empty."""
    if not os.path.isdir(path):
        return
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as kill:
            kill.write("1")
    except OSError:
        for pid in _cgroup_procs(path):
            _kill_quiet(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _cgroup_procs(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _cgroup_procs(path):
        log.warning("cgroup %s still has processes %s", path, _cgroup_procs(path))


def _quietly(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run a cleanup step; log instead of raising."""
    try:
        fn(*args)
    except Exception as exc:
        log.warning("cleanup step %r failed: %s", what, exc)


def _kill_quiet(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning("cannot signal %d: %s", pid, exc)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = KILL_WAIT_S) -> None:
    """Signal a process (its whole process group when it leads one) and reap it. Never raises."""
    try:
        if proc.poll() is None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = -1
            if pgid == proc.pid:
                os.killpg(pgid, sig)
            else:
                proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if sig != signal.SIGKILL:
            stop_process(proc, signal.SIGKILL, timeout)
        else:
            log.warning("process %d did not die", proc.pid)
    except Exception as exc:  # cleanup never raises
        log.warning("cannot stop process %d: %s", proc.pid, exc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _link_names() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def _delete_link_quiet(name: str) -> None:
    try:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=name)
            if indexes:
                ipr.link("del", index=indexes[0])
    except Exception as exc:
        log.warning("cannot delete link %s: %s", name, exc)


def _remove_netns_quiet(name: str) -> None:
    if not os.path.exists(netns_path(name)):
        return
    try:
        pr_netns.remove(name)
    except Exception as exc:
        log.warning("cannot remove netns %s: %s", name, exc)


def _write_sysctl(key: str, value: str) -> None:
    """Write a sysctl of the calling thread's netns (net.* keys are per namespace)."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as sysctl:
        sysctl.write(value)


# --------------------------------------------------------------------------- /proc/net parsing


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """Parse /proc/net/snmp or /proc/net/netstat: pairs of 'Proto: names' / 'Proto: values'."""
    out: dict[str, dict[str, int]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for header, values in zip(lines[0::2], lines[1::2]):
        proto = header[0].rstrip(":")
        out[proto] = {name: int(value) for name, value in zip(header[1:], values[1:])}
    return out


def parse_snmp6(text: str) -> dict[str, int]:
    """Parse /proc/net/snmp6: one 'Name value' pair per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            out[fields[0]] = int(fields[1])
    return out


def read_thread_net(name: str) -> str:
    """/proc/net/<name> of the calling thread's netns (use inside run_in_netns / Pod.in_netns)."""
    with open(f"/proc/thread-self/net/{name}") as proc_file:
        return proc_file.read()


# --------------------------------------------------------------------------- addressing


def _host_networks() -> list[ipaddress._BaseNetwork]:
    """Every network routed or addressed in the root netns (all tables), both families."""
    nets: list[ipaddress._BaseNetwork] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family, table=0):
                dst = route.get_attr("RTA_DST")
                if dst:
                    nets.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
            for addr in ipr.get_addr(family=family):
                nets.append(ipaddress.ip_network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False))
    return nets


def _pick_subnet(candidates: Callable[[], ipaddress._BaseNetwork], taken: Sequence[ipaddress._BaseNetwork]) -> ipaddress._BaseNetwork:
    for _ in range(200):
        net = candidates()
        if str(net) in _REGISTRY.subnets:
            continue
        if any(net.version == other.version and net.overlaps(other) for other in taken):
            continue
        _REGISTRY.add("subnets", str(net))
        return net
    raise RuntimeError("no free test subnet")


def _random_v4() -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{random.choice(IPV4_SECOND_OCTETS)}.{random.randrange(256)}.0/24")


def _random_v6() -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"{IPV6_BASE}:{random.randrange(1, 0x10000):x}::/64")


# --------------------------------------------------------------------------- pod side netlink


def _configure_pod_side(ipv4: str, ipv6: str, v4_prefix: int, v6_prefix: int, gw4: str, gw6: str) -> None:
    """Runs inside the pod netns: no DAD, lo and eth0 up, addresses, default routes."""
    for key in ("all", "default", "eth0"):
        _write_sysctl(f"net.ipv6.conf.{key}.accept_dad", "0")
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=eth0, address=ipv4, prefixlen=v4_prefix)
        ipr.addr("add", index=eth0, address=ipv6, prefixlen=v6_prefix, flags=IFA_F_NODAD)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="default", gateway=gw4)
        ipr.route("add", dst="default", gateway=gw6, family=socket.AF_INET6)


# --------------------------------------------------------------------------- Pod


class Pod:
    """One pod: a netns on the node's bridge plus a kubelet-style container cgroup."""

    def __init__(
        self,
        node: "Node",
        name: str,
        namespace: str,
        uid: str,
        container_id: str,
        ipv4: str,
        ipv6: str,
        qos: str,
        cgroup_driver: str,
        runtime: str,
    ) -> None:
        self.node = node
        self.name = name
        self.namespace = namespace
        self.uid = uid
        self.container_id = container_id
        self.qos = qos
        self.cgroup_driver = cgroup_driver
        self.runtime = runtime
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        suffix = _hex6()
        self.netns = f"{NETNS_PREFIX}{name}-{suffix}"
        self.host_veth = f"{VETH_PREFIX}{suffix}"
        self.cgroup_relpath = kubelet_cgroup_relpath(uid, container_id, qos, cgroup_driver, runtime)
        self.cgroup_path = os.path.join(node.cgroup_root, self.cgroup_relpath)
        self.cgroup_id = 0
        self.netns_inode = 0
        self.processes: list[subprocess.Popen] = []
        self._drop_rules: list[list[str]] = []
        self._own_cgroups: list[str] = []
        self._closed = False

    # -- lifecycle

    def _create(self) -> None:
        """Create netns, veth pair, addresses, routes and cgroup (called by Node.add_pod)."""
        _REGISTRY.add("netns", self.netns)
        pr_netns.create(self.netns)
        self.netns_inode = os.stat(netns_path(self.netns)).st_ino
        self._create_veth()
        run_in_netns(
            self.netns, _configure_pod_side, self.ipv4, self.ipv6,
            self.node.ipv4_net.prefixlen, self.node.ipv6_net.prefixlen,
            self.node.gateway_v4, self.node.gateway_v6,
        )
        _REGISTRY.add("live_cgroups", self.cgroup_path)
        _REGISTRY.add("pod_cgroups", self.cgroup_path)
        self._own_cgroups = _make_cgroup_dirs(self.node.cgroup_root, self.cgroup_relpath)
        self.cgroup_id = os.stat(self.cgroup_path).st_ino

    def _create_veth(self) -> None:
        _REGISTRY.add("links", self.host_veth)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.netns})
            index = ipr.link_lookup(ifname=self.host_veth)[0]
            _write_sysctl(f"net.ipv6.conf.{self.host_veth}.accept_dad", "0")
            ipr.link("set", index=index, master=self.node.bridge_index, state="up")

    def close(self) -> None:
        """Kill processes, delete veth and netns, remove the cgroup dirs. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            stop_process(proc)
        _quietly("kill cgroup", _kill_cgroup, self.cgroup_path)
        _delete_link_quiet(self.host_veth)
        _remove_netns_quiet(self.netns)
        with _REGISTRY.lock:
            _REGISTRY.live_cgroups.discard(self.cgroup_path)
        _quietly("remove cgroups", _remove_empty_test_dirs,
                 self._own_cgroups + _ancestors(self.cgroup_path, self.node.cgroup_root))

    def __enter__(self) -> "Pod":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pod({self.namespace}/{self.name} {self.ipv4} {self.ipv6} netns={self.netns})"

    # -- processes

    def _preexec(self, netns_fd: int) -> Callable[[], None]:
        procs = os.path.join(self.cgroup_path, "cgroup.procs")

        def enter_pod() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
            setns_net(netns_fd)

        return enter_pod

    def popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside this pod's netns and cgroup, as leader of a new session.

        The process (and its process group and cgroup) is killed when the pod closes.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if "preexec_fn" in popen_kwargs:
            raise ValueError("Pod.popen sets its own preexec_fn")
        popen_kwargs.setdefault("start_new_session", True)
        _libc()  # load before fork: the child must not dlopen
        fd = os.open(netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=self._preexec(fd), **popen_kwargs)
        finally:
            os.close(fd)
        self.processes.append(proc)
        _REGISTRY.add("processes", proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 60.0, check: bool = True, input: Optional[str] = None
    ) -> subprocess.CompletedProcess:
        """Run argv to completion inside the pod; capture stdout/stderr as text."""
        proc = self.popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise
        finally:
            self.processes.remove(proc)
        done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), out, err)
        return done

    def in_netns(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a thread inside this pod's netns (not its cgroup)."""
        return run_in_netns(self.netns, fn, *args)

    # -- kernel counters

    def snmp(self) -> dict[str, dict[str, int]]:
        """/proc/net/snmp of the pod's netns, e.g. pod.snmp()["Tcp"]["RetransSegs"]."""
        return parse_snmp(self.in_netns(read_thread_net, "snmp"))

    def netstat(self) -> dict[str, dict[str, int]]:
        """/proc/net/netstat of the pod's netns, e.g. pod.netstat()["TcpExt"]["TCPTimeouts"]."""
        return parse_snmp(self.in_netns(read_thread_net, "netstat"))

    def snmp6(self) -> dict[str, int]:
        """/proc/net/snmp6 of the pod's netns, e.g. pod.snmp6()["Ip6InReceives"]."""
        return parse_snmp6(self.in_netns(read_thread_net, "snmp6"))

    # -- loss injection

    def drop_packets(
        self, probability: float, direction: str = "egress", proto: str = "tcp", *, match: Sequence[str] = ()
    ) -> None:
        """Drop a random share of the pod's packets (iptables+ip6tables statistic match).

        `match` adds iptables match arguments, e.g. ("--sport", "5301"). Cleared by clear_drops().
        To make a TCP sender retransmit, drop at the receiver ("ingress" on the receiving
        pod): a DROP in the sender's own OUTPUT chain is reported to TCP as a local error
        (EPERM) and the segment is sent again later as new data, not as a retransmit.
        """
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        chain = {"egress": "OUTPUT", "ingress": "INPUT"}.get(direction)
        if chain is None:
            raise ValueError("direction must be 'egress' or 'ingress'")
        rule = [chain, "-p", proto, *match, "-m", "statistic", "--mode", "random",
                "--probability", f"{probability:.6f}", "-j", "DROP"]
        for tool in ("iptables", "ip6tables"):
            self.run([tool, "-w", "-A", *rule])
            self._drop_rules.append([tool, "-w", "-D", *rule])

    def clear_drops(self) -> None:
        """Remove every rule drop_packets added."""
        while self._drop_rules:
            self.run(self._drop_rules.pop())


# --------------------------------------------------------------------------- Node


class Node:
    """A simulated Kubernetes node: a bridge with a /24 and a /64, and pods on it."""

    def __init__(self) -> None:
        self.bridge = f"{BRIDGE_PREFIX}{_hex6()}"
        self.cgroup_root = cgroup2_mount()
        self.pods: list[Pod] = []
        self.bridge_index = 0
        self._next_host = 2
        self._closed = False
        self._lock = threading.Lock()
        _REGISTRY.add("nodes", self)
        taken = _host_networks()
        self.ipv4_net = _pick_subnet(_random_v4, taken)
        self.ipv6_net = _pick_subnet(_random_v6, taken)
        self.gateway_v4 = str(self.ipv4_net.network_address + 1)
        self.gateway_v6 = str(self.ipv6_net.network_address + 1)
        try:
            self._create_bridge()
        except BaseException:
            self.close()
            raise

    def _create_bridge(self) -> None:
        _REGISTRY.add("links", self.bridge)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            self.bridge_index = ipr.link_lookup(ifname=self.bridge)[0]
            _write_sysctl(f"net.ipv6.conf.{self.bridge}.accept_dad", "0")
            ipr.link("set", index=self.bridge_index, state="up")
            ipr.addr("add", index=self.bridge_index, address=self.gateway_v4, prefixlen=self.ipv4_net.prefixlen)
            ipr.addr("add", index=self.bridge_index, address=self.gateway_v6,
                     prefixlen=self.ipv6_net.prefixlen, flags=IFA_F_NODAD)

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        uid: Optional[str] = None,
        container_id: Optional[str] = None,
        qos: str = "besteffort",
        cgroup_driver: str = "systemd",
        runtime: str = "containerd",
    ) -> Pod:
        """Create a pod: netns ml-<name>-<hex6>, veth to the bridge, .N and ::N, a container cgroup."""
        if self._closed:
            raise RuntimeError("node is closed")
        if not name or "/" in name or any(ch.isspace() for ch in name):
            raise ValueError(f"bad pod name {name!r}")
        with self._lock:
            host = self._next_host
            self._next_host += 1
        if host >= self.ipv4_net.num_addresses - 1:
            raise RuntimeError("node subnet is full")
        pod = Pod(
            self, name, namespace,
            uid or str(uuid.uuid4()),
            container_id or secrets.token_hex(32),
            str(self.ipv4_net.network_address + host),
            str(self.ipv6_net.network_address + host),
            qos, cgroup_driver, runtime,
        )
        self.pods.append(pod)
        try:
            pod._create()
        except BaseException:
            pod.close()
            raise
        return pod

    def close(self) -> None:
        """Close every pod, delete the bridge, remove empty kubepods parents we made. Never raises."""
        if self._closed:
            return
        self._closed = True
        for pod in reversed(self.pods):
            pod.close()
        _delete_link_quiet(self.bridge)
        _quietly("remove cgroups", _remove_registered_cgroup_parents)
        with _REGISTRY.lock:
            if self in _REGISTRY.nodes:
                _REGISTRY.nodes.remove(self)

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Node({self.bridge} {self.ipv4_net} {self.ipv6_net}, {len(self.pods)} pods)"


def _remove_registered_cgroup_parents() -> None:
    """Remove every cgroup dir this process created that is now empty (deepest first)."""
    with _REGISTRY.lock:
        paths = list(_REGISTRY.cgroups)
    _remove_empty_test_dirs(paths)


# --------------------------------------------------------------------------- leftovers


def _cgroup_leftover(path: str, ours: set[str]) -> bool:
    """Is this registered cgroup dir a leftover? Empty ones are removed, shared ones skipped.

    A dir holding a cgroup of another run, directly or deeper, is shared and not ours to
    report. Decided on one snapshot of its subdirs and re-evaluated if one of ours vanished
    meanwhile, because a concurrent run may empty or fill a shared parent at any moment.
    """
    for _ in range(3):
        try:
            subdirs = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return False
        not_leftover = [sub for sub in subdirs if sub not in ours or not _cgroup_leftover(sub, ours)]
        if any(sub not in ours or os.path.isdir(sub) for sub in not_leftover):
            return False  # another run's cgroup is inside
        if not_leftover:
            continue  # one of ours was just removed: look again
        if subdirs or _cgroup_procs(path) or _REGISTRY.in_use(path):
            return True
        _rmdir_quiet(path)
    return os.path.isdir(path)


def _all_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def leftovers(everything: bool = False) -> list[str]:
    """What of ours is still present: netns, links, cgroup dirs, live processes.

    By default only what this process created (its registry); `everything=True` also
    reports any netns named ml-* and any link named mlb*/mlv* on the host, whoever made it.
    A kubepods parent we created is not reported while another process's pods are inside
    it (concurrent test runs share it): the last run to leave it empty removes it. An
    empty test-made cgroup dir of ours is removed rather than reported, settling that hand-over.
    """
    with _REGISTRY.lock:
        netns = set(_REGISTRY.netns)
        links = set(_REGISTRY.links)
        cgroups = set(_REGISTRY.cgroups)
        procs = list(_REGISTRY.processes)
    present_ns = set(_all_netns())
    present_links = _link_names()
    if everything:
        netns |= {n for n in present_ns if n.startswith(NETNS_PREFIX)}
        links |= {n for n in present_links if n.startswith((BRIDGE_PREFIX, VETH_PREFIX))}
    found = [f"netns {n}" for n in sorted(netns & present_ns)]
    found += [f"link {n}" for n in sorted(links & present_links)]
    deepest_first = sorted(cgroups, key=lambda p: p.count("/"), reverse=True)
    found += [f"cgroup {p}" for p in sorted(p for p in deepest_first if _cgroup_leftover(p, cgroups))]
    found += [f"process {p.pid} {p.args!r}" for p in procs if p.poll() is None]
    return found


def cleanup_leftovers(everything: bool = False) -> list[str]:
    """Close every node still open, then remove what leftovers() reports; return that report."""
    found = leftovers(everything)
    with _REGISTRY.lock:
        nodes = list(_REGISTRY.nodes)
        procs = list(_REGISTRY.processes)
        pod_cgroups = set(_REGISTRY.pod_cgroups)
    for node in nodes:
        node.close()
    for proc in procs:
        stop_process(proc)
    for item in found:
        kind, _, what = item.partition(" ")
        if kind == "cgroup" and what in pod_cgroups:
            _kill_cgroup(what)  # never a shared parent: that would kill other runs' pods
        elif kind == "link":
            _delete_link_quiet(what)
        elif kind == "netns":
            _remove_netns_quiet(what)
    _remove_registered_cgroup_parents()
    return found
