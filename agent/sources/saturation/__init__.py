"""Saturation source: drops with reasons, accept queues, buffer pressure, socket errors,
ephemeral ports and conntrack, from bpf/saturation.bpf.c and per-namespace sysctls."""
