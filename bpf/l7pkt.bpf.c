// SPDX-License-Identifier: GPL-2.0
/* l7pkt.bpf.c — HTTP/1.x and DNS golden signals from the packets at each pod's host-side veth.
 *
 * Kernel side of the packet L7 path (agent/sources/l7/packets.py loads it and attaches the two
 * sched_cls programs beside tc.bpf.c's on every pod veth). It produces the same `http_stats`
 * series, `l7_events` records and `l7_counters` as l7.bpf.c (one parser, bpf/include/
 * http_parser.h), without the syscall-tracepoint slow path, and it sees bodies sent with
 * sendfile/splice, which no write syscall shows.
 *
 * Direction at the host side of the veth: ingress = bytes the pod sent ("out" stream),
 * egress = bytes delivered to the pod ("in" stream). A pod that receives a method is a server,
 * one that sends a method a client. Only interfaces in `pkt_ifaces` are parsed (the agent adds
 * a pod's veth with the pod's netns inode), so a connection between two pods of the node is
 * observed once per side, each at its own pod's veth.
 *
 * Per connection (`pkt_conns`, LRU, key = interface + pod-oriented 4-tuple) and direction:
 * the next expected TCP sequence number. A segment wholly before it (retransmit, duplicate) is
 * skipped; a partial overlap skips its old prefix; a gap inside a body of known length is
 * skipped by arithmetic (body bytes are never read); any other gap desynchronises the
 * connection (counted, pending requests dropped) until a segment of that direction starts a
 * request or status line. Every message of a segment is parsed (pipelining, GSO).
 *
 * Latency: server = first request byte delivered to the pod -> first response byte the pod
 * sent; client = request sent -> first response byte delivered. Payload length is the IP
 * packet's own length less headers (Ethernet padding is never read).
 *
 * DNS (UDP): datagrams the pod sends to port 53 and the answers delivered to it go to user
 * space as ML_EV_DNS records (the same as the syscall path's, with the connection's hash in
 * place of the socket), paired there by (hash, txid).
 *
 * The parse core (sequence tracking, parser, DNS pairing) is bpf/include/l7pkt_core.h, shared
 * with the cgroup_skb entry points of bpf/l7cg.bpf.c (traffic no pod veth carries).
 *
 * Both programs return TC_ACT_UNSPEC: they observe, the next filter decides.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
/* A packet can carry a whole pipelined burst before any response (50 requests in one send
 * fit in one segment): requests wait in a deeper FIFO than on the syscall path. */
#define FIFO 64
#include "http_parser.h"
#include "l7pkt.h"
/* The continuations of a segment whose headers outlast one run's budget (l7pkt_core.h,
 * continue_segment): one program array per direction (the same
 * layout as l7cg.bpf.c's). Filled by libbpf at load. */
int meshlens_l7_egc(struct __sk_buff *skb);
int meshlens_l7_inc(struct __sk_buff *skb);

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(struct __sk_buff *));
} pkt_cont_out SEC(".maps") = { .values = { [0] = (void *)&meshlens_l7_egc } };

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(struct __sk_buff *));
} pkt_cont_in SEC(".maps") = { .values = { [0] = (void *)&meshlens_l7_inc } };

#include "l7pkt_core.h"
#include "tc_handoff.h"

char LICENSE[] SEC("license") = "GPL";


#define TC_ACT_UNSPEC (-1)
#define ETH_HLEN 14
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);               /* ifindex */
	__type(value, struct ml_pkt_iface);
} pkt_ifaces SEC(".maps");

struct ml_pkt_iface *unused_iface __attribute__((unused));

/* 1 when the agent runs these programs from the tc counter programs (a tail call, one filter
 * per hook) rather than as filters of their own: only then is skb->cb theirs to read. */
const volatile __u32 tc_chained = 0;

/* Ethernet (+2 VLAN tags), then the shared IP/L4 parse. */
static __noinline int parse(struct __sk_buff *skb, struct pkt *p)
{
	__u32 off = ETH_HLEN;
	__u16 proto = 0, vlan[2];
	int i;

	if (ld(skb, 12, &proto, 2))
		return -1;
#pragma unroll
	for (i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (ld(skb, off, vlan, 4))
			return -1;
		proto = vlan[1];
		off += 4;
	}
	return parse_ip(skb, p, off, proto);
}

/* The headers as the counters found them (tc_handoff.h): 0 with p filled as parse() fills it
 * for a TCP segment, or -1 when cb holds no handoff for this skb (then parse() decides). The
 * addresses, ports and sequence number are read here, in place; the rest is taken as the
 * counters computed it from the same bytes. */
static __always_inline int from_handoff(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 w1 = skb->cb[1], w2 = skb->cb[2], w3 = skb->cb[3], l4;
	__u16 *ports;

	if (skb->cb[0] != (ML_HANDOFF_MAGIC ^ skb->len) || skb->cb[4] != (w1 ^ w2 ^ w3 ^ ML_HANDOFF_CHECK))
		return -1;
	l4 = w1 & 0xff;   /* at most 14 + 60: the mask is for the verifier */
	if (data + l4 + 8 > end)
		return -1;
	ports = data + l4;
	__builtin_memset(&p->key, 0, sizeof(p->key));
	if ((w3 & 0xff) == 4) {
		if (data + ML_HANDOFF_L3_OFF + 20 > end)
			return -1;
		p->key.family = AF_INET;
		if (p->dir == DIR_OUT) {
			__builtin_memcpy(p->key.local_addr, data + ML_HANDOFF_L3_OFF + 12, 4);
			__builtin_memcpy(p->key.peer_addr, data + ML_HANDOFF_L3_OFF + 16, 4);
		} else {
			__builtin_memcpy(p->key.local_addr, data + ML_HANDOFF_L3_OFF + 16, 4);
			__builtin_memcpy(p->key.peer_addr, data + ML_HANDOFF_L3_OFF + 12, 4);
		}
	} else {
		if (data + ML_HANDOFF_L3_OFF + 40 > end)
			return -1;
		p->key.family = AF_INET6;
		if (p->dir == DIR_OUT) {
			__builtin_memcpy(p->key.local_addr, data + ML_HANDOFF_L3_OFF + 8, 16);
			__builtin_memcpy(p->key.peer_addr, data + ML_HANDOFF_L3_OFF + 24, 16);
		} else {
			__builtin_memcpy(p->key.local_addr, data + ML_HANDOFF_L3_OFF + 24, 16);
			__builtin_memcpy(p->key.peer_addr, data + ML_HANDOFF_L3_OFF + 8, 16);
		}
	}
	p->proto = IPPROTO_TCP;
	p->seq = bpf_ntohl(*(__u32 *)(ports + 2));
	p->tcp_flags = w3 >> 8;
	p->payload_off = w1 >> 16;
	p->payload_len = w2;
	if (p->dir == DIR_OUT) {
		p->key.local_port = bpf_ntohs(ports[0]);
		p->key.peer_port = bpf_ntohs(ports[1]);
	} else {
		p->key.local_port = bpf_ntohs(ports[1]);
		p->key.peer_port = bpf_ntohs(ports[0]);
	}
	return 0;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct ml_pkt_iface *iface;
	struct pkt p;
	int r;

	p.dir = dir;
	p.proto = 0;
	__builtin_memset(p.comm, 0, sizeof(p.comm));   /* a packet at a veth names no process */
	p.payload_len = 0;
	p.tcp_flags = 0;
	p.cgroup_id = 0;   /* a packet at a veth names no process or cgroup: the pod is its netns */
	r = -1;
	if (tc_chained)
		r = from_handoff(skb, &p);
	if (r)
		r = parse(skb, &p);
	if (r > 0)
		return TC_ACT_UNSPEC;
	/* a pure ACK (half the packets of a request/response exchange): nothing for L7, and
	 * not a single map lookup */
	if (r == 0 && p.proto == IPPROTO_TCP && p.payload_len == 0 && !(p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST)))
		return TC_ACT_UNSPEC;
	iface = bpf_map_lookup_elem(&pkt_ifaces, &ifindex);
	if (!iface)
		return TC_ACT_UNSPEC;
	if (r < 0) {
		count(ML_L7_PKT_UNPARSED);
		return TC_ACT_UNSPEC;
	}
	p.key.ifindex = ifindex;
	if (p.proto == IPPROTO_TCP && p.key.peer_port == 53)
		dns_tcp_segment(skb, &p, iface->netns);
	else if (p.proto == IPPROTO_TCP)
		http_segment(skb, &p, iface->netns, dir);
	else
		dns_message(skb, &p, iface->netns, p.payload_off, p.payload_len);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int meshlens_l7_in(struct __sk_buff *skb)
{
	return handle(skb, DIR_OUT);  /* host-side ingress: the pod sent it */
}

SEC("tc")
int meshlens_l7_eg(struct __sk_buff *skb)
{
	return handle(skb, DIR_IN);   /* host-side egress: delivered to the pod */
}

SEC("tc")
int meshlens_l7_egc(struct __sk_buff *skb)
{
	segment_continued(skb, DIR_OUT);   /* the rest of a long segment the pod sent */
	return TC_ACT_UNSPEC;
}

SEC("tc")
int meshlens_l7_inc(struct __sk_buff *skb)
{
	segment_continued(skb, DIR_IN);    /* the rest of a long segment delivered to it */
	return TC_ACT_UNSPEC;
}
