"""medseg-dashboard [RUNS_DIR] [--host=127.0.0.1] [--port=0] [--token=T]: serves the
dashboard over the runs under RUNS_DIR (default runs/) and prints its URL."""

import argparse
import ipaddress
import os
import secrets
import socket
import sys


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="medseg-dashboard", description="Serves the dashboard over the runs under "
      "RUNS_DIR (a web page on this machine) and prints its URL.")
  parser.add_argument("runs_dir", nargs="?", default="runs",
                      help="the directory of run workdirs (default: runs)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="the address to bind (default 127.0.0.1; any other needs a token)")
  parser.add_argument("--port", type=int, default=0, help="the port (default: a free one)")
  parser.add_argument("--token", default=None,
                      help="the access token every request must carry (default: none on "
                           "loopback, a generated one on any other address)")
  return parser.parse_args(argv)


def loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def main(argv: list[str] | None = None) -> None:
  args = parse(sys.argv[1:] if argv is None else argv)
  if not os.path.isdir(args.runs_dir):
    sys.exit(f"error: {args.runs_dir}: not a directory (the runs to show)")
  token = args.token or (None if loopback(args.host) else secrets.token_urlsafe(16))
  family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections wait in the backlog until the server takes them
  except OSError as e:
    sys.exit(f"error: --host={args.host} --port={args.port}: cannot bind ({e.strerror or e})")
  import uvicorn  # pylint: disable=import-outside-toplevel  (after the checks: a fast error)
  from medseg_jax.dashboard import server  # pylint: disable=import-outside-toplevel
  app = server.create_app(args.runs_dir, token)
  port = sock.getsockname()[1]
  shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
  print(f"medseg_jax dashboard of {os.path.abspath(args.runs_dir)}: "
        f"http://{shown}:{port}/" + (f"?token={token}" if token else ""), flush=True)
  config = uvicorn.Config(app, log_level="warning", access_log=False)
  uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
  main()
