"""`"ENGINE": "dbha.backends.mysql"`: Django's MySQL/MariaDB backend that
reports server failures to dbha."""
