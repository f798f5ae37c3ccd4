/* l7.h — structs shared by l7.bpf.c (HTTP/1.x and DNS from syscall tracepoints) and the
 * agent's ctypes mirror (agent/l7_structs.py). Explicitly padded: compiled with -Wpadded,
 * and a unit test compares every mirror with the compiled object's BTF.
 */
#ifndef MESHLENS_L7_H
#define MESHLENS_L7_H

#define ML_L7_COMM_LEN 16
#define ML_PATH_MAX 128        /* path prefix bytes hashed into a path id and sent once */
#define ML_DNS_MAX 512         /* DNS message bytes copied into an event */
#define ML_DUR_BUCKETS 15      /* OTel advised http duration bounds (14) + +Inf */
#define ML_SIZE_BUCKETS 12     /* body size bounds (11) + +Inf */

#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

enum ml_http_role {
	ML_ROLE_UNKNOWN = 0,
	ML_ROLE_SERVER = 1,  /* this socket read a request: the local process serves it */
	ML_ROLE_CLIENT = 2,  /* this socket wrote a request */
	ML_ROLE_NOT_HTTP = 3,
	ML_ROLE_DEAD = 4,    /* the parser gave up on this connection (counted); ignored until close */
};

enum ml_http_method {
	ML_M_UNKNOWN = 0, ML_M_GET = 1, ML_M_POST = 2, ML_M_PUT = 3, ML_M_DELETE = 4, ML_M_HEAD = 5,
	ML_M_OPTIONS = 6, ML_M_PATCH = 7, ML_M_CONNECT = 8, ML_M_TRACE = 9,
};

/* Key of the `http_stats` aggregate. Addresses in network byte order (IPv4: first 4
 * bytes), ports host order. Server role: server_* is the local end, client_addr the peer.
 * Client role: server_* is the peer, client_addr is zero (the local process is the label). */
struct ml_http_key {
	__u64 cgroup_id;     /* cgroup v2 id of the process that made the syscall */
	__u32 netns;         /* network namespace inode of the socket */
	__u32 path_id;       /* FNV-1a of the path prefix (query dropped); text via ML_EV_PATH */
	__u16 status;        /* final response status code */
	__u16 server_port;
	__u16 family;
	__u8 role;           /* enum ml_http_role (SERVER or CLIENT) */
	__u8 method;         /* enum ml_http_method */
	__u8 server_addr[16];
	__u8 client_addr[16];
	char comm[ML_L7_COMM_LEN]; /* process name, not pid: short-lived processes (a curl per
	                            * request) must not each make a new entry */
};

/* Value of `http_stats`: cumulative since load. Histogram buckets are exact: bucket i holds
 * observations <= bound i (bounds in l7_structs.py, the same as the kernel's tables). */
struct ml_http_val {
	__u64 count;
	__u64 duration_ns_sum;
	__u64 req_body_sum;
	__u64 resp_body_sum;
	__u64 req_body_count;   /* requests whose body size is known */
	__u64 resp_body_count;  /* responses whose body size is known (Content-Length, none) */
	__u64 duration_buckets[ML_DUR_BUCKETS];
	__u64 req_body_buckets[ML_SIZE_BUCKETS];
	__u64 resp_body_buckets[ML_SIZE_BUCKETS];
};

enum ml_l7_event_type {
	ML_EV_HTTP_REQUEST = 1, /* one request: overflow (stats map full) or a sampled tap record */
	ML_EV_PATH = 2,         /* text of a path id seen for the first time */
	ML_EV_DNS = 3,          /* a DNS query sent or response received (UDP) */
};

enum ml_http_event_flags {
	ML_HTTP_F_OVERFLOW = 1,      /* not in http_stats: user space aggregates it */
	ML_HTTP_F_SAMPLE = 2,        /* tap record, already counted in http_stats */
	ML_HTTP_F_REQ_SIZE = 4,      /* req_body is known */
	ML_HTTP_F_RESP_SIZE = 8,     /* resp_body is known */
};

struct ml_http_event {
	__u32 type;          /* ML_EV_HTTP_REQUEST */
	__u32 flags;         /* enum ml_http_event_flags */
	__u64 ts_ns;
	struct ml_http_key key;
	__u64 duration_ns;
	__u64 req_body;
	__u64 resp_body;
	/* the client's end of the connection (the key has only the server's, and the client's
	 * address for the server role): tap and overflow records only, for the flow stream */
	__u8 client_addr[16];
	__u16 client_port;
	__u8 _pad0[6];
};

struct ml_path_event {
	__u32 type;          /* ML_EV_PATH */
	__u32 path_id;
	__u32 len;           /* bytes of path used (<= ML_PATH_MAX) */
	__u32 _pad0;
	char path[ML_PATH_MAX];
};

enum ml_dns_dir {
	ML_DNS_QUERY = 1,    /* sent by the local process */
	ML_DNS_RESPONSE = 2, /* received by the local process */
	ML_DNS_ANSWERED = 3, /* packet path: a response the kernel paired with its query (duration_ns) */
	ML_DNS_ASKED = 4,    /* packet path, only while the tap is on (a flow-stream client follows):
	                      * a query now waiting in dns_pending, so an unanswered one has a name */
};

struct ml_dns_event {
	__u32 type;          /* ML_EV_DNS */
	__u32 len;           /* payload bytes copied */
	__u64 ts_ns;
	__u64 sk;            /* socket pointer: pairs queries with responses, with the txid */
	__u64 duration_ns;   /* ML_DNS_ANSWERED: query -> response at the pod's veth; else 0 */
	__u64 cgroup_id;
	__u32 netns;
	__u32 tgid;
	__u8 server_addr[16];
	__u16 server_port;
	__u16 family;
	__u8 dir;            /* enum ml_dns_dir */
	__u8 _pad0[3];
	char comm[ML_L7_COMM_LEN];
	__u8 client_addr[16]; /* the querying socket's end (packet path: the pod's; syscalls: its
	                       * bound address, 0.0.0.0 when unbound) */
	__u16 client_port;
	__u8 _pad1[6];
	__u8 payload[ML_DNS_MAX];
};

/* Indexes of the per-CPU `l7_counters` array. Every give-up and drop is counted here. */
enum ml_l7_counter {
	ML_L7_EVENTS_SUBMITTED = 0,
	ML_L7_RINGBUF_FULL = 1,        /* reserve failed: event lost */
	ML_L7_STATS_FULL = 2,          /* http_stats update failed: request went as overflow */
	ML_L7_CONNS_FULL = 3,          /* http_conns update failed: connection not followed */
	ML_L7_ARGS_FULL = 4,           /* syscall args could not be stashed */
	ML_L7_ERR_NOT_HTTP = 5,        /* first bytes of a TCP stream are not HTTP/1.x */
	ML_L7_ERR_HEADER_TOO_LARGE = 6,/* request/response header beyond the per-message budget */
	ML_L7_ERR_SCAN_BUDGET = 7,     /* more header bytes in one syscall than the scan budget */
	ML_L7_ERR_BAD_CHUNK = 8,       /* malformed chunked encoding */
	ML_L7_ERR_BAD_START = 9,       /* a new message did not start with a method / HTTP/1.x */
	ML_L7_ERR_TRUNCATED = 10,      /* connection ended inside a message header */
	ML_L7_ERR_NO_RESPONSE = 11,    /* connection ended with requests still waiting */
	ML_L7_ERR_UNPAIRED_RESPONSE = 12, /* a response with no request waiting */
	ML_L7_ERR_PIPELINE_FULL = 13,  /* more pipelined requests than the FIFO holds */
	ML_L7_ERR_UPGRADE = 14,        /* 101 Switching Protocols / CONNECT: stream no longer HTTP/1 */
	ML_L7_HTTP_REQUESTS = 15,      /* requests counted (paired with a final response) */
	ML_L7_DNS_EVENTS = 16,
	ML_L7_DNS_TRUNCATED = 17,      /* DNS message larger than ML_DNS_MAX: cut */
	ML_L7_SYSCALLS = 18,           /* socket syscalls inspected */
	ML_L7_PATHS_SENT = 19,
	ML_L7_SAMPLES = 20,
	/* packet path (l7pkt.bpf.c) */
	ML_L7_PKT_SEGMENTS = 21,       /* TCP segments with payload inspected */
	ML_L7_PKT_RETRANSMITS = 22,    /* segments wholly before next_seq (retransmit, duplicate): skipped */
	ML_L7_PKT_OVERLAPS = 23,       /* segments partly before next_seq: their old prefix skipped */
	ML_L7_PKT_DESYNC = 24,         /* gaps in a stream's headers: desynchronised, pending requests dropped */
	ML_L7_PKT_GAP_IN_BODY = 25,    /* gaps inside a body of known length: skipped by arithmetic */
	ML_L7_PKT_RESYNC = 26,         /* desynchronised streams resumed at a request/status line */
	ML_L7_PKT_UNPARSED = 27,       /* frames whose headers could not be parsed down to L4 */
	ML_L7_DNS_QUERIES = 28,        /* packet path: DNS queries seen (UDP, or TCP at a segment start) */
	ML_L7_DNS_UNMATCHED = 29,      /* packet path: responses no waiting query asked (id, tuple, question) */
	ML_L7_DNS_PENDING_FULL = 30,   /* packet path: no room to wait for the answer: counted unanswered */
	ML_L7_DNS_MALFORMED = 31,      /* packet path: a message to/from port 53 whose question is unreadable */
	ML_L7_DNS_TCP_SKIPPED = 32,    /* packet path: TCP port-53 segments that start no message (continuations) */
	ML_L7_PKT_FRAGMENTS = 33,      /* packet path: IP fragments (IPv4, IPv6 fragment header): not reassembled, no L7 */
	ML_L7_PKT_CONTENDED = 34,      /* packet path: segments that waited for another CPU parsing the same connection */
	ML_L7_PKT_BUSY = 35,           /* packet path: ... and waited in vain: left unparsed (a gap at the next one) */
	ML_L7_PKT_LOCK_STOLEN = 36,    /* packet path: connection locks taken over from a holder gone stale */
	ML_L7_OLD_OWNERS_FULL = 37,    /* cgroup_skb path: sockets older than the agent left unnamed (old_owners full) */
	ML_L7_CNT_MAX = 40,
};

#pragma clang diagnostic pop

#endif
