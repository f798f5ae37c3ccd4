/* tc.h — structs shared by tc.bpf.c and the agent's ctypes mirror (agent/sources/tc/structs.py).
 * Explicitly padded: compiled with -Wpadded, and tests/unit/test_tc_struct_mirrors.py
 * compares every mirror with the compiled object's BTF.
 */
#ifndef MESHLENS_TC_H
#define MESHLENS_TC_H

/* Implicit padding in a shared struct is a compile error (vmlinux.h is exempt). */
#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

/* Direction as seen by the interface the program is attached to (the host side of a pod's
 * veth): ingress = frames the pod sent, egress = frames delivered to the pod. */
enum ml_tc_dir {
	ML_TC_INGRESS = 0,
	ML_TC_EGRESS = 1,
};

/* Key of `ifstats` (interfaces without a slot of `if_slots`). */
struct ml_tc_if_key {
	__u32 ifindex;
	__u32 direction; /* enum ml_tc_dir */
};

/* Value of `if_slots` and `ifstats` (per-CPU; the agent sums the CPUs). One skb is one packet, as the
 * interface's own counters (`ip -s link`) count them; `segs` counts GSO segments. */
struct ml_tc_if_stats {
	__u64 packets;
	__u64 bytes;         /* skb->len: L2 frame without FCS, as the veth counts it */
	__u64 segs;          /* max(1, gso_segs) per skb: packets on the wire after segmentation */
	__u64 tcp_syn;       /* SYN without ACK */
	__u64 tcp_synack;    /* SYN with ACK */
	__u64 tcp_fin;
	__u64 tcp_rst;
	__u64 parse_failures; /* frames whose headers could not be parsed (reasons: `counters`) */
};

/* Key of `syns`: a SYN in flight, in the SYN's own orientation (saddr = initiator). */
struct ml_tc_flow_key {
	__u8 saddr[16]; /* IPv4 uses the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;    /* host byte order */
	__u16 dport;
	__u32 ifindex;
	__u8 family;    /* 4 or 6 */
	__u8 direction; /* enum ml_tc_dir the SYN was seen in */
	__u8 _pad[2];
};

/* Value of `syns`. */
struct ml_tc_syn {
	__u64 ts_ns; /* bpf_ktime_get_ns() of the latest SYN (a retransmitted SYN restarts it) */
};

/* Role of the pod in a handshake: client = the pod sent the SYN (seen on ingress). */
enum ml_tc_role {
	ML_TC_ROLE_CLIENT = 0,
	ML_TC_ROLE_SERVER = 1,
};

/* Key of `rtt`: per interface, role and peer (the address on the other side of the pod). */
struct ml_tc_rtt_key {
	__u8 peer[16];
	__u32 ifindex;
	__u8 family;
	__u8 role; /* enum ml_tc_role */
	__u8 _pad[2];
};

/* log2 buckets of microseconds: slot i counts RTTs in [2^(i-1), 2^i) µs, slot 0 is < 1 µs;
 * the last slot takes everything >= 2^(SLOTS-2) µs (about 18 min). A power of two, so the
 * index can be masked for the verifier. */
#define ML_TC_RTT_SLOTS 32

/* Value of `rtt` (per-CPU). */
struct ml_tc_rtt_hist {
	__u64 count;
	__u64 sum_ns;
	__u64 slots[ML_TC_RTT_SLOTS];
};

/* Key of `drops`: skb:kfree_skb events whose device is one the agent tracks. */
struct ml_tc_drop_key {
	__u32 ifindex; /* host-side ifindex the agent registered the device under */
	__u16 reason;  /* enum skb_drop_reason, clamped to ML_TC_DROP_REASON_MAX */
	__u8 side;     /* enum ml_tc_side */
	__u8 _pad;
};

#define ML_TC_DROP_REASON_MAX 1023

/* Key of `tracked`: a device by (netns inode, ifindex), as kfree_skb sees it. */
struct ml_tc_dev_key {
	__u32 netns;
	__u32 ifindex;
};

enum ml_tc_side {
	ML_TC_SIDE_HOST = 0, /* the host-side veth (or main interface) */
	ML_TC_SIDE_POD = 1,  /* the pod-side peer (eth0 inside the pod) */
};

/* Value of `tracked`. */
struct ml_tc_dev {
	__u32 host_ifindex;
	__u8 side; /* enum ml_tc_side */
	__u8 _pad[3];
};

/* Indexes of the per-CPU `counters` array: every parse failure and drop is counted here. */
enum ml_tc_counter {
	ML_TC_CNT_PACKETS = 0,          /* every skb either program saw */
	ML_TC_CNT_SHORT_ETH = 1,        /* parse failure: shorter than an Ethernet header */
	ML_TC_CNT_SHORT_VLAN = 2,       /* parse failure: VLAN tag cut off */
	ML_TC_CNT_VLAN_TOO_DEEP = 3,    /* parse failure: more than ML_TC_MAX_VLAN tags */
	ML_TC_CNT_SHORT_IPV4 = 4,       /* parse failure: IPv4 header cut off */
	ML_TC_CNT_BAD_IPV4 = 5,         /* parse failure: version != 4 or IHL < 5 */
	ML_TC_CNT_SHORT_IPV6 = 6,       /* parse failure: IPv6 header cut off */
	ML_TC_CNT_BAD_IPV6 = 7,         /* parse failure: version != 6 */
	ML_TC_CNT_SHORT_IPV6_EXT = 8,   /* parse failure: extension header cut off */
	ML_TC_CNT_IPV6_EXT_TOO_DEEP = 9, /* parse failure: more than ML_TC_MAX_IPV6_EXT headers */
	ML_TC_CNT_SHORT_TCP = 10,       /* parse failure: TCP header cut off */
	ML_TC_CNT_BAD_TCP = 11,         /* parse failure: data offset < 5 */
	ML_TC_CNT_NON_IP = 12,          /* not a failure: ARP, LLDP, ... (not parsed further) */
	ML_TC_CNT_FRAGMENTS = 13,       /* not a failure: non-first fragments (no L4 header) */
	ML_TC_CNT_IFSTATS_FULL = 14,    /* no slot and `ifstats` full: packet not counted per interface */
	ML_TC_CNT_SYNS_FULL = 15,       /* `syns` update failed: that handshake gets no RTT */
	ML_TC_CNT_RTT_FULL = 16,        /* `rtt` update failed: that RTT sample is lost */
	ML_TC_CNT_DROPS_FULL = 17,      /* `drops` update failed: that drop is only in DROPS_SEEN */
	ML_TC_CNT_SYN_RETRANSMITS = 18, /* a SYN for a 4-tuple already waiting (restarts the clock) */
	ML_TC_CNT_SYNACK_UNMATCHED = 19, /* SYN-ACK with no SYN waiting (SYN seen before attach) */
	ML_TC_CNT_SYN_RESET = 20,       /* a waiting SYN answered by RST (refused) */
	ML_TC_CNT_DROPS_SEEN = 21,      /* kfree_skb on a tracked device */
	ML_TC_CNT_IPV6_NO_L4 = 22,      /* not a failure: ESP or no-next-header, L4 unknown */
	ML_TC_CNT_MAX = 32,
};

#define ML_TC_MAX_VLAN 2
#define ML_TC_MAX_IPV6_EXT 8

#pragma clang diagnostic pop

#endif
