#!/bin/sh
# Libra's roles, the same as `libra up` makes on its embedded server; what each may do is
# ../../conf/postgres-grants.sql (mounted as 20-grants.sql, run next). PostgreSQL runs this once,
# when it creates the database. psql quotes the passwords (:'var'), whatever they hold.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" -v owner="$LIBRA_DB_PASSWORD_OWNER" -v app="$LIBRA_DB_PASSWORD_APP" \
  -v reader="$LIBRA_DB_PASSWORD_READER" <<'EOSQL'
CREATE ROLE libra_owner LOGIN PASSWORD :'owner';
CREATE ROLE libra_app LOGIN PASSWORD :'app';
CREATE ROLE libra_reader LOGIN PASSWORD :'reader';
ALTER DATABASE :"db" OWNER TO libra_owner;
EOSQL
