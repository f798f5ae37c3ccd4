// SPDX-License-Identifier: GPL-2.0
/* l7cg.bpf.c — HTTP/1.x and DNS from the packets of traffic no pod veth carries: cgroup_skb
 * ingress and egress on the cgroup v2 root.
 *
 * Kernel side of the "other traffic" L7 path (agent/sources/l7/cgroup.py loads it and attaches
 * both programs to the cgroup v2 root): loopback inside a pod, hostNetwork pods, processes
 * on the host, host process <-> pod. It runs the same core as the tc programs at pod veths
 * (bpf/include/l7pkt_core.h: sequence tracking, the HTTP/1.x parser, DNS paired in the
 * kernel) and fills the same `http_stats` series, `l7_events` records and `l7_counters`.
 *
 * What a cgroup_skb program sees: the packet from its IP header (no L2), for one socket,
 * once: egress = sent by a socket of this host (DIR_OUT), ingress = delivered to one
 * (DIR_IN). So each side of a connection is its own socket and its own `pkt_conns` entry,
 * keyed by the socket-oriented 4-tuple and, in the key's `ifindex` slot, the socket's netns
 * inode (two pods may use the same loopback tuple).
 *
 * Counted once per side: a socket whose netns is in `pkt_netns` (a pod whose veth the tc
 * path parses; written by the agent) is skipped unless the packet's device is loopback
 * (ifindex 1 in every netns): such traffic crosses the pod's veth and is the tc path's.
 * Loopback (including a pod talking to its own address, routed over lo) never reaches a
 * veth, so it is counted here. Sockets of other netns (the host's, hostNetwork pods', pods
 * the agent has not attached to) are counted here whatever the device.
 *
 * The socket's netns: TCP sockets through bpf_skc_to_tcp_sock() (BTF loads, any context);
 * UDP sockets (DNS clients) from the sending task at their first datagram to port 53, kept
 * in `cg_socks` (bpf_sk_storage) for the answer, which arrives in softirq context.
 *
 * Series carry the socket's cgroup (bpf_skb_cgroup_id) and netns; a packet names no
 * process, so `process` is empty (only --l7-source syscalls names it).
 *
 * Both programs return 1: they observe, never drop.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define FIFO 64
#include "http_parser.h"
#include "l7pkt.h"
#include "l7pkt_core.h"

char LICENSE[] SEC("license") = "GPL";

/* The netns to use for a packet whose socket cannot tell it (a TCP packet on a socket that is
 * not TCP, a UDP answer on a socket without storage): BPF_PROG_TEST_RUN hands the program a
 * fresh dummy socket per run, and the tests set this to run crafted frames through the
 * parser. 0 in the agent: such packets are not parsed. */
const volatile __u32 test_netns = 0;

#define CG_PASS 1
#define LOOPBACK_IFINDEX 1

/* Network namespaces whose pod veth the tc path parses (key: netns inode). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} pkt_netns SEC(".maps");

/* Per UDP socket: its netns, learnt when it sends to port 53. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ml_cg_sock);
} cg_socks SEC(".maps");

/* The IP header at offset 0: version nibble, then the shared parse. */
static __noinline int parse_l3(struct __sk_buff *skb, struct pkt *p)
{
	__u8 v = 0;

	if (ld(skb, 0, &v, 1))
		return -1;
	if ((v >> 4) == 4)
		return parse_ip(skb, p, 0, bpf_htons(ETH_P_IP));
	if ((v >> 4) == 6)
		return parse_ip(skb, p, 0, bpf_htons(ETH_P_IPV6));
	return 1;
}

/* The netns inode of a TCP packet's socket, 0 for a time-wait or request socket. */
static __noinline __u32 tcp_netns(struct bpf_sock *sk)
{
	struct tcp_sock *tp;

	if (!sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return test_netns;
	return tp->inet_conn.icsk_inet.sk.__sk_common.skc_net.net->ns.inum;
}

/* The netns inode of a UDP packet's socket: a send runs in the sender's context, whose netns
 * is the socket's (kept for the answers); 0 for a socket that never sent to port 53. Its own
 * function: the verifier refuses one load instruction reached with two kinds of pointer. */
static __noinline __u32 udp_netns(struct bpf_sock *sk, __u8 dir)
{
	struct ml_cg_sock *st;
	struct task_struct *t;
	__u32 netns;

	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 0;
	if (dir == DIR_OUT) {
		t = bpf_get_current_task_btf();
		netns = t->nsproxy->net_ns->ns.inum;
		st = bpf_sk_storage_get(&cg_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (st)
			st->netns = netns;
		return netns;
	}
	st = bpf_sk_storage_get(&cg_socks, sk, 0, 0);
	return st ? st->netns : test_netns;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct bpf_sock *sk;
	struct pkt p;
	__u32 netns;
	int r;

	p.dir = dir;
	p.proto = 0;
	p.payload_len = 0;
	p.tcp_flags = 0;
	r = parse_l3(skb, &p);
	if (r > 0)
		return CG_PASS;
	if (r == 0) {
		/* a pure ACK: nothing for L7, no lookup */
		if (p.proto == IPPROTO_TCP && p.payload_len == 0 && !(p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST)))
			return CG_PASS;
		/* UDP: only a DNS client's side (a server's side is its client's to count) */
		if (p.proto == IPPROTO_UDP && p.key.peer_port != 53)
			return CG_PASS;
	}
	sk = skb->sk;
	barrier_var(sk);   /* one ctx load: clang would otherwise add the offset to the ctx pointer */
	netns = r == 0 && p.proto == IPPROTO_UDP ? udp_netns(sk, dir) : tcp_netns(sk);
	if (!netns)
		return CG_PASS;
	/* the pod's veth carries it: the tc path's (loopback never reaches a veth) */
	if (skb->ifindex != LOOPBACK_IFINDEX && bpf_map_lookup_elem(&pkt_netns, &netns))
		return CG_PASS;
	if (r < 0) {
		count(ML_L7_PKT_UNPARSED);
		return CG_PASS;
	}
	p.key.ifindex = netns;
	p.cgroup_id = bpf_skb_cgroup_id(skb);
	if (p.proto == IPPROTO_TCP && p.key.peer_port == 53)
		dns_tcp_segment(skb, &p, netns);
	else if (p.proto == IPPROTO_TCP)
		http_segment(skb, &p, netns);
	else
		dns_message(skb, &p, netns, p.payload_off, p.payload_len);
	return CG_PASS;
}

SEC("cgroup_skb/egress")
int meshlens_cg_eg(struct __sk_buff *skb)
{
	return handle(skb, DIR_OUT);  /* sent by a socket of this host */
}

SEC("cgroup_skb/ingress")
int meshlens_cg_in(struct __sk_buff *skb)
{
	return handle(skb, DIR_IN);   /* delivered to a socket of this host */
}
