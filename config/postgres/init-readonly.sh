#!/bin/sh
# Run once by the postgres image on a fresh data directory (docker-compose.yml, profile
# "scaled"): a role that can read the gateway's tables and nothing else, for usage-service.
# The gateway creates its tables later, as POSTGRES_USER: default privileges grant SELECT on
# each of them as it is created.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v ro_password="$USAGE_DB_PASSWORD" -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE usage_ro LOGIN PASSWORD :'ro_password';
ALTER ROLE usage_ro SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO usage_ro;
GRANT USAGE ON SCHEMA public TO usage_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO usage_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO usage_ro;
SQL
