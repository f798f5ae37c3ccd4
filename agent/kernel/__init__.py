"""Kernel layer: the libbpf binding, BPF objects, maps and ring buffers, BTF layout checks,
attach-with-fallback and the kernel feature probe. First stage of the data flow: knows nothing
of sources, pods or metrics."""
