#!/usr/bin/env python3
"""A client of tend's local HTTP API (docs/API.md), with the Python standard library only.

Start a device with the API first:

    tend --home /tmp/a init
    tend --home /tmp/a run --api 127.0.0.1:8377 &

Then:

    python3 examples/api_client.py --url http://127.0.0.1:8377 --home /tmp/a put todo milk "2 litres"
    python3 examples/api_client.py --url http://127.0.0.1:8377 --home /tmp/a get todo milk
    python3 examples/api_client.py --url http://127.0.0.1:8377 --home /tmp/a follow --since now

`--home` reads the token from HOME/api.token; `--token` (or TEND_API_TOKEN) gives it
directly, and TEND_API_URL may stand for `--url`. `follow` prints one JSON line per change
and, if the connection drops, reconnects with Last-Event-ID, so no change is missed.
"""

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


class ApiError(Exception):
    """An error answer of the API: its HTTP status and message."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Client:
    """The API of one running device."""

    def __init__(self, url, token, timeout=30):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")
            raise ApiError(e.code, message) from None

    @staticmethod
    def _quote(name):
        return urllib.parse.quote(name, safe="")

    def put(self, collection, key, value, if_match=None):
        """Writes bytes under collection/key; returns the written fact's id and epoch."""
        headers = {"If-Match": f'"{if_match}"'} if if_match else None
        path = f"/v1/kv/{self._quote(collection)}/{self._quote(key)}"
        _, _, body = self._request("PUT", path, value, headers)
        return json.loads(body)

    def get(self, collection, key):
        """The bytes of collection/key, or None when it is absent."""
        path = f"/v1/kv/{self._quote(collection)}/{self._quote(key)}"
        try:
            _, _, body = self._request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return body

    def delete(self, collection, key):
        path = f"/v1/kv/{self._quote(collection)}/{self._quote(key)}"
        _, _, body = self._request("DELETE", path)
        return json.loads(body)

    def scan(self, collection, prefix="", after=None, limit=100):
        """Yields (key, bytes) of a collection in key order, page by page."""
        while True:
            query = {"prefix": prefix, "limit": limit}
            if after is not None:
                query["after"] = after
            path = f"/v1/kv/{self._quote(collection)}?{urllib.parse.urlencode(query)}"
            _, _, body = self._request("GET", path)
            page = json.loads(body)
            for e in page["entries"]:
                yield e["key"], base64.b64decode(e["value"])
            after = page.get("next_after")
            if after is None:
                return

    def append(self, log, data):
        """Appends an entry to a log; returns its cursor."""
        _, _, body = self._request("POST", f"/v1/logs/{self._quote(log)}", data)
        return json.loads(body)["cursor"]

    def status(self):
        _, _, body = self._request("GET", "/v1/status")
        return json.loads(body)

    def changes(self, since="0", on_open=None, reconnect=True):
        """Yields the device's changes (dicts) from a cursor, live, forever.

        Each change carries its `cursor`; keep the last one to resume later with
        `since=cursor`. When the connection drops, it reconnects after the last cursor
        seen (Last-Event-ID), so nothing is missed or repeated.
        """
        last_id = None
        while True:
            req = urllib.request.Request(
                self.url + "/v1/changes?" + urllib.parse.urlencode({"since": since})
            )
            req.add_header("Authorization", f"Bearer {self.token}")
            req.add_header("Accept", "text/event-stream")
            if last_id is not None:
                req.add_header("Last-Event-ID", last_id)
            try:
                # No read timeout: the server sends a keep-alive comment every 15 s.
                resp = urllib.request.urlopen(req)
            except urllib.error.HTTPError as e:
                raise ApiError(e.code, e.read().decode("utf-8", "replace")) from None
            except OSError:
                if not reconnect:
                    raise
                time.sleep(1)
                continue
            if on_open is not None:
                on_open()
            try:
                event = {}
                for raw in resp:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line == "":
                        if "data" in event:
                            if event.get("id") is not None:
                                last_id = event["id"]
                            if event.get("event") == "error":
                                raise ApiError(500, event["data"])
                            yield json.loads(event["data"])
                        event = {}
                    elif line.startswith(":"):
                        continue  # keep-alive
                    else:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "data":
                            event["data"] = event["data"] + "\n" + value if "data" in event else value
                        elif field in ("id", "event"):
                            event[field] = value
            except OSError:
                if not reconnect:
                    raise
            finally:
                resp.close()
            if not reconnect:
                return
            time.sleep(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("TEND_API_URL"), help="http://IP:PORT")
    p.add_argument("--token", default=os.environ.get("TEND_API_TOKEN"))
    p.add_argument("--home", help="read the token from HOME/api.token")
    sub = p.add_subparsers(dest="command", required=True)
    put = sub.add_parser("put", help="write a value (the argument, or stdin with -)")
    put.add_argument("collection")
    put.add_argument("key")
    put.add_argument("value")
    get = sub.add_parser("get", help="print a value's bytes")
    get.add_argument("collection")
    get.add_argument("key")
    follow = sub.add_parser("follow", help="print changes as JSON lines, live")
    follow.add_argument("--since", default="0", help="a cursor, or `now` (default: 0)")
    follow.add_argument("--count", type=int, help="stop after this many changes")
    args = p.parse_args()

    if not args.url:
        p.error("--url (or TEND_API_URL) is required")
    token = args.token
    if token is None and args.home:
        with open(os.path.join(args.home, "api.token"), encoding="ascii") as f:
            token = f.read().strip()
    if not token:
        p.error("give --token, TEND_API_TOKEN or --home")
    client = Client(args.url, token)

    try:
        if args.command == "put":
            value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
            print(json.dumps(client.put(args.collection, args.key, value)))
        elif args.command == "get":
            value = client.get(args.collection, args.key)
            if value is None:
                print(f"{args.collection}/{args.key} is absent", file=sys.stderr)
                return 1
            sys.stdout.buffer.write(value)
        elif args.command == "follow":
            def opened():
                print(f"following changes since {args.since}", file=sys.stderr, flush=True)

            seen = 0
            for change in client.changes(since=args.since, on_open=opened):
                print(json.dumps(change), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
