"""mitmdump addon equivalent to tls_proxy's header substitution (benchmark baseline only).

Loaded by ``mitmdump -s`` from the private venv; reads its settings from the environment:
``BENCH_HOST`` (the secret's host), ``BENCH_UPSTREAM`` (``ip:port`` to dial for it),
``BENCH_PLACEHOLDER`` and ``BENCH_VALUE``.
"""

import os

HOST = os.environ["BENCH_HOST"]
UP_IP, UP_PORT = os.environ["BENCH_UPSTREAM"].rsplit(":", 1)
PH = os.environ["BENCH_PLACEHOLDER"].encode()
VALUE = os.environ["BENCH_VALUE"].encode()


class Rewrite:
    def server_connect(self, data):  # the equivalent of --resolve
        addr = data.server.address
        if addr and addr[0] == HOST:
            data.server.address = (UP_IP, int(UP_PORT))

    def requestheaders(self, flow):
        if flow.request.pretty_host != HOST:
            return
        fields = flow.request.headers.fields
        if any(PH in v for _, v in fields):
            flow.request.headers.fields = tuple((k, v.replace(PH, VALUE)) for k, v in fields)


addons = [Rewrite()]
