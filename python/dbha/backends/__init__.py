"""Django database backends that report server failures to dbha: set
`"ENGINE": "dbha.backends.postgresql"` or `"dbha.backends.mysql"`."""
