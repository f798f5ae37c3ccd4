/* http_parser.h — the HTTP/1.x byte parser shared by l7.bpf.c (bytes from syscalls) and
 * l7pkt.bpf.c (bytes from packets at a pod's veth): per-connection stream state, the
 * per-byte state machine (step, run with bpf_loop over a window of sc->buf), request FIFO,
 * and aggregation into `http_stats` with exact OTel-bucket histograms.
 *
 * The including object fills `sc->buf` / `sc->pos` / `sc->n` with the next bytes of one
 * direction of a connection and runs `step` over them; it also defines
 *   static __always_inline void ml_fill_key(struct scratch *sc, struct ml_http_key *k);
 * (who is at either end: socket fields for syscalls, packet tuple for packets), declared here.
 */
#ifndef MESHLENS_HTTP_PARSER_H
#define MESHLENS_HTTP_PARSER_H

#include "l7.h"

#define WIN 512               /* bytes copied per parse window */
#define MAX_WINDOWS 16        /* parse windows per segment (header scan budget 8 KiB) */
#define HDR_MAX 16384         /* request/response header bytes per message */
#ifndef FIFO
#define FIFO 8                /* pending requests per connection (pipelining); a power of 2 */
#endif

/* Knob, set by the agent before load. */
const volatile __u32 sample_every = 0;   /* 0: no tap records; N: one request in N */

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
#define PF_LINE_DONE 2  /* the request line ended with a valid HTTP/1.x version */

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
	__u64 sk;            /* syscall path: struct sock pointer */
	__u64 now;
	__u64 sample_ctr;
	__u32 pos;
	__u32 n;
	__u8 is_out;
	__u8 is_req;
	__u8 lenient;
	__u8 stop;
	__u8 path_carried;   /* packet path: the request's path so far came back from `path_carry` */
	/* packet path: who the pod behind the interface is and who its peer is */
	__u8 local_addr[16];
	__u8 peer_addr[16];
	__u32 pkt_netns;
	__u16 local_port;
	__u16 peer_port;
	__u16 pkt_family;
	__u16 dns_qlen;      /* packet path: the DNS question ml_dns_question() read */
	__u32 dns_qhash;
	__u64 pkt_cgroup;    /* packet path: the series' cgroup (cgroup_skb: the socket's; tc: 0) */
	char pkt_comm[ML_L7_COMM_LEN]; /* packet path: the series' process (cgroup_skb: the
	                                * socket's creator, when known; tc: empty) */
};

/* ---- maps shared by both objects (same names: one user-space reader) ------------ */

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

/* Runtime tap switch, written by the agent while at least one tap client is connected:
 * entry 0 is "one request in N goes to the tap" (0 = off). It overrides sample_every, the
 * load-time default, so sampling costs nothing while nobody watches. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tap_ctl SEC(".maps");

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

/* Who is at either end of the connection: defined by the including object. */
static __always_inline void ml_fill_key(struct scratch *sc, struct ml_http_key *k);
/* The client's address and port (and the record's padding), for records that leave the
 * kernel: defined by the including object. */
static __always_inline void ml_fill_client(struct scratch *sc, struct ml_http_event *e);

static __always_inline void emit_request(struct scratch *sc, struct ml_http_key *k, __u32 flags, __u64 dur,
					 __u64 req, __u64 resp)
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
	ml_fill_client(sc, e);
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

	ml_fill_key(sc, &k);
	k.path_id = p->path_id;
	k.status = resp->status;
	k.method = p->method;
	count(ML_L7_HTTP_REQUESTS);

	/* One request in N goes to the tap, whichever path it takes below: N from the runtime
	 * switch (tap_ctl) when a tap client is connected, else the load-time sample_every. */
	__u32 tap_idx = 0, every = sample_every;
	__u32 *tap = bpf_map_lookup_elem(&tap_ctl, &tap_idx);

	if (tap && *tap)
		every = *tap;
	if (every) {
		sc->sample_ctr++;
		if (sc->sample_ctr % every == 0) {
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
		emit_request(sc, &k, flags | ML_HTTP_F_OVERFLOW, dur, req, rsp);
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
		emit_request(sc, &k, flags, dur, req, rsp);
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

/* RFC 9110 tchar: any of them may make up a method token. */
static __always_inline int ml_is_tchar(__u8 c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return 1;
	switch (c) {
	case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
	case '-': case '.': case '^': case '_': case '`': case '|': case '~':
		return 1;
	}
	return 0;
}

#define METHOD_MAX 20   /* longest method token followed */

/* What the first bytes of a stream (or of a segment) start, given as a little-endian word of
 * its first `len` (<= 8) bytes: 1 = a request line (a method token of 3+ characters beginning
 * with a capital, then a space, after an empty line, which RFC 9112 §2.2 lets a server
 * ignore), 2 = a status line ("HTTP/1."), 0 = neither. Not strict, a short segment of a
 * capital and tchars (a request written a byte at a time) counts as a request's start. */
static __always_inline int ml_start_kind(__u64 w, __u32 len, int strict)
{
	__u32 i, o = 0;
	__u8 c;

	if (len > 8)
		len = 8;
	if (len >= 2 && (w & 0xffff) == 0x0a0d) {
		o = 2;
		w >>= 16;
	}
	if (len <= o || (strict && len < o + 4))
		return 0;
	if (!o && len >= 4 && (__u32)w == 0x50545448U) /* "HTTP" */
		return (len >= 7 && ((w >> 32) & 0xffffff) == 0x2e312f) ? 2 : 0; /* "/1." */
	c = w & 0xff;
	if (c < 'A' || c > 'Z')
		return 0;
	for (i = 1; i < 8; i++) {
		if (o + i >= len)  /* a capital and tchars up to the end: a request's start, unless
		                    * the caller needs the whole method (resynchronising) */
			return (o || !strict) ? 1 : 0;
		c = (w >> (8 * i)) & 0xff;
		if (c == ' ')
			return i >= 3 ? 1 : 0;
		if (!ml_is_tchar(c))
			return 0;
	}
	return 1;  /* a long method token: the byte parser decides */
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
	/* the whole path is in the scratch: it started in this run, or the packet path carried
	 * the part before this segment over */
	if (s->msg_start_ns == sc->now || sc->path_carried)
		send_path(sc, s->path_hash, s->path_len);
	return 0;
}

/* The newest queued request's line ended well: it may now be answered. */
static __always_inline void request_line_done(struct scratch *sc)
{
	struct conn *c = &sc->c;

	if (c->tail != c->head)
		c->fifo[(__u8)(c->tail - 1) & (FIFO - 1)].flags |= PF_LINE_DONE;
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
		if (p->flags & PF_LINE_DONE)
			record(sc, p, s);
		else
			count(ML_L7_ERR_UNPAIRED_RESPONSE); /* answered before its request line ended */
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

#define SKIP_WORDS 16   /* words skip_line looks at per call: 128 bytes of a line */

/* ml_skip_line: the rest of a line whose bytes we ignore (a reason phrase, the value of a header we do not
 * follow), from `pos`, up to SKIP_WORDS words: returns bytes consumed. A '\n' found ends the
 * line the way the byte parser would (reason: headers start; header: next header name), so a
 * typical header line costs one step. The last word of the window may be partial: its lanes
 * beyond `n` are cleared (never a '\n'). Ends in the state the byte parser would reach.
 * Global (verified once): inlined in the per-byte callback, its loop multiplied the
 * verifier's work on that callback tenfold. */
__noinline int ml_skip_line(__u32 pos)
{
	struct scratch *sc = get_scratch();
	struct stream *s;
	__u32 b = 0, k, left, n;
	__u64 w, m;

	if (!sc)
		return 0;
	s = cur_stream(sc);
	n = sc->n;
	for (k = 0; k < SKIP_WORDS; k++) {
		if (pos + b >= n)
			break;
		w = load64(sc, pos + b);
		left = n - (pos + b);
		if (left < 8)
			w &= (1ULL << (8 * (left & 7))) - 1;
		m = byte_mask(w, '\n');
		if (m) {
			b += first_lane(m) + 1;   /* the '\n' too */
			s->hdr_bytes += b;
			s->pos = 0;
			if (s->state == S_REASON) {
				s->state = S_HEADERS;
				s->hmatch = 0;
			} else {                  /* header_byte() at '\n' of an ignored header */
				s->hmatch = 0;
			}
			return b;
		}
		b += left < 8 ? left : 8;
	}
	s->hdr_bytes += b;
	s->pos = s->pos + b > 255 ? 255 : s->pos + b;
	return b;
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
			b = byte_at(sc, pos);
			if (b == '\r' && byte_at(sc, pos + 1) == '\n' && s->hdr_bytes + 2 <= HDR_MAX) {
				/* the empty line: headers done, as the byte parser would at its '\n' */
				s->hdr_bytes += 2;
				ml_headers_done();
				return 2;
			}
			if (b == '\r' || b == '\n')
				return 0;
			w |= LOWER8;
			if (w != LE_CONTENT_ && w != LE_TRANSFER) {
				/* a header we ignore: its name and value up to the line's end, at once */
				s->hmatch = HM_OTHER;
				s->pos = 1;
				s->hdr_bytes += 1;
				return 1 + ml_skip_line(pos + 1);
			}
			if (pos + 24 > n)
				return 0;
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
		return ml_skip_line(pos);
	case S_REQ_VERSION:
		if (s->pos == 0 && (w == LE_HTTP11 || w == LE_HTTP10) && pos + 10 <= n &&
		    byte_at(sc, pos + 8) == '\r' && byte_at(sc, pos + 9) == '\n' && s->hdr_bytes + 10 <= HDR_MAX) {
			/* "HTTP/1.x\r\n": the request line is done, headers start */
			request_line_done(sc);
			s->state = S_HEADERS;
			s->pos = 0;
			s->hmatch = 0;
			s->hdr_bytes += 10;
			return 10;
		}
		if (s->pos == 0 && (w == LE_HTTP11 || w == LE_HTTP10)) {
			s->pos = 8;
			s->hdr_bytes += 8;
			return 8;
		}
		return 0;
	case S_REASON:
		return ml_skip_line(pos);
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
}

/* More header bytes than HDR_MAX. A request whose line was read may still be answered (a
 * server refuses it with 431/400 before reading it all): it stays queued and the rest of its
 * stream is no longer followed. Anything else: the connection is given up. Counted both ways. */
static __always_inline void header_too_large(struct scratch *sc, struct stream *s)
{
	if (sc->is_req && s->state == S_HEADERS) {
		count(ML_L7_ERR_HEADER_TOO_LARGE);
		s->state = S_EOF;
		return;
	}
	giveup(sc, ML_L7_ERR_HEADER_TOO_LARGE);
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
			header_too_large(sc, s);
			return 1;
		}
		return 0;
	}
	c = sc->buf[sc->pos & (WIN - 1)];
	sc->pos++;

	if (s->state != S_START && s->state <= S_HEADERS) {
		if (++s->hdr_bytes > HDR_MAX) {
			header_too_large(sc, s);
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
			/* a valid token outside RFC 9110 + PATCH is still a request: _OTHER */
			s->method = method_of(s->acc);
			s->state = S_PATH;
			return 0;
		}
		if (!ml_is_tchar(c) || s->pos >= METHOD_MAX)
			goto bad_start;
		s->acc = (s->acc << 8) | c;
		s->pos++;
		return 0;
	case S_PATH:
		if (c == ' ' || c == '?' || c == '#' || c == '\r' || c == '\n') {
			if (c == '\r' || c == '\n')
				goto bad_start; /* no HTTP version: HTTP/0.9 or not HTTP at all */
			end_segment(s);
			ml_request_started();
			s->state = c == ' ' ? S_REQ_VERSION : S_QUERY;
			s->pos = 0;
			s->acc = 0;
			return 0;
		}
		if (s->path_len < ML_PATH_MAX) {
			sc->path[s->path_len & (ML_PATH_MAX - 1)] = c;
			s->path_len++;
			path_byte(s, c);
		}
		return 0;
	case S_QUERY:
		if (c == ' ') {
			s->state = S_REQ_VERSION;
			s->pos = 0;
			s->acc = 0;
		} else if (c == '\n') {
			goto bad_start;
		}
		return 0;
	case S_REQ_VERSION:
		/* "HTTP/1." digit, then CRLF (or a bare LF) */
		if (s->pos < 7) {
			s->acc = (s->acc << 8) | c;
			if (s->pos == 6 && s->acc != HTTP1_7)
				goto bad_start;
		} else if (s->pos == 7) {
			if (c < '0' || c > '9')
				goto bad_start;
		} else if (c == '\n') {
			request_line_done(sc);
			s->state = S_HEADERS;
			s->pos = 0;
			s->hmatch = 0;
			return 0;
		} else if (c != '\r' || s->pos != 8) {
			goto bad_start;
		}
		s->pos++;
		return 0;
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

#endif
