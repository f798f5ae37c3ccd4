/* tcpconn.h — structs shared by tcpconn.bpf.c and the agent's ctypes mirror
 * (agent/sources/tcp/structs.py). Explicitly padded: compiled with -Wpadded, and a unit test
 * compares every mirror with the compiled object's BTF.
 *
 * The kernel aggregates per rollup (struct ml_rollup_key -> struct ml_rollup in `rollups`);
 * per connection it keeps only what it needs to credit deltas (struct ml_conn in `conns`).
 */
#ifndef MESHLENS_TCPCONN_H
#define MESHLENS_TCPCONN_H

#define ML_COMM_LEN 16

/* Implicit padding in a shared struct is a compile error (vmlinux.h is exempt). */
#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

/* Who opened the connection, seen from this node. */
enum ml_direction {
	ML_DIR_UNKNOWN = 0,  /* existed before the agent started */
	ML_DIR_OUTBOUND = 1, /* active open: connect() on this node */
	ML_DIR_INBOUND = 2,  /* passive open: accepted on this node */
};

/* Why a connect failed: index into ml_rollup.failed. */
enum ml_fail {
	ML_FAIL_REFUSED = 0,
	ML_FAIL_TIMEOUT = 1,
	ML_FAIL_UNREACHABLE = 2,
	ML_FAIL_ABORTED = 3,
	ML_FAIL_OTHER = 4,
	ML_FAIL_MAX = 5,
};

/* Histogram bucket upper bounds (le), the exporter's own (agent/sources/histogram.py;
 * tests/unit/test_struct_mirrors.py compares them). Buckets are found by comparison, no
 * division. Latency (connect, RTT) in ns, connection duration in ns. */
#define ML_LAT_BOUNDS_NS 50000ULL, 100000ULL, 250000ULL, 500000ULL, 1000000ULL, 2500000ULL, 5000000ULL, \
	10000000ULL, 25000000ULL, 50000000ULL, 100000000ULL, 250000000ULL, 500000000ULL, 1000000000ULL, \
	2500000000ULL, 5000000000ULL, 10000000000ULL
#define ML_LAT_NBOUNDS 17
#define ML_DUR_BOUNDS_NS 1000000ULL, 10000000ULL, 100000000ULL, 500000000ULL, 1000000000ULL, 5000000000ULL, \
	10000000000ULL, 30000000000ULL, 60000000000ULL, 300000000000ULL, 1800000000000ULL, 3600000000000ULL
#define ML_DUR_NBOUNDS 12

/* Addresses in network byte order; IPv4 uses the first 4 bytes of each array. Ports are
 * host byte order. */
struct ml_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family; /* AF_INET or AF_INET6 */
	__u16 _pad0;
};

/* What a rollup is keyed by. For the peer, outbound connections keep the remote port and
 * inbound ones the local (server) port: the client's ephemeral port would make every
 * connection its own rollup. `comm` is the connecting process for outbound connections and
 * the listening process for inbound ones (an accepted socket has no process yet when it is
 * established, in softirq). */
struct ml_rollup_key {
	__u64 cgroup_id;   /* cgroup v2 id of the socket (inherited from the listener for inbound) */
	__u8 peer[16];     /* remote address, network order */
	__u32 netns;       /* network namespace inode */
	__u16 server_port;
	__u16 family;
	__u8 direction;    /* enum ml_direction */
	__u8 _pad[7];
	char comm[ML_COMM_LEN];
};

/* Value of `rollups`: cumulative since the entry was created; the agent credits the
 * difference between sweeps. Every field is a u64, so the agent sums them as one array. */
struct ml_rollup {
	__u64 opened;
	__u64 closed;
	__s64 active;                 /* opened (or first seen) minus closed */
	__u64 failed[ML_FAIL_MAX];    /* connect failures by enum ml_fail */
	__u64 bytes_sent;             /* payload bytes acknowledged by the peer */
	__u64 bytes_received;         /* payload bytes received in order */
	__u64 segs_retrans;           /* tcp_sock.total_retrans: segments, not skbs */
	__u64 rsts_sent;
	__u64 rsts_received;
	__u64 connect_ns_sum;
	__u64 rtt_us_sum;
	__u64 duration_ns_sum;
	__u64 connect_hist[ML_LAT_NBOUNDS + 1];
	__u64 rtt_hist[ML_LAT_NBOUNDS + 1];
	__u64 duration_hist[ML_DUR_NBOUNDS + 1];
};

/* One change to one rollup: what a state change, a sweep of a socket or a reset adds. */
enum ml_delta_flags {
	ML_D_OPENED = 1,
	ML_D_CLOSED = 2,
	ML_D_CONNECT = 4,   /* connect_ns is valid */
	ML_D_RTT = 8,       /* rtt_us is valid */
	ML_D_DURATION = 16, /* duration_ns is valid */
};

struct ml_delta {
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 connect_ns;
	__u64 duration_ns;
	__u32 rtt_us;        /* ML_D_RTT: srtt at close; in a follow-mode OPEN record (flag clear):
	                      * the handshake's srtt at ESTABLISHED, for the stream only */
	__u32 segs_retrans;
	__u32 rsts_sent;
	__u32 rsts_received;
	__u16 flags;   /* enum ml_delta_flags */
	__u8 fail;     /* enum ml_fail + 1; 0: not a failure */
	__s8 active;   /* +1 opened or first seen, -1 closed */
	__u8 _pad[4];
};

/* Value of the `conns` map (key: the struct sock pointer): what crediting a connection's
 * deltas needs. Counters are the socket's own, read at state changes and at each sweep
 * (iter/tcp); `acked`/`received`/`retrans` are the values already credited. */
struct ml_conn {
	struct ml_rollup_key key;
	struct ml_tuple tuple;
	__u64 start_ns;       /* SYN sent (outbound), established (inbound), first seen (unknown) */
	__u64 established_ns; /* 0 until established */
	__u64 acked;          /* payload bytes acked, as credited so far */
	__u64 received;       /* payload bytes received, as credited so far */
	__u64 base_acked;     /* the same at establishment (per-connection totals for the stream) */
	__u64 base_received;
	__u64 retrans;        /* total_retrans credited so far */
	__u32 pid;            /* tgid of the connecting process (outbound), 0 otherwise */
	__u32 _pad;
};

/* Value of `listeners` (key: struct ml_listener_key): who listens on a port, so accepted
 * connections are named after their server process. */
struct ml_listener_key {
	__u32 netns;
	__u16 port;
	__u16 _pad;
};

struct ml_listener {
	char comm[ML_COMM_LEN];
	__u32 pid;
	__u32 _pad;
};

enum ml_event_type {
	ML_EV_OVERFLOW = 1,     /* `rollups` was full: `key` + `delta`, re-aggregated by the agent */
	ML_EV_OPEN = 2,         /* follow mode: connection established */
	ML_EV_CLOSE = 3,        /* follow mode: connection closed; totals in `total_*` */
	ML_EV_CONNECT_FAIL = 4, /* follow mode: SYN_SENT -> CLOSE; `err` is sk_err */
	ML_EV_RETRANSMIT = 5,   /* a retransmitted skb; `segs` segments in it */
	ML_EV_LISTENER = 6,     /* a listening socket of unknown owner; `inode` names its socket */
};

/* Ring-buffer record. */
struct ml_event {
	__u64 sk;       /* struct sock pointer */
	__u64 ts_ns;    /* bpf_ktime_get_ns() */
	__u32 type;     /* enum ml_event_type */
	__s32 err;
	struct ml_tuple tuple;
	struct ml_rollup_key key;
	struct ml_delta delta;
	__u64 total_sent;      /* CLOSE: the connection's payload bytes, both ways */
	__u64 total_received;
	__u64 duration_ns;     /* CLOSE: lifetime */
	__u32 segs;            /* RETRANSMIT */
	__u32 pid;
	__u64 inode;           /* LISTENER: socket inode */
};

/* Value of the one-entry `settings` array, written by the agent at runtime. */
struct ml_settings {
	__u32 follow;      /* 1: per-connection events on the ring buffer (a client follows) */
	__u32 wake_bytes;  /* wake the agent only once this much is waiting (else its timed poll) */
};

/* Indexes of the per-CPU `counters` array: every drop and failure is counted here. */
enum ml_counter {
	ML_CNT_EVENTS_SUBMITTED = 0,
	ML_CNT_RINGBUF_FULL = 1,     /* ring buffer reserve failed: record lost */
	ML_CNT_CONNS_FULL = 2,       /* conns map update failed: credited at open and close only */
	ML_CNT_RST_SENT_NOSOCK = 3,  /* RSTs sent with no full socket (e.g. refused SYN) */
	ML_CNT_SEND_CALLS = 4,       /* per-call byte programs (fallback only) */
	ML_CNT_RECV_CALLS = 5,
	ML_CNT_STATE_CHANGES = 6,    /* the ones L4 acts on: listen, connect, established, close */
	ML_CNT_RETRANSMIT_SKBS = 7,
	ML_CNT_RST_SENT = 8,
	ML_CNT_RST_RECEIVED = 9,
	ML_CNT_ROLLUPS_FULL = 10,    /* rollups map full: the delta went to the ring (overflow) */
	ML_CNT_ITER_SOCKETS = 11,    /* sockets visited by the sweep iterator */
	ML_CNT_ADOPTED = 12,         /* connections first seen by a sweep (predate the agent) */
	ML_CNT_UNTRACKED_CLOSE = 13, /* closes of connections not in conns */
	ML_CNT_MAX = 16,
};

#pragma clang diagnostic pop

#endif
