"""uvicorn's entry point: `uvicorn httpapp.asgi:application`."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "httpapp.settings")
application = get_asgi_application()
