"""A small Django project served by gunicorn (WSGI, sync workers) and
uvicorn (ASGI, an async view) in front of a PostgreSQL primary and two
standbys, through dbha: its router, its backend and its pinning
middleware. benches/http_failover.py and benches/soak.py fault its
databases under HTTP load (tools/localhttp.py starts it)."""
