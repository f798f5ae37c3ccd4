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
 * Per socket, `cg_socks` (bpf_sk_storage, BPF_F_CLONE) holds what a packet cannot tell: the
 * socket's netns, the name of the task that created it and whether it is skipped. The
 * cgroup/sock_create program (meshlens_cg_sk, same root) fills it once per socket in the
 * creating task's context; a socket accepted from a listener starts with a copy of the
 * listener's entry (so nginx's accepted sockets are "nginx"). A socket older than the agent
 * (or on a kernel refusing sock_create) gets an entry at its first packet with the netns
 * (TCP: bpf_skc_to_tcp_sock(); UDP: the sending task at its first datagram to port 53) and
 * no name: its series have an empty `process`.
 *
 * Counted once per side: a socket whose netns is in `pkt_netns` (a pod whose veth the tc
 * path parses; written by the agent) is skipped unless the packet's device is loopback
 * (ifindex 1 in every netns): such traffic crosses the pod's veth and is the tc path's.
 * Loopback (including a pod talking to its own address, routed over lo) never reaches a
 * veth, so it is counted here. Sockets of other netns (the host's, hostNetwork pods', pods
 * the agent has not attached to) are counted here whatever the device. The skip is decided
 * once per socket (ML_CGS_SKIP, set at creation or at the first packet that finds the netns
 * in `pkt_netns`) and checked first, before any header is read: a pod packet off loopback
 * costs one storage lookup. Only the skip is cached: a socket not (yet) skipped looks its
 * netns up again on each packet it parses, so a pod registered later is skipped from then on.
 *
 * Series carry the socket's cgroup (bpf_skb_cgroup_id), netns and creator's name.
 *
 * Every program returns 1: they observe, never drop or refuse.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#define FIFO 64
#include "http_parser.h"
#include "l7pkt.h"
/* The continuations of a segment whose headers outlast one run's budget (l7pkt_core.h,
 * continue_segment): one program array per direction, as a tail call's target must have the
 * caller's attach type. Filled by libbpf at load. */
int meshlens_cg_egc(struct __sk_buff *skb);
int meshlens_cg_inc(struct __sk_buff *skb);

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(struct __sk_buff *));
} pkt_cont_out SEC(".maps") = { .values = { [0] = (void *)&meshlens_cg_egc } };

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(struct __sk_buff *));
} pkt_cont_in SEC(".maps") = { .values = { [0] = (void *)&meshlens_cg_inc } };

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

/* Per socket: netns, creator's name, skip (struct ml_cg_sock); accepted sockets inherit the
 * listener's entry. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
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

/* The netns inode of a UDP packet's socket without an entry: a send runs in the sender's
 * context, whose netns is the socket's; 0 for an answer (softirq: no task to ask). Its own
 * function: the verifier refuses one load instruction reached with two kinds of pointer. */
static __noinline __u32 udp_netns(__u8 dir)
{
	struct task_struct *t;

	if (dir != DIR_OUT)
		return test_netns;
	t = bpf_get_current_task_btf();
	return t->nsproxy->net_ns->ns.inum;
}

/* The netns of a socket that has no entry yet (older than the agent, or no sock_create), kept
 * in a new entry without a name. 0: not parsed (a UDP answer, a time-wait socket). */
static __noinline __u32 learn_netns(struct bpf_sock *sk, __u8 dir, int udp)
{
	struct ml_cg_sock *st;
	__u32 netns;

	if (!sk)
		return 0;
	netns = udp ? udp_netns(dir) : tcp_netns(sk);
	if (!netns)
		return 0;
	st = bpf_sk_storage_get(&cg_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st && !(st->flags & ML_CGS_NETNS)) {
		st->netns = netns;
		st->flags |= ML_CGS_NETNS;
	}
	return netns;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct ml_cg_sock *st = NULL;
	struct bpf_sock *sk;
	struct pkt p;
	__u32 netns;
	int r;

	sk = skb->sk;
	barrier_var(sk);   /* one ctx load: clang would otherwise add the offset to the ctx pointer */
	/* first, before any header: a socket already known to be the tc path's */
	if (sk)
		st = bpf_sk_storage_get(&cg_socks, sk, 0, 0);
	if (st && (st->flags & ML_CGS_SKIP) && skb->ifindex != LOOPBACK_IFINDEX)
		return CG_PASS;
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
	if (st && (st->flags & ML_CGS_NETNS))
		netns = st->netns;
	else
		netns = learn_netns(sk, dir, r == 0 && p.proto == IPPROTO_UDP);
	if (!netns)
		return CG_PASS;
	/* the pod's veth carries it: the tc path's (loopback never reaches a veth) */
	if (skb->ifindex != LOOPBACK_IFINDEX && bpf_map_lookup_elem(&pkt_netns, &netns)) {
		if (!st && sk)
			st = bpf_sk_storage_get(&cg_socks, sk, 0, 0);
		if (st)
			st->flags |= ML_CGS_SKIP;
		return CG_PASS;
	}
	if (r < 0) {
		count(ML_L7_PKT_UNPARSED);
		return CG_PASS;
	}
	if (st && (st->flags & ML_CGS_COMM))
		__builtin_memcpy(p.comm, st->comm, sizeof(p.comm));
	else
		__builtin_memset(p.comm, 0, sizeof(p.comm));
	p.key.ifindex = netns;
	p.cgroup_id = bpf_skb_cgroup_id(skb);
	if (p.proto == IPPROTO_TCP && p.key.peer_port == 53)
		dns_tcp_segment(skb, &p, netns);
	else if (p.proto == IPPROTO_TCP)
		http_segment(skb, &p, netns, dir);
	else
		dns_message(skb, &p, netns, p.payload_off, p.payload_len);
	return CG_PASS;
}

/* Once per socket a task creates (socket(2), in its context): its netns, its name, and
 * whether the tc path owns it. Sockets the kernel makes itself do not come here; accepted
 * ones inherit their listener's entry (BPF_F_CLONE). */
SEC("cgroup/sock_create")
int meshlens_cg_sk(struct bpf_sock *ctx)
{
	struct ml_cg_sock *st;
	struct task_struct *t;
	__u32 netns;

	if (ctx->family != AF_INET && ctx->family != AF_INET6)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	st = bpf_sk_storage_get(&cg_socks, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 1;
	t = bpf_get_current_task_btf();
	netns = t->nsproxy->net_ns->ns.inum;
	st->netns = netns;
	bpf_get_current_comm(st->comm, sizeof(st->comm));
	st->flags = ML_CGS_NETNS | ML_CGS_COMM;
	if (bpf_map_lookup_elem(&pkt_netns, &netns))
		st->flags |= ML_CGS_SKIP;
	return 1;   /* allow: observe only */
}

/* Sockets older than the agent: sock_create never saw them (a server started before the
 * agent, a keep-alive connection already open), so their series would name no process, and
 * neither would what such a listener accepts. At start the agent names them in two passes:
 * the sockets' owners from every task's open files (the first task found holding one: its
 * comm, by the socket's inode), then each TCP socket of each netns, by iter/tcp, whose
 * pointer the storage helpers take (one reached through a file is untrusted to them). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);                /* the socket's inode */
	__type(value, struct ml_old_owner);
} old_owners SEC(".maps");

SEC("iter/task_file")
int meshlens_cg_owners(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct task_struct *task = ctx->task;
	struct ml_old_owner o = {};
	struct socket *sock;
	struct sock *sk;
	__u16 family;
	__u64 ino;

	if (!file || !task)
		return 0;
	sock = bpf_sock_from_file(file);
	if (!sock)
		return 0;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	ino = BPF_CORE_READ(file, f_inode, i_ino);
	bpf_probe_read_kernel_str(o.comm, sizeof(o.comm), task->comm);
	if (bpf_map_update_elem(&old_owners, &ino, &o, BPF_NOEXIST) == -7 /* E2BIG */)
		count(ML_L7_OLD_OWNERS_FULL);
	return 0;
}

SEC("iter/tcp")
int meshlens_cg_old_socks(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct ml_old_owner *o;
	struct ml_cg_sock *st;
	struct tcp_sock *tp;
	struct sock *sk;
	__u64 ino;
	__u32 netns;
	__u8 one = 1;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;   /* time-wait and request sockets: no file, nothing to name */
	sk = (struct sock *)tp;
	ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	o = ino ? bpf_map_lookup_elem(&old_owners, &ino) : NULL;
	if (!o)
		return 0;
	st = bpf_sk_storage_get(&cg_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st || (st->flags & ML_CGS_COMM))
		return 0;   /* named already (sock_create, or cloned from a named listener) */
	netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (!(st->flags & ML_CGS_NETNS)) {
		st->netns = netns;
		st->flags |= ML_CGS_NETNS;
	}
	__builtin_memcpy(st->comm, o->comm, sizeof(st->comm));
	st->flags |= ML_CGS_COMM;
	if (bpf_map_lookup_elem(&pkt_netns, &netns))
		st->flags |= ML_CGS_SKIP;
	bpf_seq_write(ctx->meta->seq, &one, 1);
	return 0;
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

SEC("cgroup_skb/egress")
int meshlens_cg_egc(struct __sk_buff *skb)
{
	segment_continued(skb, DIR_OUT);   /* the rest of a long segment this socket sent */
	return CG_PASS;
}

SEC("cgroup_skb/ingress")
int meshlens_cg_inc(struct __sk_buff *skb)
{
	segment_continued(skb, DIR_IN);    /* the rest of a long segment delivered to it */
	return CG_PASS;
}
