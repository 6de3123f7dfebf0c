#!/bin/sh
# A sentinel of docker-compose.ha.yml. Its config file is its memory of the failovers it took part in: written at
# its first start, then kept on its volume (a sentinel rewrites it as it learns replicas, peers and new primaries).
set -eu
config=/data/sentinel.conf
if [ ! -f "$config" ]; then
  cat > "$config" <<CONFIG
port 26379
dir /data
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $NODE
sentinel monitor $LOOKALIKE_REDIS_MASTER redis 6379 2
sentinel down-after-milliseconds $LOOKALIKE_REDIS_MASTER $DOWN_AFTER_MS
sentinel failover-timeout $LOOKALIKE_REDIS_MASTER 60000
CONFIG
fi
exec redis-server "$config" --sentinel
