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
#include "l7.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define MSG_PEEK 2
#define S_IFMT 00170000
#define S_IFSOCK 0140000

#define WIN 512               /* bytes copied from user memory per parse window */
#define MAX_WINDOWS 16        /* parse windows per syscall segment (header scan budget 8 KiB) */
#define MAX_IOV 4             /* iovecs followed per readv/writev/recvmsg/sendmsg */
#define MAX_MMSG 4            /* messages followed per sendmmsg */
#define HDR_MAX 16384         /* request/response header bytes per message */
#define FIFO 8                /* pending requests per connection (pipelining) */

/* Knobs, set by the agent before load. */
const volatile __u32 sample_every = 0;   /* 0: no tap records; N: one request in N */
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

enum pstate {
	S_START = 0, S_METHOD, S_PATH, S_QUERY, S_REQ_VERSION, S_RESP_VERSION, S_STATUS, S_REASON,
	S_HEADERS, S_BODY, S_CHUNK_SIZE, S_CHUNK_EXT, S_CHUNK_DATA, S_CHUNK_DATA_END, S_TRAILERS, S_EOF,
};

#define SF_HAS_CL 1
#define SF_CHUNKED 2
#define SF_CHUNK_CR 4

#define HM_NAME 1     /* in a header name: acc is its running FNV-1a (lowercase) */
#define HM_OTHER 2    /* in the value of a header we ignore */
#define HM_VAL_CL 4   /* in a Content-Length value: acc is the number */
#define HM_VAL_TE 8   /* in a Transfer-Encoding value: acc holds the last 7 bytes */

struct stream {
	__u64 remaining;     /* body / chunk bytes still to skip */
	__u64 acc;           /* accumulator: method chars, chunk size, "chunked" match */
	__u64 body_bytes;    /* decoded body bytes of the current message */
	__u64 cl;            /* Content-Length of the current message */
	__u64 msg_start_ns;  /* syscall that carried the message's first byte */
	__u32 hdr_bytes;
	__u32 path_hash;
	__u16 status;
	__u8 state;
	__u8 pos;            /* position in the current token / header line (saturating) */
	__u8 hmatch;
	__u8 flags;
	__u8 path_len;
	__u8 method;
	__u32 seg_hash;      /* FNV-1a of the current path segment */
	__u8 seg_len;
	__u8 seg_flags;
	__u8 _pad[2];
};

/* Path segments that look like ids are hashed as one placeholder, so /users/1 and /users/2
 * share a path id (and a stats entry); agent/routes.py templates the same classes. */
#define SEG_ALL_DIGIT 1
#define SEG_ALL_HEX 2     /* [0-9a-fA-F-] */
#define SEG_ALL_TOKEN 4   /* [A-Za-z0-9_=-] */
#define SEG_HAS_DIGIT 8
#define SEG_START (SEG_ALL_DIGIT | SEG_ALL_HEX | SEG_ALL_TOKEN)

#define PF_REQ_SIZE 1

struct pending {
	__u64 start_ns;
	__u64 req_body;
	__u32 path_id;
	__u8 method;
	__u8 flags;
	__u16 _pad;
};

struct conn {
	struct stream in;    /* bytes read by the process */
	struct stream out;   /* bytes written by the process */
	struct pending fifo[FIFO];
	__u8 role;
	__u8 head;
	__u8 tail;
	__u8 _pad[5];
};

enum stop_reason { STOP_NONE = 0, STOP_QUIET = 1, STOP_GIVEUP = 2 };

struct scratch {
	__u8 buf[WIN];
	/* Path of the request being parsed. Per CPU, not per connection (the connection state
	 * is copied in and out on every syscall: smaller is cheaper), so it is only trusted for
	 * a request line that started in the current syscall. */
	char path[ML_PATH_MAX];
	struct conn c;
	struct ml_http_val zero;
	__u64 sk;
	__u64 now;
	__u64 sample_ctr;
	__u32 pos;
	__u32 n;
	__u8 is_out;
	__u8 is_req;
	__u8 lenient;
	__u8 stop;
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
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);      /* resized by the agent before load */
	__type(key, struct ml_http_key);
	__type(value, struct ml_http_val);
} http_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);             /* path id */
	__type(value, __u8);
} paths_sent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);             /* UDP sockets that sent a DNS query */
	__type(value, __u8);
} dns_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} l7_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_L7_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} l7_counters SEC(".maps");

/* Never used by the programs: makes clang emit BTF for the ring-buffer record types, which
 * the agent's ctypes mirrors are checked against (tests/unit/test_l7_structs.py). */
struct l7_record_types {
	struct ml_http_event http;
	struct ml_path_event path;
	struct ml_dns_event dns;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_record_types);
} l7_record_types SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&l7_counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline void count_n(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&l7_counters, &idx);
	if (v)
		*v += n;
}

static __always_inline struct scratch *get_scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&scratch_map, &zero);
}

/* Tables are written as code: clang 14 emits BTF for static const arrays in .rodata that
 * the kernel rejects ("Invalid offset"). */
#define H_CONTENT_LENGTH 0x4df9451dU  /* FNV-1a of "content-length" */
#define H_TRANSFER_ENCODING 0xddb4744cU /* FNV-1a of "transfer-encoding" */
#define FNV_OFFSET 2166136261U
#define FNV_PRIME 16777619U
#define CHUNKED_7 0x6368756e6b6564ULL /* "chunked" */
#define HTTP1_7 0x485454502f312eULL   /* "HTTP/1." */

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

/* ---- aggregation ------------------------------------------------------------------ */

/* OTel advised bounds for http.*.request.duration (s): 0.005 .. 10; bucket i holds <= bound i. */
static __always_inline __u32 dur_bucket(__u64 ns)
{
	if (ns <= 5000000ULL) return 0;
	if (ns <= 10000000ULL) return 1;
	if (ns <= 25000000ULL) return 2;
	if (ns <= 50000000ULL) return 3;
	if (ns <= 75000000ULL) return 4;
	if (ns <= 100000000ULL) return 5;
	if (ns <= 250000000ULL) return 6;
	if (ns <= 500000000ULL) return 7;
	if (ns <= 750000000ULL) return 8;
	if (ns <= 1000000000ULL) return 9;
	if (ns <= 2500000000ULL) return 10;
	if (ns <= 5000000000ULL) return 11;
	if (ns <= 7500000000ULL) return 12;
	if (ns <= 10000000000ULL) return 13;
	return 14;
}

/* Body size bounds in bytes: 0, then powers of 4 from 64 to 16 MiB. */
static __always_inline __u32 size_bucket(__u64 b)
{
	__u32 i;
	__u64 bound = 64;

	if (b == 0)
		return 0;
	for (i = 1; i < ML_SIZE_BUCKETS - 1; i++) {
		if (b <= bound)
			return i;
		bound <<= 2;
	}
	return ML_SIZE_BUCKETS - 1;
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

static __always_inline void fill_key(struct ml_http_key *k, __u64 skp, __u8 role)
{
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

static __always_inline void emit_request(struct ml_http_key *k, __u32 flags, __u64 dur, __u64 req, __u64 resp)
{
	struct ml_http_event *e = bpf_ringbuf_reserve(&l7_events, sizeof(*e), 0);

	if (!e) {
		count(ML_L7_RINGBUF_FULL);
		return;
	}
	e->type = ML_EV_HTTP_REQUEST;
	e->flags = flags;
	e->ts_ns = bpf_ktime_get_ns();
	e->key = *k;
	e->duration_ns = dur;
	e->req_body = req;
	e->resp_body = resp;
	bpf_ringbuf_submit(e, 0);
	count(ML_L7_EVENTS_SUBMITTED);
}

/* One finished request (final response headers seen). */
static __always_inline void record(struct scratch *sc, struct pending *p, struct stream *resp)
{
	struct ml_http_key k = {};
	struct ml_http_val *v;
	__u64 dur = 0, req = p->req_body, rsp = resp->cl;
	__u32 flags = 0, b;
	int req_known = p->flags & PF_REQ_SIZE;
	int resp_known = 0;

	if (resp->msg_start_ns > p->start_ns)
		dur = resp->msg_start_ns - p->start_ns;
	if (p->method == ML_M_HEAD || resp->status == 204 || resp->status == 304) {
		rsp = 0;
		resp_known = 1;
	} else if (resp->flags & SF_HAS_CL && !(resp->flags & SF_CHUNKED)) {
		resp_known = 1;
	} else if (!(resp->flags & SF_CHUNKED)) {
		rsp = 0; /* until close: size unknown here */
	}
	if (req_known)
		flags |= ML_HTTP_F_REQ_SIZE;
	if (resp_known)
		flags |= ML_HTTP_F_RESP_SIZE;

	fill_key(&k, sc->sk, sc->c.role);
	k.path_id = p->path_id;
	k.status = resp->status;
	k.method = p->method;
	count(ML_L7_HTTP_REQUESTS);

	/* One request in sample_every goes to the tap, whichever path it takes below. */
	if (sample_every) {
		sc->sample_ctr++;
		if (sc->sample_ctr % sample_every == 0) {
			count(ML_L7_SAMPLES);
			flags |= ML_HTTP_F_SAMPLE;
		}
	}
	v = bpf_map_lookup_elem(&http_stats, &k);
	if (!v) {
		bpf_map_update_elem(&http_stats, &k, &sc->zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&http_stats, &k);
	}
	if (!v) {
		/* No room: the request travels as a record (tap-sampled or not) and is counted. */
		count(ML_L7_STATS_FULL);
		emit_request(&k, flags | ML_HTTP_F_OVERFLOW, dur, req, rsp);
		return;
	}
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->duration_ns_sum, dur);
	b = dur_bucket(dur);
	if (b < ML_DUR_BUCKETS)
		__sync_fetch_and_add(&v->duration_buckets[b], 1);
	if (req_known) {
		__sync_fetch_and_add(&v->req_body_sum, req);
		__sync_fetch_and_add(&v->req_body_count, 1);
		b = size_bucket(req);
		if (b < ML_SIZE_BUCKETS)
			__sync_fetch_and_add(&v->req_body_buckets[b], 1);
	}
	if (resp_known) {
		__sync_fetch_and_add(&v->resp_body_sum, rsp);
		__sync_fetch_and_add(&v->resp_body_count, 1);
		b = size_bucket(rsp);
		if (b < ML_SIZE_BUCKETS)
			__sync_fetch_and_add(&v->resp_body_buckets[b], 1);
	}
	if (flags & ML_HTTP_F_SAMPLE)
		emit_request(&k, flags, dur, req, rsp);
}

static __always_inline void send_path(struct scratch *sc, __u32 path_id, __u32 len)
{
	struct ml_path_event *e;
	__u8 one = 1;

	if (bpf_map_lookup_elem(&paths_sent, &path_id))
		return;
	e = bpf_ringbuf_reserve(&l7_events, sizeof(*e), 0);
	if (!e) {
		count(ML_L7_RINGBUF_FULL);
		return; /* not marked sent: the next request with this path tries again */
	}
	e->type = ML_EV_PATH;
	e->path_id = path_id;
	e->len = len > ML_PATH_MAX ? ML_PATH_MAX : len;
	e->_pad0 = 0;
	__builtin_memcpy(e->path, sc->path, ML_PATH_MAX);
	bpf_ringbuf_submit(e, 0);
	bpf_map_update_elem(&paths_sent, &path_id, &one, BPF_ANY);
	count(ML_L7_PATHS_SENT);
	count(ML_L7_EVENTS_SUBMITTED);
}

/* ---- the byte parser ---------------------------------------------------------------- */

static __always_inline void giveup(struct scratch *sc, __u32 reason)
{
	count(reason);
	sc->c.role = ML_ROLE_DEAD;
	sc->stop = STOP_GIVEUP;
}

static __always_inline __u8 method_of(__u64 acc)
{
	switch (acc) {
	case 0x474554ULL: return ML_M_GET;
	case 0x504f5354ULL: return ML_M_POST;
	case 0x505554ULL: return ML_M_PUT;
	case 0x44454c455445ULL: return ML_M_DELETE;
	case 0x48454144ULL: return ML_M_HEAD;
	case 0x4f5054494f4e53ULL: return ML_M_OPTIONS;
	case 0x5041544348ULL: return ML_M_PATCH;
	case 0x434f4e4e454354ULL: return ML_M_CONNECT;
	case 0x5452414345ULL: return ML_M_TRACE;
	}
	return ML_M_UNKNOWN;
}

static __always_inline void start_message(struct scratch *sc, struct stream *s)
{
	s->msg_start_ns = sc->now;
	s->hdr_bytes = 0;
	s->acc = 0;
	s->pos = 0;
	s->flags = 0;
	s->cl = 0;
	s->body_bytes = 0;
	s->status = 0;
	s->hmatch = 0;
	s->path_len = 0;
	s->path_hash = FNV_OFFSET;
	s->method = 0;
	s->seg_hash = FNV_OFFSET;
	s->seg_len = 0;
	s->seg_flags = SEG_START;
}

static __always_inline void end_segment(struct stream *s)
{
	__u8 f = s->seg_flags, n = s->seg_len;
	int id = n && ((f & SEG_ALL_DIGIT) || ((f & SEG_ALL_HEX) && n >= 8 && (f & SEG_HAS_DIGIT)) ||
		       ((f & SEG_ALL_TOKEN) && n >= 24 && (f & SEG_HAS_DIGIT)));

	if (n)
		s->path_hash = (s->path_hash ^ (id ? 0x2a2a2a2aU : s->seg_hash)) * FNV_PRIME;
	s->seg_hash = FNV_OFFSET;
	s->seg_len = 0;
	s->seg_flags = SEG_START;
}

static __always_inline void path_byte(struct stream *s, __u8 c)
{
	__u8 lc = c | 0x20;
	int digit = c >= '0' && c <= '9';
	int hex = digit || (lc >= 'a' && lc <= 'f') || c == '-';
	int tok = digit || (lc >= 'a' && lc <= 'z') || c == '_' || c == '-' || c == '=';

	if (c == '/') {
		end_segment(s);
		s->path_hash = (s->path_hash ^ c) * FNV_PRIME;
		return;
	}
	s->seg_hash = (s->seg_hash ^ c) * FNV_PRIME;
	if (s->seg_len < 255)
		s->seg_len++;
	if (!digit)
		s->seg_flags &= ~SEG_ALL_DIGIT;
	else
		s->seg_flags |= SEG_HAS_DIGIT;
	if (!hex)
		s->seg_flags &= ~SEG_ALL_HEX;
	if (!tok)
		s->seg_flags &= ~SEG_ALL_TOKEN;
}

static __always_inline struct stream *cur_stream(struct scratch *sc)
{
	return sc->is_out ? &sc->c.out : &sc->c.in;
}

/* The request line's path ended: queue the request. */
__noinline int ml_request_started(void)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	struct conn *c;
	struct pending *p;
	__u8 used;

	if (!sc)
		return 0;
	s = cur_stream(sc);
	c = &sc->c;
	used = c->tail - c->head;

	if (used >= FIFO) {
		giveup(sc, ML_L7_ERR_PIPELINE_FULL);
		return 0;
	}
	p = &c->fifo[c->tail & (FIFO - 1)];
	p->start_ns = s->msg_start_ns;
	p->req_body = 0;
	p->path_id = s->path_hash;
	p->method = s->method;
	p->flags = 0;
	c->tail++;
	if (s->msg_start_ns == sc->now)  /* the whole path is in this syscall's scratch */
		send_path(sc, s->path_hash, s->path_len);
	return 0;
}

/* The newest queued request's body size is now known. */
static __always_inline void request_body_known(struct scratch *sc, __u64 size)
{
	struct conn *c = &sc->c;
	struct pending *p;

	if (c->tail == c->head)
		return; /* already answered (early response) */
	p = &c->fifo[(__u8)(c->tail - 1) & (FIFO - 1)];
	p->req_body = size;
	p->flags |= PF_REQ_SIZE;
}

/* Global (non-static) subprograms are verified once, whatever calls them: the parser's rare
 * events live in them to keep the per-byte callback small for the verifier. */
__noinline int ml_message_done(void)
{
	struct scratch *sc = get_scratch();
	struct stream *s;

	if (!sc)
		return 0;
	s = cur_stream(sc);
	if (sc->is_req && (s->flags & SF_CHUNKED))
		request_body_known(sc, s->body_bytes);
	s->state = S_START;
	return 0;
}

__noinline int ml_headers_done(void)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	struct conn *c;
	struct pending *p;
	__u8 head_method = 0;

	if (!sc)
		return 0;
	s = cur_stream(sc);
	c = &sc->c;

	if (sc->is_req) {
		if (s->flags & SF_CHUNKED) {
			s->state = S_CHUNK_SIZE;
			s->acc = 0;
		} else {
			request_body_known(sc, (s->flags & SF_HAS_CL) ? s->cl : 0);
			if ((s->flags & SF_HAS_CL) && s->cl) {
				s->state = S_BODY;
				s->remaining = s->cl;
			} else {
				s->state = S_START;
			}
		}
		if (s->method == ML_M_CONNECT)
			s->state = S_EOF;
		return 0;
	}
	/* Response. 1xx other than 101 are interim: the request stays queued. */
	if (s->status >= 100 && s->status < 200 && s->status != 101) {
		s->state = S_START;
		return 0;
	}
	if (c->tail == c->head) {
		count(ML_L7_ERR_UNPAIRED_RESPONSE);
	} else {
		p = &c->fifo[c->head & (FIFO - 1)];
		head_method = p->method;
		record(sc, p, s);
		c->head++;
	}
	if (s->status == 101 || (head_method == ML_M_CONNECT && s->status >= 200 && s->status < 300)) {
		giveup(sc, ML_L7_ERR_UPGRADE);
		return 0;
	}
	if (head_method == ML_M_HEAD || s->status == 204 || s->status == 304) {
		s->state = S_START;
	} else if (s->flags & SF_CHUNKED) {
		s->state = S_CHUNK_SIZE;
		s->acc = 0;
	} else if (s->flags & SF_HAS_CL) {
		s->state = s->cl ? S_BODY : S_START;
		s->remaining = s->cl;
	} else {
		s->state = S_EOF;
	}
	return 0;
}

static __always_inline __u8 lower(__u8 c)
{
	return (c >= 'A' && c <= 'Z') ? c | 0x20 : c;
}

static __always_inline void header_byte(struct scratch *sc, struct stream *s, __u8 c)
{
	__u8 lc, pos = s->pos;

	if (c == '\n') {
		if (pos == 0) {
			if (s->state == S_TRAILERS)
				ml_message_done();
			else
				ml_headers_done();
			return;
		}
		if (s->hmatch & HM_VAL_CL) {
			s->flags |= SF_HAS_CL;
			s->cl = s->acc;
		}
		s->pos = 0;
		s->hmatch = 0;
		return;
	}
	if (c == '\r')
		return;
	if (s->state == S_TRAILERS) {
		if (pos < 255)
			s->pos = pos + 1;
		return;
	}
	lc = lower(c);
	if (pos == 0) {
		s->hmatch = HM_NAME;
		s->acc = FNV_OFFSET;
	}
	if (s->hmatch & HM_NAME) {
		if (c == ':') {
			if ((__u32)s->acc == H_CONTENT_LENGTH)
				s->hmatch = HM_VAL_CL;
			else if ((__u32)s->acc == H_TRANSFER_ENCODING)
				s->hmatch = HM_VAL_TE;
			else
				s->hmatch = HM_OTHER;
			s->acc = 0;
		} else {
			s->acc = (__u32)((__u32)(s->acc ^ lc) * FNV_PRIME);
		}
	} else if (s->hmatch & HM_VAL_CL) {
		if (c >= '0' && c <= '9') {
			if (s->acc < (1ULL << 50))
				s->acc = s->acc * 10 + (c - '0');
		}
	} else if (s->hmatch & HM_VAL_TE) {
		s->acc = ((s->acc << 8) | lc) & 0xffffffffffffffULL;
		if (s->acc == CHUNKED_7)
			s->flags |= SF_CHUNKED;
	}
	if (pos < 255)
		s->pos = pos + 1;
}

static __always_inline int hexval(__u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = lower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static __always_inline void chunk_size_done(struct scratch *sc, struct stream *s)
{
	if (s->acc == 0) {
		s->state = S_TRAILERS;
		s->pos = 0;
	} else {
		s->remaining = s->acc;
		s->state = S_CHUNK_DATA;
	}
}

/* Skip body bytes without looking at them. Returns bytes consumed. */
static __always_inline __u64 skip_body(struct scratch *sc, struct stream *s, __u64 avail)
{
	__u64 k;

	if (s->state == S_EOF)
		return avail;
	k = s->remaining < avail ? s->remaining : avail;
	s->remaining -= k;
	s->body_bytes += k;
	if (s->remaining == 0) {
		if (s->state == S_BODY)
			ml_message_done();
		else
			s->state = S_CHUNK_DATA_END;
	}
	return k;
}

static __always_inline int is_skip_state(__u8 st)
{
	return st == S_BODY || st == S_CHUNK_DATA || st == S_EOF;
}

#define LE_CONTENT_ 0x2d746e65746e6f63ULL   /* "content-" */
#define LE_LENGTH_ 0x3a6874676e656cULL      /* "length:" (7 bytes) */
#define LE_TRANSFER 0x726566736e617274ULL   /* "transfer" */
#define LE_ENCODIN 0x6e69646f636e652dULL    /* "-encodin" */
#define LE_HTTP11 0x312e312f50545448ULL     /* "HTTP/1.1" */
#define LE_HTTP10 0x302e312f50545448ULL     /* "HTTP/1.0" */
#define LOWER8 0x2020202020202020ULL
#define ONES8 0x0101010101010101ULL
#define HIGH8 0x8080808080808080ULL

static __always_inline __u64 load64(struct scratch *sc, __u32 off)
{
	return *(__u64 *)(sc->buf + (off & (WIN - 1)));
}

static __always_inline __u8 byte_at(struct scratch *sc, __u32 off)
{
	return sc->buf[off & (WIN - 1)];
}

/* 0x80 in each byte lane of x equal to b, exact in the lowest lane (the classic test). */
static __always_inline __u64 byte_mask(__u64 x, __u64 b)
{
	__u64 v = x ^ (ONES8 * b);
	return (v - ONES8) & ~v & HIGH8;
}

static __always_inline int has_byte(__u64 x, __u64 b)
{
	return byte_mask(x, b) != 0;
}

/* Index of the lowest lane set in a non-zero byte_mask(). */
static __always_inline __u32 first_lane(__u64 m)
{
	__u32 i = 0;

	if (!(m & 0xffffffffULL)) {
		i += 4;
		m >>= 32;
	}
	if (!(m & 0xffffULL)) {
		i += 2;
		m >>= 16;
	}
	if (!(m & 0xffULL))
		i += 1;
	return i;
}

static __always_inline int is_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* Eight path bytes with no terminator among them (global: verified once, whatever the
 * caller's state). */
__noinline int ml_path_word(__u64 w)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	__u32 i, off;

	if (!sc)
		return 0;
	s = cur_stream(sc);
	off = s->path_len;
	if (off > ML_PATH_MAX - 8)
		return 0;
	*(__u64 *)(sc->path + off) = w;
	for (i = 0; i < 8; i++)
		path_byte(s, (w >> (8 * i)) & 0xff);
	s->path_len += 8;
	s->hdr_bytes += 8;
	return 0;
}

/* Word-at-a-time shortcuts for the common shapes (status line, request method, header names
 * we care about, bytes we skip to the end of a line). Returns bytes consumed, 0 to let the
 * byte parser take the next byte. Only used when the whole word is inside the window, and
 * every shortcut ends in the same state the byte parser would reach. */
static __always_inline __u32 fast_path(struct scratch *sc, struct stream *s)
{
	__u32 pos = sc->pos, n = sc->n;
	__u64 w, w1;
	__u8 b;

	if (pos + 8 > n)
		return 0;
	w = load64(sc, pos);
	switch (s->state) {
	case S_START:
		if (pos + 16 > n)
			return 0;
		if (!sc->is_req) {
			if ((w != LE_HTTP11 && w != LE_HTTP10) || byte_at(sc, pos + 8) != ' ' ||
			    !is_digit(byte_at(sc, pos + 9)) || !is_digit(byte_at(sc, pos + 10)) ||
			    !is_digit(byte_at(sc, pos + 11)))
				return 0;
			start_message(sc, s);
			s->status = (byte_at(sc, pos + 9) - '0') * 100 + (byte_at(sc, pos + 10) - '0') * 10 +
				    (byte_at(sc, pos + 11) - '0');
			s->state = S_REASON;
			s->hdr_bytes = 12;
			return 12;
		}
		switch ((__u32)w) {
		case 0x20544547: /* "GET " */
			b = ML_M_GET;
			break;
		case 0x20545550: /* "PUT " */
			b = ML_M_PUT;
			break;
		case 0x54534f50: /* "POST" */
			if (byte_at(sc, pos + 4) != ' ')
				return 0;
			b = ML_M_POST;
			break;
		case 0x44414548: /* "HEAD" */
			if (byte_at(sc, pos + 4) != ' ')
				return 0;
			b = ML_M_HEAD;
			break;
		default:
			return 0;
		}
		start_message(sc, s);
		s->method = b;
		s->state = S_PATH;
		b = (b == ML_M_POST || b == ML_M_HEAD) ? 5 : 4;
		s->hdr_bytes = b;
		return b;
	case S_HEADERS:
		if (s->pos == 0) {
			if (pos + 24 > n)
				return 0;
			b = byte_at(sc, pos);
			if (b == '\r' || b == '\n')
				return 0;
			w |= LOWER8;
			w1 = load64(sc, pos + 8) | LOWER8;
			if (w == LE_CONTENT_ && (w1 & 0x00ffffffffffffffULL) == LE_LENGTH_) {
				s->hmatch = HM_VAL_CL;
				s->acc = 0;
				s->pos = 15;
				s->hdr_bytes += 15;
				return 15;
			}
			if (w == LE_TRANSFER && w1 == LE_ENCODIN && (byte_at(sc, pos + 16) | 0x20) == 'g' &&
			    byte_at(sc, pos + 17) == ':') {
				s->hmatch = HM_VAL_TE;
				s->acc = 0;
				s->pos = 18;
				s->hdr_bytes += 18;
				return 18;
			}
			s->hmatch = HM_OTHER;
			s->pos = 1;
			s->hdr_bytes += 1;
			return 1;
		}
		if (s->hmatch != HM_OTHER)
			return 0;
		goto to_newline;
	case S_REQ_VERSION:
	case S_REASON:
		goto to_newline;
	case S_QUERY:
		if (has_byte(w, '\n') || has_byte(w, ' '))
			return 0;
		break;
	case S_PATH:
		if (s->path_len > ML_PATH_MAX - 8 || has_byte(w, ' ') || has_byte(w, '?') || has_byte(w, '#') ||
		    has_byte(w, '\r') || has_byte(w, '\n'))
			return 0;
		ml_path_word(w);
		return 8;
	default:
		return 0;
	}
	/* eight bytes that cannot end the line (or the query) */
	s->hdr_bytes += 8;
	if (s->pos < 247)
		s->pos += 8;
	return 8;

to_newline:
	/* skip up to the line's '\n', which the byte parser then takes */
	w1 = byte_mask(w, '\n');
	b = w1 ? first_lane(w1) : 8;
	s->hdr_bytes += b;
	if (s->pos < 247)
		s->pos += b;
	return b;
}

struct loop_ctx {
	struct scratch *sc;
};

static long step(__u32 index, void *ctx)
{
	struct scratch *sc = ((struct loop_ctx *)ctx)->sc;
	struct stream *s;
	__u32 fast;
	__u8 c;
	int h;

	if (!sc || sc->stop || sc->pos >= sc->n || sc->pos >= WIN)
		return 1;
	s = sc->is_out ? &sc->c.out : &sc->c.in;
	if (is_skip_state(s->state)) {
		sc->pos += skip_body(sc, s, sc->n - sc->pos);
		return 0;
	}
	fast = fast_path(sc, s);
	if (fast) {
		sc->pos += fast;
		if (s->hdr_bytes > HDR_MAX) {
			giveup(sc, ML_L7_ERR_HEADER_TOO_LARGE);
			return 1;
		}
		return 0;
	}
	c = sc->buf[sc->pos & (WIN - 1)];
	sc->pos++;

	if (s->state != S_START && s->state <= S_HEADERS) {
		if (++s->hdr_bytes > HDR_MAX) {
			giveup(sc, ML_L7_ERR_HEADER_TOO_LARGE);
			return 1;
		}
	}
	switch (s->state) {
	case S_START:
		if (c == '\r' || c == '\n')
			return 0;
		start_message(sc, s);
		s->hdr_bytes = 1;
		if (sc->is_req) {
			if (c < 'A' || c > 'Z')
				goto bad_start;
			s->acc = c;
			s->pos = 1;
			s->state = S_METHOD;
		} else {
			if (c != 'H')
				goto bad_start;
			s->acc = c;
			s->pos = 1;
			s->state = S_RESP_VERSION;
		}
		return 0;
	case S_METHOD:
		if (c == ' ') {
			s->method = method_of(s->acc);
			if (s->method == ML_M_UNKNOWN)
				goto bad_start;
			s->state = S_PATH;
			return 0;
		}
		if (c < 'A' || c > 'Z' || s->pos >= 8)
			goto bad_start;
		s->acc = (s->acc << 8) | c;
		s->pos++;
		return 0;
	case S_PATH:
		if (c == ' ' || c == '?' || c == '#' || c == '\r' || c == '\n') {
			end_segment(s);
			ml_request_started();
			s->state = c == ' ' ? S_REQ_VERSION : S_QUERY;
			if (c == '\n') {
				s->state = S_HEADERS; /* HTTP/0.9-style line: headers follow anyway */
				s->pos = 0;
			}
			return 0;
		}
		if (s->path_len < ML_PATH_MAX) {
			sc->path[s->path_len & (ML_PATH_MAX - 1)] = c;
			s->path_len++;
			path_byte(s, c);
		}
		return 0;
	case S_QUERY:
		if (c == ' ')
			s->state = S_REQ_VERSION;
		else if (c == '\n') {
			s->state = S_HEADERS;
			s->pos = 0;
		}
		return 0;
	case S_REQ_VERSION:
	case S_REASON:
		if (c == '\n') {
			s->state = S_HEADERS;
			s->pos = 0;
			s->hmatch = 0;
		}
		return 0;
	case S_RESP_VERSION:
		if (s->pos < 7) {
			s->acc = (s->acc << 8) | c;
			if (s->pos == 6 && s->acc != HTTP1_7)
				goto bad_start;
		} else if (s->pos == 7) {
			if (c != '0' && c != '1')
				goto bad_start;
		} else if (c == ' ') {
			s->state = S_STATUS;
			s->pos = 0;
			s->status = 0;
			return 0;
		} else {
			goto bad_start;
		}
		s->pos++;
		return 0;
	case S_STATUS:
		if (s->pos < 3) {
			if (c < '0' || c > '9')
				goto bad_start;
			s->status = s->status * 10 + (c - '0');
			s->pos++;
			return 0;
		}
		s->state = S_REASON;
		if (c == '\n') {
			s->state = S_HEADERS;
			s->pos = 0;
		}
		return 0;
	case S_HEADERS:
	case S_TRAILERS:
		header_byte(sc, s, c);
		return 0;
	case S_CHUNK_SIZE:
		h = hexval(c);
		if (h >= 0) {
			if (s->acc >= (1ULL << 40)) {
				giveup(sc, ML_L7_ERR_BAD_CHUNK);
				return 1;
			}
			s->acc = s->acc * 16 + h;
			return 0;
		}
		if (c == '\n') {
			chunk_size_done(sc, s);
			return 0;
		}
		if (c == ';' || c == ' ' || c == '\t' || c == '\r') {
			s->state = S_CHUNK_EXT;
			return 0;
		}
		giveup(sc, ML_L7_ERR_BAD_CHUNK);
		return 1;
	case S_CHUNK_EXT:
		if (c == '\n')
			chunk_size_done(sc, s);
		return 0;
	case S_CHUNK_DATA_END:
		if (c == '\r')
			return 0;
		if (c == '\n') {
			s->state = S_CHUNK_SIZE;
			s->acc = 0;
			return 0;
		}
		giveup(sc, ML_L7_ERR_BAD_CHUNK);
		return 1;
	}
	return 0;

bad_start:
	if (sc->lenient) {
		/* A server's write that is not a response start: body bytes (or sendfile'd body
		 * already gone): nothing to parse in this write. */
		s->state = S_START;
		sc->stop = STOP_QUIET;
		return 1;
	}
	giveup(sc, ML_L7_ERR_BAD_START);
	return 1;
}

/* Parse one contiguous user buffer of `len` bytes as the next bytes of the stream. */
__noinline int ml_consume(__u64 ptr, __u64 len)
{
	struct scratch *sc = get_scratch();
	struct loop_ctx lc;
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
		if (bpf_probe_read_user(sc->buf, n, (void *)(ptr + off))) {
			sc->stop = STOP_QUIET; /* unreadable user memory: leave the stream as it is */
			return 0;
		}
		sc->pos = 0;
		sc->n = n;
		lc.sc = sc;
		bpf_loop(WIN, step, &lc, 0);
		off += sc->pos;
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
	__u32 w = 0;

	if (len < 4 || bpf_probe_read_user(&w, 4, (void *)ptr))
		return ML_ROLE_NOT_HTTP;
	w = bpf_ntohl(w);
	switch (w) {
	case 0x47455420: /* "GET " */
	case 0x504f5354: /* POST */
	case 0x50555420: /* "PUT " */
	case 0x44454c45: /* DELE */
	case 0x48454144: /* HEAD */
	case 0x4f505449: /* OPTI */
	case 0x50415443: /* PATC */
	case 0x434f4e4e: /* CONN */
	case 0x54524143: /* TRAC */
		return is_write ? ML_ROLE_CLIENT : ML_ROLE_SERVER;
	case 0x48545450: /* HTTP: a response first: the connection predates us */
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
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->dir = a->is_write ? ML_DNS_QUERY : ML_DNS_RESPONSE;
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
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
