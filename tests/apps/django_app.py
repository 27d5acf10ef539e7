"""Single-file Django project for the observer's tests: WSGI `application`.

  /        200 "ok"
  /error   the view calls middle(), which calls inner(), which raises RuntimeError("boom 42");
           Django turns it into a 500 (DEBUG=False: "Server Error (500)"). With DEBUG=False and
           the default LOGGING nothing is printed for it (django.request goes to mail_admins).
  /caught  a KeyError raised and caught inside the view: 200 "caught"
  /call    two outbound calls: one HTTP GET (requests, to localhost:$BACKEND_HTTP's port,
           /api/items/7), then one Redis GET k:django (redis-py, 127.0.0.1:$REDIS_PORT)

No database, no installed apps; Django's security and common middleware.
"""
import os

import redis
import requests

from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="observer-tests-not-secret",
    MIDDLEWARE=["django.middleware.security.SecurityMiddleware", "django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
)

import django  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

django.setup()


def inner():
    raise RuntimeError("boom 42")


def middle():
    return inner()


def index(request):
    return HttpResponse("ok\n")


def error(request):
    middle()
    return HttpResponse("unreachable\n")


def caught(request):
    try:
        {}["missing"]
    except KeyError:
        pass
    return HttpResponse("caught\n")


_redis = {}


def call(request):
    port = int(os.environ["BACKEND_HTTP"].rsplit(":", 1)[1])
    r = requests.get("http://localhost:%d/api/items/7" % port, timeout=10)
    pid = os.getpid()
    if pid not in _redis:  # per process: never shared across uWSGI's fork
        _redis[pid] = redis.Redis(host="127.0.0.1", port=int(os.environ["REDIS_PORT"]), protocol=2, driver_info=None)
    _redis[pid].get("k:django")
    return HttpResponse("called %d\n" % r.status_code)


urlpatterns = [
    path("call", call),
    path("", index),
    path("error", error),
    path("caught", caught),
]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
