"""A bare WSGI callable (no framework) for the observer's tests.

  /        200 "bare ok"
  /error   helper() raises ValueError("bare 7") out of the callable, into uWSGI
           (uWSGI logs the traceback and answers 500 with an empty body)
  other    404
"""


def helper():
    raise ValueError("bare 7")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/error":
        helper()
    if path == "/":
        body = b"bare ok\n"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    body = b"not found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
