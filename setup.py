"""meshlens packaging.

The repository keeps the design card's layout (`agent/`, `exporter/` at the top); installed,
they become `meshlens.agent` and `meshlens.exporter`. Building the package compiles the BPF
objects (clang, libbpf headers) and ships them inside `meshlens.agent.bpfobj`, so a node that
installs the wheel needs neither a compiler nor kernel headers.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithBpf(build_py):
    """Compile bpf/*.bpf.c into agent/bpfobj and generate the Observer's gRPC modules from
    exporter/proto/observer.proto (grpcio-tools, the `build` extra) before collecting package data."""

    def run(self) -> None:
        if glob.glob(os.path.join(HERE, "bpf", "*.bpf.c")):
            subprocess.check_call(["make", "-C", HERE, "--no-print-directory", "bpf"])
        try:
            import grpc_tools  # noqa: F401 - the `build` extra; an editable install gets it later (make proto)
        except ImportError:
            pass
        else:
            subprocess.check_call(["make", "-C", HERE, "--no-print-directory", "MESHLENS_NO_APT=1", "proto",
                                   f"PROTOC={sys.executable} -m grpc_tools.protoc"])
        super().run()


setup(
    name="meshlens",
    version="0.1.0",
    description="Sidecarless eBPF telemetry agent for Kubernetes: golden signals, service map, tap",
    python_requires=">=3.9",
    packages=[
        "meshlens.agent", "meshlens.agent.kernel", "meshlens.agent.sources", "meshlens.agent.sources.tcp",
        "meshlens.agent.sources.l7", "meshlens.agent.sources.tc", "meshlens.agent.sources.saturation",
        "meshlens.agent.identity",
        "meshlens.agent.aggregate", "meshlens.exporter", "meshlens.exporter.prometheus", "meshlens.exporter.api",
        "meshlens.exporter.client", "meshlens.exporter.grpc", "meshlens.exporter.proto",
    ],
    package_dir={"meshlens.agent": "agent", "meshlens.exporter": "exporter"},
    package_data={"meshlens.agent": ["bpfobj/*.bpf.o"], "meshlens.exporter.api": ["static/*"]},
    install_requires=[
        "prometheus-client>=0.17",
        "pyroute2>=0.7",
        "psutil>=5.9",
        "grpcio>=1.50",
        "protobuf>=5.26",
        "fastapi>=0.100",
        "uvicorn>=0.23",
        "sse-starlette>=1.6",
        "httpx>=0.24",
        "rich>=13",
        "kubernetes>=30",
        "pydantic-settings>=2.3",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "requests>=2", "import-linter>=2.0",
                             # daemonset/ checks: Kubernetes schemas, Prometheus Operator CRD models
                             # (their pytest plugin imports filelock)
                             "kubernetes-validate>=1.30", "cloudcoil.models.prometheus-operator>=0.80",
                             "filelock>=3", "schemathesis>=3.19",
                             # TLS tests make their own CA
                             "cryptography>=41"],
                    # exporter/proto/observer.proto -> Python at build time (make proto)
                    "build": ["grpcio-tools>=1.50"]},
    entry_points={"console_scripts": ["meshlens=meshlens.exporter.cli:main"]},
    cmdclass={"build_py": BuildWithBpf},
)
