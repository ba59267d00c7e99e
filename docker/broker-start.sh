#!/bin/sh
# What the broker container runs (after the eclipse-mosquitto image's own entrypoint).
# A first start has an empty data volume, and mosquitto refuses to start without its password
# and ACL files: create them empty (the service fills them). Then admit the healthcheck's login,
# which may connect and nothing else (the ACL never names it; no owner may take a name starting
# with "chargeshare"). MOSQUITTO_CONF / MOSQUITTO_DATA / MOSQUITTO_OWNER exist for tests.
set -eu
conf="${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}"
data="${MOSQUITTO_DATA:-/mosquitto/data}"
owner="${MOSQUITTO_OWNER:-1883:1883}"

umask 077
for f in passwd acl; do
    [ -e "$data/$f" ] || : > "$data/$f"
done
if [ ! -s "$data/healthcheck.password" ]; then
    head -c 18 /dev/urandom | base64 | tr -d '/+=\n' > "$data/healthcheck.password"
fi
mosquitto_passwd -b "$data/passwd" chargeshare-healthcheck "$(cat "$data/healthcheck.password")"
if [ "$(id -u)" = 0 ]; then
    chown "$owner" "$data/passwd" "$data/acl" "$data/healthcheck.password"
fi
exec mosquitto -c "$conf"
