#!/bin/sh
# One node of gptoss's Redis, watched by Sentinel; compose and Kubernetes run this same script:
#
#   start.sh redis [redis-server options...]         a Redis: the primary, or a replica of it
#   start.sh sentinel [redis-sentinel options...]    a Sentinel watching that primary
#
# Where the primary is, asked on every start: what a Sentinel says, else a Redis that says it is the
# primary, else (a cold start) the first of REDIS_NODES. So a node that restarts after a failover
# rejoins the new primary instead of claiming the role back, and Sentinels keep no state on disk.
#
# Environment: REDIS_SELF (host:port others reach this node at: its replica-announce-ip, or the
# Sentinel's announce-ip), REDIS_NODES and SENTINEL_NODES (every one, host:port, space-separated),
# SENTINEL_MASTER (default gptoss), SENTINEL_QUORUM (Sentinels only), SENTINEL_DOWN_AFTER_MS,
# SENTINEL_FAILOVER_TIMEOUT_MS, REDIS_DIR (data, default /data), REDIS_CONF_DIR (default /tmp), and
# REDISCLI_AUTH: the password of every Redis and Sentinel (redis-cli sends it too). It is written
# into this node's config file, never onto a command line, which `ps` shows to every user.
set -eu

ROLE=${1:?usage: start.sh redis|sentinel [options...]}
shift
SELF=${REDIS_SELF:?host:port this node is reached at}
NODES=${REDIS_NODES:?every Redis, host:port separated by spaces}
SENTINELS=${SENTINEL_NODES:?every Sentinel, host:port separated by spaces}
MASTER=${SENTINEL_MASTER:-gptoss}
DIR=${REDIS_DIR:-/data}
CONF_DIR=${REDIS_CONF_DIR:-/tmp}
: "${REDISCLI_AUTH:?the password of every Redis and Sentinel}"

ask() { # redis-cli at host:port $1, the rest its command; nothing when it does not answer in time
  at=$1
  shift
  timeout 3 redis-cli -h "${at%:*}" -p "${at##*:}" "$@" 2>/dev/null || true
}

primary() { # host:port of the primary now
  for sentinel in $SENTINELS; do
    # shellcheck disable=SC2046  # two words: host and port
    set -- $(ask "$sentinel" sentinel get-master-addr-by-name "$MASTER")
    if [ $# -eq 2 ] && [ -n "$2" ] && [ -z "$(echo "$2" | tr -d 0-9)" ]; then
      echo "$1:$2"
      return
    fi
  done
  for node in $NODES; do
    if [ "$node" != "$SELF" ] && [ "$(ask "$node" role | head -n 1)" = master ]; then
      echo "$node"
      return
    fi
  done
  # shellcheck disable=SC2086
  set -- $NODES
  echo "$1"
}

umask 077
at=$(primary)
case $ROLE in
redis)
  conf=$CONF_DIR/redis.conf
  {
    echo "port ${SELF##*:}"
    echo "dir $DIR"
    echo "requirepass \"$REDISCLI_AUTH\""
    echo "masterauth \"$REDISCLI_AUTH\"" # a replica's password to its primary: any node may become one
    # The primary lists its replicas (and Sentinel learns them) by name, not by a container's IP.
    echo "replica-announce-ip ${SELF%:*}"
    echo "replica-announce-port ${SELF##*:}"
    if [ "$at" != "$SELF" ]; then
      echo "replicaof ${at%:*} ${at##*:}"
    fi
  } >"$conf"
  echo "start.sh: redis at $SELF, primary $at" >&2
  exec redis-server "$conf" "$@"
  ;;
sentinel)
  conf=$CONF_DIR/sentinel.conf # Sentinel rewrites its config file as it learns: it must be writable
  {
    echo "port ${SELF##*:}"
    echo "dir $CONF_DIR"
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames yes"
    echo "sentinel announce-ip ${SELF%:*}"
    echo "sentinel announce-port ${SELF##*:}"
    echo "requirepass \"$REDISCLI_AUTH\"" # clients' and the other Sentinels' password to this one
    echo "sentinel monitor $MASTER ${at%:*} ${at##*:} ${SENTINEL_QUORUM:?Sentinels that must agree}"
    echo "sentinel auth-pass $MASTER \"$REDISCLI_AUTH\""
    echo "sentinel down-after-milliseconds $MASTER ${SENTINEL_DOWN_AFTER_MS:-5000}"
    echo "sentinel failover-timeout $MASTER ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}"
    echo "sentinel parallel-syncs $MASTER 1"
  } >"$conf"
  echo "start.sh: sentinel at $SELF, primary $at" >&2
  exec redis-sentinel "$conf" "$@"
  ;;
*)
  echo "start.sh: unknown role $ROLE (redis or sentinel)" >&2
  exit 2
  ;;
esac
