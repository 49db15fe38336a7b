"""``python -m examples.service``: serve the app with uvicorn (settings from ``TIU_*``)."""

from __future__ import annotations

import os

import uvicorn

from examples.service.app import create_app


def main() -> None:
    host = os.environ.get("SERVICE_HOST", "127.0.0.1")
    port = int(os.environ.get("SERVICE_PORT", "8000"))
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


if __name__ == "__main__":
    main()
