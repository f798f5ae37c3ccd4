// SPDX-License-Identifier: GPL-2.0
/* probe.bpf.c — tiny programs the agent loads to learn what this kernel allows
 * (agent/kernel_features.py): whether fentry programs load. Never attached. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("fentry/tcp_sendmsg")
int BPF_PROG(probe_fentry, struct sock *sk)
{
	return 0;
}
