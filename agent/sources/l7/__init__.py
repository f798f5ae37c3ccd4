"""L7 sources: bpf/l7.bpf.c (HTTP/1.x parsed in the kernel, DNS messages), their struct
mirrors, the DNS wire parser and HTTP route templating."""
