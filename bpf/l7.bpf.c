// SPDX-License-Identifier: GPL-2.0
/* l7.bpf.c — HTTP/1.x and DNS golden signals from syscall tracepoints.
 *
 * Kernel side of the L7 pipeline (agent/http_source.py, agent/dns_source.py read it).
 *
 * Capture: sys_enter_* of read, write, recvfrom, sendto, recvmsg, sendmsg, readv, writev and
 * sendmmsg stash the buffer arguments of calls on TCP/UDP sockets (fd -> file -> socket -> sock
 * resolved with CO-RE); sys_exit_* reads the bytes that were really transferred (ret > 0) with
 * bpf_probe_read_user. close() and inet_sock_set_state(CLOSE) end a connection's state.
 *
 * HTTP (TCP): one state per connection (`http_conns`, keyed by struct sock pointer) with a
 * byte-level parser for each direction: request line / status line, headers (Content-Length,
 * Transfer-Encoding: chunked), bodies (Content-Length, chunked, until close), so keep-alive,
 * pipelining, bodies split over reads and bodies that start with a method all count right.
 * The role comes from the first bytes: reading a method = server, writing one = client.
 * Requests wait in a small per-connection FIFO until their final response (1xx are not
 * final); latency is first request byte read -> first response byte written (server) or
 * request written -> first response byte read (client). Each finished request is added to
 * `http_stats` (count, sums, exact OTel-bucket histograms); if the map is full it goes to the
 * ring buffer as an overflow record. A path's text goes through the ring buffer once per
 * path id. Every parser give-up is counted in `l7_counters`.
 *
 * The server's response direction is parsed leniently: bodies sent with sendfile/splice never
 * appear in write syscalls, so a write that starts a new response ends any body in progress.
 *
 * DNS (UDP): queries sent to port 53 and responses read on the same sockets go to user space
 * as ring-buffer records (DNS rates are low); user space pairs them by (socket, txid).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "http_parser.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define MSG_PEEK 2
#define S_IFMT 00170000
#define S_IFSOCK 0140000

#define MAX_IOV 4             /* iovecs followed per readv/writev/recvmsg/sendmsg */
#define MAX_MMSG 4            /* messages followed per sendmmsg */

/* Knob, set by the agent before load. */
const volatile __u32 self_tgid = 0;      /* the agent itself is not observed */
/* The kernel has the bpf_rdonly_cast kfunc (6.2+). Without it (6.1) the same socket fields
 * are read with bpf_probe_read_kernel, one helper call each; the verifier drops the branch
 * this value rules out. */
const volatile __u32 have_rdonly_cast = 1;

/* ---- private structs (kernel only) ----------------------------------------------- */

enum arg_kind { K_BUF = 1, K_IOV = 2, K_MSG = 3, K_MMSG = 4 };

struct l7_args {
	__u64 sk;
	__u64 buf;   /* buffer, iovec array, msghdr or mmsghdr array */
	__u64 addr;  /* sendto/recvfrom sockaddr */
	__u32 vlen;
	__u8 kind;
	__u8 is_write;
	__u16 proto;
};

/* ---- maps ------------------------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);             /* pid_tgid */
	__type(value, struct l7_args);
} l7_args SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);     /* resized by the agent before load */
	__type(key, __u64);             /* struct sock pointer */
	__type(value, struct conn);
} http_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);             /* UDP sockets that sent a DNS query */
	__type(value, __u8);
} dns_socks SEC(".maps");

/* Network namespaces whose pod veth the packet path (l7pkt.bpf.c) parses: their sockets'
 * traffic to non-loopback peers is counted there, so it is skipped here (counted once). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);             /* netns inode */
	__type(value, __u8);
} pkt_netns SEC(".maps");

static __always_inline int is_loopback(__u16 family, const __u8 *a)
{
	if (family == AF_INET)
		return a[0] == 127;
	/* ::1, or ::ffff:127.x.y.z */
	if (*(__u64 *)a != 0)
		return 0;
	if (*(__u32 *)(a + 8) == 0 && *(__u32 *)(a + 12) == bpf_htonl(1))
		return 1;
	return *(__u32 *)(a + 8) == bpf_htonl(0xffff) && a[12] == 127;
}

static __always_inline int is_unspecified(__u16 family, const __u8 *a)
{
	if (family == AF_INET)
		return *(__u32 *)a == 0;
	return *(__u64 *)a == 0 && *(__u64 *)(a + 8) == 0;
}

/* Is this peer, for a socket in netns, reached through a pod veth the packet path parses? */
static __always_inline int seen_by_packets(__u32 netns, __u16 family, const __u8 *peer)
{
	if (!bpf_map_lookup_elem(&pkt_netns, &netns))
		return 0;
	return !is_loopback(family, peer) && !is_unspecified(family, peer);
}

/* ---- fd -> sock ------------------------------------------------------------------- */

/* Weak: on kernels without it libbpf leaves the call unresolved, and have_rdonly_cast = 0
 * makes every call to it dead code. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

/* fd -> struct sock with direct (BTF, fault-safe) loads instead of one helper call per
 * pointer: this runs at every read/write-family syscall on the node, sockets or not. */
static __always_inline struct sock *fd_to_sock(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file *file = NULL, *f;
	struct socket *sock;

	if (fd < 0 || (__u32)fd >= fdt->max_fds)
		return NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fdt->fd[fd]) || !file)
		return NULL;
	if (!have_rdonly_cast) {
		if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
			return NULL;
		sock = BPF_CORE_READ(file, private_data);
		return BPF_CORE_READ(sock, sk);
	}
	f = bpf_rdonly_cast(file, bpf_core_type_id_kernel(struct file));
	if ((f->f_inode->i_mode & S_IFMT) != S_IFSOCK)
		return NULL;
	sock = bpf_rdonly_cast(f->private_data, bpf_core_type_id_kernel(struct socket));
	return sock->sk;
}

static __always_inline int stash(void *ctx, int fd, __u64 buf, __u64 addr, __u32 vlen, __u8 kind, __u8 is_write)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_args a = {};
	struct sock *sk;
	__u16 family, proto;
	__u64 key;

	if (self_tgid && (id >> 32) == self_tgid)
		return 0;
	sk = fd_to_sock(fd);
	if (!sk)
		return 0;
	if (have_rdonly_cast) {
		family = sk->__sk_common.skc_family;
		proto = sk->sk_protocol;
	} else {
		family = BPF_CORE_READ(sk, __sk_common.skc_family);
		proto = BPF_CORE_READ(sk, sk_protocol);
	}
	if (family != AF_INET && family != AF_INET6)
		return 0;
	{
		__u8 peer[16] = {};
		__u32 netns;

		if (have_rdonly_cast) {
			netns = sk->__sk_common.skc_net.net->ns.inum;
			if (family == AF_INET)
				*(__u32 *)peer = sk->__sk_common.skc_daddr;
			else
				__builtin_memcpy(peer, &sk->__sk_common.skc_v6_daddr, 16);
		} else {
			netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
			if (family == AF_INET)
				BPF_CORE_READ_INTO((__u32 *)peer, sk, __sk_common.skc_daddr);
			else
				BPF_CORE_READ_INTO(&peer, sk, __sk_common.skc_v6_daddr);
		}
		if (seen_by_packets(netns, family, peer))
			return 0;
	}
	if (proto == IPPROTO_TCP) {
		key = (__u64)sk;
		struct conn *c = bpf_map_lookup_elem(&http_conns, &key);
		if (c && (c->role == ML_ROLE_NOT_HTTP || c->role == ML_ROLE_DEAD))
			return 0; /* cheap exit for connections we gave up on */
		if (kind == K_MMSG)
			return 0;
	} else if (proto != IPPROTO_UDP) {
		return 0;
	}
	a.sk = (__u64)sk;
	a.buf = buf;
	a.addr = addr;
	a.vlen = vlen;
	a.kind = kind;
	a.is_write = is_write;
	a.proto = proto;
	if (bpf_map_update_elem(&l7_args, &id, &a, BPF_ANY))
		count(ML_L7_ARGS_FULL);
	return 0;
}

/* fill_key without bpf_rdonly_cast: the same fields through bpf_probe_read_kernel. */
static __always_inline void fill_key_probe_read(struct ml_http_key *k, struct sock *sk, __u8 role)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	k->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	k->family = family;
	k->role = role;
	if (role == ML_ROLE_SERVER) {
		k->server_port = BPF_CORE_READ(sk, __sk_common.skc_num);
		if (family == AF_INET) {
			BPF_CORE_READ_INTO((__u32 *)k->server_addr, sk, __sk_common.skc_rcv_saddr);
			BPF_CORE_READ_INTO((__u32 *)k->client_addr, sk, __sk_common.skc_daddr);
		} else {
			BPF_CORE_READ_INTO(&k->server_addr, sk, __sk_common.skc_v6_rcv_saddr);
			BPF_CORE_READ_INTO(&k->client_addr, sk, __sk_common.skc_v6_daddr);
		}
	} else {
		k->server_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (family == AF_INET)
			BPF_CORE_READ_INTO((__u32 *)k->server_addr, sk, __sk_common.skc_daddr);
		else
			BPF_CORE_READ_INTO(&k->server_addr, sk, __sk_common.skc_v6_daddr);
	}
}

static __always_inline void ml_fill_key(struct scratch *sc, struct ml_http_key *k)
{
	__u64 skp = sc->sk;
	__u8 role = sc->c.role;
	struct sock *sk;
	struct sock_common *c;
	__u16 family;

	k->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&k->comm, sizeof(k->comm));
	if (!have_rdonly_cast) {
		fill_key_probe_read(k, (struct sock *)skp, role);
		return;
	}
	sk = bpf_rdonly_cast((void *)skp, bpf_core_type_id_kernel(struct sock));
	c = &sk->__sk_common;
	family = c->skc_family;
	k->netns = c->skc_net.net->ns.inum;
	k->family = family;
	k->role = role;
	if (role == ML_ROLE_SERVER) {
		k->server_port = c->skc_num;
		if (family == AF_INET) {
			*(__u32 *)k->server_addr = c->skc_rcv_saddr;
			*(__u32 *)k->client_addr = c->skc_daddr;
		} else {
			__builtin_memcpy(k->server_addr, &c->skc_v6_rcv_saddr, 16);
			__builtin_memcpy(k->client_addr, &c->skc_v6_daddr, 16);
		}
	} else {
		k->server_port = bpf_ntohs(c->skc_dport);
		if (family == AF_INET)
			*(__u32 *)k->server_addr = c->skc_daddr;
		else
			__builtin_memcpy(k->server_addr, &c->skc_v6_daddr, 16);
	}
}

/* The client's end, for tap and overflow records (rare: helper reads are fine): the peer
 * when this socket serves, else the socket's own address and port. */
static __always_inline void ml_fill_client(struct scratch *sc, struct ml_http_event *e)
{
	struct sock *sk = (struct sock *)sc->sk;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	__builtin_memset(e->client_addr, 0, sizeof(e->client_addr));
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
	if (sc->c.role == ML_ROLE_SERVER) {
		e->client_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (family == AF_INET)
			BPF_CORE_READ_INTO((__u32 *)e->client_addr, sk, __sk_common.skc_daddr);
		else
			BPF_CORE_READ_INTO(&e->client_addr, sk, __sk_common.skc_v6_daddr);
	} else {
		e->client_port = BPF_CORE_READ(sk, __sk_common.skc_num);
		if (family == AF_INET)
			BPF_CORE_READ_INTO((__u32 *)e->client_addr, sk, __sk_common.skc_rcv_saddr);
		else
			BPF_CORE_READ_INTO(&e->client_addr, sk, __sk_common.skc_v6_rcv_saddr);
	}
}

/* Parse one contiguous user buffer of `len` bytes as the next bytes of the stream. */
/* Copy one window of user memory (1..WIN bytes) and run the byte parser over it. Global:
 * verified once, whatever state the caller's loop is in. Returns bytes consumed. */
__noinline int ml_user_window(__u64 ptr, __u64 n)
{
	struct scratch *sc = get_scratch();
	struct loop_ctx lc;

	if (!sc || n == 0)
		return 0;
	n = ((n - 1) & (WIN - 1)) + 1;
	if (bpf_probe_read_user(sc->buf, n, (void *)ptr)) {
		sc->stop = STOP_QUIET; /* unreadable user memory: leave the stream as it is */
		return 0;
	}
	sc->pos = 0;
	sc->n = n;
	lc.sc = sc;
	bpf_loop(WIN, step, &lc, 0);
	return sc->pos;
}

__noinline int ml_consume(__u64 ptr, __u64 len)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	__u64 off = 0, n;
	int w;

	if (!sc)
		return 0;
	for (w = 0; w < MAX_WINDOWS; w++) {
		if (off >= len || sc->stop)
			return 0;
		s = sc->is_out ? &sc->c.out : &sc->c.in;
		if (is_skip_state(s->state)) {
			off += skip_body(sc, s, len - off);
			continue;
		}
		n = len - off;
		if (n > WIN)
			n = WIN;
		off += ml_user_window(ptr + off, n);
	}
	if (off < len && !sc->stop) {
		s = sc->is_out ? &sc->c.out : &sc->c.in;
		if (!is_skip_state(s->state))
			giveup(sc, ML_L7_ERR_SCAN_BUDGET);
	}
	return 0;
}

/* Classify the first bytes of a connection not seen before. */
static __always_inline __u8 classify(__u64 ptr, __u64 len, __u8 is_write)
{
	__u64 w = 0;
	__u32 n = len >= 8 ? 8 : 4;

	if (len < 4 || bpf_probe_read_user(&w, n, (void *)ptr))
		return ML_ROLE_NOT_HTTP;
	switch (ml_start_kind(w, n, 0)) {
	case 1:
		return is_write ? ML_ROLE_CLIENT : ML_ROLE_SERVER;
	case 2: /* a response first: the connection predates us */
		return ML_ROLE_UNKNOWN;
	}
	return ML_ROLE_NOT_HTTP;
}

/* Segment i of the syscall's data: pointer and length (0 when there is none). */
static __always_inline __u64 segment(struct l7_args *a, __u32 i, __u64 *len_out)
{
	__u64 iov = 0, base = 0, ilen = 0;
	__u64 iovlen = 0;

	*len_out = 0;
	if (a->kind == K_BUF) {
		if (i)
			return 0;
		*len_out = ~0ULL;
		return a->buf;
	}
	if (a->kind == K_IOV) {
		iov = a->buf;
		iovlen = a->vlen;
	} else if (a->kind == K_MSG) {
		bpf_probe_read_user(&iov, sizeof(iov), (void *)(a->buf + 16));
		bpf_probe_read_user(&iovlen, sizeof(iovlen), (void *)(a->buf + 24));
	}
	if (!iov || i >= iovlen)
		return 0;
	bpf_probe_read_user(&base, sizeof(base), (void *)(iov + i * 16));
	bpf_probe_read_user(&ilen, sizeof(ilen), (void *)(iov + i * 16 + 8));
	*len_out = ilen;
	return base;
}

static __always_inline void http_exit(struct l7_args *a, __u64 ret)
{
	struct scratch *sc = get_scratch();
	__u64 key = a->sk, left = ret, ptr, slen;
	struct conn *c;
	__u8 role;
	__u32 i;

	if (!sc)
		return;
	count(ML_L7_SYSCALLS);
	c = bpf_map_lookup_elem(&http_conns, &key);
	if (c) {
		if (c->role == ML_ROLE_NOT_HTTP || c->role == ML_ROLE_DEAD)
			return;
		__builtin_memcpy(&sc->c, c, sizeof(sc->c));
	} else {
		ptr = segment(a, 0, &slen);
		if (slen > ret)
			slen = ret;
		role = classify(ptr, slen, a->is_write);
		if (role == ML_ROLE_UNKNOWN)
			return;
		__builtin_memset(&sc->c, 0, sizeof(sc->c));
		sc->c.role = role;
		if (role == ML_ROLE_NOT_HTTP) {
			count(ML_L7_ERR_NOT_HTTP);
			if (bpf_map_update_elem(&http_conns, &key, &sc->c, BPF_ANY))
				count(ML_L7_CONNS_FULL);
			return;
		}
	}
	sc->sk = key;
	sc->now = bpf_ktime_get_ns();
	sc->stop = STOP_NONE;
	sc->is_out = a->is_write;
	sc->is_req = (sc->c.role == ML_ROLE_SERVER) != (a->is_write != 0);
	sc->lenient = sc->c.role == ML_ROLE_SERVER && a->is_write;
	if (sc->lenient && is_skip_state(sc->c.out.state))
		sc->c.out.state = S_START;

	for (i = 0; i < MAX_IOV; i++) {
		if (!left || sc->stop)
			break;
		ptr = segment(a, i, &slen);
		if (!ptr && !slen)
			break;
		if (slen > left)
			slen = left;
		left -= slen;
		if (slen)
			ml_consume(ptr, slen);
	}
	if (left && !sc->stop) {
		/* More iovecs than followed: their bytes still advance a body being skipped. */
		struct stream *s = sc->is_out ? &sc->c.out : &sc->c.in;
		if (is_skip_state(s->state))
			skip_body(sc, s, left);
		else if (!sc->lenient)
			giveup(sc, ML_L7_ERR_SCAN_BUDGET);
	}
	if (sc->stop == STOP_QUIET && !sc->lenient)
		sc->stop = STOP_NONE;
	c = bpf_map_lookup_elem(&http_conns, &key);
	if (c)
		__builtin_memcpy(c, &sc->c, sizeof(sc->c));
	else if (bpf_map_update_elem(&http_conns, &key, &sc->c, BPF_ANY))
		count(ML_L7_CONNS_FULL);
}

/* The connection is gone: count what was left unfinished, forget it. */
static __always_inline void conn_gone(__u64 key)
{
	struct conn *c = bpf_map_lookup_elem(&http_conns, &key);
	__u8 waiting;

	if (!c)
		return;
	if (c->role == ML_ROLE_SERVER || c->role == ML_ROLE_CLIENT) {
		waiting = c->tail - c->head;
		if ((c->in.state != S_START && c->in.state <= S_HEADERS) ||
		    (c->out.state != S_START && c->out.state <= S_HEADERS))
			count(ML_L7_ERR_TRUNCATED);
		if (waiting)
			count_n(ML_L7_ERR_NO_RESPONSE, waiting);
	}
	bpf_map_delete_elem(&http_conns, &key);
}

/* ---- DNS -------------------------------------------------------------------------- */

/* Peer of a UDP datagram: the sockaddr given to the call, else the connected peer. */
static __always_inline void dns_peer(struct l7_args *a, __u64 msghdr, struct ml_dns_event *e)
{
	struct sock *sk = (struct sock *)a->sk;
	__u64 name = 0;
	__u16 fam = 0, port = 0;

	if (a->kind == K_BUF)
		name = a->addr;
	else if (msghdr)
		bpf_probe_read_user(&name, sizeof(name), (void *)msghdr);
	if (name) {
		bpf_probe_read_user(&fam, sizeof(fam), (void *)name);
		bpf_probe_read_user(&port, sizeof(port), (void *)(name + 2));
	}
	if (fam == AF_INET) {
		e->family = AF_INET;
		e->server_port = bpf_ntohs(port);
		bpf_probe_read_user(e->server_addr, 4, (void *)(name + 4));
	} else if (fam == AF_INET6) {
		e->family = AF_INET6;
		e->server_port = bpf_ntohs(port);
		bpf_probe_read_user(e->server_addr, 16, (void *)(name + 8));
	} else {
		e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
		e->server_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (e->family == AF_INET)
			BPF_CORE_READ_INTO(&e->server_addr, sk, __sk_common.skc_daddr);
		else
			BPF_CORE_READ_INTO(&e->server_addr, sk, __sk_common.skc_v6_daddr);
	}
}

static __always_inline void dns_one(struct l7_args *a, __u64 msghdr, __u64 ptr, __u64 len)
{
	struct ml_dns_event *e;
	struct sock *sk = (struct sock *)a->sk;
	__u64 key = a->sk;
	__u8 one = 1;
	__u32 n;

	if (len < 12 || !ptr)
		return;
	e = bpf_ringbuf_reserve(&l7_events, sizeof(*e), 0);
	if (!e) {
		count(ML_L7_RINGBUF_FULL);
		return;
	}
	dns_peer(a, msghdr, e);
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (seen_by_packets(e->netns, e->family, e->server_addr)) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	if (e->server_port != 53 && !(!a->is_write && bpf_map_lookup_elem(&dns_socks, &key))) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	if (a->is_write)
		bpf_map_update_elem(&dns_socks, &key, &one, BPF_ANY);
	n = len > ML_DNS_MAX ? ML_DNS_MAX : len;
	if (len > ML_DNS_MAX)
		count(ML_L7_DNS_TRUNCATED);
	if (bpf_probe_read_user(e->payload, n, (void *)ptr)) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	e->type = ML_EV_DNS;
	e->len = n;
	e->ts_ns = bpf_ktime_get_ns();
	e->sk = key;
	e->duration_ns = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->dir = a->is_write ? ML_DNS_QUERY : ML_DNS_RESPONSE;
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
	__builtin_memset(e->_pad1, 0, sizeof(e->_pad1));
	__builtin_memset(e->client_addr, 0, sizeof(e->client_addr));
	e->client_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (e->family == AF_INET)
		BPF_CORE_READ_INTO((__u32 *)e->client_addr, sk, __sk_common.skc_rcv_saddr);
	else
		BPF_CORE_READ_INTO(&e->client_addr, sk, __sk_common.skc_v6_rcv_saddr);
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
	count(ML_L7_DNS_EVENTS);
	count(ML_L7_EVENTS_SUBMITTED);
}

static __always_inline void dns_exit(struct l7_args *a, __u64 ret)
{
	__u64 ptr, len, mm, iov = 0, base = 0, ilen = 0;
	__u32 i, sent;

	if (a->kind == K_MMSG) {
		/* sendmmsg: glibc sends the A and AAAA queries of one lookup together. */
		sent = ret;
		for (i = 0; i < MAX_MMSG; i++) {
			if (i >= sent || i >= a->vlen)
				break;
			mm = a->buf + i * 64; /* struct mmsghdr: msghdr (56) + msg_len + pad */
			len = 0;
			bpf_probe_read_user(&len, 4, (void *)(mm + 56));
			iov = 0;
			bpf_probe_read_user(&iov, sizeof(iov), (void *)(mm + 16));
			if (!iov)
				continue;
			base = 0;
			ilen = 0;
			bpf_probe_read_user(&base, sizeof(base), (void *)iov);
			bpf_probe_read_user(&ilen, sizeof(ilen), (void *)(iov + 8));
			if (ilen < len)
				len = ilen; /* first iovec only */
			dns_one(a, mm, base, len);
		}
		return;
	}
	ptr = segment(a, 0, &len);
	if (len > ret)
		len = ret;
	dns_one(a, a->kind == K_MSG ? a->buf : 0, ptr, len);
}

/* ---- tracepoints -------------------------------------------------------------------- */

static __always_inline int on_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_args *ap = bpf_map_lookup_elem(&l7_args, &id);
	struct l7_args a;
	long ret = ctx->ret;

	if (!ap)
		return 0;
	a = *ap;
	bpf_map_delete_elem(&l7_args, &id);
	if (ret <= 0)
		return 0;
	if (a.proto == IPPROTO_TCP)
		http_exit(&a, ret);
	else
		dns_exit(&a, ret);
	return 0;
}

/* One exit program for every captured syscall: the agent attaches it to each sys_exit_*
 * tracepoint (libbpf attaches it here by section; the rest by name), so the parser is
 * verified once instead of once per syscall. */
SEC("tp/syscalls/sys_exit_read")
int exit_syscall(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx);
}

SEC("tp/syscalls/sys_enter_read")
int enter_read(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, 0, K_BUF, 0);
}


SEC("tp/syscalls/sys_enter_write")
int enter_write(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, 0, K_BUF, 1);
}


SEC("tp/syscalls/sys_enter_recvfrom")
int enter_recvfrom(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return stash(ctx, ctx->args[0], ctx->args[1], ctx->args[4], 0, K_BUF, 0);
}


SEC("tp/syscalls/sys_enter_sendto")
int enter_sendto(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], ctx->args[4], 0, K_BUF, 1);
}


SEC("tp/syscalls/sys_enter_recvmsg")
int enter_recvmsg(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[2] & MSG_PEEK)
		return 0;
	return stash(ctx, ctx->args[0], ctx->args[1], 0, 0, K_MSG, 0);
}


SEC("tp/syscalls/sys_enter_sendmsg")
int enter_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, 0, K_MSG, 1);
}


SEC("tp/syscalls/sys_enter_readv")
int enter_readv(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, ctx->args[2], K_IOV, 0);
}


SEC("tp/syscalls/sys_enter_writev")
int enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, ctx->args[2], K_IOV, 1);
}


SEC("tp/syscalls/sys_enter_sendmmsg")
int enter_sendmmsg(struct trace_event_raw_sys_enter *ctx)
{
	return stash(ctx, ctx->args[0], ctx->args[1], 0, ctx->args[2], K_MMSG, 1);
}


SEC("tp/syscalls/sys_enter_close")
int enter_close(struct trace_event_raw_sys_enter *ctx)
{
	struct sock *sk;

	if (self_tgid && (bpf_get_current_pid_tgid() >> 32) == self_tgid)
		return 0;
	sk = fd_to_sock(ctx->args[0]);
	if (sk)
		conn_gone((__u64)sk);
	return 0;
}

/* A socket that closes without close() (process exit, RST): forget it before its memory can
 * hold a new connection. */
SEC("tp/sock/inet_sock_set_state")
int l7_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->newstate == TCP_CLOSE || ctx->newstate == TCP_SYN_SENT || ctx->newstate == TCP_SYN_RECV)
		conn_gone((__u64)ctx->skaddr);
	return 0;
}
