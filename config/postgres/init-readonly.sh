#!/bin/sh
# Run once by the postgres image on a fresh data directory (docker-compose.yml, profile
# "scaled"): the read-only role usage-service logs in as. It may read only the gateway's
# tokens, users, options and logs tables; those exist only once the gateway has started, so the
# one-shot "postgres-grants" service grants them then (config/postgres/grant-readonly.sh).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v ro_password="$USAGE_DB_PASSWORD" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE usage_service LOGIN PASSWORD :'ro_password';
ALTER ROLE usage_service SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO usage_service;
GRANT USAGE ON SCHEMA public TO usage_service;
-- PostgreSQL 14 and older let every role create tables in public; keep that to the gateway's
-- user (POSTGRES_USER, the superuser here, which needs no grant). A no-op from 15 on.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
