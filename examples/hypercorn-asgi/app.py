"""A small ASGI app (no framework): GET / and a WebSocket echo on /ws.
Nothing in it knows about draining: the drain kit wraps it (serve.py).
The same app as examples/uvicorn-asgi."""

import json
import os


async def app(scope, receive, send):
    if scope["type"] == "http":
        body = json.dumps({"version": os.environ.get("ZDD_VERSION", "dev"),
                           "pid": os.getpid()}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
