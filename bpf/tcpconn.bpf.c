// SPDX-License-Identifier: GPL-2.0
/* tcpconn.bpf.c — L4 telemetry for every TCP connection on the node, aggregated in the kernel.
 *
 * Kernel side of the L4 pipeline. Nothing runs per send or receive call: byte, segment and
 * retransmit counts are the socket's own (struct tcp_sock), read at state changes, at close
 * and, for connections that stay open, by the `sweep_conns` iterator the agent runs at each
 * sweep (`adopt_tcp`, run once per namespace at start, brings in older connections). What they add is credited to `rollups` (keyed by the rollup, not the connection),
 * so the agent's work per sweep is proportional to rollups. The `events` ring buffer carries
 * only the overflow when `rollups` is full (re-aggregated by the agent), retransmit records,
 * and per-connection records while a client follows the stream (`settings.follow`).
 * Every failure to record (full map, full ring buffer) is counted in `counters`.
 *
 * Attach points (the agent picks per signal, see agent/kernel/attach.py):
 *   state:      tp/sock/inet_sock_set_state                 (4.16+)
 *   bytes:      a pass over `conns` run by the agent at each sweep (BPF_PROG_TEST_RUN of a
 *               raw_tp program, 5.13+), iter/tcp once per namespace at start (5.9+);
 *               per-call fallbacks: fexit/tcp_sendmsg + fexit/tcp_sendpage (before 6.5) +
 *               fexit/tcp_recvmsg where fentry is allowed, else
 *               tp/sock/sock_send_length + sock_recv_length (6.3+)
 *               tp/sock/sock_send_length + sock_recv_length   (per-call fallback, 6.3+)
 *   retransmit: tp/tcp/tcp_retransmit_skb, tp/tcp/tcp_retransmit_synack
 *   reset:      tp/tcp/tcp_send_reset, tp/tcp/tcp_receive_reset
 *   (retransmit_skb and send_reset records changed layout in 6.10: both are read)
 *   socket-less resets before 6.10: fentry/tcp_v4_send_reset, fentry/tcp_v6_send_reset
 *
 * Counting rules (measured, see tests/integration/test_tcp_l4.py): tcp_sock.bytes_acked
 * counts every sequence number the peer acknowledged, the FIN included, and
 * bytes_received every one received in order, the peer's FIN included; so the FIN is
 * subtracted once it is acked (ours) or received (theirs). What the handshake added is in
 * the baseline taken at establishment.
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

#define ECONNREFUSED 111
#define ETIMEDOUT 110
#define EHOSTUNREACH 113
#define ENETUNREACH 101

/* Keep the shared structs in the object's BTF for the mirror checks. */
struct ml_event *unused_ml_event __attribute__((unused));
struct ml_settings *unused_ml_settings __attribute__((unused));

/* Knobs, set by the agent before load. */
const volatile __u8 emit_retransmit_events = 1;
/* 1: bytes come from per-call programs (fallback where iter/tcp is missing), not the socket. */
const volatile __u8 bytes_per_call = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* resized by the agent before load */
	__type(key, __u64);
	__type(value, struct ml_conn);
} conns SEC(".maps");

/* Shared (not per-CPU) with atomic adds: per-CPU values of this size would cost
 * entries x CPUs x 536 bytes on a large node, and programs on one CPU can nest (softirq
 * over the sweep iterator), which per-CPU plain adds would not survive either. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384); /* resized by the agent before load */
	__type(key, struct ml_rollup_key);
	__type(value, struct ml_rollup);
} rollups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ml_listener_key);
	__type(value, struct ml_listener);
} listeners SEC(".maps");

/* Rollup keys of connections closed abortively moments ago: a zero-linger close moves the
 * socket to CLOSE before its RST goes out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct ml_rollup_key);
} aborted SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ml_settings);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* The value new rollups start from (too large for the BPF stack); never written. */
struct ml_rollup zero_rollup;

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		__sync_fetch_and_add(v, 1); /* per-CPU slot; atomic because programs can nest */
}

static __always_inline struct ml_settings *get_settings(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&settings, &zero);
}

static __always_inline int following(void)
{
	struct ml_settings *s = get_settings();
	return s && s->follow;
}

/* Wake the agent only when enough is waiting: it polls on a timer anyway. */
static __always_inline __u64 wake_flags(void)
{
	struct ml_settings *s = get_settings();

	if (s && s->follow)
		return 0;
	if (s && s->wake_bytes && bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= s->wake_bytes)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline int is_full_tcp_state(int state)
{
	return state == TCP_ESTABLISHED || state == TCP_SYN_SENT || state == TCP_FIN_WAIT1 ||
	       state == TCP_FIN_WAIT2 || state == TCP_CLOSE_WAIT || state == TCP_LAST_ACK ||
	       state == TCP_CLOSING;
}

/* ---- rollups ------------------------------------------------------------------------ */

static __always_inline __u32 lat_bucket(__u64 v)
{
	const __u64 b[ML_LAT_NBOUNDS] = {ML_LAT_BOUNDS_NS};
	__u32 i;

#pragma clang loop unroll(full)
	for (i = 0; i < ML_LAT_NBOUNDS; i++)
		if (v <= b[i])
			return i;
	return ML_LAT_NBOUNDS;
}

static __always_inline __u32 dur_bucket(__u64 v)
{
	const __u64 b[ML_DUR_NBOUNDS] = {ML_DUR_BOUNDS_NS};
	__u32 i;

#pragma clang loop unroll(full)
	for (i = 0; i < ML_DUR_NBOUNDS; i++)
		if (v <= b[i])
			return i;
	return ML_DUR_NBOUNDS;
}

/* The record that carries a delta when its rollup has no room in the map. */
static __always_inline void overflow(const struct ml_rollup_key *k, const struct ml_delta *d)
{
	struct ml_event *e;

	count(ML_CNT_ROLLUPS_FULL);
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->type = ML_EV_OVERFLOW;
	e->ts_ns = bpf_ktime_get_ns();
	e->key = *k;
	e->delta = *d;
	bpf_ringbuf_submit(e, wake_flags());
	count(ML_CNT_EVENTS_SUBMITTED);
}

/* Add a delta to its rollup, creating the rollup on first use. */
static __always_inline void apply(const struct ml_rollup_key *k, const struct ml_delta *d)
{
	struct ml_rollup *r = bpf_map_lookup_elem(&rollups, k);
	__u32 i;

	if (!r) {
		bpf_map_update_elem(&rollups, k, &zero_rollup, BPF_NOEXIST); /* EEXIST: raced, fine */
		r = bpf_map_lookup_elem(&rollups, k);
		if (!r) {
			overflow(k, d);
			return;
		}
	}
	if (d->flags & ML_D_OPENED)
		__sync_fetch_and_add(&r->opened, 1);
	if (d->flags & ML_D_CLOSED)
		__sync_fetch_and_add(&r->closed, 1);
	if (d->active)
		__sync_fetch_and_add(&r->active, (__s64)d->active);
	if (d->fail) {
		i = d->fail - 1;
		if (i < ML_FAIL_MAX)
			__sync_fetch_and_add(&r->failed[i], 1);
	}
	if (d->bytes_sent)
		__sync_fetch_and_add(&r->bytes_sent, d->bytes_sent);
	if (d->bytes_received)
		__sync_fetch_and_add(&r->bytes_received, d->bytes_received);
	if (d->segs_retrans)
		__sync_fetch_and_add(&r->segs_retrans, d->segs_retrans);
	if (d->rsts_sent)
		__sync_fetch_and_add(&r->rsts_sent, d->rsts_sent);
	if (d->rsts_received)
		__sync_fetch_and_add(&r->rsts_received, d->rsts_received);
	if (d->flags & ML_D_CONNECT) {
		__sync_fetch_and_add(&r->connect_ns_sum, d->connect_ns);
		i = lat_bucket(d->connect_ns);
		if (i <= ML_LAT_NBOUNDS)
			__sync_fetch_and_add(&r->connect_hist[i], 1);
	}
	if (d->flags & ML_D_RTT) {
		__sync_fetch_and_add(&r->rtt_us_sum, d->rtt_us);
		i = lat_bucket((__u64)d->rtt_us * 1000);
		if (i <= ML_LAT_NBOUNDS)
			__sync_fetch_and_add(&r->rtt_hist[i], 1);
	}
	if (d->flags & ML_D_DURATION) {
		__sync_fetch_and_add(&r->duration_ns_sum, d->duration_ns);
		i = dur_bucket(d->duration_ns);
		if (i <= ML_DUR_NBOUNDS)
			__sync_fetch_and_add(&r->duration_hist[i], 1);
	}
}

/* ---- keys and counters from the socket ----------------------------------------------- */

static __always_inline void tuple_from_sock(struct ml_tuple *t, struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	t->family = family;
	t->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	t->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		BPF_CORE_READ_INTO(&t->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO(&t->daddr, sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO(&t->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&t->daddr, sk, __sk_common.skc_v6_daddr);
	}
}

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

/* The tuple from a BTF-typed socket (tp_btf): plain loads, no helper call per field. */
static __always_inline void tuple_from_btf_sock(struct ml_tuple *t, struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;

	t->family = family;
	t->sport = sk->__sk_common.skc_num;
	t->dport = bpf_ntohs(sk->__sk_common.skc_dport);
	if (family == AF_INET) {
		__builtin_memcpy(t->saddr, &sk->__sk_common.skc_rcv_saddr, 4);
		__builtin_memcpy(t->daddr, &sk->__sk_common.skc_daddr, 4);
	} else {
		__builtin_memcpy(t->saddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(t->daddr, &sk->__sk_common.skc_v6_daddr, 16);
	}
}

static __always_inline __u32 netns_of(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* The rollup key of a connection, from its tuple; `comm` is filled by the caller. */
static __always_inline void key_from(struct ml_rollup_key *k, struct sock *sk, const struct ml_tuple *t, __u8 dir)
{
	k->cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	k->netns = netns_of(sk);
	k->family = t->family;
	k->direction = dir;
	__builtin_memcpy(k->peer, t->daddr, sizeof(k->peer));
	if (dir == ML_DIR_OUTBOUND)
		k->server_port = t->dport;
	else if (dir == ML_DIR_INBOUND)
		k->server_port = t->sport;
	else /* unknown: the well-known side is usually the smaller */
		k->server_port = t->sport < t->dport ? t->sport : t->dport;
}

static __always_inline struct ml_listener *listener_of(__u32 netns, __u16 port)
{
	struct ml_listener_key lk = {.netns = netns, .port = port};
	return bpf_map_lookup_elem(&listeners, &lk);
}

/* Key of a socket the agent has no record of (conns full, or it predates the agent): inbound
 * when a known listener owns its local port, else of unknown direction. */
static __always_inline void key_untracked(struct ml_rollup_key *k, struct sock *sk)
{
	struct ml_tuple t = {};
	struct ml_listener *l;

	tuple_from_sock(&t, sk);
	l = listener_of(netns_of(sk), t.sport);
	if (l) {
		key_from(k, sk, &t, ML_DIR_INBOUND);
		__builtin_memcpy(k->comm, l->comm, sizeof(k->comm));
	} else {
		key_from(k, sk, &t, ML_DIR_UNKNOWN);
	}
}

#define FIN_SENT_STATES ((1 << TCP_FIN_WAIT1) | (1 << TCP_FIN_WAIT2) | (1 << TCP_CLOSING) | \
			 (1 << TCP_LAST_ACK) | (1 << TCP_TIME_WAIT))

/* Payload bytes acked and received so far: the socket's counters without the FINs. `state`
 * is the state the socket is leaving (at a state change) or is in (at a sweep). */
static __always_inline void payload_counts(struct sock *sk, int state, __u64 *acked, __u64 *received)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	__u64 a = BPF_CORE_READ(tp, bytes_acked);
	__u64 r = BPF_CORE_READ(tp, bytes_received);

	/* Our FIN is queued in these states; it is acked once snd_una reaches write_seq. */
	if (((1 << state) & FIN_SENT_STATES) && BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq) && a)
		a -= 1;
	/* SOCK_DONE: the peer's FIN was received in order (tcp_fin). */
	if ((BPF_CORE_READ(sk, __sk_common.skc_flags) & (1UL << SOCK_DONE)) && r)
		r -= 1;
	*acked = a;
	*received = r;
}

/* Credit what the socket counted since the last credit. xchg makes each byte credited once
 * even if a sweep and the close run at the same moment on two CPUs. */
static __always_inline void credit(struct ml_conn *c, struct sock *sk, int state, struct ml_delta *d)
{
	__u64 acked, received, old;
	__u64 retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans), oldr;

	if (!bytes_per_call) {
		payload_counts(sk, state, &acked, &received);
		old = __sync_lock_test_and_set(&c->acked, acked);
		if (acked > old)
			d->bytes_sent = acked - old;
		old = __sync_lock_test_and_set(&c->received, received);
		if (received > old)
			d->bytes_received = received - old;
	}
	oldr = __sync_lock_test_and_set(&c->retrans, retrans);
	if (retrans > oldr)
		d->segs_retrans = retrans - oldr;
}

static __always_inline void baseline(struct ml_conn *c, struct sock *sk, int state)
{
	payload_counts(sk, state, &c->acked, &c->received);
	c->base_acked = c->acked;
	c->base_received = c->received;
}

/* Follow mode: one record per connection event. */
static __always_inline void follow_event(__u32 type, __u64 sk, const struct ml_conn *c, const struct ml_delta *d,
					 __s32 err, __u64 now)
{
	struct ml_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->sk = sk;
	e->ts_ns = now;
	e->type = type;
	e->err = err;
	e->tuple = c->tuple;
	e->key = c->key;
	e->delta = *d;
	e->pid = c->pid;
	if (type == ML_EV_CLOSE) {
		e->total_sent = c->acked - c->base_acked;
		e->total_received = c->received - c->base_received;
		e->duration_ns = now - c->start_ns;
	}
	bpf_ringbuf_submit(e, 0);
	count(ML_CNT_EVENTS_SUBMITTED);
}

static __always_inline __u8 fail_reason(int err)
{
	switch (err) {
	case ECONNREFUSED:
		return ML_FAIL_REFUSED + 1;
	case ETIMEDOUT:
		return ML_FAIL_TIMEOUT + 1;
	case EHOSTUNREACH:
	case ENETUNREACH:
		return ML_FAIL_UNREACHABLE + 1;
	case 0:
		return ML_FAIL_ABORTED + 1;
	default:
		return ML_FAIL_OTHER + 1;
	}
}

/* ---- state changes ---------------------------------------------------------------- */

static __always_inline void on_listen(struct sock *sk, __u16 port, int up)
{
	struct ml_listener_key lk = {.netns = netns_of(sk), .port = port};
	struct ml_listener l = {};

	if (!up) {
		bpf_map_delete_elem(&listeners, &lk);
		return;
	}
	l.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&l.comm, sizeof(l.comm));
	bpf_map_update_elem(&listeners, &lk, &l, BPF_ANY);
}

static __always_inline void on_connect(struct sock *sk, __u64 key, const struct ml_tuple *t, __u64 now)
{
	struct ml_conn c = {};

	/* Active open, in the connect() caller's context: the source port is not chosen yet
	 * (completed at ESTABLISHED), the destination is. */
	c.tuple = *t;
	key_from(&c.key, sk, &c.tuple, ML_DIR_OUTBOUND);
	c.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&c.key.comm, sizeof(c.key.comm));
	c.start_ns = now;
	if (bpf_map_update_elem(&conns, &key, &c, BPF_ANY))
		count(ML_CNT_CONNS_FULL);
}

/* The socket's smoothed RTT at ESTABLISHED, in µs: the handshake's own sample (the client's
 * SYN -> SYN-ACK, the server's SYN-ACK -> ACK, both taken before the state change). For the
 * follow record only: it is not credited to the rollup (no ML_D_RTT), whose RTT is the
 * connection's srtt at close. */
static __always_inline __u32 handshake_rtt_us(struct sock *sk)
{
	return BPF_CORE_READ((struct tcp_sock *)sk, srtt_us) >> 3;
}

static __always_inline void on_established(struct sock *sk, __u64 key, int os, const struct ml_tuple *t,
					   __u64 now)
{
	struct ml_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ml_delta d = {.flags = ML_D_OPENED, .active = 1};
	struct ml_conn fresh = {};
	struct ml_listener *l;

	if (c) {
		if (c->established_ns)
			return; /* already counted (e.g. adopted by a sweep) */
		/* Our connect (also a simultaneous open, SYN_SENT -> SYN_RECV -> ESTABLISHED). */
		c->tuple = *t;
		c->established_ns = now;
		baseline(c, sk, TCP_ESTABLISHED);
		d.flags |= ML_D_CONNECT;
		d.connect_ns = now - c->start_ns;
		apply(&c->key, &d);
		if (following()) {
			d.rtt_us = handshake_rtt_us(sk);
			follow_event(ML_EV_OPEN, key, c, &d, 0, now);
		}
		return;
	}
	fresh.tuple = *t;
	fresh.start_ns = now;
	fresh.established_ns = now;
	if (os == TCP_SYN_RECV) {
		/* Accepted, in softirq: named after the process that listens on the port. */
		key_from(&fresh.key, sk, &fresh.tuple, ML_DIR_INBOUND);
		l = listener_of(fresh.key.netns, fresh.tuple.sport);
		if (l)
			__builtin_memcpy(fresh.key.comm, l->comm, sizeof(fresh.key.comm));
	} else {
		key_untracked(&fresh.key, sk); /* our connect, but conns had no room for it */
	}
	baseline(&fresh, sk, TCP_ESTABLISHED);
	fresh.retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans); /* SYN-ACK retries: counted apart */
	if (bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST))
		count(ML_CNT_CONNS_FULL);
	apply(&fresh.key, &d);
	if (following()) {
		d.rtt_us = handshake_rtt_us(sk);
		follow_event(ML_EV_OPEN, key, &fresh, &d, 0, now);
	}
}

static __always_inline void on_close(struct sock *sk, __u64 key, int os, __u64 now)
{
	struct ml_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ml_delta d = {};
	struct ml_conn tmp = {};
	__u32 srtt;

	if (!c) {
		/* Untracked: credit what the socket itself still knows. */
		count(ML_CNT_UNTRACKED_CLOSE);
		key_untracked(&tmp.key, sk);
		tuple_from_sock(&tmp.tuple, sk);
		c = &tmp;
	}
	if (os == TCP_SYN_SENT || (os == TCP_SYN_RECV && !c->established_ns)) {
		d.fail = fail_reason(BPF_CORE_READ(sk, sk_err));
		d.segs_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans); /* SYN retries */
		apply(&c->key, &d);
		if (following())
			follow_event(ML_EV_CONNECT_FAIL, key, c, &d, BPF_CORE_READ(sk, sk_err), now);
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	credit(c, sk, os, &d);
	d.flags = ML_D_CLOSED;
	d.active = c == &tmp ? 0 : -1;
	if (c->start_ns) {
		d.flags |= ML_D_DURATION;
		d.duration_ns = now - c->start_ns;
	}
	srtt = BPF_CORE_READ((struct tcp_sock *)sk, srtt_us) >> 3;
	if (srtt) {
		d.flags |= ML_D_RTT;
		d.rtt_us = srtt;
	}
	apply(&c->key, &d);
	if (following())
		follow_event(ML_EV_CLOSE, key, c, &d, 0, now);
	/* Straight from a synchronized state to CLOSE: an abort (zero linger, RST), whose RST may
	 * go out after this. */
	if (os == TCP_ESTABLISHED || os == TCP_CLOSE_WAIT)
		bpf_map_update_elem(&aborted, &key, &c->key, BPF_ANY);
	if (c != &tmp)
		bpf_map_delete_elem(&conns, &key);
}

/* Most transitions (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING) change nothing L4
 * counts: leave before any other work. */
static __always_inline int state_counts(int ns)
{
	return ns == TCP_LISTEN || ns == TCP_SYN_SENT || ns == TCP_ESTABLISHED || ns == TCP_CLOSE;
}

/* Whether a state change needs the connection's tuple (filled by the program's caller). */
static __always_inline int state_needs_tuple(int ns)
{
	return ns == TCP_SYN_SENT || ns == TCP_ESTABLISHED;
}

/* One state change. `t` holds the tuple when state_needs_tuple(ns); `port` is the local port
 * (for listeners). Both come from the program: the trace record or the BTF socket. */
static __always_inline void on_state(struct sock *sk, int os, int ns, const struct ml_tuple *t, __u16 port)
{
	__u64 key = (__u64)sk;
	__u64 now;

	count(ML_CNT_STATE_CHANGES);
	now = bpf_ktime_get_ns();
	if (ns == TCP_LISTEN) {
		on_listen(sk, port, 1);
	} else if (ns == TCP_SYN_SENT) {
		on_connect(sk, key, t, now);
	} else if (ns == TCP_ESTABLISHED) {
		on_established(sk, key, os, t, now);
	} else if (ns == TCP_CLOSE) {
		if (os == TCP_LISTEN)
			on_listen(sk, port, 0);
		else if (os != TCP_CLOSE)
			on_close(sk, key, os, now);
	}
}

SEC("tp/sock/inet_sock_set_state")
int handle_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct ml_tuple t = {};
	int ns = ctx->newstate;

	if (ctx->protocol != IPPROTO_TCP || !state_counts(ns))
		return 0;
	if (state_needs_tuple(ns))
		tuple_from_state_ctx(&t, ctx);
	on_state((struct sock *)ctx->skaddr, ctx->oldstate, ns, &t, ctx->sport);
	return 0;
}

/* The same on the BTF-typed tracepoint: no trace record is built for it (the classic
 * tracepoint fills one for every state change of every socket, ours or not, before the
 * program runs), the early exit costs one comparison, and the tuple is read with plain loads. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(handle_set_state_btf, struct sock *sk, int oldstate, int newstate)
{
	struct ml_tuple t = {};

	if (!state_counts(newstate) || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (state_needs_tuple(newstate))
		tuple_from_btf_sock(&t, sk);
	on_state(sk, oldstate, newstate, &t, sk->__sk_common.skc_num);
	return 0;
}

/* ---- bytes: the sweep iterators ---------------------------------------------------- */

/* Credits one tracked connection's counters (a bpf_for_each_map_elem callback over `conns`).
 * The socket is read through the pointer that keys the entry: the entry is deleted at CLOSE,
 * before the socket can be freed, and it is looked up again after the read, so counters of
 * a socket that closed meanwhile (its close credited them) are dropped. */
static long sweep_one(struct bpf_map *map, __u64 *kp, struct ml_conn *c, void *unused)
{
	struct ml_conn *again;
	struct ml_delta d = {};
	struct sock *sk;
	__u64 key = *kp, start, acked, received, retrans, old;
	int state;

	if (!c->established_ns)
		return 0;
	count(ML_CNT_ITER_SOCKETS);
	start = c->start_ns;
	sk = (struct sock *)key;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (!is_full_tcp_state(state) || state == TCP_SYN_SENT)
		return 0;
	payload_counts(sk, state, &acked, &received);
	retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	again = bpf_map_lookup_elem(&conns, &key);
	if (!again || again->start_ns != start)
		return 0; /* closed (and maybe reused) while we read: the close credited it */
	if (!bytes_per_call) {
		old = __sync_lock_test_and_set(&again->acked, acked);
		if (acked > old)
			d.bytes_sent = acked - old;
		old = __sync_lock_test_and_set(&again->received, received);
		if (received > old)
			d.bytes_received = received - old;
	}
	old = __sync_lock_test_and_set(&again->retrans, retrans);
	if (retrans > old)
		d.segs_retrans = retrans - old;
	if (d.bytes_sent || d.bytes_received || d.segs_retrans)
		apply(&again->key, &d);
	return 0;
}

/* Run by the agent at each sweep (BPF_PROG_TEST_RUN, attached to nothing): credits every
 * tracked live connection's counters, whatever its namespace. Cost: one pass over `conns`.
 * (An iter/bpf_map_elem program would do the same; this kernel refuses those, and an
 * iter/tcp walks the whole established hash once per namespace.) */
SEC("raw_tp")
int sweep_conns(void *ctx)
{
	return bpf_for_each_map_elem(&conns, sweep_one, NULL, 0);
}

/* Run by the agent once per network namespace when it starts (an iter/tcp shows only its
 * reader's namespace): adopts connections that predate the agent, counted from then on,
 * and reports listening sockets of unknown owner so the agent can name them. */
SEC("iter/tcp")
int adopt_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct sock *sk;
	struct ml_conn fresh = {};
	struct ml_delta d = {};
	struct ml_event *e;
	__u64 key;
	int state;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* time-wait and request sockets: nothing left to count */
	sk = (struct sock *)tp;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state == TCP_LISTEN) {
		struct ml_listener_key lk = {.netns = netns_of(sk), .port = BPF_CORE_READ(sk, __sk_common.skc_num)};
		struct ml_listener unknown = {};

		if (bpf_map_lookup_elem(&listeners, &lk) || bpf_map_update_elem(&listeners, &lk, &unknown, BPF_NOEXIST))
			return 0;
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e) {
			count(ML_CNT_RINGBUF_FULL);
			return 0;
		}
		__builtin_memset(e, 0, sizeof(*e));
		e->type = ML_EV_LISTENER;
		e->sk = (__u64)sk;
		e->ts_ns = bpf_ktime_get_ns();
		tuple_from_sock(&e->tuple, sk);
		e->key.netns = lk.netns;
		e->inode = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
		bpf_ringbuf_submit(e, wake_flags());
		count(ML_CNT_EVENTS_SUBMITTED);
		return 0;
	}
	if (state == TCP_SYN_SENT || !is_full_tcp_state(state))
		return 0;
	key = (__u64)sk;
	if (bpf_map_lookup_elem(&conns, &key))
		return 0; /* seen by the state tracepoint already */
	tuple_from_sock(&fresh.tuple, sk);
	key_untracked(&fresh.key, sk);
	fresh.start_ns = fresh.established_ns = bpf_ktime_get_ns();
	baseline(&fresh, sk, state);
	fresh.retrans = BPF_CORE_READ(tp, total_retrans);
	if (bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST)) {
		count(ML_CNT_CONNS_FULL);
		return 0;
	}
	count(ML_CNT_ADOPTED);
	d.active = 1;
	apply(&fresh.key, &d);
	return 0;
}

/* ---- bytes: per-call fallback (kernels without iter/tcp) ----------------------------- */

static __always_inline void account_bytes(struct sock *sk, __u64 sent, __u64 received)
{
	__u64 key = (__u64)sk;
	struct ml_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ml_delta d = {.bytes_sent = sent, .bytes_received = received};
	struct ml_rollup_key k = {};

	if (c) {
		__sync_fetch_and_add(&c->acked, sent);
		__sync_fetch_and_add(&c->received, received);
		apply(&c->key, &d);
		return;
	}
	if (!is_full_tcp_state(BPF_CORE_READ(sk, __sk_common.skc_state)))
		return;
	key_untracked(&k, sk);
	apply(&k, &d);
}

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


SEC("tp/tcp/tcp_retransmit_skb")
int handle_retransmit(void *ctx)
{
	struct sock *sk;
	struct sk_buff *skb;
	__u64 key;
	struct ml_conn *c;
	struct ml_event *e;
	__u16 gso_segs = 0;

	sk_skb_from_ctx(ctx, SK_SKB_CTX_HAS_OWN_TYPE(trace_event_raw_tcp_retransmit_skb), &sk, &skb);
	key = (__u64)sk;
	count(ML_CNT_RETRANSMIT_SKBS);
	/* Counts come from total_retrans (segments, like RetransSegs); this record is for the
	 * stream and the agent's health only. */
	if (!emit_retransmit_events)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(ML_CNT_RINGBUF_FULL);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->type = ML_EV_RETRANSMIT;
	e->sk = key;
	e->ts_ns = bpf_ktime_get_ns();
	c = bpf_map_lookup_elem(&conns, &key);
	if (c) {
		e->tuple = c->tuple;
		e->key = c->key;
	} else {
		tuple_from_sock(&e->tuple, sk);
	}
	/* TCP_SKB_CB(skb)->tcp_gso_segs lives at offset 8 of skb->cb. */
	bpf_probe_read_kernel(&gso_segs, sizeof(gso_segs), (void *)skb + bpf_core_field_offset(skb->cb) + 8);
	e->segs = gso_segs ? gso_segs : 1;
	bpf_ringbuf_submit(e, wake_flags());
	count(ML_CNT_EVENTS_SUBMITTED);
	return 0;
}

SEC("tp/tcp/tcp_retransmit_synack")
int handle_retransmit_synack(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr; /* the listener */
	struct ml_tuple t = {};
	struct ml_rollup_key k = {};
	struct ml_delta d = {.segs_retrans = 1};
	struct ml_listener *l;

	t.family = ctx->family;
	t.sport = ctx->sport;
	t.dport = ctx->dport;
	if (ctx->family == AF_INET) {
		bpf_probe_read_kernel(t.saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(t.daddr, 4, ctx->daddr);
	} else {
		bpf_probe_read_kernel(t.saddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(t.daddr, 16, ctx->daddr_v6);
	}
	key_from(&k, sk, &t, ML_DIR_INBOUND);
	l = listener_of(k.netns, t.sport);
	if (l)
		__builtin_memcpy(k.comm, l->comm, sizeof(k.comm));
	apply(&k, &d);
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

SEC("tp/tcp/tcp_send_reset")
int handle_send_reset(void *raw)
{
	struct trace_event_raw_tcp_send_reset *ctx = raw;
	int own_type = SK_SKB_CTX_HAS_OWN_TYPE(trace_event_raw_tcp_send_reset);
	struct sock *sk;
	struct sk_buff *skb;
	__u64 key;
	struct ml_conn *c = NULL;
	struct ml_rollup_key *ak, k = {};
	struct ml_delta d = {.rsts_sent = 1};
	struct ml_tuple t = {};
	__u8 sa[28], da[28];
	int state;

	sk_skb_from_ctx(raw, own_type, &sk, &skb);
	key = (__u64)sk;
	count(ML_CNT_RST_SENT);
	if (sk) {
		c = bpf_map_lookup_elem(&conns, &key);
		if (c) {
			apply(&c->key, &d);
			return 0;
		}
		ak = bpf_map_lookup_elem(&aborted, &key);
		if (ak) {
			k = *ak;
			apply(&k, &d);
			return 0;
		}
		state = BPF_CORE_READ(sk, __sk_common.skc_state);
		if (is_full_tcp_state(state) && state != TCP_SYN_SENT) {
			key_untracked(&k, sk);
			apply(&k, &d);
			return 0;
		}
	}
	/* No full socket (a SYN to a closed port, a time-wait or request socket): the RST's
	 * own addresses name it, seen from the side that sends it. */
	count(ML_CNT_RST_SENT_NOSOCK);
	if (!own_type) {
		tuple_from_sk_skb_pre610(&t, raw);
	} else if (bpf_core_field_size(ctx->saddr) == sizeof(sa)) {
		bpf_probe_read_kernel(sa, sizeof(sa), ctx->saddr);
		bpf_probe_read_kernel(da, sizeof(da), ctx->daddr);
		tuple_from_sockaddrs(&t, sa, da);
	}
	k.family = t.family;
	k.direction = ML_DIR_INBOUND;
	k.server_port = t.sport;
	__builtin_memcpy(k.peer, t.daddr, sizeof(k.peer));
	if (sk) {
		k.netns = netns_of(sk);
	} else {
		/* The RST answers this skb: its device's namespace is the socket-less side's. */
		if (skb)
			k.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	}
	apply(&k, &d);
	return 0;
}

/* ---- resets without a full socket, before 6.10 ------------------------------------ */

/* Before 6.10 tcp_v4/v6_send_reset fire tcp_send_reset only for a full socket: the RST
 * that refuses a SYN to a closed port, or answers for a time-wait or request socket, has
 * no record. These hooks count exactly those; the agent attaches them only where the
 * tracepoint has the pre-6.10 layout. The RST goes back to the skb's source. */
static __always_inline int reset_without_full_sock(struct sock *sk, struct sk_buff *skb, int v6)
{
	struct ml_rollup_key k = {};
	struct ml_delta d = {.rsts_sent = 1};
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
	k.server_port = bpf_ntohs(tcp.dest); /* the local port the RST is sent from */
	if (v6) {
		struct ipv6hdr ip6;
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return 0;
		k.family = AF_INET6;
		__builtin_memcpy(k.peer, &ip6.saddr, 16);
	} else {
		struct iphdr ip;
		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
			return 0;
		k.family = AF_INET;
		__builtin_memcpy(k.peer, &ip.saddr, 4);
	}
	if (sk)
		k.netns = netns_of(sk);
	else
		k.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	k.direction = ML_DIR_INBOUND;
	apply(&k, &d);
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
	__u64 key = (__u64)sk;
	struct ml_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ml_delta d = {.rsts_received = 1};
	struct ml_rollup_key k = {};

	count(ML_CNT_RST_RECEIVED);
	if (c) {
		apply(&c->key, &d);
		return 0;
	}
	key_untracked(&k, sk);
	apply(&k, &d);
	return 0;
}
