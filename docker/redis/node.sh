#!/bin/sh
# A Redis node of the compose deployment. Alone (docker-compose.yml), it is the one Redis. With sentinels
# (docker-compose.ha.yml sets LOOKALIKE_REDIS_MASTER), it starts as a replica of the primary they name, and only
# when none answers (the very first start) as the primary, for the service `redis`, or as its replica: so a node
# that comes back, or a `down` and `up` after a failover, never makes a second primary.
set -eu
primary=""
if [ -n "${LOOKALIKE_REDIS_MASTER:-}" ]; then
  tries=0
  while [ -z "$primary" ] && [ "$tries" -lt 20 ]; do
    for sentinel in sentinel-1 sentinel-2 sentinel-3; do
      primary=$(redis-cli -h "$sentinel" -p 26379 --raw sentinel get-master-addr-by-name "$LOOKALIKE_REDIS_MASTER" \
                2>/dev/null | head -n 1) || primary=""
      [ -n "$primary" ] && break
    done
    tries=$((tries + 1))
    [ -n "$primary" ] || sleep 1
  done
fi
[ -n "$primary" ] || primary=redis
if [ "$primary" = "$NODE" ]; then
  set --
else
  set -- --replicaof "$primary" 6379
fi
# noeviction: queues, load records and the change feed are never evicted; the web stops taking searches at 80%.
# --dir and --protected-mode as the official image has them, so that a Redis built from Debian's package runs alike.
exec redis-server --dir /data --protected-mode no --appendonly yes --appendfsync everysec \
  --maxmemory 2gb --maxmemory-policy noeviction --replica-announce-ip "$NODE" "$@"
