#!/bin/sh
# The broker container's health check: log in on the service listener and publish at QoS 1.
# Exit status 0 only when the broker accepted the login and acknowledged the message.
set -eu
data="${MOSQUITTO_DATA:-/mosquitto/data}"
port="${MOSQUITTO_PORT:-1883}"
exec mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -n -t chargeshare/healthcheck \
    -i "chargeshare-healthcheck-$$" \
    -u chargeshare-healthcheck -P "$(cat "$data/healthcheck.password")"
