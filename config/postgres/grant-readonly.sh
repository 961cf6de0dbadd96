#!/bin/sh
# The one-shot "postgres-grants" service (docker-compose.yml, profile "scaled"): wait until the
# gateway has created its tables, then let usage-service read the four it needs, and no more
# (the same GRANT as in docs/databases.md). Safe to run again: GRANT is idempotent.
set -eu
tries=0
until psql -qtA -c 'SELECT 1 FROM tokens, users, options, logs LIMIT 0' >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 150 ]; then
        echo "grant-readonly: the gateway's tables did not appear in 5 minutes" >&2
        exit 1
    fi
    sleep 2
done
psql -v ON_ERROR_STOP=1 -q -c 'GRANT SELECT ON tokens, users, options, logs TO usage_service'
echo "grant-readonly: usage_service may read tokens, users, options and logs"
