"""Our CORS middleware against Starlette's, in process, around an app that does nothing.

What matters is the cost for requests without an Origin header (every non-browser client):

    .venv/bin/python bench/cors.py
"""

import asyncio
import sys
import time
from pathlib import Path

from starlette.middleware.cors import CORSMiddleware as StarletteCORS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usage_service.cors import CORSMiddleware  # noqa: E402


async def inner(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x"})


async def rx():
    return {"type": "http.request"}


async def tx(m):
    pass


scope = {
    "type": "http",
    "method": "GET",
    "path": "/api/usage/token",
    "headers": [(b"host", b"x"), (b"user-agent", b"y"), (b"authorization", b"Bearer sk-abc")],
}
oscope = dict(scope, headers=scope["headers"] + [(b"origin", b"https://d.example")])
apps = {
    "none": inner,
    "ours": CORSMiddleware(inner, origins=("*",), paths=frozenset({"/api/usage/token"})),
    "starlette": StarletteCORS(
        inner,
        allow_origins=["*"],
        allow_methods=["GET", "HEAD"],
        allow_headers=["authorization"],
        expose_headers=["ETag"],
        max_age=600,
    ),
}


async def main():
    for label, sc in (("no Origin", scope), ("with Origin", oscope)):
        for name, app in apps.items():
            best = 1e9
            for _ in range(5):
                t = time.process_time()
                for _ in range(50000):
                    await app(dict(sc), rx, tx)
                best = min(best, (time.process_time() - t) / 50000)
            print(f"{label:12} {name:10} {best * 1e6:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
