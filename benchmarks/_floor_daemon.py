"""The floor under ``h3d serve``: a daemon on the same libraries that does nothing of h3d's.

What any daemon built on fastapi, SQLAlchemy's ORM and uvicorn does before a truthful first
answer, and no more: a FastAPI app with a sync ``/healthz`` and one POST route taking a
pydantic body (every daemon that takes data has one: FastAPI builds its model fields, which
imports ``pydantic.v1`` for a compatibility check), one ORM table in a SQLite file under
``$H3D_DATA_DIR`` (created when absent, checked with one query otherwise), uvicorn on a
pre-bound loopback socket, and ``daemon.json`` written once the lifespan has started, as h3d
does. No cyclic GC until the server is up, as ``h3d serve``. benchmarks/startup.py spawns it
and polls it exactly as it does ``h3d serve``.
"""

from __future__ import annotations

import gc

gc.disable()

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    loss: Mapped[float]


class RowIn(BaseModel):
    loss: float


def main() -> None:
    data = Path(os.environ["H3D_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{data / 'floor.db'}")
    Base.metadata.create_all(engine)  # one PRAGMA per table on an existing store
    with Session(engine) as s:
        s.scalar(select(func.count()).select_from(Row))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        (data / "daemon.json").write_text(json.dumps({"url": url}))
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/rows")
    def add(body: RowIn) -> dict[str, int]:
        with Session(engine) as s:
            s.add(Row(loss=body.loss))
            s.commit()
        return {"accepted": 1}

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            gc.freeze()
            gc.enable()

    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
