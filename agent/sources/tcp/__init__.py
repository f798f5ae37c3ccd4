"""L4 source: bpf/tcpconn.bpf.c (every TCP connection) and its struct mirrors."""
