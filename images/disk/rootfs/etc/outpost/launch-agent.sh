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
# Self-update (U2, docs/operations.md "Agent upgrades"): the agent keeps the stable link
# agent/current on the data partition, pointing at the binary to start (this image's at first,
# a self-updated slot once one committed). A new binary on trial that exits brings busybox init
# back here, to `current`, still the previous binary, which rolls the trial back.
agent=/usr/bin/outpost-agent
# The control this box runs when it leads (D6) is the image's, also when the agent runs from a
# self-updated slot (the agent otherwise looks next to its own binary).
[ -n "${OUTPOST_CONTROL_PROGRAM:-}" ] || export OUTPOST_CONTROL_PROGRAM=/usr/bin/outpost-control
[ -x /var/lib/outpost/agent/current ] && agent=/var/lib/outpost/agent/current
echo "outpost-boot: starting $agent at $(cut -d' ' -f1 /proc/uptime) s" >/dev/console
exec "$agent" run --data-dir /var/lib/outpost
