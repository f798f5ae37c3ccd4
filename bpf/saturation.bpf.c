// SPDX-License-Identifier: GPL-2.0
/* saturation.bpf.c — how close the network path is to its limits, from exceptional events.
 *
 * Kernel side of the saturation source (agent/sources/saturation/). Every program here
 * fires on an exception (a drop, a full queue, a socket error, a failed connect) or runs
 * when the agent asks (the iterator), never per packet or per request:
 *
 *  - skb:kfree_skb counts every dropped skb in `drops`, per (netns, socket cgroup, L3
 *    protocol, drop reason). The netns is that of the receiving socket (rx_sk), else the
 *    skb's socket, else its device. Drops for lack of room on a known socket (reasons
 *    SOCKET_RCVBUFF, SOCKET_BACKLOG, PROTO_MEM, TCP_ZEROWINDOW, resolved by CO-RE from the
 *    running kernel's enum, so no numbers are compiled in) also go to `sock_events` with
 *    the sender's address read from the skb's IP header.
 *  - sock:sock_rcvqueue_full, sock:sock_exceed_buf_limit and sock:inet_sk_error_report
 *    (raw tracepoints: only the raw arguments carry the socket) count per (pod, peer) in
 *    `sock_events`; errors by the socket's errno.
 *  - sock:inet_sock_set_state SYN_SENT -> CLOSE with no local port: tcp_v4_connect and
 *    tcp_v6_connect set SYN_SENT before inet_hash_connect picks the port and CLOSE when it
 *    fails, so this transition is a connect that found no free ephemeral port.
 *  - iter/tcp, run by the agent in each network namespace at each sweep: one record per
 *    listening socket (accept queue depth and limit, the listener's drop counter), one per
 *    connection at zero window, and a last record with the namespace's count of sockets
 *    on a port inside ip_local_port_range (which the agent writes into `iter_cfg` first).
 *
 * Maps are plain hashes: when one is full the update fails and the failure is counted.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "saturation.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6

struct ml_sat_iter_rec *unused_iter_rec __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ml_sat_drop_key);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ml_sat_sock_key);
	__type(value, __u64);
} sock_events SEC(".maps");

/* ip_local_port_range of the namespace being iterated, written by the agent before each
 * iteration (read from the sysctl in that namespace: no kernel struct layout involved). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ml_sat_iter_cfg);
} iter_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_SAT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Per-iteration totals of the iterator (one iteration at a time: the agent's sweep thread). */
__u32 it_ephemeral = 0;
__u32 it_seen = 0;
__u32 it_ports = 0;
__u32 it_gen = 0;
/* Iteration stamp per local port: a port counts once per iteration without clearing a bitmap. */
__u32 port_gen[65536] = {};

/* Atomic although per-CPU: kfree_skb can fire in hard-irq context on top of another program. */
static __always_inline void sat_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void add_one(void *map, void *key, __u32 full_counter)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(map, key);

	if (v) {
		__sync_fetch_and_add(v, 1);
		return;
	}
	if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(map, key); /* another CPU may have created it */
		if (v)
			__sync_fetch_and_add(v, 1);
		else
			sat_count(full_counter);
	}
}

static __always_inline __u32 sk_netns(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* Only full sockets have a cgroup: time-wait and request sockets are shorter structs. */
static __always_inline __u64 sk_cgroup(struct sock *sk)
{
	__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);

	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)
		return 0;
	return BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
}

/* The connected peer of a socket, if any (family 0 when unknown). */
static __always_inline void sk_peer(struct sock *sk, struct ml_sat_sock_key *key)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	if (family == AF_INET) {
		bpf_probe_read_kernel(key->peer, 4, &sk->__sk_common.skc_daddr);
		key->family = 4;
	} else if (family == AF_INET6) {
		bpf_probe_read_kernel(key->peer, 16, &sk->__sk_common.skc_v6_daddr);
		key->family = 6;
	}
}

/* The sender of an inbound skb, from its IP header (the socket may be unconnected, UDP). */
static __always_inline void skb_source(struct sk_buff *skb, struct ml_sat_sock_key *key)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u16 proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));

	if (proto == ETH_P_IP) {
		if (!bpf_probe_read_kernel(key->peer, 4, head + nh + 12))
			key->family = 4;
	} else if (proto == ETH_P_IPV6) {
		if (!bpf_probe_read_kernel(key->peer, 16, head + nh + 8))
			key->family = 6;
	}
}

static __always_inline int is_room_reason(__u32 reason)
{
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_RCVBUFF) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_RCVBUFF))
		return 1;
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_BACKLOG) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_BACKLOG))
		return 1;
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_PROTO_MEM) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_PROTO_MEM))
		return 1;
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_TCP_ZEROWINDOW) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_ZEROWINDOW))
		return 1;
	return 0;
}

SEC("tp/skb/kfree_skb")
int handle_sat_kfree_skb(struct trace_event_raw_kfree_skb *ctx)
{
	struct sk_buff *skb = ctx->skbaddr;
	struct sock *rx = NULL;
	struct sock *sk;
	struct ml_sat_drop_key key = {};
	struct net_device *dev;
	__u32 reason = ctx->reason;

	sat_count(ML_SAT_CNT_DROPS_SEEN);
	if (bpf_core_field_exists(ctx->rx_sk)) /* older kernels trace no rx_sk */
		rx = ctx->rx_sk;
	sk = rx;
	if (!sk)
		sk = BPF_CORE_READ(skb, sk);
	if (sk) {
		key.netns = sk_netns(sk);
		key.cgroup_id = sk_cgroup(sk);
	} else {
		dev = BPF_CORE_READ(skb, dev);
		if (dev)
			key.netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	}
	key.protocol = ctx->protocol; /* already host order in the tracepoint */
	key.reason = reason > ML_SAT_REASON_MAX ? ML_SAT_REASON_MAX : reason;
	add_one(&drops, &key, ML_SAT_CNT_DROPS_FULL);

	if (rx && is_room_reason(reason)) {
		struct ml_sat_sock_key ev = {};

		ev.netns = key.netns;
		ev.cgroup_id = key.cgroup_id;
		ev.kind = ML_SAT_RCVBUF_DROP;
		ev.detail = key.reason;
		skb_source(skb, &ev);
		add_one(&sock_events, &ev, ML_SAT_CNT_EVENTS_FULL);
	}
	return 0;
}

/* TP_PROTO(struct sock *sk, struct sk_buff *skb) */
SEC("raw_tp/sock_rcvqueue_full")
int handle_sat_rcvqueue_full(struct bpf_raw_tracepoint_args *ctx)
{
	struct sock *sk = (struct sock *)ctx->args[0];
	struct sk_buff *skb = (struct sk_buff *)ctx->args[1];
	struct ml_sat_sock_key ev = {};

	sat_count(ML_SAT_CNT_RCVQUEUE_FULL);
	ev.netns = sk_netns(sk);
	ev.cgroup_id = sk_cgroup(sk);
	ev.kind = ML_SAT_RCVQUEUE_FULL;
	sk_peer(sk, &ev);
	if (skb && !ev.peer[0] && !ev.peer[1] && !ev.peer[2] && !ev.peer[3])
		skb_source(skb, &ev);
	add_one(&sock_events, &ev, ML_SAT_CNT_EVENTS_FULL);
	return 0;
}

/* TP_PROTO(struct sock *sk, struct proto *prot, long allocated, int kind) */
SEC("raw_tp/sock_exceed_buf_limit")
int handle_sat_buf_limit(struct bpf_raw_tracepoint_args *ctx)
{
	struct sock *sk = (struct sock *)ctx->args[0];
	struct ml_sat_sock_key ev = {};

	sat_count(ML_SAT_CNT_BUF_LIMIT);
	ev.netns = sk_netns(sk);
	ev.cgroup_id = sk_cgroup(sk);
	ev.kind = ML_SAT_BUF_LIMIT;
	ev.detail = (__u32)ctx->args[3]; /* SK_MEM_SEND 0, SK_MEM_RECV 1 */
	sk_peer(sk, &ev);
	add_one(&sock_events, &ev, ML_SAT_CNT_EVENTS_FULL);
	return 0;
}

/* TP_PROTO(const struct sock *sk) */
SEC("raw_tp/inet_sk_error_report")
int handle_sat_error_report(struct bpf_raw_tracepoint_args *ctx)
{
	struct sock *sk = (struct sock *)ctx->args[0];
	struct ml_sat_sock_key ev = {};

	sat_count(ML_SAT_CNT_ERRORS);
	ev.netns = sk_netns(sk);
	ev.cgroup_id = sk_cgroup(sk);
	ev.kind = ML_SAT_SOCK_ERROR;
	ev.detail = (__u32)BPF_CORE_READ(sk, sk_err);
	sk_peer(sk, &ev);
	add_one(&sock_events, &ev, ML_SAT_CNT_EVENTS_FULL);
	return 0;
}

SEC("tp/sock/inet_sock_set_state")
int handle_sat_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct ml_sat_sock_key ev = {};

	if (ctx->oldstate != TCP_SYN_SENT || ctx->newstate != TCP_CLOSE || ctx->sport != 0 ||
	    ctx->protocol != IPPROTO_TCP)
		return 0;
	sat_count(ML_SAT_CNT_PORT_EXHAUSTED);
	ev.netns = sk_netns(sk);
	ev.cgroup_id = sk_cgroup(sk);
	ev.kind = ML_SAT_PORT_EXHAUSTED;
	if (ctx->family == AF_INET) {
		bpf_probe_read_kernel(ev.peer, 4, ctx->daddr);
		ev.family = 4;
	} else {
		bpf_probe_read_kernel(ev.peer, 16, ctx->daddr_v6);
		ev.family = 6;
	}
	add_one(&sock_events, &ev, ML_SAT_CNT_EVENTS_FULL);
	return 0;
}

static __always_inline void emit(struct seq_file *seq, struct ml_sat_iter_rec *r)
{
	if (bpf_seq_write(seq, r, sizeof(*r)))
		sat_count(ML_SAT_CNT_ITER_WRITE_FAILED);
}

/* The iterator's socket is a trusted kernel pointer: fields are read directly (no helper
 * call per field), which matters because the walk visits every socket, time-wait included. */
static __always_inline void copy_addr(struct sock_common *skc, int peer, struct ml_sat_iter_rec *r)
{
	if (skc->skc_family == AF_INET) {
		__u32 a = peer ? skc->skc_daddr : skc->skc_rcv_saddr;

		__builtin_memcpy(r->addr, &a, 4);
		r->family = 4;
	} else {
		struct in6_addr a = peer ? skc->skc_v6_daddr : skc->skc_v6_rcv_saddr;

		__builtin_memcpy(r->addr, &a, 16);
		r->family = 6;
	}
}

/* sk_drops_read(): the plain counter plus the NUMA counters where a protocol has them. */
static __always_inline __u64 listener_drops(struct sock *sk)
{
	__u64 n = (__u32)sk->sk_drops.counter;

	if (bpf_core_field_exists(sk->sk_drop_counters)) {
		struct numa_drop_counters *c = sk->sk_drop_counters;

		if (c)
			n += (__u32)c->drops0.counter + (__u32)c->drops1.counter;
	}
	return n;
}

static __always_inline void fill_owner(struct sock *sk, struct ml_sat_iter_rec *r)
{
	r->netns = sk->__sk_common.skc_net.net->ns.inum;
	r->cgroup_id = sk->sk_cgrp_data.cgroup->kn->id;
}

SEC("iter/tcp")
int sat_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock_common *skc = ctx->sk_common;
	struct ml_sat_iter_rec r = {};
	struct ml_sat_iter_cfg *cfg;
	struct tcp_sock *tp;
	struct sock *sk;
	__u32 zero = 0, flags = 0;
	__u16 port;
	__u8 state;

	if (ctx->meta->seq_num == 0) {
		it_ephemeral = 0;
		it_seen = 0;
		it_ports = 0;
		it_gen += 1;
	}
	if (!skc) { /* called once more after the last socket */
		r.kind = ML_SAT_REC_SUMMARY;
		r.a = it_ephemeral;
		r.b = it_seen;
		r.probes = it_ports;
		emit(seq, &r);
		return 0;
	}
	sat_count(ML_SAT_CNT_ITER_SOCKETS);
	it_seen += 1;
	state = skc->skc_state;
	if (state == TCP_NEW_SYN_RECV)
		return 0; /* a request socket holds the listener's port, not an ephemeral one */
	port = skc->skc_num;
	if (state != TCP_LISTEN) {
		cfg = bpf_map_lookup_elem(&iter_cfg, &zero);
		if (cfg && port >= cfg->port_low && port <= cfg->port_high) {
			it_ephemeral += 1;
			if (port_gen[port] != it_gen) {
				port_gen[port] = it_gen;
				it_ports += 1;
			}
		}
		if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT)
			return 0;
	}
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = &tp->inet_conn.icsk_inet.sk;
	r.port = port;
	if (state == TCP_LISTEN) {
		r.kind = ML_SAT_REC_LISTEN;
		r.a = sk->sk_ack_backlog;
		r.b = sk->sk_max_ack_backlog;
		r.drops = listener_drops(sk);
		fill_owner(sk, &r);
		copy_addr(skc, 0, &r);
		emit(seq, &r);
		return 0;
	}
	if (tp->rcv_wnd == 0)
		flags |= ML_SAT_ZW_LOCAL;
	if (tp->snd_wnd == 0)
		flags |= ML_SAT_ZW_PEER;
	if (!flags)
		return 0;
	r.kind = ML_SAT_REC_ZEROWIN;
	r.c = flags;
	r.probes = tp->inet_conn.icsk_probes_out;
	fill_owner(sk, &r);
	copy_addr(skc, 1, &r);
	emit(seq, &r);
	return 0;
}
