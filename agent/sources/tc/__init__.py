"""Per-pod interface source: bpf/tc.bpf.c on every pod veth, the netlink link watch that
finds the veths and the tc attach rules."""
