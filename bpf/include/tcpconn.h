/* tcpconn.h — structs shared by tcpconn.bpf.c and the agent's ctypes mirror
 * (agent/tcpconn_structs.py). Explicitly padded: compiled with -Wpadded, and a unit test
 * compares every mirror with the compiled object's BTF.
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

/* Value of the `conns` map (key: the struct sock pointer). Counters are cumulative for the
 * life of the connection, as far as the agent saw it. */
struct ml_conn {
	struct ml_tuple tuple;
	__u64 start_ns;       /* SYN sent (outbound), established (inbound), first seen (unknown) */
	__u64 established_ns; /* 0 until established */
	__u64 cgroup_id;      /* cgroup v2 id of the socket (inherited from the listener for inbound) */
	__u64 bytes_sent;     /* payload bytes returned by sendmsg & co. */
	__u64 bytes_received; /* payload bytes returned by recvmsg & co. */
	__u32 segs_retrans;   /* tcp_sock.total_retrans: segments, not skbs */
	__u32 rsts_sent;
	__u32 rsts_received;
	__u32 srtt_us;        /* smoothed RTT, read at close */
	__u32 pid;            /* tgid of the last process that used the socket (0: not yet) */
	__u32 netns;          /* network namespace inode */
	__u8 direction;       /* enum ml_direction */
	__u8 _pad1[7];
	char comm[ML_COMM_LEN];
};

enum ml_event_type {
	ML_EV_OPEN = 1,         /* connection established */
	ML_EV_CLOSE = 2,        /* connection closed; `conn` holds the final counters */
	ML_EV_CONNECT_FAIL = 3, /* SYN_SENT -> CLOSE; `err` is sk_err (ECONNREFUSED, ETIMEDOUT, ...) */
	ML_EV_RETRANSMIT = 4,   /* a retransmitted skb; `segs` segments so far on this socket */
	ML_EV_BYTES = 5,        /* overflow: bytes of a socket the conns map had no room for */
	ML_EV_RESET = 6,        /* RST sent or received for a socket not in the conns map */
	ML_EV_SYNACK_RETRANSMIT = 7, /* SYN-ACK retransmitted for a request socket */
};

/* Ring-buffer record. */
struct ml_event {
	__u64 sk;       /* struct sock pointer: the conns key */
	__u64 ts_ns;    /* bpf_ktime_get_ns() */
	struct ml_conn conn;
	__u32 type;     /* enum ml_event_type */
	__s32 err;
	__u32 segs;     /* retransmitted segments in this event (RETRANSMIT, SYNACK_RETRANSMIT) */
	__u8 rst_sent;  /* RESET: 1 sent, 0 received */
	__u8 _pad2[3];
	__u64 bytes_sent;     /* BYTES overflow deltas */
	__u64 bytes_received;
};

/* Indexes of the per-CPU `counters` array: every drop and failure is counted here. */
enum ml_counter {
	ML_CNT_EVENTS_SUBMITTED = 0,
	ML_CNT_RINGBUF_FULL = 1,     /* ring buffer reserve failed: event lost */
	ML_CNT_CONNS_FULL = 2,       /* conns map update failed: counters go to ML_EV_BYTES */
	ML_CNT_RST_SENT_NOSOCK = 3,  /* RSTs sent with no full socket (e.g. refused SYN) */
	ML_CNT_SEND_CALLS = 4,
	ML_CNT_RECV_CALLS = 5,
	ML_CNT_STATE_CHANGES = 6,
	ML_CNT_RETRANSMIT_SKBS = 7,
	ML_CNT_RST_SENT = 8,
	ML_CNT_RST_RECEIVED = 9,
	ML_CNT_MAX = 16,
};

#pragma clang diagnostic pop

#endif
