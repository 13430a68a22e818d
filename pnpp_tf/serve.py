"""Serves searches of a catalogue index over HTTP, with a page to search from in a browser.

    python -m pnpp_tf.serve --index=pictures.index            # then open http://127.0.0.1:8000/
    curl -F image=@photo.jpg -F k=5 http://127.0.0.1:8000/search
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/search?k=5'

The index and its model are opened once (`pnpp_tf.search.Searcher`); the endpoints are those of
`pnpp_tf.serving.service`. It listens on 127.0.0.1 unless --host says otherwise, and stops cleanly
on Ctrl+C (SIGINT) or SIGTERM: requests under way are answered, then it exits with status 0.
Needs the `serve` extra: pip install "pnpp_tf[serve]".
"""

import signal
import socket

from pnpp_tf import flags
from pnpp_tf.catalogue_config import ServeConfig
from pnpp_tf.errors import UserError


def main(config):
    try:
        import uvicorn  # pylint: disable=import-outside-toplevel
        from pnpp_tf.serving.service import make_app  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError(f"pnpp_tf.serve needs the serve extra ({error}): pip install 'pnpp_tf[serve]'.") from error
    from pnpp_tf.search import Searcher  # pylint: disable=import-outside-toplevel
    searcher = Searcher.from_config(config)
    app = make_app(searcher, max_upload_bytes=config.max_upload_bytes, max_pixels=config.max_pixels,
                   max_k=config.max_k, max_failure_queries=config.max_failure_queries)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on --host={config.host} --port={config.port}: {error}") from error
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"Serving {len(searcher.index)} images of {config.index} at http://{shown}:{port}/ "
          "(Ctrl+C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10))
    # uvicorn catches SIGINT and SIGTERM, finishes the requests under way, then raises the signal
    # again for the handler it found: these, so that a stop asked for is a clean exit (status 0).
    stopped = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: stopped.append(signal.Signals(number).name))
    server.run(sockets=[sock])
    print(f"Stopped{' by ' + stopped[0] if stopped else ''}.", flush=True)


if __name__ == "__main__":
    flags.run(main, ServeConfig, "pnpp_tf.serve")
