"""`"ENGINE": "dbha.backends.postgresql"`: Django's PostgreSQL backend that
reports server failures to dbha."""
