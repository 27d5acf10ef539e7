"""Single-file Django project for the observer's tests: WSGI `application`.

  /        200 "ok"
  /error   the view calls middle(), which calls inner(), which raises RuntimeError("boom 42");
           Django turns it into a 500 (DEBUG=False: "Server Error (500)"; logged by
           django.request to stderr through the default LOGGING)
  /caught  a KeyError raised and caught inside the view: 200 "caught"

No database, no installed apps, no middleware.
"""
from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="observer-tests-not-secret",
    MIDDLEWARE=[],
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


urlpatterns = [
    path("", index),
    path("error", error),
    path("caught", caught),
]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
