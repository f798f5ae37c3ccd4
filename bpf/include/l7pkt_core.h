/* l7pkt_core.h — the packet L7 path's core, shared by its two entry points: tc on pod veths
 * (bpf/l7pkt.bpf.c) and cgroup_skb on the cgroup v2 root for traffic no pod veth carries
 * (bpf/l7cg.bpf.c).
 *
 * An entry point fills a `struct pkt` (parse_ip() from the IP header on: the oriented 4-tuple,
 * sequence number, payload span, direction; key.ifindex = what separates equal tuples: the
 * interface for tc, the socket's netns for cgroup_skb), then calls http_segment(),
 * dns_tcp_segment() or dns_message(). Everything after that is the same code: TCP sequence
 * tracking, the HTTP/1.x parser (http_parser.h) on the per-CPU scratch, DNS paired in the
 * kernel (`dns_pending`), the `http_stats` series and the `l7_events` records.
 *
 * Direction: DIR_OUT = bytes the observed side sent (the pod at its veth's host-side ingress,
 * or the socket at cgroup egress), DIR_IN = bytes delivered to it. A side that receives a
 * method is a server, one that sends a method a client.
 */
#ifndef MESHLENS_L7PKT_CORE_H
#define MESHLENS_L7PKT_CORE_H

#define AF_INET 2
#define AF_INET6 10
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define DIR_IN 0   /* delivered to the observed side: tc host-side egress, cgroup ingress */
#define DIR_OUT 1  /* sent by it: tc host-side ingress, cgroup egress */
#define PKT_WINDOWS 48   /* parse windows per segment: pipelined messages each start a window */
#define SCAN_MAX 8192    /* header bytes scanned per run (then a tail call goes on) */

#define PC_SYNC_IN 1     /* next_seq[DIR_IN] is valid */
#define PC_SYNC_OUT 2
#define PC_FIN_IN 4
#define PC_FIN_OUT 8

/* Header bytes one run scans before the rest of the segment goes to a tail call: SCAN_MAX in
 * the agent. The tests lower it: BPF_PROG_TEST_RUN takes no skb over a page, so it is the way
 * to make a frame outlast one run's budget there. */
const volatile __u32 scan_max = SCAN_MAX;

struct pconn {
	struct conn c;
	__u32 next_seq[2];
	__u8 flags;
	__u8 _pad[3];
	__u32 lock;    /* 0, or the owner's stamp (pconn_lock): one CPU at a time parses it */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);       /* resized by the agent before load */
	__type(key, struct ml_pkt_conn_key);
	__type(value, struct pconn);
} pkt_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pconn);
} pconn_scratch SEC(".maps");   /* a new entry is built here: too big for the stack */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pconn);
} pconn_zero SEC(".maps");      /* never written: the zero a new entry starts from */

/* One connection's segments can be parsed on two CPUs at once: a veth delivers each packet
 * on the sending task's CPU (its backlog), so when the sender moves while its old CPU's
 * backlog still holds packets, or ksoftirqd runs them late, two segments of one stream, or
 * a request and a response, meet in this program concurrently. Each copies the connection
 * state into its CPU's scratch, parses, and copies it back: without a lock the second works
 * from state the first has not written yet, and one write-back undoes the other (seen as
 * `bad_start` and lost requests when 50 pipelined responses crossed two CPUs). So a CPU
 * holds the entry's `lock` from its sequence check to its write-back, through the tail
 * calls of a long segment. A bpf_spin_lock cannot be held across bpf_loop or a tail call;
 * this one is a compare-and-swap word, and a CPU that finds it held waits (bounded) for
 * the owner. At tc and cgroup ingress the owner runs in softirq and cannot be descheduled
 * mid-parse; at cgroup egress it runs in the sending task, which only a fully preemptible
 * kernel (PREEMPT, RT) may deschedule there. Either way the wait is bounded.
 *
 * The word holds the owner's clock in µs (never 0): a holder older than LOCK_STALE_US has
 * died without releasing (an LRU eviction under it) and the lock is taken over, counted.
 * A CPU that waited LOCK_SPINS turns in vain leaves its segment unparsed, counted as
 * `pkt_busy`: the stream then shows a gap at its next segment, handled like a lost one. */
#define LOCK_SPINS 16384
#define LOCK_STALE_US 2000

static __always_inline __u32 lock_stamp(void)
{
	return (__u32)(bpf_ktime_get_ns() >> 10) | 1;
}

struct lock_wait {
	__u32 *word;
	__u32 me;
	__u32 got;
};

static long lock_spin(__u32 i, void *ctx)
{
	struct lock_wait *w = ctx;
	__u32 cur = *(volatile __u32 *)w->word, now;

	if (!cur) {
		if (__sync_val_compare_and_swap(w->word, 0, w->me) == 0) {
			w->got = 1;
			return 1;
		}
		return 0;
	}
	if ((i & 1023) == 1023) {
		now = lock_stamp();
		if ((__s32)(now - cur) > LOCK_STALE_US &&
		    __sync_val_compare_and_swap(w->word, cur, now) == cur) {
			w->got = 2;
			return 1;
		}
	}
	return 0;
}

/* 0 when this CPU holds pc's lock, -1 when it stayed busy (counted). */
static __always_inline int pconn_lock(struct pconn *pc)
{
	struct lock_wait w = { .word = &pc->lock, .me = lock_stamp() };

	if (__sync_val_compare_and_swap(&pc->lock, 0, w.me) == 0)
		return 0;
	count(ML_L7_PKT_CONTENDED);
	bpf_loop(LOCK_SPINS, lock_spin, &w, 0);
	if (w.got == 2)
		count(ML_L7_PKT_LOCK_STOLEN);
	if (w.got)
		return 0;
	count(ML_L7_PKT_BUSY);
	return -1;
}

static __always_inline void pconn_unlock(struct pconn *pc)
{
	__sync_lock_test_and_set(&pc->lock, 0);   /* an exchange: ordered after the state writes */
}

/* A zeroed connection entry (per CPU). */
static __always_inline struct pconn *fresh_pconn(void)
{
	__u32 zero = 0;
	struct pconn *pc = bpf_map_lookup_elem(&pconn_scratch, &zero);
	struct pconn *z = bpf_map_lookup_elem(&pconn_zero, &zero);

	/* too big for an inlined memset: one helper copy (CAP_PERFMON, which the agent holds) */
	if (!pc || !z || bpf_probe_read_kernel(pc, sizeof(*pc), z))
		return NULL;
	return pc;
}

/* Wire layouts. */
struct pk_ip4 {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 proto;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

struct pk_ip6 {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct pk_tcp {
	__u16 sport;
	__u16 dport;
	__u32 seq;
	__u32 ack;
	__u8 doff_res;
	__u8 flags;
	__u16 window;
	__u16 check;
	__u16 urg;
};

struct pk_udp {
	__u16 sport;
	__u16 dport;
	__u16 len;
	__u16 check;
};

struct pkt {
	struct ml_pkt_conn_key key;
	__u64 cgroup_id;     /* cgroup_skb: the socket's cgroup v2 id; tc: 0 (a packet names none) */
	__u32 seq;
	__u32 payload_off;
	__u32 payload_len;
	__u8 proto;
	__u8 tcp_flags;
	__u8 dir;
	__u8 _pad;
	char comm[ML_L7_COMM_LEN];  /* cgroup_skb: the socket's creator, when known; tc: empty */
};

/* Who is at either end: the pod behind the interface is `local`. */
static __always_inline void ml_fill_key(struct scratch *sc, struct ml_http_key *k)
{
	k->cgroup_id = sc->pkt_cgroup;  /* tc: 0, the pod is its netns; cgroup_skb: the socket's */
	k->netns = sc->pkt_netns;
	k->family = sc->pkt_family;
	k->role = sc->c.role;
	__builtin_memcpy(k->comm, sc->pkt_comm, sizeof(k->comm));
	if (sc->c.role == ML_ROLE_SERVER) {
		k->server_port = sc->local_port;
		__builtin_memcpy(k->server_addr, sc->local_addr, 16);
		__builtin_memcpy(k->client_addr, sc->peer_addr, 16);
	} else {
		k->server_port = sc->peer_port;
		__builtin_memcpy(k->server_addr, sc->peer_addr, 16);
	}
}

/* The client's end, for tap and overflow records: the peer when the pod serves, else the pod. */
static __always_inline void ml_fill_client(struct scratch *sc, struct ml_http_event *e)
{
	if (sc->c.role == ML_ROLE_SERVER) {
		__builtin_memcpy(e->client_addr, sc->peer_addr, 16);
		e->client_port = sc->peer_port;
	} else {
		__builtin_memcpy(e->client_addr, sc->local_addr, 16);
		e->client_port = sc->local_port;
	}
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
}

/* A header at `off`: straight from the linear head when it lies there (no helper call), else
 * bpf_skb_load_bytes (paged fragments; bounds-checked against skb->len). `len` is constant. */
#define MAX_DIRECT_OFF 128
static __always_inline int ld(struct __sk_buff *skb, __u32 off, void *dst, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= MAX_DIRECT_OFF && data + off + len <= end) {
		__builtin_memcpy(dst, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, dst, len);
}

#define IP6_HOP 0
#define IP6_ROUTING 43
#define IP6_FRAGMENT 44
#define IP6_DSTOPTS 60
#define IP6_EXT_MAX 4    /* extension headers skipped; more is not trusted (pkt_unparsed) */

/* IPv6 extension headers from *l4 on (p->proto = the first next-header): hop-by-hop, routing
 * and destination options are skipped by their length ((len + 1) * 8 bytes), up to
 * IP6_EXT_MAX of them; *l4 and p->proto end at the L4 header. Returns 0, 1 for a fragment
 * (no L7 from fragments, as for IPv4) or -1 when a header is cut off or there are more. */
static __always_inline int skip_ip6_ext(struct __sk_buff *skb, struct pkt *p, __u32 *l4, __u32 end)
{
	__u8 eh[2];
	int i;

#pragma unroll
	for (i = 0; i < IP6_EXT_MAX; i++) {
		if (p->proto == IP6_FRAGMENT) {
			count(ML_L7_PKT_FRAGMENTS);
			return 1;
		}
		if (p->proto != IP6_HOP && p->proto != IP6_ROUTING && p->proto != IP6_DSTOPTS)
			return 0;
		if (*l4 + 8 > end || ld(skb, *l4, eh, 2))
			return -1;
		p->proto = eh[0];
		*l4 += ((__u32)eh[1] + 1) * 8;
	}
	if (p->proto == IP6_FRAGMENT) {
		count(ML_L7_PKT_FRAGMENTS);
		return 1;
	}
	if (p->proto == IP6_HOP || p->proto == IP6_ROUTING || p->proto == IP6_DSTOPTS)
		return -1;
	return 0;
}

/* IPv4 (first fragments) or IPv6 (hop-by-hop, routing and destination options skipped) at `off` (ethertype `proto`, network
 * order), TCP or UDP: the part of the parse both entry points share (tc starts after
 * Ethernet, cgroup_skb at the IP header). Returns 0 when the packet has an L4 payload to
 * look at, 1 when it is nothing for L7, -1 when it cannot be trusted. */
static __always_inline int parse_ip(struct __sk_buff *skb, struct pkt *p, __u32 off, __u16 proto)
{
	struct pk_ip4 ip;
	struct pk_ip6 ip6;
	struct pk_tcp th;
	struct pk_udp uh;
	__u32 end, l4, doff;
	int r;

	__builtin_memset(&p->key, 0, sizeof(p->key));
	if (proto == bpf_htons(ETH_P_IP)) {
		if (ld(skb, off, &ip, sizeof(ip)) || (ip.ver_ihl >> 4) != 4)
			return -1;
		if (bpf_ntohs(ip.frag_off) & 0x3fff) {
			count(ML_L7_PKT_FRAGMENTS);
			return 1; /* fragment (or more to come): no L7 from fragments, counted */
		}
		l4 = off + (ip.ver_ihl & 0x0f) * 4;
		end = off + bpf_ntohs(ip.tot_len);
		if (!ip.tot_len)
			end = skb->len; /* BIG TCP packets say 0 */
		else if (end > skb->len || bpf_ntohs(ip.tot_len) < (ip.ver_ihl & 0x0f) * 4)
			return -1;      /* cut short, or a length that is a lie: nothing to trust */
		p->proto = ip.proto;
		p->key.family = AF_INET;
		if (p->dir == DIR_OUT) {
			__builtin_memcpy(p->key.local_addr, &ip.saddr, 4);
			__builtin_memcpy(p->key.peer_addr, &ip.daddr, 4);
		} else {
			__builtin_memcpy(p->key.local_addr, &ip.daddr, 4);
			__builtin_memcpy(p->key.peer_addr, &ip.saddr, 4);
		}
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (ld(skb, off, &ip6, sizeof(ip6)) || (bpf_ntohl(ip6.ver_tc_flow) >> 28) != 6)
			return -1;
		l4 = off + sizeof(ip6);
		end = l4 + bpf_ntohs(ip6.payload_len);
		if (!ip6.payload_len)
			end = skb->len; /* jumbo / BIG TCP */
		else if (end > skb->len)
			return -1;
		p->proto = ip6.nexthdr;
		r = skip_ip6_ext(skb, p, &l4, end);
		if (r)
			return r;
		p->key.family = AF_INET6;
		if (p->dir == DIR_OUT) {
			__builtin_memcpy(p->key.local_addr, ip6.saddr, 16);
			__builtin_memcpy(p->key.peer_addr, ip6.daddr, 16);
		} else {
			__builtin_memcpy(p->key.local_addr, ip6.daddr, 16);
			__builtin_memcpy(p->key.peer_addr, ip6.saddr, 16);
		}
	} else {
		return 1;
	}
	if (p->proto == IPPROTO_TCP) {
		if (l4 + sizeof(th) > end || ld(skb, l4, &th, sizeof(th)))
			return -1;
		doff = (th.doff_res >> 4) * 4;
		if (doff < sizeof(th) || l4 + doff > end)
			return -1;
		p->seq = bpf_ntohl(th.seq);
		p->tcp_flags = th.flags;
		p->payload_off = l4 + doff;
		p->payload_len = end - p->payload_off;
		if (p->dir == DIR_OUT) {
			p->key.local_port = bpf_ntohs(th.sport);
			p->key.peer_port = bpf_ntohs(th.dport);
		} else {
			p->key.local_port = bpf_ntohs(th.dport);
			p->key.peer_port = bpf_ntohs(th.sport);
		}
		return 0;
	}
	if (p->proto == IPPROTO_UDP) {
		if (l4 + sizeof(uh) > end || ld(skb, l4, &uh, sizeof(uh)))
			return -1;
		p->payload_off = l4 + sizeof(uh);
		p->payload_len = end - p->payload_off;
		if (bpf_ntohs(uh.len) >= sizeof(uh) && bpf_ntohs(uh.len) - sizeof(uh) < p->payload_len)
			p->payload_len = bpf_ntohs(uh.len) - sizeof(uh);
		if (p->dir == DIR_OUT) {
			p->key.local_port = bpf_ntohs(uh.sport);
			p->key.peer_port = bpf_ntohs(uh.dport);
		} else {
			p->key.local_port = bpf_ntohs(uh.dport);
			p->key.peer_port = bpf_ntohs(uh.sport);
		}
		return 0;
	}
	return 1;
}

/* Does the payload at `off` start a request (a method token and a space) or a status line
 * ("HTTP/1.")? 1 = request, 2 = response, 0 = neither. */
static __always_inline int starts_message(struct __sk_buff *skb, __u32 off, __u32 len, int strict)
{
	__u64 w = 0;
	__u32 n = len >= 8 ? 8 : 4;

	if (len < 4)
		n = len;
	if (n == 0)
		return 0;
	/* The size in a form every verifier bounds to [1, 8]. 6.1's does not learn n >= 1 from
	 * `n != 0` (newer ones do), so `n & 7 ? n & 7 : 8` was a possibly zero-sized read to
	 * it; the barrier keeps clang from folding the mask away (it knows n <= 8). */
	barrier_var(n);
	if (bpf_skb_load_bytes(skb, off, &w, ((n - 1) & 7) + 1))
		return 0;
	return ml_start_kind(w, n, strict);
}

/* Load one window of payload at `off` (1..WIN bytes) and run the byte parser over it.
 * Global: verified once, whatever state the caller's loop is in. Returns bytes consumed,
 * 0 when the load failed (the parser then stops quietly). */
__noinline int ml_pkt_window(struct __sk_buff *skb, __u32 off, __u32 n)
{
	struct scratch *sc = get_scratch();
	struct loop_ctx lc;

	if (!sc || !skb || n == 0)
		return 0;
	n = ((n - 1) & (WIN - 1)) + 1;  /* [1, WIN], in a form the verifier follows */
	if (bpf_skb_load_bytes(skb, off, sc->buf, n)) {
		sc->stop = STOP_QUIET;
		return 0;
	}
	sc->pos = 0;
	sc->n = n;
	lc.sc = sc;
	bpf_loop(WIN, step, &lc, 0);
	return sc->pos;
}

/* Parse payload bytes [off, off+len) of the segment as the next bytes of the current stream,
 * up to PKT_WINDOWS windows and SCAN_MAX header bytes. Returns the bytes left unparsed when the
 * budget ran out inside headers (the caller continues them in a tail call, or gives up), else 0. */
__noinline int ml_consume_skb(struct __sk_buff *skb, __u32 off, __u32 len)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	__u32 done = 0, n, scanned = 0;
	int w;

	if (!sc || !skb)
		return 0;
	for (w = 0; w < PKT_WINDOWS; w++) {
		if (done >= len || sc->stop)
			return 0;
		s = sc->is_out ? &sc->c.out : &sc->c.in;
		if (is_skip_state(s->state)) {
			done += skip_body(sc, s, len - done);
			continue;
		}
		n = len - done;
		if (n > WIN)
			n = WIN;
		n = ml_pkt_window(skb, off + done, n);
		done += n;
		scanned += n;
		if (scanned > scan_max)
			break;
	}
	if (done < len && !sc->stop) {
		s = sc->is_out ? &sc->c.out : &sc->c.in;
		if (!is_skip_state(s->state))
			return len - done;
		skip_body(sc, s, len - done);
	}
	return 0;
}

/* The connection state between its map entry and the per-CPU scratch the parser works on:
 * both streams, role and FIFO indexes, and only the FIFO entries in use (none or one on a
 * keep-alive connection). Copying the whole 1.7 KB entry both ways cost ~0.45 µs per data
 * segment (BPF_PROG_TEST_RUN, bench/l7pkt_frames.py); entries outside [head, tail) are
 * never read. */
static __always_inline void conn_copy(struct conn *dst, struct conn *src)
{
	__u8 head = src->head, used = src->tail - src->head;
	__u32 i, idx;

	dst->in = src->in;
	dst->out = src->out;
	dst->role = src->role;
	dst->head = head;
	dst->tail = src->tail;
	for (i = 0; i < FIFO; i++) {
		if (i >= used)
			break;
		idx = (head + i) & (FIFO - 1);
		dst->fifo[idx] = src->fifo[idx];
	}
}

/* The connection ended (RST, or FIN both ways): count what was left unfinished. */
static __always_inline void pconn_gone(struct pconn *pc)
{
	struct conn *c = &pc->c;
	__u8 waiting;

	if (c->role == ML_ROLE_SERVER || c->role == ML_ROLE_CLIENT) {
		waiting = c->tail - c->head;
		if ((c->in.state != S_START && c->in.state <= S_HEADERS) ||
		    (c->out.state != S_START && c->out.state <= S_HEADERS))
			count(ML_L7_ERR_TRUNCATED);
		if (waiting)
			count_n(ML_L7_ERR_NO_RESPONSE, waiting);
	}
}

/* A gap in the headers: nothing said after it can be trusted until a message starts a
 * segment again. Requests still waiting lose their pairing (their responses would be
 * matched to the wrong request), so they are dropped and counted. */
static __always_inline void desync(struct pconn *pc)
{
	struct conn *c = &pc->c;
	__u8 waiting = c->tail - c->head;

	count(ML_L7_PKT_DESYNC);
	if (waiting)
		count_n(ML_L7_ERR_NO_RESPONSE, waiting);
	c->head = c->tail = 0;
	c->in.state = S_START;
	c->out.state = S_START;
	pc->flags &= ~(PC_SYNC_IN | PC_SYNC_OUT);
}

/* A request line whose path spans segments (one-byte writes, a pipelined burst cut at the
 * MSS): the path bytes so far live in the per-CPU scratch, which the next segment of this
 * connection may not find there. The hash that names the route goes on in the connection
 * state; the text, which is sent once per path (`send_path`), would be lost, so the route
 * showed "unknown" until the same path came whole. So the part seen is kept here between the
 * segments, per connection and only while a path is open: no cost to a path in one segment. */
struct path_part {
	char path[ML_PATH_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ml_pkt_conn_key);
	__type(value, struct path_part);
} path_carry SEC(".maps");

/* Before a segment is parsed: the open path's first part back into the scratch. */
static __always_inline void path_restore(struct scratch *sc, struct ml_pkt_conn_key *key)
{
	struct stream *s = sc->is_out ? &sc->c.out : &sc->c.in;
	struct path_part *part;

	sc->path_carried = 0;
	if (!sc->is_req || s->state != S_PATH || !s->path_len)
		return;
	part = bpf_map_lookup_elem(&path_carry, key);
	if (!part)
		return;   /* evicted: the route's text waits for this path to come whole */
	__builtin_memcpy(sc->path, part->path, ML_PATH_MAX);
	sc->path_carried = 1;
}

/* After it: a path still open at its end is kept for the next segment; else forgotten. */
static __always_inline void path_save(struct scratch *sc, struct ml_pkt_conn_key *key, __u8 had)
{
	struct stream *s = sc->is_out ? &sc->c.out : &sc->c.in;

	if (sc->is_req && s->state == S_PATH && s->path_len) {
		bpf_map_update_elem(&path_carry, key, sc->path, BPF_ANY);
		return;
	}
	if (had)
		bpf_map_delete_elem(&path_carry, key);
}

/* A segment whose headers outlast one program's budget (a GSO super-packet of 50 pipelined
 * responses) goes on in a tail call: the continuation (the entry point's `pkt_cont_out` /
 * `pkt_cont_in` program arrays, entry 0) takes the connection state from the per-CPU scratch,
 * where it is, and the rest of the segment from here. At most PKT_TAILS continuations per
 * segment, then `scan_budget` as before. */
#define PKT_TAILS 8

struct pkt_cont {
	struct ml_pkt_conn_key key;
	__u32 off;     /* where the rest starts */
	__u32 len;     /* its length; 0 = no continuation pending */
	__u8 dir;
	__u8 flags;    /* the segment's TCP flags (FIN/RST handled after the last part) */
	__u8 tails;    /* continuations so far */
	__u8 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pkt_cont);
} pkt_cont SEC(".maps");

/* End of a segment, with pc's lock held: FIN and RST, after its payload; then the lock is
 * released (before the entry goes, so no CPU waits on a deleted one). */
static __always_inline void segment_flags(struct pconn *pc, struct ml_pkt_conn_key *key, __u8 dir, __u8 f)
{
	__u8 finbit = dir == DIR_OUT ? PC_FIN_OUT : PC_FIN_IN;

	if (f & TCP_FIN) {
		pc->next_seq[dir & 1] += 1;
		pc->flags |= finbit;
	}
	if ((f & TCP_RST) || (pc->flags & (PC_FIN_IN | PC_FIN_OUT)) == (PC_FIN_IN | PC_FIN_OUT)) {
		pconn_gone(pc);
		pconn_unlock(pc);
		bpf_map_delete_elem(&pkt_conns, key);
		return;
	}
	pconn_unlock(pc);
}

/* The rest of a segment in a tail call; returns only if it could not be made (then the
 * caller gives up on the headers, counted as `scan_budget`). */
static __always_inline void continue_segment(struct __sk_buff *skb, struct pkt_cont *pk, __u32 off, __u32 rest,
					     __u8 dir)
{
	pk->off = off;
	pk->len = rest;
	pk->tails += 1;
	if (pk->tails > PKT_TAILS) {
		pk->len = 0;
		return;
	}
	/* `dir` is a constant here: each program references only its own direction's array */
	if (dir == DIR_OUT)
		bpf_tail_call(skb, &pkt_cont_out, 0);
	else
		bpf_tail_call(skb, &pkt_cont_in, 0);
	pk->len = 0;
}

/* The continuation program's body (`dir`: its constant direction): parse the rest, continue
 * again or write the state back. */
static __always_inline int segment_continued(struct __sk_buff *skb, __u8 dir)
{
	__u32 zero = 0, len, off, rest;
	struct pkt_cont *pk = bpf_map_lookup_elem(&pkt_cont, &zero);
	struct scratch *sc = get_scratch();
	struct pconn *pc;

	if (!pk || !pk->len || pk->dir != dir)
		return 0;   /* no segment handed over: no lock is held for it */
	len = pk->len;
	off = pk->off;
	pk->len = 0;
	if (sc) {
		rest = ml_consume_skb(skb, off, len);
		if (rest) {
			continue_segment(skb, pk, off + len - rest, rest, dir);
			giveup(sc, ML_L7_ERR_SCAN_BUDGET);
		}
		path_save(sc, &pk->key, sc->path_carried);
	}
	pc = bpf_map_lookup_elem(&pkt_conns, &pk->key);
	if (!pc)
		return 0;
	if (sc)
		conn_copy(&pc->c, &sc->c);
	segment_flags(pc, &pk->key, dir, pk->flags);   /* releases the lock the first part took */
	return 0;
}

/* `dir` is the entry point's constant (p->dir, which the compiler cannot fold after p went
 * through a non-inlined parse): the tail call below must name one program array per program. */
static __always_inline void http_segment(struct __sk_buff *skb, struct pkt *p, __u32 netns, const __u8 dir)
{
	struct scratch *sc;
	struct pconn *pc;
	struct stream *s;
	__u32 off = p->payload_off, len = p->payload_len;
	__u8 syncbit = dir == DIR_OUT ? PC_SYNC_OUT : PC_SYNC_IN;
	__u8 finbit = dir == DIR_OUT ? PC_FIN_OUT : PC_FIN_IN;
	__u8 f = p->tcp_flags;
	__u32 seq = p->seq, skip = 0;
	__s32 delta;

	if (len == 0 && !(f & (TCP_SYN | TCP_FIN | TCP_RST)))
		return; /* a pure ACK: nothing for L7, and no lookup */
	pc = bpf_map_lookup_elem(&pkt_conns, &p->key);
	if (f & TCP_SYN) {
		/* SYN: a new connection (the 4-tuple may be reused), both directions afresh;
		 * SYN-ACK: the answering direction starts here */
		struct pconn *fresh;

		if (pc && (f & TCP_ACK)) {
			pc->next_seq[dir & 1] = seq + 1;
			pc->flags |= syncbit;
			return;
		}
		if (pc)
			pconn_gone(pc);
		fresh = fresh_pconn();
		if (!fresh)
			return;
		fresh->next_seq[dir & 1] = seq + 1;
		fresh->flags = syncbit;
		if (bpf_map_update_elem(&pkt_conns, &p->key, fresh, BPF_ANY))
			count(ML_L7_CONNS_FULL);
		return;
	}
	if (pc && (pc->c.role == ML_ROLE_NOT_HTTP || pc->c.role == ML_ROLE_DEAD)) {
		if (f & TCP_RST || ((pc->flags | finbit) & (PC_FIN_IN | PC_FIN_OUT)) == (PC_FIN_IN | PC_FIN_OUT))
			bpf_map_delete_elem(&pkt_conns, &p->key);
		else if (f & TCP_FIN)
			pc->flags |= finbit;
		return;
	}
	if (!pc && len == 0)
		return;
	if (len == 0) {
		if (pconn_lock(pc))
			return;
		goto flags;
	}
	count(ML_L7_PKT_SEGMENTS);
	if (!pc) {
		/* the handshake was not seen (connection older than the agent, or an LRU eviction):
		 * follow it from a segment that starts a request; a response first tells nothing */
		struct pconn *fresh;

		if (starts_message(skb, off, len, 1) != 1)
			return;
		fresh = fresh_pconn();
		if (!fresh)
			return;
		fresh->c.role = dir == DIR_OUT ? ML_ROLE_CLIENT : ML_ROLE_SERVER;
		fresh->next_seq[dir & 1] = seq;
		fresh->flags = syncbit;
		if (bpf_map_update_elem(&pkt_conns, &p->key, fresh, BPF_ANY)) {
			count(ML_L7_CONNS_FULL);
			return;
		}
		pc = bpf_map_lookup_elem(&pkt_conns, &p->key);
		if (!pc)
			return;
	}
	/* from the sequence check to the write-back (segment_flags), this CPU alone */
	if (pconn_lock(pc))
		return;
	if (pc->c.role == ML_ROLE_UNKNOWN) {
		/* first payload after a handshake we saw: decide what this connection is */
		if (starts_message(skb, off, len, 0) == 1) {
			pc->c.role = dir == DIR_OUT ? ML_ROLE_CLIENT : ML_ROLE_SERVER;
		} else {
			pc->c.role = ML_ROLE_NOT_HTTP;
			count(ML_L7_ERR_NOT_HTTP);
			pconn_unlock(pc);
			return;
		}
	}
	if (pc->flags & syncbit) {
		delta = (__s32)(seq - pc->next_seq[dir & 1]);
		if (delta < 0) {
			if ((__u32)(-delta) >= len) {
				count(ML_L7_PKT_RETRANSMITS);
				goto flags;
			}
			count(ML_L7_PKT_OVERLAPS);
			skip = -delta;
		} else if (delta > 0) {
			s = dir == DIR_OUT ? &pc->c.out : &pc->c.in;
			if ((s->state == S_BODY || s->state == S_CHUNK_DATA) && s->remaining > (__u64)delta) {
				/* the hole is body bytes we would only have skipped */
				count(ML_L7_PKT_GAP_IN_BODY);
				s->remaining -= delta;
				s->body_bytes += delta;
			} else if (s->state == S_EOF) {
				count(ML_L7_PKT_GAP_IN_BODY);
			} else {
				desync(pc);
			}
		}
	}
	if (!(pc->flags & syncbit)) {
		/* resynchronise only where this direction starts a message it may carry */
		int want = ((pc->c.role == ML_ROLE_SERVER) == (dir == DIR_IN)) ? 1 : 2;

		if (starts_message(skb, off, len, 1) != want)
			goto flags;
		count(ML_L7_PKT_RESYNC);
		pc->flags |= syncbit;
		s = dir == DIR_OUT ? &pc->c.out : &pc->c.in;
		s->state = S_START;
		skip = 0;
	}
	pc->next_seq[dir & 1] = seq + len;

	/* A segment wholly inside a body (or of a stream no longer followed) changes two
	 * counters: done in place, without copying the connection state in and out. */
	s = dir == DIR_OUT ? &pc->c.out : &pc->c.in;
	if (s->state == S_EOF)
		goto flags;
	if ((s->state == S_BODY || s->state == S_CHUNK_DATA) && s->remaining > len - skip) {
		s->remaining -= len - skip;
		s->body_bytes += len - skip;
		goto flags;
	}

	sc = get_scratch();
	if (!sc) {
		pconn_unlock(pc);
		return;
	}
	conn_copy(&sc->c, &pc->c);
	sc->sk = 0;
	sc->now = bpf_ktime_get_ns();
	sc->stop = STOP_NONE;
	sc->is_out = dir == DIR_OUT;
	sc->is_req = (sc->c.role == ML_ROLE_SERVER) != (dir == DIR_OUT);
	sc->lenient = 0;
	__builtin_memcpy(sc->local_addr, p->key.local_addr, 16);
	__builtin_memcpy(sc->peer_addr, p->key.peer_addr, 16);
	sc->local_port = p->key.local_port;
	sc->peer_port = p->key.peer_port;
	sc->pkt_family = p->key.family;
	sc->pkt_netns = netns;
	sc->pkt_cgroup = p->cgroup_id;
	__builtin_memcpy(sc->pkt_comm, p->comm, sizeof(sc->pkt_comm));
	path_restore(sc, &p->key);
	if (skip < len) {
		__u32 rest = ml_consume_skb(skb, off + skip, len - skip);

		if (rest) {
			__u32 zero = 0;
			struct pkt_cont *pk = bpf_map_lookup_elem(&pkt_cont, &zero);

			if (pk) {
				__builtin_memcpy(&pk->key, &p->key, sizeof(pk->key));
				pk->dir = dir;
				pk->flags = f;
				pk->tails = 0;
				continue_segment(skb, pk, off + len - rest, rest, dir);
			}
			giveup(sc, ML_L7_ERR_SCAN_BUDGET);
		}
	}
	path_save(sc, &p->key, sc->path_carried);
	pc = bpf_map_lookup_elem(&pkt_conns, &p->key);
	if (!pc)
		return;
	conn_copy(&pc->c, &sc->c);
flags:
	segment_flags(pc, &p->key, dir, f);
}

/* FNV-1a over the connection key: the event's `sk` (which exchange a record belongs to). */
static __always_inline __u64 key_hash(struct ml_pkt_conn_key *k)
{
	__u64 h = 14695981039346656037ULL;
	__u32 *w = (__u32 *)k;
	int i;

#pragma unroll
	for (i = 0; i < (int)(sizeof(*k) / 4); i++)
		h = (h ^ w[i]) * 1099511628211ULL;
	return h;
}

#define DNS_NAME_MAX 255

/* The first question (name, type, class) of the DNS message in the scratch buffer, n bytes:
 * its length and FNV-1a hash go to sc->dns_qlen / dns_qhash. Returns 0, or -1 when there is
 * none or it cannot be read (QDCOUNT 0, a compressed or reserved label, a name past the end
 * or longer than 255 bytes). One byte per iteration, and global (verified once): a loop whose
 * exits the verifier had to follow into the caller would multiply its work. */
__noinline int ml_dns_question(__u32 n)
{
	struct scratch *sc = get_scratch();
	__u32 i, o, next = 12, end = 0, h = FNV_OFFSET;
	__u8 c;

	if (!sc || n > WIN || (!sc->buf[4] && !sc->buf[5]))
		return -1;
	for (i = 0; i < DNS_NAME_MAX; i++) {
		o = 12 + i;
		if (o >= n)
			return -1;
		c = sc->buf[o & (WIN - 1)];
		h = (h ^ c) * FNV_PRIME;
		if (o == next) {      /* a label's length */
			if (c == 0) {
				end = o + 1;
				break;
			}
			if (c & 0xc0)
				return -1;
			next = o + c + 1;
		}
	}
	if (!end || end + 4 > n)
		return -1;
	for (i = 0; i < 4; i++)   /* QTYPE, QCLASS */
		h = (h ^ sc->buf[(end + i) & (WIN - 1)]) * FNV_PRIME;
	sc->dns_qlen = end + 4 - 12;
	sc->dns_qhash = h;
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);  /* not LRU: a query that finds no room is counted */
	__uint(max_entries, 4096);
	__type(key, struct ml_dns_pending_key);
	__type(value, struct ml_dns_pending);
} dns_pending SEC(".maps");

/* Whether a flow-stream client follows (the tap switch, tap_ctl, is on): then queries go to
 * user space too (ML_DNS_ASKED), so one that is never answered can be named. */
static __always_inline int dns_tap_on(void)
{
	__u32 idx = 0;
	__u32 *tap = bpf_map_lookup_elem(&tap_ctl, &idx);

	return tap && *tap;
}

/* One DNS record to user space: the message's first `m` bytes ([1, ML_DNS_MAX]) at `off`. */
static __always_inline void dns_record(struct __sk_buff *skb, struct pkt *p, __u32 netns, __u32 off, __u32 m,
				       __u8 dir, __u64 now, __u64 dur)
{
	struct ml_dns_event *e = bpf_ringbuf_reserve(&l7_events, sizeof(*e), 0);

	if (!e) {
		count(ML_L7_RINGBUF_FULL);
		return;
	}
	if (bpf_skb_load_bytes(skb, off, e->payload, m)) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	e->type = ML_EV_DNS;
	e->len = m;
	e->ts_ns = now;
	e->sk = key_hash(&p->key);
	e->duration_ns = dur;
	e->cgroup_id = p->cgroup_id;
	e->netns = netns;
	e->tgid = 0;
	__builtin_memcpy(e->server_addr, p->key.peer_addr, 16);
	e->server_port = 53;
	e->family = p->key.family;
	e->dir = dir;
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
	__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	__builtin_memcpy(e->client_addr, p->key.local_addr, 16);
	e->client_port = p->key.local_port;
	__builtin_memset(e->_pad1, 0, sizeof(e->_pad1));
	bpf_ringbuf_submit(e, 0);
	count(ML_L7_DNS_EVENTS);
	count(ML_L7_EVENTS_SUBMITTED);
}

/* One DNS message at payload offset `off`, `n` bytes (UDP datagram, or a TCP segment's message
 * after its 2-byte length). A query the pod sends waits in `dns_pending` under (tuple, id);
 * the answer delivered to the pod is paired with it here, if it repeats the question, and
 * goes to user space once, with the latency, for names and response codes. */
static __noinline void dns_message(struct __sk_buff *skb, struct pkt *p, __u32 netns, __u32 off, __u32 n)
{
	struct ml_dns_pending_key k = {};
	struct ml_dns_pending v = {}, *waiting;
	struct scratch *sc;
	__u32 qlen = 0, qhash = 0, m;
	__u64 now, dur;
	int query;

	if (p->dir == DIR_OUT && p->key.peer_port == 53)
		query = 1;
	else if (p->dir == DIR_IN && p->key.peer_port == 53)
		query = 0;
	else
		return;
	if (n < 12) {
		count(ML_L7_DNS_MALFORMED);
		return;
	}
	if (n > ML_DNS_MAX) {
		count(ML_L7_DNS_TRUNCATED);
		n = ML_DNS_MAX;
	}
	sc = get_scratch();
	if (!sc)
		return;
	m = ((n - 1) & (ML_DNS_MAX - 1)) + 1;  /* [1, ML_DNS_MAX] for the verifier */
	if (bpf_skb_load_bytes(skb, off, sc->buf, m))
		return;
	/* QR must say what the direction says; the question must be readable */
	if (((sc->buf[2] & 0x80) != 0) == query || ml_dns_question(m)) {
		/* over TCP this is also what the rest of a long message looks like */
		count(p->proto == IPPROTO_TCP ? ML_L7_DNS_TCP_SKIPPED : ML_L7_DNS_MALFORMED);
		return;
	}
	qlen = sc->dns_qlen;
	qhash = sc->dns_qhash;
	now = bpf_ktime_get_ns();
	__builtin_memcpy(&k.conn, &p->key, sizeof(k.conn));
	k.txid = ((__u16)sc->buf[0] << 8) | sc->buf[1];
	k.proto = p->proto;
	if (query) {
		v.ts_ns = now;
		v.qhash = qhash;
		v.qlen = qlen;
		count(ML_L7_DNS_QUERIES);
		if (bpf_map_update_elem(&dns_pending, &k, &v, BPF_ANY)) {
			count(ML_L7_DNS_PENDING_FULL);
			return;
		}
		if (dns_tap_on())
			dns_record(skb, p, netns, off, m, ML_DNS_ASKED, now, 0);
		return;
	}
	waiting = bpf_map_lookup_elem(&dns_pending, &k);
	if (!waiting || waiting->qhash != qhash || waiting->qlen != qlen) {
		count(ML_L7_DNS_UNMATCHED);
		return;
	}
	dur = now > waiting->ts_ns ? now - waiting->ts_ns : 0;
	bpf_map_delete_elem(&dns_pending, &k);
	dns_record(skb, p, netns, off, m, ML_DNS_ANSWERED, now, dur);
}

/* DNS over TCP, where a message starts the segment: its 2-byte length, then the message
 * (only the first of several in one segment; its question must be in this segment). A
 * segment that does not start one (the rest of a long answer) is counted and skipped. */
static __always_inline void dns_tcp_segment(struct __sk_buff *skb, struct pkt *p, __u32 netns)
{
	__u16 len = 0;
	__u32 n;

	if (p->payload_len == 0)
		return;   /* handshake, FIN, RST: nothing to pair */
	if (p->payload_len < 2 + 12 || bpf_skb_load_bytes(skb, p->payload_off, &len, 2)) {
		count(ML_L7_DNS_TCP_SKIPPED);
		return;
	}
	n = bpf_ntohs(len);
	if (n < 12) {
		count(ML_L7_DNS_TCP_SKIPPED);
		return;
	}
	if (n > p->payload_len - 2)
		n = p->payload_len - 2;   /* the message goes on in the next segment */
	dns_message(skb, p, netns, p->payload_off + 2, n);
}

#endif
