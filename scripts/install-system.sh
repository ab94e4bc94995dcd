#!/usr/bin/env bash
# Install the Debian packages tiermail needs and make sure RabbitMQ and Redis are running.
#
# Idempotent and quick when nothing is missing: it asks dpkg which packages are installed and
# probes two TCP ports; apt-get runs only when a package is missing. Called by `make install`.
#
#   openssl          self-signed development certificates (common/tls.py)
#   swaks            SMTP client used by tests and by hand
#   postfix          smtp-source (bench load generator) and the reference MTA in bench/
#   rabbitmq-server  the broker between the tiers (127.0.0.1:5672)
#   redis-server     directory cache and counters (127.0.0.1:6379)
#   strace           the store's durability test reads the order of its system calls
#   btrfs-progs      mkfs.btrfs and btrfs: the store's disk-quota tests make a btrfs with a
#                    qgroup limit (the kernel has no tmpfs quotas)
#   rspamd           spam scanner (filter tier)
#   clamav-daemon    clamd, the virus scanner (filter tier); clamdscan: its CLI client
#   spamassassin     the alternative spam scanner: rules (spamassassin), daemon (spamd) and
#   spamd spamc      client (spamc) are three packages in Debian 12
#   isync            mbsync, the real IMAP sync client of the IMAP integration tests
#   interimap        a real QRESYNC client (two accounts kept in step) for the IMAP tests
#   fetchmail        a real POP3 and IMAP retrieval client for the POP3 and IMAP tests
#   dovecot-imapd    the reference IMAP server of bench/imap_bench.py (never a system service)
#   dovecot-pop3d    the reference POP3 server of bench/pop3_compare.py (the same)
#
# The scanners are only installed here, never started as system services (there is no
# systemd, and policy-rc.d keeps apt from starting them): `tiermail up` and the test fixtures
# run instances of their own with the configuration in deploy/scanners/
# (services/devscanners/runner.py). ClamAV's freshclam is not used: deploy/scanners/clamav/
# ships an EICAR-only signature database.
#
# Not root and something missing: prints the exact command to run and fails.
set -euo pipefail

PACKAGES=(openssl swaks postfix rabbitmq-server redis-server strace btrfs-progs
          rspamd clamav-daemon clamdscan spamassassin spamd spamc
          isync interimap fetchmail thunderbird dovecot-imapd dovecot-pop3d)
RABBITMQ_PORT=5672
REDIS_PORT=6379
STARTUP_TIMEOUT=60

say() { printf 'install-system: %s\n' "$*"; }
die() { printf 'install-system: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

port_open() {
    # bash's /dev/tcp: no dependency on nc/ss; bounded by timeout.
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

install_packages() {
    local missing=()
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    if ! is_root; then
        say "missing Debian packages: ${missing[*]}"
        say "run as root:"
        if [[ " ${missing[*]} " == *" postfix "* ]]; then
            printf "  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections\n"
        fi
        printf '  %s\n' "$cmd"
        die "cannot install packages without root"
    fi
    say "installing missing Debian packages: ${missing[*]}"
    if [[ " ${missing[*]} " == *" postfix "* ]]; then
        # No /etc/postfix/main.cf and no running system MTA: the benchmark runs its own
        # Postfix instance with its own config directory (bench/smtp_bench.py).
        say "preseeding postfix: main_mailer_type = No configuration"
        echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
        echo 'postfix postfix/mailname string localhost' | debconf-set-selections
    fi
    say "apt-get update"
    apt-get update -q
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    stop_system_services "${missing[@]}"
}

# On a machine with systemd, apt starts the packages' own services. tiermail runs its own
# scanner instances from deploy/scanners/ (a system rspamd on 11333 would be taken for ours,
# with the wrong configuration) and Dovecot is only the benchmark's reference: a system
# Dovecot would be an IMAP server nobody asked for on 143/993. Only services of packages
# installed just now are stopped and disabled; an administrator's own setup is left alone.
stop_system_services() {
    [ -d /run/systemd/system ] || return 0
    local pkg unit
    for pkg in "$@"; do
        case "$pkg" in
            rspamd) unit=rspamd ;;
            clamav-daemon) unit=clamav-daemon ;;
            spamd) unit=spamd ;;
            dovecot-imapd|dovecot-pop3d) unit=dovecot ;;
            *) continue ;;
        esac
        say "stopping and disabling the system service $unit (tiermail runs its own)"
        systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
    done
}

ensure_redis() {
    if port_open "$REDIS_PORT"; then
        return 0
    fi
    is_root || die "Redis is not listening on 127.0.0.1:$REDIS_PORT and we are not root to start it"
    say "starting redis-server on 127.0.0.1:$REDIS_PORT"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    local i
    for ((i = 0; i < STARTUP_TIMEOUT * 5; i++)); do
        port_open "$REDIS_PORT" && { say "redis is up"; return 0; }
        sleep 0.2
    done
    die "redis-server did not open 127.0.0.1:$REDIS_PORT within ${STARTUP_TIMEOUT}s (see /var/log/redis/ci.log)"
}

ensure_rabbitmq() {
    if port_open "$RABBITMQ_PORT"; then
        return 0
    fi
    is_root || die "RabbitMQ is not listening on 127.0.0.1:$RABBITMQ_PORT and we are not root to start it"
    say "starting rabbitmq-server (detached)"
    # A node left half-running (epmd up, listener down) makes -detached fail; await_startup
    # below is the real check.
    rabbitmq-server -detached || say "rabbitmq-server -detached returned $?; waiting anyway"
    say "waiting up to ${STARTUP_TIMEOUT}s for rabbitmqctl await_startup"
    # await_startup fails at once while the node's distribution port is not up yet: retry
    # until the deadline.
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until timeout 30 rabbitmqctl -q await_startup >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] ||
            die "RabbitMQ did not start within ${STARTUP_TIMEOUT}s (see /var/log/rabbitmq/)"
        sleep 1
    done
    local i
    for ((i = 0; i < 50; i++)); do
        port_open "$RABBITMQ_PORT" && { say "rabbitmq is up"; return 0; }
        sleep 0.2
    done
    die "RabbitMQ started but 127.0.0.1:$RABBITMQ_PORT is not open"
}

install_packages
ensure_redis
ensure_rabbitmq
