// SPDX-License-Identifier: GPL-2.0
/* tc.bpf.c — per-pod traffic seen at the host side of each pod's veth.
 *
 * Kernel side of the tc pipeline. Two sched_cls programs (direct-action, attached to the
 * clsact ingress and egress hooks of every pod's host-side veth by agent/sources/tc/attach.py)
 * parse Ethernet, up to ML_TC_MAX_VLAN 802.1Q/802.1ad tags, IPv4 (IHL, fragments) or IPv6
 * (up to ML_TC_MAX_IPV6_EXT extension headers) and TCP flags, and count per interface and
 * direction. A SYN is remembered in `syns` (keyed by its 4-tuple and interface) until the
 * SYN-ACK passes the same interface the other way; the difference is the handshake RTT, kept
 * per (interface, role, peer) as a log2 histogram in `rtt`. Entries whose SYN is never
 * answered are expired by the agent's sweep. Maps are plain hashes, never LRU: when one is
 * full the update fails and the failure is counted.
 *
 * Counting costs no hash lookup: the agent gives every interface it attaches to a slot of the
 * per-CPU array `if_slots` and attaches both filters with the slot as their classid, which
 * cls_bpf writes into the skb (skb->tc_classid) right before it runs the program. Slot 0 (no
 * slot: the table was full, or a BPF_PROG_TEST_RUN, which cannot set a classid) falls back to
 * the per-CPU hash `ifstats` keyed by ifindex (the agent reports how many interfaces and
 * packets took that path).
 *
 * Headers of the usual frame (untagged IPv4 or IPv6, then TCP, all in the linear head) are
 * read in place through skb->data; every other frame goes through the general parser, which
 * reads with bpf_skb_load_bytes where a header lies beyond the linear head (a paged
 * fragment) and bounds-checks against skb->len: a header cut off by the end of the packet is
 * a counted parse failure. Only SYN, SYN-ACK and RST segments touch the handshake maps.
 * Bytes are skb->len as the programs see it, which is the L2 frame as the veth's own
 * counters count it.
 *
 * Drops: a tc program only sees packets that reach it, so "drops seen" come from the
 * skb:kfree_skb tracepoint (real drops: consumed skbs go to skb:consume_skb), filtered to
 * the devices the agent registered in `tracked` (host-side veth and its pod-side peer,
 * matched by netns inode and ifindex) and counted by drop reason in `drops`.
 *
 * One filter per hook: when the L7 packet parser (bpf/l7pkt.bpf.c) runs on the same veths,
 * the agent puts its two programs into `l7_progs` and each counter program ends with a tail
 * call to the parser for its direction, so a packet pays one filter dispatch. With the array
 * empty the tail call falls through. A bare ACK (a whole TCP segment read in place, no
 * payload, no SYN/FIN/RST: about half the packets) is not handed on: the parser would only
 * parse it again to return at once. Any other TCP segment read in place goes with what its
 * headers said (offsets, lengths, flags) in skb->cb (bpf/include/tc_handoff.h), so the
 * parser does not read them again.
 *
 * Both programs return TC_ACT_UNSPEC (so does the parser): the next filter (or the default
 * action) decides.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tc.h"
#include "tc_handoff.h"

char LICENSE[] SEC("license") = "GPL";

#define TC_ACT_UNSPEC (-1)
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IPPROTO_HOPOPTS 0
#define IPPROTO_TCP 6
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ESP 50
#define IPPROTO_AH 51
#define IPPROTO_NONE 59
#define IPPROTO_DSTOPTS 60
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* Keep the shared structs in the object's BTF for the mirror test (some are only used as
 * map keys/values, which BTF records anyway; these are belt and braces). */
struct ml_tc_if_stats *unused_if_stats __attribute__((unused));
struct ml_tc_rtt_hist *unused_rtt_hist __attribute__((unused));
struct ml_tc_dev *unused_dev __attribute__((unused));

/* Index (slot - 1) * 2 + direction; slot = the filter's classid. Resized by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * 1024);
	__type(key, __u32);
	__type(value, struct ml_tc_if_stats);
} if_slots SEC(".maps");

/* Interfaces without a slot (see above): 2 entries per interface; resized by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 512);
	__type(key, struct ml_tc_if_key);
	__type(value, struct ml_tc_if_stats);
} ifstats SEC(".maps");

/* The L7 packet parser's programs, by direction (agent/sources/tc/chain.py fills it). */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} l7_progs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ml_tc_flow_key);
	__type(value, struct ml_tc_syn);
} syns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ml_tc_rtt_key);
	__type(value, struct ml_tc_rtt_hist);
} rtt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ml_tc_dev_key);
	__type(value, struct ml_tc_dev);
} tracked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ml_tc_drop_key);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ML_TC_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* A header at `off`: read straight from the linear head when it lies there (no helper call),
 * else with bpf_skb_load_bytes, which also reaches paged fragments and bounds-checks against
 * skb->len. `len` is a constant at every call site. Returns 0 on success. */
#define MAX_DIRECT_OFF 256  /* deeper headers (long extension chains) take the helper */
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

/* Atomic although per-CPU: kfree_skb may fire in hard-irq context on top of a tc program. */
static __always_inline void tc_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Every skb either program saw. Not atomic: only the tc programs touch this slot, and a
 * kfree_skb interrupting one touches other slots. */
static __always_inline void packets_seen(void)
{
	__u32 idx = ML_TC_CNT_PACKETS;
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		*v += 1;
}

/* Wire layouts (fixed by the protocols, so no CO-RE). */
struct ml_vlan {
	__u16 tci;
	__u16 proto;
};

struct ml_ip4 {
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

struct ml_ip6 {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct ml_ip6_ext {
	__u8 nexthdr;
	__u8 len;
	__u16 frag_off; /* fragment header only */
	__u32 id;       /* fragment header only */
};

struct ml_tcp {
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

/* Where the headers are; the addresses and ports are read only for a handshake segment. */
struct parsed {
	__u32 l3_off; /* IP header */
	__u32 l4_off; /* TCP header (if tcp) */
	__u8 family;
	__u8 tcp;   /* 1: a TCP header was parsed */
	__u8 flags; /* TCP flags */
	__u8 bare_ack; /* fast_parse: a whole TCP segment, no payload, no SYN/FIN/RST */
	__u8 whole;    /* fast_parse: a whole TCP segment in place (the handoff, tc_handoff.h) */
	__u8 _pad[3];
	__u32 payload_off; /* if whole */
	__u32 payload_len;
};

enum tc_parse_result {
	PARSE_L4 = 0,      /* parsed down to L4 (TCP flags valid if p->tcp) */
	PARSE_NO_L4 = 1,   /* valid, but no L4 header to read (non-IP, later fragment, ESP) */
	PARSE_FAILED = 2,  /* counted by reason */
};

static __always_inline int tc_fail(__u32 reason)
{
	tc_count(reason);
	return PARSE_FAILED;
}

/* The end of the L3 packet: header length field, or skb->len when the field says 0 (BIG TCP
 * GSO packets) or more than the frame holds. Anything after it is Ethernet padding. */
static __always_inline __u32 l3_end(struct __sk_buff *skb, __u32 l3_off, __u32 l3_len)
{
	if (l3_len == 0 || l3_off + l3_len > skb->len)
		return skb->len;
	return l3_off + l3_len;
}

static __always_inline int parse_tcp(struct __sk_buff *skb, __u32 off, __u32 end, struct parsed *p)
{
	struct ml_tcp th;
	__u32 doff;

	if (off + sizeof(th) > end || ld(skb, off, &th, sizeof(th)))
		return tc_fail(ML_TC_CNT_SHORT_TCP);
	doff = (th.doff_res >> 4) * 4;
	if (doff < sizeof(th))
		return tc_fail(ML_TC_CNT_BAD_TCP);
	if (off + doff > end)
		return tc_fail(ML_TC_CNT_SHORT_TCP);
	p->l4_off = off;
	p->flags = th.flags;
	p->tcp = 1;
	return PARSE_L4;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
	struct ml_ip4 ip;
	__u32 ihl, end, tot;

	if (ld(skb, off, &ip, sizeof(ip)))
		return tc_fail(ML_TC_CNT_SHORT_IPV4);
	ihl = (ip.ver_ihl & 0x0f) * 4;
	if ((ip.ver_ihl >> 4) != 4 || ihl < sizeof(ip))
		return tc_fail(ML_TC_CNT_BAD_IPV4);
	tot = bpf_ntohs(ip.tot_len);
	if (tot && tot < ihl)
		return tc_fail(ML_TC_CNT_BAD_IPV4);
	end = l3_end(skb, off, tot);
	if (off + ihl > end)
		return tc_fail(ML_TC_CNT_SHORT_IPV4);
	p->family = 4;
	p->l3_off = off;
	if (bpf_ntohs(ip.frag_off) & 0x1fff) {
		tc_count(ML_TC_CNT_FRAGMENTS); /* only the first fragment carries the L4 header */
		return PARSE_NO_L4;
	}
	if (ip.proto != IPPROTO_TCP)
		return PARSE_L4;
	return parse_tcp(skb, off + ihl, end, p);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
	struct ml_ip6 ip6;
	struct ml_ip6_ext ext;
	__u32 end, hlen;
	__u8 nh;
	int i;

	if (ld(skb, off, &ip6, sizeof(ip6)))
		return tc_fail(ML_TC_CNT_SHORT_IPV6);
	if ((bpf_ntohl(ip6.ver_tc_flow) >> 28) != 6)
		return tc_fail(ML_TC_CNT_BAD_IPV6);
	p->family = 6;
	p->l3_off = off;
	off += sizeof(ip6);
	end = l3_end(skb, off, bpf_ntohs(ip6.payload_len));
	nh = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < ML_TC_MAX_IPV6_EXT; i++) {
		switch (nh) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
		case IPPROTO_AH:
		case IPPROTO_FRAGMENT:
			break;
		case IPPROTO_ESP:
		case IPPROTO_NONE:
			tc_count(ML_TC_CNT_IPV6_NO_L4);
			return PARSE_NO_L4;
		case IPPROTO_TCP:
			return parse_tcp(skb, off, end, p);
		default:
			return PARSE_L4; /* UDP, ICMPv6, ...: no flags to read */
		}
		if (off + 8 > end || ld(skb, off, &ext, sizeof(ext)))
			return tc_fail(ML_TC_CNT_SHORT_IPV6_EXT);
		if (nh == IPPROTO_FRAGMENT) {
			if (bpf_ntohs(ext.frag_off) & 0xfff8) {
				tc_count(ML_TC_CNT_FRAGMENTS);
				return PARSE_NO_L4;
			}
			hlen = 8;
		} else if (nh == IPPROTO_AH) {
			hlen = ((__u32)ext.len + 2) * 4;
		} else {
			hlen = ((__u32)ext.len + 1) * 8;
		}
		if (off + hlen > end)
			return tc_fail(ML_TC_CNT_SHORT_IPV6_EXT);
		off += hlen;
		nh = ext.nexthdr;
	}
	switch (nh) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return tc_fail(ML_TC_CNT_IPV6_EXT_TOO_DEEP);
	case IPPROTO_TCP:
		return parse_tcp(skb, off, end, p);
	}
	return PARSE_L4;
}

static __always_inline int tc_parse(struct __sk_buff *skb, struct parsed *p)
{
	__u16 proto;
	__u32 off = ETH_HLEN;
	struct ml_vlan vh;
	int i;

	/* h_proto is the last two bytes of the Ethernet header */
	if (ld(skb, 12, &proto, sizeof(proto)))
		return tc_fail(ML_TC_CNT_SHORT_ETH);
#pragma unroll
	for (i = 0; i < ML_TC_MAX_VLAN; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (ld(skb, off, &vh, sizeof(vh)))
			return tc_fail(ML_TC_CNT_SHORT_VLAN);
		proto = vh.proto;
		off += sizeof(vh);
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return tc_fail(ML_TC_CNT_VLAN_TOO_DEEP);
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, off, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, off, p);
	tc_count(ML_TC_CNT_NON_IP);
	return PARSE_NO_L4;
}

/* The usual frame in place: untagged IPv4 (not a later fragment) or IPv6 without extension
 * headers, then TCP or a protocol without flags, every header between skb->data and
 * data_end, lengths consistent. PARSE_L4 when it is such a frame (the result tc_parse would
 * give), -1 for anything else, which tc_parse then takes from the start: so every malformed
 * frame is judged, and counted by reason, in one place. */
static __always_inline int fast_parse(struct __sk_buff *skb, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 len = skb->len, l4, l3end, doff;
	__u8 *th, vi, nh, whole = 1;
	__u16 tot;

	if (data + ETH_HLEN + sizeof(struct ml_ip6) > end)
		return -1;
	if (*(__u16 *)(data + 12) == bpf_htons(ETH_P_IP)) {
		vi = *(__u8 *)(data + ETH_HLEN);
		if ((vi >> 4) != 4 || (vi & 0x0f) < 5)
			return -1;
		tot = bpf_ntohs(*(__u16 *)(data + ETH_HLEN + 2));
		l4 = ETH_HLEN + (vi & 0x0f) * 4;
		l3end = ETH_HLEN + tot;
		if (l3end < l4 || l3end > len || (*(__u16 *)(data + ETH_HLEN + 6) & bpf_htons(0x1fff)))
			return -1; /* BIG TCP's 0, a lie, a later fragment: the general parser decides */
		p->family = 4;
		p->l3_off = ETH_HLEN;
		p->tcp = 0;
		whole = !(*(__u16 *)(data + ETH_HLEN + 6) & bpf_htons(0x2000)); /* MF: a first fragment */
		if (*(__u8 *)(data + ETH_HLEN + 9) != IPPROTO_TCP)
			return PARSE_L4;
	} else if (*(__u16 *)(data + 12) == bpf_htons(ETH_P_IPV6)) {
		if ((*(__u8 *)(data + ETH_HLEN) >> 4) != 6)
			return -1;
		tot = bpf_ntohs(*(__u16 *)(data + ETH_HLEN + 4));
		l4 = ETH_HLEN + sizeof(struct ml_ip6);
		l3end = l4 + tot;
		if (!tot || l3end > len)
			return -1;
		nh = *(__u8 *)(data + ETH_HLEN + 6);
		p->family = 6;
		p->l3_off = ETH_HLEN;
		p->tcp = 0;
		if (nh != IPPROTO_TCP) {
			switch (nh) {
			case IPPROTO_HOPOPTS:
			case IPPROTO_ROUTING:
			case IPPROTO_DSTOPTS:
			case IPPROTO_AH:
			case IPPROTO_FRAGMENT:
			case IPPROTO_ESP:
			case IPPROTO_NONE:
				return -1;
			}
			return PARSE_L4;
		}
	} else {
		return -1;
	}
	th = data + l4;
	if ((void *)(th + sizeof(struct ml_tcp)) > end || l4 + sizeof(struct ml_tcp) > l3end)
		return -1;
	doff = (th[12] >> 4) * 4;
	if (doff < sizeof(struct ml_tcp) || l4 + doff > l3end)
		return -1;
	p->l4_off = l4;
	p->flags = th[13];
	p->tcp = 1;
	p->whole = whole;
	p->payload_off = l4 + doff;
	p->payload_len = l3end - (l4 + doff);
	p->bare_ack = whole && !p->payload_len && !(th[13] & (TCP_SYN | TCP_FIN | TCP_RST));
	return PARSE_L4;
}

/* The counters of an interface without a slot (see the header comment): created on its
 * first packet in the `ifstats` hash. */
static __always_inline struct ml_tc_if_stats *unslotted_stats(__u32 ifindex, __u32 dir)
{
	struct ml_tc_if_key key = { .ifindex = ifindex, .direction = dir };
	struct ml_tc_if_stats zero = {};
	struct ml_tc_if_stats *s;

	s = bpf_map_lookup_elem(&ifstats, &key);
	if (s)
		return s;
	bpf_map_update_elem(&ifstats, &key, &zero, BPF_NOEXIST); /* EEXIST if another CPU won */
	s = bpf_map_lookup_elem(&ifstats, &key);
	if (!s)
		tc_count(ML_TC_CNT_IFSTATS_FULL);
	return s;
}

/* Number of significant bits of us (0 -> 0, 1 -> 1, 2..3 -> 2, ...): the histogram slot. */
static __always_inline __u32 log2_slot(__u64 us)
{
	__u32 bits = 0, shift;

	shift = (us > 0xFFFFFFFFULL) << 5; us >>= shift; bits |= shift;
	shift = (us > 0xFFFF) << 4; us >>= shift; bits |= shift;
	shift = (us > 0xFF) << 3; us >>= shift; bits |= shift;
	shift = (us > 0xF) << 2; us >>= shift; bits |= shift;
	shift = (us > 0x3) << 1; us >>= shift; bits |= shift;
	bits |= (us >> 1);
	return us ? bits + 1 : 0;
}

static __always_inline void record_rtt(struct ml_tc_flow_key *syn, __u64 rtt_ns)
{
	struct ml_tc_rtt_key key = {};
	struct ml_tc_rtt_hist zero = {};
	struct ml_tc_rtt_hist *h;
	__u32 slot;

	key.ifindex = syn->ifindex;
	key.family = syn->family;
	/* The endpoint behind the interface sent the SYN if it came in on ingress. */
	key.role = syn->direction == ML_TC_INGRESS ? ML_TC_ROLE_CLIENT : ML_TC_ROLE_SERVER;
	if (key.role == ML_TC_ROLE_CLIENT)
		__builtin_memcpy(key.peer, syn->daddr, 16);
	else
		__builtin_memcpy(key.peer, syn->saddr, 16);
	h = bpf_map_lookup_elem(&rtt, &key);
	if (!h) {
		bpf_map_update_elem(&rtt, &key, &zero, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&rtt, &key);
		if (!h) {
			tc_count(ML_TC_CNT_RTT_FULL);
			return;
		}
	}
	slot = log2_slot(rtt_ns / 1000);
	if (slot >= ML_TC_RTT_SLOTS)
		slot = ML_TC_RTT_SLOTS - 1;
	h->count += 1;
	h->sum_ns += rtt_ns;
	barrier_var(slot); /* keep the mask below: it is what the verifier needs to see */
	h->slots[slot & (ML_TC_RTT_SLOTS - 1)] += 1;
}

/* The 4-tuple of a handshake segment, read from the headers the parser located. */
static __always_inline int read_tuple(struct __sk_buff *skb, struct parsed *p, struct ml_tc_flow_key *k)
{
	__u16 ports[2];

	if (p->family == 4) {
		if (ld(skb, p->l3_off + 12, k->saddr, 4) || ld(skb, p->l3_off + 16, k->daddr, 4))
			return -1;
	} else if (ld(skb, p->l3_off + 8, k->saddr, 16) || ld(skb, p->l3_off + 24, k->daddr, 16)) {
		return -1;
	}
	if (ld(skb, p->l4_off, ports, sizeof(ports)))
		return -1;
	k->sport = bpf_ntohs(ports[0]);
	k->dport = bpf_ntohs(ports[1]);
	return 0;
}

/* A SYN, SYN-ACK or RST (the caller checks): start, close or cancel a handshake. Inlined,
 * not a subprogram: a program with a tail call and subprograms gets 256 bytes of stack per
 * frame, and the general parser needs more. */
static __always_inline void track_handshake(struct __sk_buff *skb, struct parsed *p, __u32 dir)
{
	struct ml_tc_flow_key seg = {}, key = {};
	struct ml_tc_syn *waiting;
	struct ml_tc_syn syn;
	__u8 f = p->flags;

	if (read_tuple(skb, p, &seg))
		return; /* cannot happen: the parser read these bytes */
	key.ifindex = skb->ifindex;
	key.family = p->family;
	if ((f & TCP_SYN) && !(f & TCP_ACK)) {
		__builtin_memcpy(key.saddr, seg.saddr, 16);
		__builtin_memcpy(key.daddr, seg.daddr, 16);
		key.sport = seg.sport;
		key.dport = seg.dport;
		key.direction = dir;
		if (bpf_map_lookup_elem(&syns, &key))
			tc_count(ML_TC_CNT_SYN_RETRANSMITS);
		syn.ts_ns = bpf_ktime_get_ns();
		if (bpf_map_update_elem(&syns, &key, &syn, BPF_ANY))
			tc_count(ML_TC_CNT_SYNS_FULL);
		return;
	}
	/* A SYN-ACK or RST answers the SYN that went the other way on this interface. */
	__builtin_memcpy(key.saddr, seg.daddr, 16);
	__builtin_memcpy(key.daddr, seg.saddr, 16);
	key.sport = seg.dport;
	key.dport = seg.sport;
	key.direction = dir == ML_TC_INGRESS ? ML_TC_EGRESS : ML_TC_INGRESS;
	waiting = bpf_map_lookup_elem(&syns, &key);
	if (!waiting) {
		if (f & TCP_SYN)
			tc_count(ML_TC_CNT_SYNACK_UNMATCHED);
		return;
	}
	if (f & TCP_SYN) {
		__u64 now = bpf_ktime_get_ns();
		__u64 then = waiting->ts_ns;

		record_rtt(&key, now > then ? now - then : 0);
	} else {
		tc_count(ML_TC_CNT_SYN_RESET);
	}
	bpf_map_delete_elem(&syns, &key);
}

static __always_inline int tc_handle(struct __sk_buff *skb, __u32 dir)
{
	/* the slot's two entries: (classid - 1) * 2 + dir; classid 0 wraps past the array */
	__u32 idx = skb->tc_classid * 2 + dir - 2;
	struct ml_tc_if_stats *s = bpf_map_lookup_elem(&if_slots, &idx);
	struct parsed p = {};
	__u32 segs;
	int res;

	packets_seen();
	res = fast_parse(skb, &p);
	if (res < 0)
		res = tc_parse(skb, &p);
	if (!s)
		s = unslotted_stats(skb->ifindex, dir);
	if (s) {
		segs = skb->gso_segs;
		s->packets += 1;
		s->bytes += skb->len;
		s->segs += segs > 1 ? segs : 1;
		if (res == PARSE_FAILED)
			s->parse_failures += 1;
	}
	if (res == PARSE_L4 && p.tcp && (p.flags & (TCP_SYN | TCP_FIN | TCP_RST))) {
		if (s) {
			if (p.flags & TCP_SYN) {
				if (p.flags & TCP_ACK)
					s->tcp_synack += 1;
				else
					s->tcp_syn += 1;
			}
			if (p.flags & TCP_FIN)
				s->tcp_fin += 1;
			if (p.flags & TCP_RST)
				s->tcp_rst += 1;
		}
		if (p.flags & (TCP_SYN | TCP_RST))
			track_handshake(skb, &p, dir);
	}
	/* The L7 parser, when the agent chained it. Not for a bare ACK (about half the packets
	 * of a request/response exchange), which it would only parse again to return at once:
	 * only a frame fast_parse read whole qualifies, untagged and unfragmented, with the
	 * payload length the parser itself would compute, so everything else (UDP, VLAN, IPv6
	 * extension headers, fragments, frames the counters could not parse) still goes to it. */
	if (p.bare_ack)
		return TC_ACT_UNSPEC;
	/* What the headers said, so the parser does not read them again (tc_handoff.h) */
	if (p.whole) {
		__u32 w1 = p.l4_off | (p.payload_off << 16), w2 = p.payload_len;
		__u32 w3 = p.family | ((__u32)p.flags << 8);

		skb->cb[1] = w1;
		skb->cb[2] = w2;
		skb->cb[3] = w3;
		skb->cb[4] = w1 ^ w2 ^ w3 ^ ML_HANDOFF_CHECK;
		skb->cb[0] = ML_HANDOFF_MAGIC ^ skb->len;
	} else {
		skb->cb[0] = 0;
	}
	bpf_tail_call(skb, &l7_progs, dir);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int meshlens_tc_in(struct __sk_buff *skb)
{
	return tc_handle(skb, ML_TC_INGRESS);
}

SEC("tc")
int meshlens_tc_eg(struct __sk_buff *skb)
{
	return tc_handle(skb, ML_TC_EGRESS);
}

SEC("tp/skb/kfree_skb")
int handle_tc_kfree_skb(struct trace_event_raw_kfree_skb *ctx)
{
	struct sk_buff *skb = ctx->skbaddr;
	struct ml_tc_dev_key dk = {};
	struct ml_tc_drop_key key = {};
	struct net_device *dev;
	struct ml_tc_dev *t;
	__u64 one = 1, *v;
	__u32 reason;

	dev = BPF_CORE_READ(skb, dev);
	if (!dev)
		return 0;
	dk.ifindex = BPF_CORE_READ(dev, ifindex);
	dk.netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	t = bpf_map_lookup_elem(&tracked, &dk);
	if (!t)
		return 0;
	tc_count(ML_TC_CNT_DROPS_SEEN);
	reason = ctx->reason;
	key.ifindex = t->host_ifindex;
	key.side = t->side;
	key.reason = reason > ML_TC_DROP_REASON_MAX ? ML_TC_DROP_REASON_MAX : reason;
	v = bpf_map_lookup_elem(&drops, &key);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return 0;
	}
	if (bpf_map_update_elem(&drops, &key, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&drops, &key);
		if (v)
			__sync_fetch_and_add(v, 1);
		else
			tc_count(ML_TC_CNT_DROPS_FULL);
	}
	return 0;
}
