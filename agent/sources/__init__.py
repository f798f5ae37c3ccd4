"""Sources: one package per BPF object (tcp, l7, tc), each beside its struct mirrors. A source
loads its object through agent.kernel, reads its maps and ring buffers and hands a snapshot of
what the kernel saw to the aggregate stage. Sources know nothing of pods or workloads."""
