#!/usr/bin/env bash
# The local stack without Docker: one Apache Kafka broker (KRaft, official jars from
# Maven Central) and PostgreSQL (Debian's package), both on 127.0.0.1.
#
#   deploy/local/stack.sh up       start what is not running, wait until ready
#   deploy/local/stack.sh down     stop both
#   deploy/local/stack.sh status   say what runs
#   deploy/local/stack.sh restart-kafka | restart-postgres   (the chaos suite's broker and database restarts)
#   deploy/local/stack.sh pg-tls   give the running PostgreSQL a TLS certificate from a local CA (part of
#                                  `up`; no restart, plaintext connections still accepted)
#
# Environment: ENRICH_STACK_DIR (state and logs, default .stack/ in the repository),
# KAFKA_HEAP_OPTS (default -Xms256m -Xmx768m), KAFKA_PORT (9092), PG_PORT (5432).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
stack_dir=${ENRICH_STACK_DIR:-$root/.stack}
kafka_port=${KAFKA_PORT:-9092}
controller_port=$((kafka_port + 1))
pg_port=${PG_PORT:-5432}
pg_version=15
# The server's TLS material sits beside the cluster's configuration, not in a checkout, so
# the server never depends on a working tree; clients get a copy of the CA in the stack dir.
pg_tls_dir=/etc/postgresql/$pg_version/main/enrich-tls
pg_tls_client_ca=$stack_dir/pg-tls/ca.pem
heap=${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}
kafka_libs=$stack_dir/kafka/libs
kafka_data=$stack_dir/kafka/data
kafka_pidfile=$stack_dir/kafka/kafka.pid
logs=$stack_dir/logs

say() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name seconds command...
  local name=$1 secs=$2; shift 2
  local i=0
  until "$@"; do
    i=$((i + 1))
    [ "$i" -le $((secs * 4)) ] || return 1
    sleep 0.25
  done
  say "$name is ready"
}

need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing: $2"; }

kafka_running() { [ -f "$kafka_pidfile" ] && kill -0 "$(cat "$kafka_pidfile")" 2>/dev/null; }

fetch_kafka() {
  [ -f "$kafka_libs/.complete" ] && return 0
  need java "install Java 17 or newer (Debian: apt-get install openjdk-17-jre-headless)"
  need mvn "install Maven (Debian: apt-get install maven); it fetches the Kafka jars from Maven Central"
  say "fetching the Apache Kafka broker jars from Maven Central (first run only)"
  rm -rf "$kafka_libs"; mkdir -p "$kafka_libs"
  mvn -q -B -f "$root/deploy/local/kafka-pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$kafka_libs" >"$logs/maven.log" 2>&1 \
    || die "Maven could not fetch the Kafka jars; see $logs/maven.log"
  touch "$kafka_libs/.complete"
}

write_kafka_config() {
  mkdir -p "$stack_dir/kafka"
  cat >"$stack_dir/kafka/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$kafka_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$kafka_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$kafka_data
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
log.retention.hours=24
PROPS
  cat >"$stack_dir/kafka/log4j2.properties" <<PROPS
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$logs/kafka.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
PROPS
}

kafka_java() {
  # shellcheck disable=SC2086
  java $heap -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$stack_dir/kafka/log4j2.properties" \
    -cp "$kafka_libs/*" "$@"
}

kafka_up() {
  if kafka_running; then
    say "Kafka already running (pid $(cat "$kafka_pidfile")) on 127.0.0.1:$kafka_port"
    return 0
  fi
  if port_open "$kafka_port"; then
    die "port $kafka_port is taken by another process; stop it or set KAFKA_PORT"
  fi
  fetch_kafka
  write_kafka_config
  if [ ! -f "$kafka_data/meta.properties" ]; then
    say "formatting Kafka storage in $kafka_data"
    mkdir -p "$kafka_data"
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$logs/kafka-format.log" | tail -n 1)
    kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" \
      -c "$stack_dir/kafka/server.properties" >>"$logs/kafka-format.log" 2>&1 \
      || die "formatting Kafka storage failed; see $logs/kafka-format.log"
  fi
  say "starting Kafka (heap: $heap)"
  # Its own session: the broker outlives whatever started it (a make target, the chaos
  # suite restarting it) and is stopped only by `down`.
  setsid nohup bash -c "$(declare -f kafka_java); heap='$heap' stack_dir='$stack_dir' kafka_libs='$kafka_libs' \
    kafka_java kafka.Kafka '$stack_dir/kafka/server.properties'" \
    >"$logs/kafka.out" 2>&1 </dev/null &
  echo $! >"$kafka_pidfile"
  wait_for "Kafka on 127.0.0.1:$kafka_port" 120 port_open "$kafka_port" \
    || die "Kafka did not open port $kafka_port in 120 s; see $logs/kafka.log and $logs/kafka.out"
}

kafka_down() {
  if kafka_running; then
    local pid; pid=$(cat "$kafka_pidfile")
    say "stopping Kafka (pid $pid)"
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    local i=0
    while kill -0 "$pid" 2>/dev/null || port_open "$kafka_port"; do
      i=$((i + 1)); [ $i -lt 120 ] || { pkill -KILL -P "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; break; }
      sleep 0.25
    done
  else
    say "Kafka is not running"
  fi
  rm -f "$kafka_pidfile"
}

pg_install() {
  [ -x "/usr/lib/postgresql/$pg_version/bin/postgres" ] && return 0
  need apt-get "PostgreSQL $pg_version is not installed and apt-get is not available to install it"
  say "installing PostgreSQL from Debian's packages"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-$pg_version"; } \
    >"$logs/apt.log" 2>&1 || die "apt-get could not install postgresql-$pg_version; see $logs/apt.log"
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$pg_port"; }

pg_up() {
  pg_install
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -q "^$pg_version main$"; then
    say "creating the PostgreSQL cluster $pg_version/main"
    pg_createcluster -p "$pg_port" "$pg_version" main >"$logs/pg-create.log" 2>&1
  fi
  # pg_stat_statements (statements, rows and WAL per statement and role: `make bench`
  # reports them per stage) must be loaded at server start.
  local conf=/etc/postgresql/$pg_version/main/conf.d/enrich.conf
  if ! grep -qs pg_stat_statements "$conf"; then
    mkdir -p "$(dirname "$conf")"
    printf "# written by deploy/local/stack.sh\nshared_preload_libraries = 'pg_stat_statements'\n" >"$conf"
    chown postgres:postgres "$conf" 2>/dev/null || true
  fi
  if pg_ready && [ "$(su postgres -c "psql -At -p $pg_port -c 'SHOW shared_preload_libraries'")" != "pg_stat_statements" ]; then
    say "restarting PostgreSQL to load pg_stat_statements"
    pg_ctlcluster "$pg_version" main restart -m fast || die "PostgreSQL did not restart"
    wait_for "PostgreSQL on 127.0.0.1:$pg_port" 60 pg_ready || die "PostgreSQL is not accepting connections"
  fi
  if pg_ready; then
    say "PostgreSQL already running on 127.0.0.1:$pg_port"
  else
    say "starting PostgreSQL $pg_version"
    pg_ctlcluster "$pg_version" main start || die "PostgreSQL did not start; see /var/log/postgresql/"
    wait_for "PostgreSQL on 127.0.0.1:$pg_port" 60 pg_ready || die "PostgreSQL is not accepting connections"
  fi
  # The role and database the product and its tests use (CREATEDB: tests make one database each).
  su postgres -c "psql -q -p $pg_port -v ON_ERROR_STOP=1" >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'enrich') THEN
    CREATE ROLE enrich LOGIN CREATEDB PASSWORD 'enrich';
  END IF;
END $$;
SELECT 'CREATE DATABASE enrich OWNER enrich' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'enrich')\gexec
-- `make bench` runs each stage as its own role, so pg_stat_statements tells the stages
-- apart; the bench grants them the tables of its scratch databases.
DO $$ DECLARE r text; BEGIN
  FOREACH r IN ARRAY ARRAY['enrich_bench_ingest', 'enrich_bench_enricher', 'enrich_bench_publisher'] LOOP
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', r, 'enrich');
    END IF;
  END LOOP;
END $$;
GRANT pg_read_all_stats TO enrich;
\c enrich
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SQL
}

pg_sql() { su postgres -c "psql -q -At -p $pg_port -v ON_ERROR_STOP=1" ; }

# The CA and server certificate are kept while the certificate verifies against the CA and
# has more than 30 days left; otherwise both are made again.
pg_tls_material_valid() {
  [ -f "$pg_tls_dir/ca.pem" ] && [ -f "$pg_tls_dir/server.pem" ] && [ -f "$pg_tls_dir/server.key" ] &&
    openssl verify -CAfile "$pg_tls_dir/ca.pem" "$pg_tls_dir/server.pem" >/dev/null 2>&1 &&
    openssl x509 -checkend 2592000 -noout -in "$pg_tls_dir/server.pem" >/dev/null 2>&1
}

pg_tls_make() {
  local work; work=$(mktemp -d)
  cat >"$work/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[dn]
CN = kafka-llm-enrich local PostgreSQL CA
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
  cat >"$work/server.ext" <<'CNF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
  {
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -config "$work/ca.cnf" -keyout "$work/ca.key" -out "$work/ca.pem" &&
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
        -keyout "$work/server.key" -out "$work/server.csr" &&
      openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
        -days 825 -extfile "$work/server.ext" -out "$work/server.pem"
  } >"$logs/pg-tls.log" 2>&1 || { rm -rf "$work"; die "openssl could not make the certificates; see $logs/pg-tls.log"; }
  # Nothing else is ever signed with this CA: its key goes.
  mkdir -p "$pg_tls_dir"
  install -o postgres -g postgres -m 0644 "$work/ca.pem" "$work/server.pem" "$pg_tls_dir/"
  install -o postgres -g postgres -m 0600 "$work/server.key" "$pg_tls_dir/"
  rm -rf "$work"
  say "made a local CA and a server certificate for 127.0.0.1, ::1 and localhost in $pg_tls_dir"
}

pg_tls_ready() {
  PGPASSWORD=enrich psql -At -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' \
    "host=127.0.0.1 port=$pg_port user=enrich dbname=enrich sslmode=verify-full sslrootcert=$pg_tls_client_ca" \
    2>/dev/null | grep -qx t
}

# Idempotent and safe on a running server: ALTER SYSTEM and a reload, which keep every open
# session; pg_hba's `host` lines match plaintext and TLS alike, so nothing else changes.
pg_tls() {
  need openssl "install it (Debian: apt-get install openssl)"
  [ "$(id -u)" -eq 0 ] || die "pg-tls writes $pg_tls_dir and runs psql as postgres: run it as root"
  pg_ready || die "PostgreSQL is not running on 127.0.0.1:$pg_port (deploy/local/stack.sh up)"
  mkdir -p "$(dirname "$pg_tls_client_ca")"
  # Two callers at once (two test runs, from any checkout) must not make two CAs.
  exec 9>"$pg_tls_dir.lock"
  flock 9
  pg_tls_material_valid || pg_tls_make
  cp "$pg_tls_dir/ca.pem" "$pg_tls_client_ca.tmp" && mv "$pg_tls_client_ca.tmp" "$pg_tls_client_ca"
  local current
  current=$(echo "SELECT current_setting('ssl') || ' ' || current_setting('ssl_cert_file') || ' ' || current_setting('ssl_key_file');" | pg_sql)
  if [ "$current" != "on $pg_tls_dir/server.pem $pg_tls_dir/server.key" ] || ! pg_tls_ready; then
    pg_sql >/dev/null <<SQL
ALTER SYSTEM SET ssl = on;
ALTER SYSTEM SET ssl_cert_file = '$pg_tls_dir/server.pem';
ALTER SYSTEM SET ssl_key_file = '$pg_tls_dir/server.key';
SELECT pg_reload_conf();
SQL
    # The reload is asynchronous: wait until a verified connection succeeds.
    wait_for "PostgreSQL TLS (verify-full against $pg_tls_client_ca)" 30 pg_tls_ready \
      || die "PostgreSQL does not accept verify-full connections after the reload; see /var/log/postgresql/"
  else
    say "PostgreSQL TLS already set up (CA for clients: $pg_tls_client_ca)"
  fi
  exec 9>&-
}

pg_down() {
  if pg_ready 2>/dev/null; then
    say "stopping PostgreSQL"
    pg_ctlcluster "$pg_version" main stop || true
  else
    say "PostgreSQL is not running"
  fi
}

mkdir -p "$logs"
case "${1:-}" in
  up) pg_up; pg_tls; kafka_up; say "stack is up: Kafka 127.0.0.1:$kafka_port, PostgreSQL 127.0.0.1:$pg_port (logs in $logs)" ;;
  down) kafka_down; pg_down ;;
  status)
    if kafka_running; then say "Kafka: running (pid $(cat "$kafka_pidfile"))"; else say "Kafka: stopped"; fi
    if pg_ready 2>/dev/null; then say "PostgreSQL: running"; else say "PostgreSQL: stopped"; fi ;;
  # For the chaos suite: a broker or database restart under load.
  restart-kafka) kafka_down; kafka_up ;;
  restart-postgres)
    say "restarting PostgreSQL"
    pg_ctlcluster "$pg_version" main restart -m fast || die "PostgreSQL did not restart"
    wait_for "PostgreSQL on 127.0.0.1:$pg_port" 60 pg_ready || die "PostgreSQL is not accepting connections" ;;
  pg-tls) pg_tls ;;
  *) echo "usage: $0 up|down|status|restart-kafka|restart-postgres|pg-tls" >&2; exit 2 ;;
esac
