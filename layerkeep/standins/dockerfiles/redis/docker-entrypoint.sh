#!/bin/sh
# Stand-in for the official redis image's entrypoint.
set -e

# `docker run redis --port 7000` and `docker run redis /my/redis.conf` mean redis-server ...
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
	find . \! -user redis -exec chown redis '{}' +
	exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "$1" = 'redis-server' ]; then
	# The official image compiles protected mode off; Debian's redis keeps it on, and then
	# other containers get DENIED. Defaults go first so the user's flags still win; a
	# config file (which must come first) wins unless it leaves protected-mode unset.
	if [ $# -ge 2 ] && [ "${2#-}" = "$2" ]; then
		if ! grep -Eq '^[[:space:]]*protected-mode[[:space:]]' "$2" 2>/dev/null; then
			config="$2"
			shift 2
			set -- redis-server "$config" --protected-mode no "$@"
		fi
	else
		shift
		set -- redis-server --bind '* -::*' --protected-mode no "$@"
	fi
	umask 0077
fi

exec "$@"
