# Sourced by start_head.sh and start_worker.sh: sets ip_addr to this node's IP address,
# from NODE_IP, else the first IPv4 address of RAY_NET_IFACE, else `hostname -I`.
node_ip() {
    if [[ -n "${NODE_IP:-}" ]]; then
        echo "$NODE_IP"
    elif [[ -n "${RAY_NET_IFACE:-}" ]]; then
        ip -4 -o addr show dev "$RAY_NET_IFACE" | awk '{split($4, a, "/"); print a[1]; exit}'
    else
        hostname -I | awk '{print $1}'
    fi
}

ip_addr=$(node_ip)
if [[ -z "$ip_addr" ]]; then
    echo "$(basename "$0"): cannot determine this node's IP address; set NODE_IP" >&2
    exit 1
fi
