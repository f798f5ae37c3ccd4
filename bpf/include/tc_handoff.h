/* tc_handoff.h — what the tc counter programs (bpf/tc.bpf.c) hand the chained L7 packet
 * parser (bpf/l7pkt.bpf.c) in skb->cb, so a packet's headers are parsed once: a tail call
 * keeps the skb, and with it the 20 bytes of cb a tc program may use.
 *
 * Written right before the tail call, for every frame handed on: the layout below for a TCP
 * segment the counters read whole in place (untagged IPv4 without fragmentation or IPv6
 * without extension headers, every header in the linear head, lengths consistent), else
 * cb[0] = 0. The parser takes it only when it runs chained (its `tc_chained` knob; a
 * standalone filter never reads cb) and only when the magic matches this skb's length and
 * the check word the other three; otherwise it parses the headers itself, as before.
 */
#ifndef MESHLENS_TC_HANDOFF_H
#define MESHLENS_TC_HANDOFF_H

#define ML_HANDOFF_MAGIC 0x6d6c3768U   /* "ml7h"; cb[0] = ML_HANDOFF_MAGIC ^ skb->len */
#define ML_HANDOFF_CHECK 0x2f7c0be1U   /* cb[4] = cb[1] ^ cb[2] ^ cb[3] ^ ML_HANDOFF_CHECK */

/* cb[1]: L4 (TCP) header offset, low 16 bits; payload offset, high 16 bits.
 * cb[2]: payload length (from the IP header's length: Ethernet padding excluded).
 * cb[3]: IP version (4 or 6), low 8 bits; TCP flags, bits 8-15. The L3 header is at 14. */
#define ML_HANDOFF_L3_OFF 14

#endif
