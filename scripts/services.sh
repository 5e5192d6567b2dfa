#!/usr/bin/env bash
# Start the local services Sluice's tests and `make run` use, if they are not running:
# PostgreSQL (127.0.0.1:5432), RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379).
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "services: $name did not come up on port $port" >&2
  return 1
}

if ! port_open 5432; then
  echo "services: starting PostgreSQL" >&2
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  else
    echo "services: PostgreSQL is not running and pg_ctlcluster is missing" >&2
    exit 1
  fi
  wait_port 5432 PostgreSQL
fi

if ! port_open 5672; then
  echo "services: starting RabbitMQ" >&2
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
if ! port_open 6379; then
  echo "services: starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis
fi

# The port opens before the broker accepts clients; wait until it is fully booted.
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl await_startup --timeout 120 >/dev/null
fi
echo "services: PostgreSQL, RabbitMQ and Redis are up" >&2
