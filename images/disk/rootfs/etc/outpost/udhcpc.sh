#!/bin/sh
# /etc/outpost/udhcpc.sh — applies a DHCP lease from busybox udhcpc (address, routers, dns).
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for router in $router; do
            ip route replace default via "$router" dev "$interface"
            break
        done
        : >/etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >>/etc/resolv.conf
        done
        echo "outpost-boot: dhcp $interface $ip/${mask:-24} router ${router:-none} at $(cut -d' ' -f1 /proc/uptime) s" >/dev/console
        ;;
esac
exit 0
