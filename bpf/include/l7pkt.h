/* l7pkt.h — structs shared by l7pkt.bpf.c (HTTP/1.x and DNS from packets at a pod's veth),
 * l7cg.bpf.c (the same from cgroup_skb on the cgroup v2 root) and the agent's ctypes mirror
 * (agent/sources/l7/structs.py). The series they produce use
 * the structs of l7.h. Explicitly padded (-Wpadded), checked against BTF by a unit test.
 */
#ifndef MESHLENS_L7PKT_H
#define MESHLENS_L7PKT_H

#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

/* Value of `pkt_ifaces` (key: ifindex of a pod's host-side veth), written by the agent when
 * it attaches there: packets on interfaces not in this map are not parsed. */
struct ml_pkt_iface {
	__u32 netns;   /* inode of the pod's network namespace (the series' netns) */
	__u32 flags;   /* reserved, 0 */
};

/* Key of `pkt_conns`: one connection as seen at one interface, oriented from the pod behind
 * that interface (local) to its peer, so both directions of a connection share an entry and
 * the two pods of a node-local connection each have their own (one observation per side). */
struct ml_pkt_conn_key {
	__u8 local_addr[16];  /* IPv4: first 4 bytes */
	__u8 peer_addr[16];
	__u16 local_port;     /* host byte order */
	__u16 peer_port;
	__u32 ifindex;        /* tc: the interface; cgroup_skb (l7cg.bpf.c): the socket's netns inode */
	__u8 family;          /* AF_INET or AF_INET6 */
	__u8 _pad[3];
};

/* Key of `dns_pending`: a DNS query the pod sent, waiting at its veth for the answer. */
struct ml_dns_pending_key {
	struct ml_pkt_conn_key conn;  /* the pod's side of the exchange, as for HTTP */
	__u16 txid;                   /* DNS message id */
	__u8 proto;                   /* IPPROTO_UDP or IPPROTO_TCP */
	__u8 _pad;
};

/* Value of `dns_pending`. The agent's sweep deletes entries older than its timeout and
 * counts them unanswered. */
struct ml_dns_pending {
	__u64 ts_ns;   /* bpf_ktime_get_ns() when the query crossed the veth */
	__u32 qhash;   /* FNV-1a of the question (name, type, class): the answer must repeat it */
	__u16 qlen;    /* its length */
	__u16 _pad;
};

/* ml_cg_sock.flags */
#define ML_CGS_NETNS 1   /* netns is set */
#define ML_CGS_COMM 2    /* comm is the creating task's (cgroup/sock_create, or cloned from the
                          * listener an accepted socket came from) */
#define ML_CGS_SKIP 4    /* the socket's netns is a pod's whose veth the tc path parses: its
                          * packets off loopback are the tc path's (decided once per socket) */

/* Value of l7cg.bpf.c's `cg_socks` (bpf_sk_storage, BPF_F_CLONE: a socket accepted from a
 * listener starts with a copy of the listener's): what a packet in softirq context cannot
 * tell about its socket, learnt once in the task's context, and the per-socket skip. */
struct ml_cg_sock {
	__u32 netns;   /* inode of the socket's network namespace */
	__u32 flags;   /* ML_CGS_* */
	char comm[16]; /* the creating task's name (ML_L7_COMM_LEN), if ML_CGS_COMM */
};

/* Value of l7cg.bpf.c's `old_owners` (socket inode -> the first task found holding it): what
 * the iter/task_file pass learns for the iter/tcp pass, at the agent's start only. */
struct ml_old_owner {
	char comm[16];
};

#pragma clang diagnostic pop

#endif
