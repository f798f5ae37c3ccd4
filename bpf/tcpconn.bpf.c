// SPDX-License-Identifier: GPL-2.0
/* tcpconn.bpf.c — L4 telemetry for every TCP connection on the node.
 *
 * Kernel side of the L4 pipeline: per-connection counters live in the `conns` hash map
 * (keyed by struct sock pointer) and are swept by the agent; connection open/close,
 * failed connects and retransmits go through the `events` ring buffer. Every failure to
 * record (full map, full ring buffer) is counted in `counters`.
 *
 * Attach points (the agent picks per signal, see agent/attach.py):
 *   state:      tp/sock/inet_sock_set_state                 (4.16+)
 *   bytes:      fexit/tcp_sendmsg + fexit/tcp_sendpage (before 6.5) + fexit/tcp_recvmsg
 *               (where fentry is allowed)
 *               tp/sock/sock_send_length + sock_recv_length   (6.3+, the fallback here)
 *   retransmit: tp/tcp/tcp_retransmit_skb, tp/tcp/tcp_retransmit_synack
 *   reset:      tp/tcp/tcp_send_reset, tp/tcp/tcp_receive_reset
 *   (retransmit_skb and send_reset records changed layout in 6.10: both are read)
 *   socket-less resets before 6.10: fentry/tcp_v4_send_reset, fentry/tcp_v6_send_reset
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "tcpconn.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MSG_PEEK 2

/* Keeps struct ml_event in the object's BTF (it is only used inside inlined helpers), so the
 * agent's ctypes mirror can be checked against it. */
struct ml_event *unused_ml_event __attribute__((unused));

/* Knobs, set by the agent before load. */
const volatile __u8 emit_retransmit_events = 1;
/* Off by default in the agent: opens are learnt from sweeps and close records. */
const volatile __u8 emit_open_events = 1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* resized by the agent before load */
	__type(key, __u64);
	__type(value, struct ml_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline int is_full_tcp_state(int state)
{
	return state == TCP_ESTABLISHED || state == TCP_SYN_SENT || state == TCP_FIN_WAIT1 ||
	       state == TCP_FIN_WAIT2 || state == TCP_CLOSE_WAIT || state == TCP_LAST_ACK ||
	       state == TCP_CLOSING;
}

/* Tuple, netns and cgroup straight from the socket (works in softirq context too). */
static __always_inline void fill_from_sock(struct ml_conn *c, struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	c->tuple.family = family;
	c->tuple.sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	c->tuple.dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		BPF_CORE_READ_INTO(&c->tuple.saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO(&c->tuple.daddr, sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO(&c->tuple.saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&c->tuple.daddr, sk, __sk_common.skc_v6_daddr);
	}
	c->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	c->cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
}

static __always_inline void fill_task(struct ml_conn *c)
{
	c->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&c->comm, sizeof(c->comm));
}

static __always_inline void fill_tcp_close_stats(struct ml_conn *c, struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	c->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
	c->segs_retrans = BPF_CORE_READ(tp, total_retrans);
}

static __always_inline int emit(__u32 type, __u64 sk, const struct ml_conn *c, __s32 err, __u32 segs)
{
	struct ml_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return -1;
	}
	e->sk = sk;
	e->ts_ns = bpf_ktime_get_ns();
	e->conn = *c;
	e->type = type;
	e->err = err;
	e->segs = segs;
	e->rst_sent = 0;
	__builtin_memset(e->_pad2, 0, sizeof(e->_pad2));
	e->bytes_sent = 0;
	e->bytes_received = 0;
	bpf_ringbuf_submit(e, 0);
	count(ML_CNT_EVENTS_SUBMITTED);
	return 0;
}

/* The connection's entry, created on first sight for sockets that predate the agent.
 * Returns NULL if the socket is not a full TCP socket or the map is full (counted). */
static __always_inline struct ml_conn *get_or_create(struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ml_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ml_conn fresh = {};

	if (c)
		return c;
	if (!is_full_tcp_state(BPF_CORE_READ(sk, __sk_common.skc_state)))
		return NULL;
	fill_from_sock(&fresh, sk);
	fresh.start_ns = bpf_ktime_get_ns();
	fresh.direction = ML_DIR_UNKNOWN;
	if (bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST) && bpf_map_lookup_elem(&conns, &key) == NULL) {
		count(ML_CNT_CONNS_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&conns, &key);
}

static __always_inline void account_bytes(struct sock *sk, __u64 sent, __u64 received)
{
	struct ml_conn *c = get_or_create(sk);
	struct ml_event *e;

	if (c) {
		if (!c->pid)
			fill_task(c); /* first process-context touch of an accepted socket */
		if (sent)
			__sync_fetch_and_add(&c->bytes_sent, sent);
		if (received)
			__sync_fetch_and_add(&c->bytes_received, received);
		return;
	}
	if (!is_full_tcp_state(BPF_CORE_READ(sk, __sk_common.skc_state)))
		return;
	/* No room in the map: the bytes travel as an overflow record instead of vanishing. */
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->sk = (__u64)sk;
	e->ts_ns = bpf_ktime_get_ns();
	fill_from_sock(&e->conn, sk);
	fill_task(&e->conn);
	e->type = ML_EV_BYTES;
	e->bytes_sent = sent;
	e->bytes_received = received;
	bpf_ringbuf_submit(e, 0);
	count(ML_CNT_EVENTS_SUBMITTED);
}

/* ---- state changes ---------------------------------------------------------------- */

static __always_inline void tuple_from_state_ctx(struct ml_tuple *t, struct trace_event_raw_inet_sock_set_state *ctx)
{
	t->family = ctx->family;
	t->sport = ctx->sport;
	t->dport = ctx->dport;
	/* Arrays in the tracepoint record are read with a helper: the verifier refuses
	 * loads through a ctx pointer moved by memcpy. */
	if (ctx->family == AF_INET) {
		bpf_probe_read_kernel(t->saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(t->daddr, 4, ctx->daddr);
	} else {
		bpf_probe_read_kernel(t->saddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(t->daddr, 16, ctx->daddr_v6);
	}
}

SEC("tp/sock/inet_sock_set_state")
int handle_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	__u64 key = (__u64)sk;
	int os = ctx->oldstate, ns = ctx->newstate;
	struct ml_conn *c, tmp = {};
	__u64 now;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	count(ML_CNT_STATE_CHANGES);
	now = bpf_ktime_get_ns();

	if (ns == TCP_SYN_SENT) {
		/* Active open, in the connect() caller's context: the source port is not chosen
		 * yet, the tuple is completed at ESTABLISHED or CLOSE. */
		fill_from_sock(&tmp, sk);
		tuple_from_state_ctx(&tmp.tuple, ctx);
		fill_task(&tmp);
		tmp.start_ns = now;
		tmp.direction = ML_DIR_OUTBOUND;
		if (bpf_map_update_elem(&conns, &key, &tmp, BPF_ANY))
			count(ML_CNT_CONNS_FULL);
		return 0;
	}

	if (ns == TCP_ESTABLISHED) {
		c = bpf_map_lookup_elem(&conns, &key);
		if (os == TCP_SYN_SENT && c) {
			tuple_from_state_ctx(&c->tuple, ctx);
			c->established_ns = now;
			if (emit_open_events)
				emit(ML_EV_OPEN, key, c, 0, 0);
			return 0;
		}
		if (c) /* e.g. first seen by a byte counter during a simultaneous open */
			return 0;
		fill_from_sock(&tmp, sk);
		tuple_from_state_ctx(&tmp.tuple, ctx);
		tmp.start_ns = now;
		tmp.established_ns = now;
		tmp.direction = os == TCP_SYN_RECV ? ML_DIR_INBOUND : ML_DIR_OUTBOUND;
		/* pid/comm stay empty for accepted sockets: this runs in softirq. The first
		 * send/recv from the owning process fills them. */
		if (bpf_map_update_elem(&conns, &key, &tmp, BPF_NOEXIST)) {
			count(ML_CNT_CONNS_FULL);
			emit(ML_EV_OPEN, key, &tmp, 0, 0); /* untracked: the open must travel as an event */
		} else if (emit_open_events) {
			emit(ML_EV_OPEN, key, &tmp, 0, 0);
		}
		return 0;
	}

	if (ns == TCP_CLOSE) {
		if (os == TCP_LISTEN || os == TCP_CLOSE)
			return 0;
		c = bpf_map_lookup_elem(&conns, &key);
		if (!c) {
			/* Untracked (map was full): report what the socket itself still knows. */
			fill_from_sock(&tmp, sk);
			tuple_from_state_ctx(&tmp.tuple, ctx);
			c = &tmp;
		}
		if (os == TCP_SYN_SENT) {
			tuple_from_state_ctx(&c->tuple, ctx);
			c->segs_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans); /* SYN retries */
			emit(ML_EV_CONNECT_FAIL, key, c, BPF_CORE_READ(sk, sk_err), 0);
		} else {
			fill_tcp_close_stats(c, sk);
			emit(ML_EV_CLOSE, key, c, 0, 0);
		}
		bpf_map_delete_elem(&conns, &key);
	}
	return 0;
}

/* ---- bytes: tracepoint variant ---------------------------------------------------- */

SEC("tp/sock/sock_send_length")
int handle_send_length(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || (ctx->family != AF_INET && ctx->family != AF_INET6))
		return 0;
	count(ML_CNT_SEND_CALLS);
	if (ctx->ret > 0)
		account_bytes((struct sock *)ctx->sk, ctx->ret, 0);
	return 0;
}

SEC("tp/sock/sock_recv_length")
int handle_recv_length(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || (ctx->family != AF_INET && ctx->family != AF_INET6))
		return 0;
	count(ML_CNT_RECV_CALLS);
	if (ctx->ret > 0 && !(ctx->flags & MSG_PEEK))
		account_bytes((struct sock *)ctx->sk, 0, ctx->ret);
	return 0;
}

/* ---- bytes: fentry variant (kernels without sock_*_length, where fentry is allowed) --- */

SEC("fexit/tcp_sendmsg")
int BPF_PROG(fexit_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	count(ML_CNT_SEND_CALLS);
	if (ret > 0)
		account_bytes(sk, ret, 0);
	return 0;
}

/* sendfile/splice before 6.5 go through tcp_sendpage, not tcp_sendmsg. */
SEC("fexit/tcp_sendpage")
int BPF_PROG(fexit_tcp_sendpage, struct sock *sk, struct page *page, int offset, size_t size, int flags, int ret)
{
	count(ML_CNT_SEND_CALLS);
	if (ret > 0)
		account_bytes(sk, ret, 0);
	return 0;
}

/* Bytes a recvmsg returned, MSG_PEEK excluded, as sock_recv_length counts them.
 * (tcp_cleanup_rbuf, the usual hook, counts peeked bytes too: measured on 6.1.)
 * tcp_recvmsg lost its `nonblock` argument in 5.19, so flags are found by argument count. */
SEC("fexit/tcp_recvmsg")
int fexit_tcp_recvmsg(unsigned long long *ctx)
{
	__u64 sk = 0, flags = 0, ret = 0;
	__u32 flags_arg = bpf_get_func_arg_cnt(ctx) == 5 ? 3 : 4;

	count(ML_CNT_RECV_CALLS);
	bpf_get_func_ret(ctx, &ret);
	bpf_get_func_arg(ctx, 0, &sk);
	bpf_get_func_arg(ctx, flags_arg, &flags);
	if ((__s32)ret > 0 && !(flags & MSG_PEEK))
		account_bytes((struct sock *)sk, 0, (__u32)ret);
	return 0;
}

/* ---- retransmits ------------------------------------------------------------------- */

/* Before 6.10 tcp_retransmit_skb and tcp_send_reset were events of the tcp_event_sk_skb
 * class (6.1: no trace_event_raw_tcp_retransmit_skb/_send_reset types in the kernel's BTF;
 * addresses as in_addr/in6_addr, ports in host order). CO-RE matches this local type to
 * the kernel's trace_event_raw_tcp_event_sk_skb; bpf_core_type_exists() picks the layout
 * at load time and the verifier drops the other branch. */
struct trace_event_raw_tcp_event_sk_skb___pre610 {
	struct trace_entry ent;
	const void *skbaddr;
	const void *skaddr;
	int state;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

#define SK_SKB_CTX_HAS_OWN_TYPE(t) bpf_core_type_exists(struct t)

static __always_inline void sk_skb_from_ctx(void *ctx, int own_type, struct sock **sk, struct sk_buff **skb)
{
	struct trace_event_raw_tcp_event_sk_skb___pre610 *old = ctx;
	struct trace_event_raw_tcp_retransmit_skb *cur = ctx;

	/* Read with the helper: clang folds two direct loads into one load through a moved
	 * ctx pointer, which the verifier refuses. */
	if (own_type) {
		bpf_core_read(sk, sizeof(*sk), &cur->skaddr);
		bpf_core_read(skb, sizeof(*skb), &cur->skbaddr);
	} else {
		bpf_core_read(sk, sizeof(*sk), &old->skaddr);
		bpf_core_read(skb, sizeof(*skb), &old->skbaddr);
	}
}

SEC("tp/tcp/tcp_retransmit_skb")
int handle_retransmit(void *ctx)
{
	struct sock *sk;
	struct sk_buff *skb;
	struct ml_conn *c;
	__u32 segs;
	__u16 gso_segs = 0;

	sk_skb_from_ctx(ctx, SK_SKB_CTX_HAS_OWN_TYPE(trace_event_raw_tcp_retransmit_skb), &sk, &skb);
	count(ML_CNT_RETRANSMIT_SKBS);
	c = get_or_create(sk);
	if (!c)
		return 0;
	/* total_retrans counts segments, like RetransSegs; one skb may carry many (TSO). */
	c->segs_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	if (!emit_retransmit_events)
		return 0;
	/* TCP_SKB_CB(skb)->tcp_gso_segs lives at offset 8 of skb->cb. */
	bpf_probe_read_kernel(&gso_segs, sizeof(gso_segs), (void *)skb + bpf_core_field_offset(skb->cb) + 8);
	segs = gso_segs ? gso_segs : 1;
	emit(ML_EV_RETRANSMIT, (__u64)sk, c, 0, segs);
	return 0;
}

SEC("tp/tcp/tcp_retransmit_synack")
int handle_retransmit_synack(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	struct ml_conn tmp = {};

	tmp.tuple.family = ctx->family;
	tmp.tuple.sport = ctx->sport;
	tmp.tuple.dport = ctx->dport;
	if (ctx->family == AF_INET) {
		bpf_probe_read_kernel(tmp.tuple.saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(tmp.tuple.daddr, 4, ctx->daddr);
	} else {
		bpf_probe_read_kernel(tmp.tuple.saddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(tmp.tuple.daddr, 16, ctx->daddr_v6);
	}
	tmp.direction = ML_DIR_INBOUND;
	tmp.netns = BPF_CORE_READ((struct sock *)ctx->skaddr, __sk_common.skc_net.net, ns.inum);
	tmp.cgroup_id = BPF_CORE_READ((struct sock *)ctx->skaddr, sk_cgrp_data.cgroup, kn, id);
	emit(ML_EV_SYNACK_RETRANSMIT, (__u64)ctx->skaddr, &tmp, 0, 1);
	return 0;
}

/* ---- resets ------------------------------------------------------------------------ */

/* 6.x records the RST's addresses as sockaddr_in/sockaddr_in6 in 28-byte arrays. */
static __always_inline void tuple_from_sockaddrs(struct ml_tuple *t, const __u8 *sa, const __u8 *da)
{
	__u16 family = *(__u16 *)sa;

	t->family = family;
	t->sport = bpf_ntohs(*(__u16 *)(sa + 2));
	t->dport = bpf_ntohs(*(__u16 *)(da + 2));
	if (family == AF_INET) {
		__builtin_memcpy(t->saddr, sa + 4, 4);
		__builtin_memcpy(t->daddr, da + 4, 4);
	} else if (family == AF_INET6) {
		__builtin_memcpy(t->saddr, sa + 8, 16);
		__builtin_memcpy(t->daddr, da + 8, 16);
	}
}

static __always_inline void emit_reset(__u64 sk, struct ml_conn *tmp, __u8 sent)
{
	struct ml_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->sk = sk;
	e->ts_ns = bpf_ktime_get_ns();
	e->conn = *tmp;
	e->type = ML_EV_RESET;
	e->rst_sent = sent;
	bpf_ringbuf_submit(e, 0);
	count(ML_CNT_EVENTS_SUBMITTED);
}

/* The pre-6.10 record: in_addr/in6_addr and host-order ports, always with a socket. */
static __always_inline void tuple_from_sk_skb_pre610(struct ml_tuple *t, struct trace_event_raw_tcp_event_sk_skb___pre610 *old)
{
	t->family = BPF_CORE_READ(old, family);
	t->sport = BPF_CORE_READ(old, sport);
	t->dport = BPF_CORE_READ(old, dport);
	if (t->family == AF_INET) {
		bpf_probe_read_kernel(t->saddr, 4, old->saddr);
		bpf_probe_read_kernel(t->daddr, 4, old->daddr);
	} else {
		bpf_probe_read_kernel(t->saddr, 16, old->saddr_v6);
		bpf_probe_read_kernel(t->daddr, 16, old->daddr_v6);
	}
}

SEC("tp/tcp/tcp_send_reset")
int handle_send_reset(void *raw)
{
	struct trace_event_raw_tcp_send_reset *ctx = raw;
	int own_type = SK_SKB_CTX_HAS_OWN_TYPE(trace_event_raw_tcp_send_reset);
	struct sock *sk;
	struct sk_buff *skb;
	struct ml_conn *c = NULL, tmp = {};
	__u8 sa[28], da[28];

	sk_skb_from_ctx(raw, own_type, &sk, &skb);
	count(ML_CNT_RST_SENT);
	if (sk)
		c = get_or_create(sk);
	if (c) {
		__sync_fetch_and_add(&c->rsts_sent, 1);
		return 0;
	}
	/* No full socket (a SYN to a closed port, a time-wait or request socket): report the
	 * RST with the addresses the tracepoint recorded. */
	count(ML_CNT_RST_SENT_NOSOCK);
	if (!own_type) {
		tuple_from_sk_skb_pre610(&tmp.tuple, raw);
	} else if (bpf_core_field_size(ctx->saddr) == sizeof(sa)) {
		bpf_probe_read_kernel(sa, sizeof(sa), ctx->saddr);
		bpf_probe_read_kernel(da, sizeof(da), ctx->daddr);
		tuple_from_sockaddrs(&tmp.tuple, sa, da);
	}
	if (sk) {
		tmp.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		/* A zero-linger close moves the socket to CLOSE before the RST goes out: the
		 * agent matches `sk` with the connection it just closed. */
		if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_CLOSE) {
			tmp.cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
			fill_task(&tmp);
		}
	} else {
		/* The RST answers this skb: its device's namespace is the socket-less side's. */
		if (skb)
			tmp.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	}
	tmp.direction = ML_DIR_INBOUND;
	emit_reset((__u64)sk, &tmp, 1);
	return 0;
}

/* ---- resets without a full socket, before 6.10 ------------------------------------ */

/* Before 6.10 tcp_v4/v6_send_reset fire tcp_send_reset only for a full socket: the RST
 * that refuses a SYN to a closed port, or answers for a time-wait or request socket, has
 * no record. These hooks report exactly those; the agent attaches them only where the
 * tracepoint has the pre-6.10 layout. The RST goes back to the skb's source. */
static __always_inline int reset_without_full_sock(struct sock *sk, struct sk_buff *skb, int v6)
{
	struct ml_conn tmp = {};
	unsigned char *head;
	__u16 nh, th;
	struct tcphdr tcp;

	if (sk) {
		int state = BPF_CORE_READ(sk, __sk_common.skc_state);
		if (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV)
			return 0; /* full socket: tcp_send_reset reports it */
	}
	count(ML_CNT_RST_SENT);
	count(ML_CNT_RST_SENT_NOSOCK);
	head = BPF_CORE_READ(skb, head);
	nh = BPF_CORE_READ(skb, network_header);
	th = BPF_CORE_READ(skb, transport_header);
	if (bpf_probe_read_kernel(&tcp, sizeof(tcp), head + th))
		return 0;
	tmp.tuple.sport = bpf_ntohs(tcp.dest);
	tmp.tuple.dport = bpf_ntohs(tcp.source);
	if (v6) {
		struct ipv6hdr ip6;
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return 0;
		tmp.tuple.family = AF_INET6;
		__builtin_memcpy(tmp.tuple.saddr, &ip6.daddr, 16);
		__builtin_memcpy(tmp.tuple.daddr, &ip6.saddr, 16);
	} else {
		struct iphdr ip;
		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
			return 0;
		tmp.tuple.family = AF_INET;
		__builtin_memcpy(tmp.tuple.saddr, &ip.daddr, 4);
		__builtin_memcpy(tmp.tuple.daddr, &ip.saddr, 4);
	}
	if (sk)
		tmp.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	else
		tmp.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	tmp.direction = ML_DIR_INBOUND;
	emit_reset((__u64)sk, &tmp, 1);
	return 0;
}

SEC("fentry/tcp_v4_send_reset")
int BPF_PROG(fentry_tcp_v4_send_reset, struct sock *sk, struct sk_buff *skb)
{
	return reset_without_full_sock(sk, skb, 0);
}

SEC("fentry/tcp_v6_send_reset")
int BPF_PROG(fentry_tcp_v6_send_reset, struct sock *sk, struct sk_buff *skb)
{
	return reset_without_full_sock(sk, skb, 1);
}

SEC("tp/tcp/tcp_receive_reset")
int handle_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct ml_conn *c, tmp = {};

	count(ML_CNT_RST_RECEIVED);
	c = get_or_create(sk);
	if (c) {
		__sync_fetch_and_add(&c->rsts_received, 1);
		return 0;
	}
	fill_from_sock(&tmp, sk);
	emit_reset((__u64)sk, &tmp, 0);
	return 0;
}
