"""gunicorn's entry point: `gunicorn --preload httpapp.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application

import dbha

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "httpapp.settings")
application = get_wsgi_application()

# With --preload this runs in gunicorn's master, before it forks the
# workers: dbha's checker is running at the fork, and each worker must get
# a working checker of its own.
dbha.available_db()
