// SPDX-License-Identifier: Apache-2.0
//
// The kernel half of secrets-proxy's kernel relay (src/kernel_relay.rs says when and why).
// A session's two sockets (client and server) are both in PEERS, each under the other's
// socket cookie, so that what arrives on one is sent out of the other without waking the
// proxy. Until user space arms a socket (puts its cookie in ARMED), what arrives on it goes
// to the proxy as usual.

// The few kernel ABI numbers used, from linux/bpf.h (stable; spelled out so that building
// needs clang only, not the kernel headers of one architecture).
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_SOCKHASH 18
#define SK_PASS 1
struct __sk_buff {
    __u32 len;
};
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key,
                                    __u64 flags) = (void *)72;

#define SEC(name) __attribute__((section(name), used))

// The layout aya reads from a "maps" section.
struct map_definition {
    __u32 type;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u32 map_flags;
};

#define SESSION_SOCKETS 65536

// Socket cookie -> the session's other socket.
SEC("maps") struct map_definition PEERS = {
    .type = BPF_MAP_TYPE_SOCKHASH,
    .key_size = sizeof(__u64),
    .value_size = sizeof(__u32),
    .max_entries = SESSION_SOCKETS,
};

// Socket cookie -> its slot in REDIRECTED, for the sockets whose data the kernel relays.
SEC("maps") struct map_definition ARMED = {
    .type = BPF_MAP_TYPE_HASH,
    .key_size = sizeof(__u64),
    .value_size = sizeof(__u32),
    .max_entries = SESSION_SOCKETS,
};

// Bytes relayed from each armed socket: the proxy's byte metrics, and how it knows whether
// anything was relayed while it disarmed a socket.
SEC("maps") struct map_definition REDIRECTED = {
    .type = BPF_MAP_TYPE_ARRAY,
    .key_size = sizeof(__u32),
    .value_size = sizeof(__u64),
    .max_entries = SESSION_SOCKETS,
};

SEC("sk_skb/stream_verdict")
int relay(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    __u32 *slot = bpf_map_lookup_elem(&ARMED, &cookie);
    if (!slot)
        return SK_PASS;
    __u64 *bytes = bpf_map_lookup_elem(&REDIRECTED, slot);
    if (bytes)
        __sync_fetch_and_add(bytes, skb->len);
    return bpf_sk_redirect_hash(skb, &PEERS, &cookie, 0);
}

char LICENSE[] SEC("license") = "Apache-2.0";
