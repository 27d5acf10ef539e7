"""Fixture app for the observer's tests and demo: varied routes, statuses and bodies."""
from flask import Flask, Response, request, abort

app = Flask(__name__)


@app.route("/")
def index():
    return "hello, world\n"


@app.route("/users/<int:uid>", methods=["GET", "POST", "PUT", "DELETE"])
def user(uid):
    return {"id": uid, "method": request.method}


@app.route("/status/<int:code>")
def status(code):
    return Response("status %d\n" % code, status=code)


@app.route("/missing")
def missing():
    abort(404)


@app.route("/error")
def error():
    raise RuntimeError("boom 42")


@app.route("/caught")
def caught():
    """An exception raised and handled inside the view: the request still succeeds (200)."""
    try:
        {}["missing"]
    except KeyError:
        pass
    return "caught\n"


class OutOfStock(Exception):
    pass


@app.errorhandler(OutOfStock)
def out_of_stock(e):
    """An app-level error handler: the exception becomes a 503 without reaching Flask's own."""
    return "out of stock: %s\n" % e, 503


@app.route("/handled")
def handled():
    raise OutOfStock("sku 9")


@app.route("/upload", methods=["POST"])
def upload():
    data = request.get_data()
    return "got %d bytes\n" % len(data)


@app.route("/work")
def work():
    """About 1 ms of pure-Python work (for the benchmark's second route)."""
    total = 0
    for i in range(20000):
        total += i * i % 7
    return "work %d\n" % total


@app.route("/slow")
def slow():
    import time
    time.sleep(0.05)
    return "slow\n"


_redis = {}


@app.route("/checkout")
def checkout():
    """Demo route: an HTTP call to BACKEND_HTTP (requests) and a Redis INCR on REDIS_PORT."""
    import os

    import redis
    import requests

    r = requests.get("http://localhost:%s/api/items/1" % os.environ["BACKEND_HTTP"].rsplit(":", 1)[1], timeout=5)
    pid = os.getpid()
    if pid not in _redis:
        _redis[pid] = redis.Redis(host="127.0.0.1", port=int(os.environ["REDIS_PORT"]), protocol=2, driver_info=None)
    n = _redis[pid].incr("orders")
    return {"item": r.json(), "orders": n}


class Crash:
    """WSGI middleware: /crash raises out of the app, into uWSGI (500, zero bytes)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/crash":
            raise ValueError("escaped to uwsgi")
        return self.inner(environ, start_response)


application = Crash(app)
