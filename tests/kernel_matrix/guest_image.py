"""Guest image for the kernel matrix: a Debian kernel .deb turned into a bootable kernel,
initramfs and module tree, cached by content under /var/cache/meshlens/kernel-matrix.

Feeds tests/kernel_matrix/vm.py. The kernel comes from Debian's own package
(`linux-image-amd64` resolves to the current `linux-image-6.1.0-N-amd64`), fetched with
`apt-get download` and checked against the SHA256 apt's signed index gives for it. The
initramfs holds busybox-static, stage 1 (initramfs_init.sh) and only the modules needed to
mount the host's root over virtio-9p; every other module is loaded inside the guest from the
extracted tree (stage 2 points the kernel's modprobe at it). The cache key is the .deb's
SHA256 plus a hash of the initramfs recipe, so a new kernel or a changed stage 1 builds a
new image and an unchanged one is reused.

    python -m tests.kernel_matrix.guest_image      # build (or find) the image, print its paths
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CACHE_ROOT = Path(os.environ.get("MESHLENS_KMATRIX_CACHE", "/var/cache/meshlens/kernel-matrix"))
META_PACKAGE = "linux-image-amd64"
HERE = Path(__file__).resolve().parent
STAGE1 = HERE / "initramfs_init.sh"
BUSYBOX = Path("/bin/busybox")
# What stage 1 needs to mount the host's root: virtio PCI transport, 9p over virtio.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
RECIPE_VERSION = "1"


class ImageError(RuntimeError):
    """The guest image cannot be built (package not found, download or extraction failed)."""


@dataclass(frozen=True)
class GuestImage:
    package: str
    kernel_release: str
    vmlinuz: Path
    initrd: Path
    module_root: Path  # modprobe -d: holds lib/modules/<kernel_release>

    def describe(self) -> Dict[str, str]:
        return {"package": self.package, "kernel_release": self.kernel_release, "vmlinuz": str(self.vmlinuz),
                "initrd": str(self.initrd), "module_root": str(self.module_root)}


def _run(argv: Sequence[str], cwd: Optional[Path] = None) -> str:
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package Debian's meta package points at (override: MESHLENS_KMATRIX_PACKAGE)."""
    forced = os.environ.get("MESHLENS_KMATRIX_PACKAGE")
    if forced:
        return forced
    out = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE])
    for line in out.splitlines():
        m = re.match(r"Depends:\s*(linux-image-[^\s,(]+)", line)
        if m:
            return m.group(1)
    raise ImageError(f"apt-cache show {META_PACKAGE} names no kernel package (run apt-get update?)")


@dataclass(frozen=True)
class DebInfo:
    url: str
    filename: str
    size: int
    sha256: str


def deb_info(package: str) -> DebInfo:
    """URL, file name, size and SHA256 of the package, from apt's (signed) index."""
    out = _run(["apt-get", "download", "--print-uris", package]).strip()
    m = re.match(r"'(\S+)' (\S+) (\d+) SHA256:([0-9a-f]{64})", out)
    if not m:
        raise ImageError(f"unexpected apt-get --print-uris output for {package}: {out!r}")
    return DebInfo(m.group(1), m.group(2), int(m.group(3)), m.group(4))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(info: DebInfo, package: str, cache: Path) -> Path:
    """The .deb in the cache, downloaded with `apt-get download` if missing; SHA256 checked."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / info.filename
    if target.exists() and _sha256(target) == info.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user may write here
        _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        got = Path(tmp) / info.filename
        if not got.exists():
            raise ImageError(f"apt-get download {package} did not produce {info.filename}")
        digest = _sha256(got)
        if digest != info.sha256:
            raise ImageError(f"{info.filename}: SHA256 {digest} differs from apt's index {info.sha256}")
        os.replace(got, target)
    return target


def parse_modules_dep(text: str) -> Dict[str, List[str]]:
    """modules.dep ("kernel/a.ko: kernel/b.ko kernel/c.ko") -> {module name: [dependency paths]}, plus paths."""
    deps: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = os.path.basename(path)
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def load_order(deps: Dict[str, List[str]], wanted: Sequence[str]) -> List[str]:
    """Module paths to insmod, dependencies first, each once."""
    by_name = {module_name(p): p for p in deps}
    order: List[str] = []

    def visit(path: str, stack: tuple) -> None:
        if path in order:
            return
        if path in stack:
            raise ImageError(f"module dependency cycle at {path}")
        for dep in deps.get(path, []):
            visit(dep, stack + (path,))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageError(f"module {name} not in this kernel's modules.dep")
        visit(by_name[key], ())
    return order


def _recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(STAGE1.read_bytes())
    h.update(",".join(BOOT_MODULES).encode())
    h.update(_sha256(BUSYBOX).encode())
    return h.hexdigest()[:12]


def _build(deb: Path, package: str, out: Path) -> GuestImage:
    root = out / "root"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
    if len(releases) != 1:
        raise ImageError(f"{deb.name}: expected one lib/modules/<release>, found {releases}")
    release = releases[0]
    _run(["depmod", "-b", str(root), release])
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise ImageError(f"{deb.name}: no boot/vmlinuz-{release}")
    moddir = root / "lib" / "modules" / release
    order = load_order(parse_modules_dep((moddir / "modules.dep").read_text()), BOOT_MODULES)

    stage = out / "initramfs"
    for d in ("bin", "dev", "modules"):
        (stage / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
    shutil.copy2(STAGE1, stage / "init")
    os.chmod(stage / "init", 0o755)
    names = []
    for path in order:
        name = os.path.basename(path)
        if name.endswith((".xz", ".zst", ".gz")):
            raise ImageError(f"{name}: compressed modules are not supported by busybox insmod here")
        shutil.copy2(moddir / path, stage / "modules" / name)
        names.append(name)
    (stage / "modules.order").write_text("\n".join(names) + "\n")
    os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    files = _run(["find", ".", "-mindepth", "1"], cwd=stage)
    initrd = out / "initrd.cpio"
    with open(initrd, "wb") as f:
        proc = subprocess.run(["busybox", "cpio", "-o", "-H", "newc"], cwd=stage, input=files.encode(),
                              stdout=f, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise ImageError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
    shutil.rmtree(stage)
    image = GuestImage(package, release, vmlinuz, initrd, root)
    (out / "image.json").write_text(json.dumps(image.describe(), indent=1) + "\n")
    return image


def _load(out: Path) -> Optional[GuestImage]:
    try:
        d = json.loads((out / "image.json").read_text())
    except (OSError, ValueError):
        return None
    img = GuestImage(d["package"], d["kernel_release"], Path(d["vmlinuz"]), Path(d["initrd"]), Path(d["module_root"]))
    return img if img.vmlinuz.exists() and img.initrd.exists() else None


def ensure_image(cache: Path = CACHE_ROOT) -> GuestImage:
    """The cached image for the current Debian kernel package, built on first use."""
    try:
        package = kernel_package()
        info = deb_info(package)
    except ImageError:  # no or stale package lists (a fresh machine): refresh them once
        _run(["apt-get", "update", "-qq"])
        package = kernel_package()
        info = deb_info(package)
    key = f"{info.sha256[:16]}-{_recipe_hash()}"
    out = cache / "images" / key
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _load(out)
        if found:
            return found
        deb = fetch_deb(info, package, cache)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache / "images"))
        os.chmod(tmp, 0o755)
        try:
            _build(deb, package, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # image.json holds the temp path; rewrite it with the final one.
        image = _load_rebased(out, tmp)
        _prune(cache / "images", keep=out)
        _prune(cache / "debs", keep=deb)
        return image


def _load_rebased(out: Path, old: Path) -> GuestImage:
    text = (out / "image.json").read_text().replace(str(old), str(out))
    (out / "image.json").write_text(text)
    image = _load(out)
    if image is None:
        raise ImageError(f"{out}: image incomplete after build")
    return image


def _prune(directory: Path, keep: Path) -> None:
    """Older images or .debs (another kernel version or recipe) are removed: one is enough."""
    for p in directory.iterdir():
        if p == keep or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def main() -> int:
    try:
        image = ensure_image()
    except ImageError as exc:
        print(f"kernel-matrix image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(image.describe(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
