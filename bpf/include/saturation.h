/* saturation.h — structs shared by saturation.bpf.c and its ctypes mirror
 * (agent/sources/saturation/structs.py). Explicitly padded (compiled with -Wpadded);
 * tests/unit/test_saturation_structs.py compares every mirror with the object's BTF.
 */
#ifndef MESHLENS_SATURATION_H
#define MESHLENS_SATURATION_H

#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

/* Key of `drops`: every skb:kfree_skb, per network namespace, socket cgroup (0 when no
 * full socket is known), L3 protocol and the kernel's drop reason. */
struct ml_sat_drop_key {
	__u64 cgroup_id;
	__u32 netns;    /* inode of the netns of rx_sk, skb->sk or skb->dev; 0 if none */
	__u16 protocol; /* skb->protocol, host byte order (0x0800 IPv4, 0x86DD IPv6, ...) */
	__u16 reason;   /* enum skb_drop_reason, clamped to ML_SAT_REASON_MAX */
};

#define ML_SAT_REASON_MAX 1023

/* What a `sock_events` entry counts. */
enum ml_sat_kind {
	ML_SAT_RCVBUF_DROP = 0,   /* kfree_skb on a socket for lack of room; detail = reason */
	ML_SAT_RCVQUEUE_FULL = 1, /* sock:sock_rcvqueue_full */
	ML_SAT_BUF_LIMIT = 2,     /* sock:sock_exceed_buf_limit; detail = 0 send, 1 receive */
	ML_SAT_SOCK_ERROR = 3,    /* sock:inet_sk_error_report; detail = sk_err (errno) */
	ML_SAT_PORT_EXHAUSTED = 4, /* connect failed before a local port was found */
};

/* Key of `sock_events`: per pod (cgroup, netns) and peer address. */
struct ml_sat_sock_key {
	__u64 cgroup_id;
	__u8 peer[16];  /* IPv4 in the first 4 bytes; all zero when unknown */
	__u32 netns;
	__u32 detail;
	__u8 kind;      /* enum ml_sat_kind */
	__u8 family;    /* 4, 6 or 0 */
	__u8 _pad[6];
};

/* Records the iter/tcp program writes (bpf_seq_write), one struct each. */
enum ml_sat_rec_kind {
	ML_SAT_REC_LISTEN = 1,   /* a listening socket: accept queue and its drops */
	ML_SAT_REC_ZEROWIN = 2,  /* an established socket at zero window, either way */
	ML_SAT_REC_SUMMARY = 3,  /* the last record: per-netns totals of this iteration */
};

#define ML_SAT_ZW_LOCAL 1 /* this socket advertises a zero receive window (rcv_wnd == 0) */
#define ML_SAT_ZW_PEER 2  /* the peer advertised zero (snd_wnd == 0) */

struct ml_sat_iter_rec {
	__u64 cgroup_id;
	__u64 drops;       /* LISTEN: the listener's drop counter (tcp_listendrop) */
	__u8 addr[16];     /* LISTEN: local address; ZEROWIN: peer address */
	__u32 netns;
	__u32 a;           /* LISTEN: sk_ack_backlog; SUMMARY: sockets (not listening) on an ephemeral port */
	__u32 b;           /* LISTEN: sk_max_ack_backlog; SUMMARY: sockets seen */
	__u32 c;           /* ZEROWIN: ML_SAT_ZW_* bits */
	__u32 probes;      /* ZEROWIN: unanswered zero-window probes (icsk_probes_out); SUMMARY: distinct ephemeral ports */
	__u16 port;        /* LISTEN, ZEROWIN: local port */
	__u8 kind;         /* enum ml_sat_rec_kind */
	__u8 family;       /* 4 or 6 */
};

/* Value of `iter_cfg`: the iterated namespace's ip_local_port_range. */
struct ml_sat_iter_cfg {
	__u32 port_low;
	__u32 port_high;
};

/* Indexes of the per-CPU `counters` array. */
enum ml_sat_counter {
	ML_SAT_CNT_DROPS_SEEN = 0,     /* kfree_skb calls */
	ML_SAT_CNT_DROPS_FULL = 1,     /* `drops` update failed: only in DROPS_SEEN */
	ML_SAT_CNT_EVENTS_FULL = 2,    /* `sock_events` update failed: that event is lost */
	ML_SAT_CNT_RCVQUEUE_FULL = 3,  /* sock_rcvqueue_full calls */
	ML_SAT_CNT_BUF_LIMIT = 4,      /* sock_exceed_buf_limit calls */
	ML_SAT_CNT_ERRORS = 5,         /* inet_sk_error_report calls */
	ML_SAT_CNT_PORT_EXHAUSTED = 6, /* SYN_SENT -> CLOSE without a local port */
	ML_SAT_CNT_ITER_SOCKETS = 7,   /* sockets the iterator visited */
	ML_SAT_CNT_ITER_WRITE_FAILED = 8, /* bpf_seq_write refused a record (seq buffer full) */
	ML_SAT_CNT_MAX = 16,
};

#pragma clang diagnostic pop

#endif
