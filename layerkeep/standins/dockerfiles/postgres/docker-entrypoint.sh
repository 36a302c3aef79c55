#!/usr/bin/env bash
# Stand-in for the official postgres image's entrypoint: the parts CI relies on.
# POSTGRES_PASSWORD, POSTGRES_USER, POSTGRES_DB, POSTGRES_HOST_AUTH_METHOD and
# POSTGRES_INITDB_ARGS; /docker-entrypoint-initdb.d/*.sh, *.sql and *.sql.gz in order.
# No -u: *.sh init scripts are sourced into this shell, as in the official image.
set -Eeo pipefail

# `docker run postgres -c fsync=off` means `postgres -c fsync=off`.
if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi
if [ "$1" != 'postgres' ]; then
	exec "$@"
fi

if [ "$(id -u)" = '0' ]; then
	mkdir -p "$PGDATA"
	find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
	chmod 00700 "$PGDATA"
	mkdir -p /var/run/postgresql
	find /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
	chmod 03775 /var/run/postgresql
	# initdb refuses to run as root; setpriv (util-linux) does what gosu does.
	exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PASSWORD:=}"
: "${POSTGRES_HOST_AUTH_METHOD:=}"
: "${POSTGRES_INITDB_ARGS:=}"

psql_init() {
	psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc "$@"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
	if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
		cat >&2 <<-'EOM'
			Error: Database is uninitialized and superuser password is not specified.
			       You must specify POSTGRES_PASSWORD to a non-empty value for the
			       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".
			       To allow all connections without a password, set
			       POSTGRES_HOST_AUTH_METHOD=trust (not for anything but tests).
		EOM
		exit 1
	fi

	read -r -a initdb_args <<< "$POSTGRES_INITDB_ARGS"
	# --pwfile refuses an empty file, hence the newline.
	initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") "${initdb_args[@]}"

	auth_method="${POSTGRES_HOST_AUTH_METHOD:-$(postgres -C password_encryption)}"
	printf '\nhost all all all %s\n' "$auth_method" >> "$PGDATA/pg_hba.conf"

	# While scripts run, listen on the socket only: a client polling TCP must not see a
	# server that is about to restart.
	export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
	pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start

	if [ "$POSTGRES_DB" != 'postgres' ]; then
		exists="$(psql_init --dbname postgres --tuples-only --no-align \
			--set db="$POSTGRES_DB" <<< "SELECT 1 FROM pg_database WHERE datname = :'db';")"
		if [ -z "$exists" ]; then
			psql_init --dbname postgres --set db="$POSTGRES_DB" <<< 'CREATE DATABASE :"db";'
		fi
	fi

	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh)
				echo "$0: running $f"
				if [ -x "$f" ]; then "$f"; else . "$f"; fi
				;;
			*.sql) echo "$0: running $f"; psql_init --dbname "$POSTGRES_DB" -f "$f" ;;
			*.sql.gz) echo "$0: running $f"; gzip -dc "$f" | psql_init --dbname "$POSTGRES_DB" ;;
			*) if [ -e "$f" ]; then echo "$0: ignoring $f"; fi ;;
		esac
	done

	pg_ctl -D "$PGDATA" -m fast -w stop
	unset PGPASSWORD
	echo
	echo 'PostgreSQL init process complete; ready for start up.'
	echo
fi

exec "$@"
