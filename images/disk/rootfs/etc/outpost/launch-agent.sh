#!/bin/sh
# /etc/outpost/launch-agent.sh — started (and restarted) by busybox init: runs the agent with
# the OUTPOST_* settings the boot script copied from the boot partition.
export PATH=/bin:/sbin:/usr/bin
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
if [ -e /run/outpost/agent-started ]; then
    # A restart after an exit: do not spin.
    sleep 2
fi
: >/run/outpost/agent-started
while IFS= read -r line; do
    case "$line" in OUTPOST_*=*) export "$line" ;; esac
done </run/outpost/agent.env
echo "outpost-boot: starting outpost-agent at $(cut -d' ' -f1 /proc/uptime) s" >/dev/console
exec /usr/bin/outpost-agent run --data-dir /var/lib/outpost
