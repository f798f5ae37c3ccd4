"""meshlens agent: loads the BPF programs, reads kernel maps and ring buffers, aggregates flows.

Data flow: kernel (bpf/) -> agent (this package: loader, sources, flow table) -> exporter.
"""
