"""Fixture app for the exit-span tests: each route makes real outbound calls.

Endpoints come from the environment, read at each call:
  BACKEND_HTTP   host:port of tests/py/http_backend.py (e.g. 127.0.0.1:PORT)
  REDIS_PORT     redis-server on 127.0.0.1
  PG_PORT        postgres on 127.0.0.1; PG_DB (default shop), PG_USER (default postgres), trust auth
  MYSQL_PORT     mariadbd on 127.0.0.1; MYSQL_DB (default shop), MYSQL_USER (default app),
                 MYSQL_PASSWORD (default secret)

Exact outbound calls per request (the tests assert these counts):
  /call/http               1 HTTP GET  (requests, host name "localhost", new connection, closed)
  /call/http-status/<c>    1 HTTP GET  (requests, "localhost", the backend answers status c)
  /call/urllib             1 HTTP GET  (urllib.request, 127.0.0.1, new connection, closed)
  /call/httpclient         1 HTTP GET  (http.client.HTTPConnection to BACKEND_HTTP, closed)
  /call/redis              2 Redis commands: SET k:1 v, then GET k:1
  /call/pg                 1 SQL statement: SELECT name FROM items WHERE id = %s  (1)
  /call/mysql              1 SQL statement: the same query
  /call/all                7: http + urllib + httpclient + redis (2) + pg + mysql, in that order
  /warm                    0 commands/statements; opens the Redis, PG and MySQL connections
                           (but see PyMySQL below)

Connections: the Redis client, the psycopg2 connection and the PyMySQL connection are
module-level, created at first use IN EACH PROCESS (never before uWSGI forks) and reused by
later requests of that process. They are set up so that opening them sends no extra command
or statement, with one exception:
  - redis-py: protocol=2 and driver_info=None, so no HELLO, no CLIENT SETINFO, no
    maintenance-notifications handshake; health checks off. Connecting sends nothing.
  - psycopg2: autocommit=True, so no BEGIN before the SELECT; connecting is the libpq startup
    only (no SQL).
  - PyMySQL: autocommit=True, so no "SET AUTOCOMMIT"; but PyMySQL ALWAYS sends one
    "SET NAMES utf8mb4" COM_QUERY right after connecting (not through cursor.execute).
    So the first /call/mysql (or /call/all, or /warm) of a process puts 2 COM_QUERY on the
    wire, later ones 1. At the cursor.execute level it is always 1.
HTTP: "localhost" is resolved by getaddrinfo; where /etc/hosts maps localhost to ::1 as well
(Debian's default), urllib3 first tries [::1]:PORT (refused: the backend listens on 127.0.0.1
only) and then 127.0.0.1:PORT. Still 1 HTTP request.
"""
import http.client
import json
import os
import urllib.request

import psycopg2
import pymysql
import redis
from flask import Flask, jsonify
import requests

app = Flask(__name__)

_redis = None
_pg = None
_mysql = None
_pid = None


def _fresh_process():
    """Forget connections inherited across a fork (uWSGI forks workers after import)."""
    global _redis, _pg, _mysql, _pid
    if _pid != os.getpid():
        _redis = _pg = _mysql = None
        _pid = os.getpid()


def backend():
    return os.environ["BACKEND_HTTP"]


def backend_port():
    return int(backend().rsplit(":", 1)[1])


def redis_client():
    global _redis
    _fresh_process()
    if _redis is None:
        _redis = redis.Redis(
            host="127.0.0.1",
            port=int(os.environ["REDIS_PORT"]),
            protocol=2,
            driver_info=None,
            health_check_interval=0,
            decode_responses=True,
        )
    return _redis


def pg_conn():
    global _pg
    _fresh_process()
    if _pg is None or _pg.closed:
        _pg = psycopg2.connect(
            host="127.0.0.1",
            port=int(os.environ["PG_PORT"]),
            dbname=os.environ.get("PG_DB", "shop"),
            user=os.environ.get("PG_USER", "postgres"),
        )
        _pg.autocommit = True
    return _pg


def mysql_conn():
    global _mysql
    _fresh_process()
    if _mysql is None or not _mysql.open:
        _mysql = pymysql.connect(
            host="127.0.0.1",
            port=int(os.environ["MYSQL_PORT"]),
            database=os.environ.get("MYSQL_DB", "shop"),
            user=os.environ.get("MYSQL_USER", "app"),
            password=os.environ.get("MYSQL_PASSWORD", "secret"),
            autocommit=True,
        )
    return _mysql


# One outbound call each (see the module docstring for counts).


def do_http():
    r = requests.get("http://localhost:%d/api/items/1" % backend_port(), timeout=10)
    return {"status": r.status_code, "body": r.json()}


def do_http_status(code):
    r = requests.get("http://localhost:%d/api/status/%d" % (backend_port(), code), timeout=10)
    return {"status": r.status_code}


def do_urllib():
    url = "http://127.0.0.1:%d/api/items/2" % backend_port()
    with urllib.request.urlopen(url, timeout=10) as r:
        return {"status": r.status, "body": json.loads(r.read())}


def do_httpclient():
    host, port = backend().rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", "/api/items/3")
        r = c.getresponse()
        return {"status": r.status, "body": json.loads(r.read())}
    finally:
        c.close()


def do_redis():
    r = redis_client()
    r.set("k:1", "v")  # command 1
    return {"value": r.get("k:1")}  # command 2


def do_pg():
    with pg_conn().cursor() as cur:
        cur.execute("SELECT name FROM items WHERE id = %s", (1,))
        return {"name": cur.fetchone()[0]}


def do_mysql():
    with mysql_conn().cursor() as cur:
        cur.execute("SELECT name FROM items WHERE id = %s", (1,))
        return {"name": cur.fetchone()[0]}


@app.route("/call/http")
def call_http():  # 1 call
    return jsonify(do_http())


@app.route("/call/http-status/<int:code>")
def call_http_status(code):  # 1 call
    return jsonify(do_http_status(code))


@app.route("/call/urllib")
def call_urllib():  # 1 call
    return jsonify(do_urllib())


@app.route("/call/httpclient")
def call_httpclient():  # 1 call
    return jsonify(do_httpclient())


@app.route("/call/redis")
def call_redis():  # 2 calls: SET, GET
    return jsonify(do_redis())


@app.route("/call/pg")
def call_pg():  # 1 call
    return jsonify(do_pg())


@app.route("/call/mysql")
def call_mysql():  # 1 call (+1 SET NAMES on the wire when this process connects)
    return jsonify(do_mysql())


@app.route("/call/all")
def call_all():  # 7 calls: 3 HTTP, 2 Redis, 1 PG, 1 MySQL
    return jsonify(
        {
            "http": do_http(),
            "urllib": do_urllib(),
            "httpclient": do_httpclient(),
            "redis": do_redis(),
            "pg": do_pg(),
            "mysql": do_mysql(),
        }
    )


@app.route("/warm")
def warm():  # 0 calls; opens the connections (MySQL: 1 SET NAMES on the wire if new)
    pool = redis_client().connection_pool
    pool.release(pool.get_connection())  # connects; no command (health checks are off)
    pg_conn()
    mysql_conn()
    return "warm\n"


application = app
